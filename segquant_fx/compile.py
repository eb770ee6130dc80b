"""``segquant_fx.compile``: quantize through the export path, then compile with Inductor.

::

    model --segquant_fx.quantize(calib, config)--> QuantizedModel (export ATen graph, segquant ops)
          --torch.compile(its graph module, backend=segquant's Inductor: quantize/dequantize
                          decomposed and fused, qlinear kept as an extern kernel)--> CompiledQuantizedModel

The result is called exactly like ``model`` (positional/keyword arguments, ``return_dict``: the
binding is :meth:`QuantizedModel.run_graph <segquant_fx.quantized.QuantizedModel.run_graph>`), and
exposes the :class:`~segquant_fx.quantized.QuantizedModel` behind it as ``.quantized`` (``.plan``,
``.report()``, ``.save()``, ``config`` ... are forwarded to it). With ``dynamic=True`` the dims the
export kept dynamic (batch, tokens, spatial) are dynamic from the first call and every other dim is
static (:func:`~segquant_fx.quantized.mark_export_dims`), so new resolutions never recompile.

Example::

    fast = segquant_fx.compile(model, calib_items, "w8a8", dynamic=True, fullgraph=True)
    out = fast(**inputs)  # first call compiles; new resolutions reuse the dynamic graph
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import Any

import torch

from segquant_fx.backend import make_backend
from segquant_fx.errors import ConfigError
from segquant_fx.quantized import QuantizedModel, _DtypeShortcuts

__all__ = ["compile", "CompiledQuantizedModel"]

_OWN = frozenset({"quantized", "_compiled", "_backend", "_compile_kwargs", "_dynamic", "training"})


class CompiledQuantizedModel(_DtypeShortcuts, torch.nn.Module):
    """A quantized model whose graph runs through ``torch.compile`` (Inductor).

    Args:
        quantized: The quantized model.
        backend: The Dynamo backend (``(gm, example_inputs) -> Callable``) to compile with.
        compile_kwargs: Further ``torch.compile`` arguments (``dynamic``, ``fullgraph`` ...).
    """

    def __init__(self, quantized: QuantizedModel, backend: Any, compile_kwargs: dict[str, Any]):
        super().__init__()
        self.quantized = quantized
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_compile_kwargs", dict(compile_kwargs))
        self._build()

    def _build(self) -> None:
        # dynamic=True: run_graph marks the dims the export kept dynamic and every other dim static
        object.__setattr__(self, "_dynamic", self._compile_kwargs.get("dynamic") is True)
        compiled = torch.compile(self.quantized.graph_module, backend=self._backend, **self._compile_kwargs)
        object.__setattr__(self, "_compiled", compiled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled graph with the float model's arguments."""
        return self.quantized.run_graph(self._compiled, args, kwargs, dynamic=self._dynamic)

    def to(self, *args: Any, **kwargs: Any) -> CompiledQuantizedModel:  # type: ignore[override]
        """Move/convert the quantized model (see ``QuantizedModel.to``); the next call recompiles."""
        self.quantized.to(*args, **kwargs)
        self._build()
        return self

    def train(self, mode: bool = True) -> CompiledQuantizedModel:  # type: ignore[override]
        """Set the flag only: the compiled graph is an inference graph."""
        self.training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN or name.startswith("__"):
                raise
            return getattr(self._modules["quantized"], name)

    def extra_repr(self) -> str:
        """Compile arguments, for ``print(model)``."""
        return ", ".join(f"{k}={v!r}" for k, v in self._compile_kwargs.items())


def compile(
    model: torch.nn.Module,
    calib: Iterable[Any] | None,
    config: Any = None,
    *,
    fuse: bool = True,
    progress: bool = True,
    **compile_kwargs: Any,
) -> CompiledQuantizedModel:
    """Quantize ``model`` with SegQuant and compile the result with Inductor.

    The whole flow: :func:`segquant_fx.quantize` captures the model with ``torch.export``, matches
    SegQuant patterns, calibrates on ``calib`` and rewrites every linear to ``torch.ops.segquant``
    ops; the rewritten graph is then compiled with ``torch.compile`` through the segquant backend
    (:mod:`segquant_fx.backend`): Inductor, with quantize/dequantize (and SmoothQuant division)
    decomposed into elementwise ops that it fuses into the neighbouring kernels, while
    ``segquant::qlinear`` stays our GEMM kernel (extern call).

    Args:
        model: A float ``nn.Module``, or a :class:`~segquant_fx.quantized.QuantizedModel` (then
            ``calib`` and ``config`` are ignored and only the compile step runs).
        calib: Calibration items, as for :func:`segquant_fx.quantize` (kwargs dicts keyed by the
            forward's parameter names, positional tuples, or ``(args, kwargs)``).
        config: Quantization config or preset name (default ``"w8a8"``).
        fuse: Let Inductor fuse quantize/dequantize (False: every segquant op is an extern call).
        progress: Show progress bars while quantizing.
        **compile_kwargs: ``torch.compile`` arguments: ``dynamic``, ``fullgraph``, ``mode``,
            ``options`` (Inductor config patches) ... (``backend`` is fixed).

    Returns:
        A :class:`CompiledQuantizedModel`, called like ``model``. The first call compiles.

    Raises:
        ConfigError: ``backend`` was passed, a bad option, or a bad config.
        CaptureError / CalibrationError: As :func:`segquant_fx.quantize`.

    Example:
        >>> import torch, segquant_fx
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> fast = segquant_fx.compile(m, [(torch.randn(4, 16),)], "w8a8", progress=False)
        >>> fast(torch.randn(4, 16)).shape  # doctest: +SKIP
        torch.Size([4, 8])
    """
    if "backend" in compile_kwargs:
        raise ConfigError(
            "segquant_fx.compile always compiles with the segquant Inductor backend; to use another backend, "
            "call torch.compile(segquant_fx.quantize(...), backend=...) instead"
        )
    options = compile_kwargs.pop("options", None)
    mode = compile_kwargs.pop("mode", None)
    if isinstance(model, QuantizedModel):
        qmodel = model
    else:
        from segquant_fx.api import quantize

        if calib is None:
            raise ConfigError(
                "segquant_fx.compile needs calibration items to quantize a float model (calib=None)"
            )
        qmodel = quantize(
            model, calib, config, dynamic=compile_kwargs.get("dynamic") is not False, progress=progress
        )
    backend = make_backend(fuse=fuse, mode=mode, inductor_options=options)
    return CompiledQuantizedModel(qmodel, backend, compile_kwargs)


class _CallableModule(types.ModuleType):
    """Makes ``segquant_fx.compile`` callable even when it resolves to this module.

    ``segquant_fx.compile`` names both this module and its function; importing the module first
    (``import segquant_fx.compile``) makes the package attribute the module.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> CompiledQuantizedModel:
        return compile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
