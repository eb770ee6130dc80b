"""Registration of the ``torch.ops.segquant`` op set with the PyTorch dispatcher.

Importing this module (``import segquant_fx.ops`` does) defines every schema in the ``segquant``
namespace, registers a fake (meta) kernel for each op so that ``torch.export`` and
``torch.compile`` trace them as single opaque nodes, and registers the pure-PyTorch reference
kernels of :mod:`segquant_fx.ops.reference`:

* ``CPU``: always the reference.
* ``CUDA``: a small dispatcher that follows :mod:`~segquant_fx.ops.kernel_preference`. It runs the
  implementation installed with :func:`register_cuda_impl` when there is one, else the reference
  (one warning per process under ``AUTO``; :class:`~segquant_fx.errors.KernelUnavailableError`
  under ``CUDA``).

Hook for compiled kernels: a module named :data:`CUDA_KERNELS_MODULE`, if it exists, is imported
on the first CUDA call; it is expected to load the kernel library and call
:func:`register_cuda_impl` for every op it implements. A missing module, or one that fails to
import (for example because the shared library is absent), means the reference path with one
warning, never a crash.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from segquant_fx.errors import ConfigError, KernelUnavailableError
from segquant_fx.ops import reference as _ref
from segquant_fx.ops.kernel_preference import KernelPreference, get_kernel_preference

__all__ = [
    "NAMESPACE",
    "SCHEMAS",
    "CUDA_KERNELS_MODULE",
    "register_cuda_impl",
    "has_cuda_impl",
]

#: The one op namespace.
NAMESPACE = "segquant"

#: Module imported on the first CUDA call; it registers compiled implementations.
CUDA_KERNELS_MODULE = "segquant_fx.ops.cuda_kernels"

#: Schema of every op, keyed by op name (the contract; see ``README.md`` beside this file).
SCHEMAS: dict[str, str] = {
    "quantize": (
        "quantize(Tensor x, Tensor scale, SymInt[] segments, str qtype, Tensor? smooth=None) -> Tensor"
    ),
    "dequantize": (
        "dequantize(Tensor q, Tensor scale, SymInt[] segments, str qtype, ScalarType out_dtype) -> Tensor"
    ),
    "quantize_dynamic": (
        "quantize_dynamic(Tensor x, SymInt[] segments, str qtype, Tensor? smooth=None) -> (Tensor, Tensor)"
    ),
    "quantize_dual": (
        "quantize_dual(Tensor x, Tensor scale_pos, Tensor scale_neg, SymInt[] segments, str qtype, "
        "Tensor? smooth=None) -> Tensor"
    ),
    "qlinear": (
        "qlinear(Tensor qx, Tensor x_scale, SymInt[] x_segments, str x_qtype, Tensor qw, Tensor w_scale, "
        "SymInt[] w_segments, str w_qtype, Tensor? bias, bool dual, ScalarType out_dtype) -> Tensor"
    ),
    "fake_quantize": (
        "fake_quantize(Tensor x, Tensor scale, SymInt[] segments, str qtype, Tensor? smooth=None) -> Tensor"
    ),
    "fake_quantize_dual": (
        "fake_quantize_dual(Tensor x, Tensor scale_pos, Tensor scale_neg, SymInt[] segments, str qtype, "
        "Tensor? smooth=None) -> Tensor"
    ),
}

_REFERENCE: dict[str, Callable[..., Any]] = {
    "quantize": _ref.reference_quantize,
    "dequantize": _ref.reference_dequantize,
    "quantize_dynamic": _ref.reference_quantize_dynamic,
    "quantize_dual": _ref.reference_quantize_dual,
    "qlinear": _ref.reference_qlinear,
    "fake_quantize": _ref.reference_fake_quantize,
    "fake_quantize_dual": _ref.reference_fake_quantize_dual,
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name in _ref.OP_NAMES:
    _lib.define(SCHEMAS[_name], tags=(torch.Tag.pt2_compliant_tag,))


# --------------------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------------------


@torch.library.register_fake("segquant::quantize", lib=_lib)
def _quantize_fake(x, scale, segments, qtype, smooth=None):
    _, info, shape = _ref.infer_quantize(x, scale, segments, qtype, smooth)
    return x.new_empty(shape, dtype=info.storage_dtype)


@torch.library.register_fake("segquant::dequantize", lib=_lib)
def _dequantize_fake(q, scale, segments, qtype, out_dtype):
    _, _, shape = _ref.infer_dequantize(q, scale, segments, qtype, out_dtype)
    return q.new_empty(shape, dtype=out_dtype)


@torch.library.register_fake("segquant::quantize_dynamic", lib=_lib)
def _quantize_dynamic_fake(x, segments, qtype, smooth=None):
    _, info, q_shape, s_shape = _ref.infer_quantize_dynamic(x, segments, qtype, smooth)
    return x.new_empty(q_shape, dtype=info.storage_dtype), x.new_empty(s_shape, dtype=torch.float32)


@torch.library.register_fake("segquant::quantize_dual", lib=_lib)
def _quantize_dual_fake(x, scale_pos, scale_neg, segments, qtype, smooth=None):
    _, info, shape = _ref.infer_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth)
    return x.new_empty(shape, dtype=info.storage_dtype)


@torch.library.register_fake("segquant::qlinear", lib=_lib)
def _qlinear_fake(qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype):
    spec = _ref.infer_qlinear(
        qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype
    )
    return qx.new_empty(spec.out_shape, dtype=out_dtype)


@torch.library.register_fake("segquant::fake_quantize", lib=_lib)
def _fake_quantize_fake(x, scale, segments, qtype, smooth=None):
    _ref.infer_quantize(x, scale, segments, qtype, smooth, op="segquant::fake_quantize")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("segquant::fake_quantize_dual", lib=_lib)
def _fake_quantize_dual_fake(x, scale_pos, scale_neg, segments, qtype, smooth=None):
    _ref.infer_quantize_dual(
        x, scale_pos, scale_neg, segments, qtype, smooth, op="segquant::fake_quantize_dual"
    )
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# real kernels: reference on CPU, preference-driven dispatch on CUDA
# --------------------------------------------------------------------------------------------------

_CUDA_IMPLS: dict[str, Callable[..., Any]] = {}
_cuda_module_tried = False
_cuda_module_error: str | None = None
_fallback_warned = False


def _op_name(op_name: str) -> str:
    name = op_name.removeprefix(f"{NAMESPACE}::").split(".")[0]
    if name not in _REFERENCE:
        raise ConfigError(f"unknown segquant op {op_name!r}; use one of {', '.join(_ref.OP_NAMES)}")
    return name


def register_cuda_impl(op_name: str, fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Install the compiled CUDA implementation of one op (or remove it with ``fn=None``).

    The implementation takes the op's arguments positionally in schema order (tensors on one CUDA
    device) and returns what the schema returns, matching ``README.md``: same shapes, dtypes and
    contiguous layout as the reference. It is used for CUDA tensors under
    ``KernelPreference.AUTO`` and ``CUDA``; ``REFERENCE`` bypasses it.

    Args:
        op_name: ``"qlinear"`` or ``"segquant::qlinear"`` (any op of :data:`SCHEMAS`).
        fn: The implementation, or None to fall back to the reference again.

    Returns:
        The implementation previously installed for this op, or None.

    Raises:
        ConfigError: unknown op, or ``fn`` is neither callable nor None.
    """
    name = _op_name(op_name)
    if fn is not None and not callable(fn):
        raise ConfigError(f"register_cuda_impl: fn for {name!r} must be callable or None, got {fn!r}")
    previous = _CUDA_IMPLS.pop(name, None)
    if fn is not None:
        _CUDA_IMPLS[name] = fn
    return previous


def has_cuda_impl(op_name: str) -> bool:
    """Whether a compiled CUDA implementation of ``op_name`` is installed (tries the hook once)."""
    name = _op_name(op_name)
    _try_cuda_module()
    return name in _CUDA_IMPLS


def _try_cuda_module() -> None:
    global _cuda_module_tried, _cuda_module_error
    if _cuda_module_tried:
        return
    _cuda_module_tried = True
    try:
        importlib.import_module(CUDA_KERNELS_MODULE)
    except ModuleNotFoundError as e:
        if e.name != CUDA_KERNELS_MODULE:
            _cuda_module_error = f"importing {CUDA_KERNELS_MODULE} failed: {e}"
        else:
            _cuda_module_error = f"{CUDA_KERNELS_MODULE} is not installed"
    except Exception as e:  # a broken kernel library must degrade to the reference, never crash
        _cuda_module_error = f"importing {CUDA_KERNELS_MODULE} failed: {type(e).__name__}: {e}"


def _select_cuda(name: str) -> Callable[..., Any]:
    global _fallback_warned
    preference = get_kernel_preference()
    if preference is KernelPreference.REFERENCE:
        return _REFERENCE[name]
    _try_cuda_module()
    impl = _CUDA_IMPLS.get(name)
    if impl is not None:
        return impl
    reason = _cuda_module_error or "no implementation was registered with register_cuda_impl"
    if preference is KernelPreference.CUDA:
        raise KernelUnavailableError(
            f"segquant::{name}: KernelPreference.CUDA asks for the compiled CUDA kernel, but it is not "
            f"available ({reason}); build the kernels, or use KernelPreference.AUTO/REFERENCE"
        )
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"segquant::{name}: no compiled CUDA kernel ({reason}); using the pure-PyTorch reference "
            f"kernels for CUDA tensors (slow). This warning is shown once.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _REFERENCE[name]


def _make_cuda_kernel(name: str) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        return _select_cuda(name)(*args)

    kernel.__name__ = f"{name}_cuda"
    kernel.__qualname__ = kernel.__name__
    return kernel


for _name in _ref.OP_NAMES:
    _lib.impl(_name, _REFERENCE[_name], "CPU")
    _lib.impl(_name, _make_cuda_kernel(_name), "CUDA")
del _name
