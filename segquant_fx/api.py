"""``quantize()``: the end-to-end flow, in one documented entry point.

::

    model --capture--> exported graph (un-decomposed ATen, dynamic batch/tokens)
          --find_patterns--> per-linear matches (SegLinear segments, DualScale)
          --AnnotatePass(config)--> frozen LinearAnnotation per quantized linear
          --calibrate(interpreter over calib items)--> per input tensor: channel extremes, and what
                the optimizers need (row reservoir, histograms, GPTQ Hessian); ONE pass over the items
          --optimize--> smoothing (alpha search), SVD branch, GPTQ / round-to-nearest, act scales
          --QuantizeRewritePass--> torch.ops.segquant.* calls, quantized weights/scales as buffers
          --> QuantizedModel (called like the float model)
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import itertools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from segquant_fx.capture import capture, normalize_example
from segquant_fx.config import QuantizeConfig, check_supported
from segquant_fx.distributed import calibrate_sharded, map_items, resolve_distributed
from segquant_fx.errors import CalibrationError, ConfigError
from segquant_fx.optim.pipeline import optimize
from segquant_fx.optim.search import SearchState
from segquant_fx.passes.annotate import AnnotatePass, annotations
from segquant_fx.passes.base import run_passes
from segquant_fx.passes.calibrate import calibrate
from segquant_fx.passes.rewrite import QuantizeRewritePass
from segquant_fx.patterns import PATTERNS
from segquant_fx.quantized import QuantizedModel, prepare_graph_module
from segquant_fx.report import find_patterns

__all__ = [
    "quantize",
    "load",
    "prepare",
    "calibrate_and_finish",
    "finish",
    "Prepared",
    "SUPPORTED_OPT",
    "SUPPORTED_CALIB",
]

#: Optimizers and calibrators this version implements (others raise a clear ConfigError).
SUPPORTED_OPT = frozenset({"default", "smooth", "svd"})
SUPPORTED_CALIB = frozenset({"amax", "percentile", "mse", "gptq"})


def _has_tensor(v: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))


def _plain_attributes(model: torch.nn.Module) -> dict[str, Any]:
    """Attributes pipelines read (``config`` and other plain values), never tensors or modules."""
    out = {}
    for k, v in vars(model).items():
        if k.startswith("_") or k == "training" or isinstance(v, (torch.nn.Module, torch.Tensor)):
            continue
        if callable(v) and not hasattr(v, "keys"):
            continue
        out[k] = v
    cfg = getattr(model, "config", None)  # diffusers: a property over _internal_dict
    if cfg is not None and not isinstance(cfg, (torch.nn.Module, torch.Tensor)):
        out["config"] = cfg
    return out


def _first_and_rest(items: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError("the calibration set is empty: pass at least one item (kwargs dict or args tuple)") from None
    if it is items:  # a one-shot iterator: put the first item back
        return first, itertools.chain([first], it)
    return first, items


def _unbatch(item: Any) -> Any:
    """DataLoader batches built with a list collate hold one item: unwrap ``[item]``."""
    if isinstance(item, list) and len(item) == 1 and isinstance(item[0], (dict, tuple)):
        return item[0]
    return item


def _plan_entry(ann: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    shapes = {k: list(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return {
        "patterns": list(ann.plan.patterns),
        "act": ann.act_qtype or "none",
        "act_dynamic": ann.act_dynamic,
        "weight": ann.weight_qtype,
        "weight_granularity": ann.weight_granularity,
        "weight_group_size": ann.weight_group_size,
        "in_segments": list(ann.in_segments),
        "out_segments": list(ann.out_segments),
        "dual": ann.dual,
        "dual_segments": list(ann.dual_segments) if ann.dual_segments is not None else None,
        "smooth_alpha": ann.smooth_alpha,
        "alpha_search": ann.search is not None,
        "smooth_groups": list(ann.smooth_groups),
        "low_rank": ann.low_rank,
        "calib": ann.calib.type,
        "real_quant": ann.real_quant,
        "in_features": ann.in_features,
        "out_features": ann.out_features,
        "tensor_shapes": shapes,
    }


def quantize(
    model: torch.nn.Module,
    calib_data_loader: Iterable[Any],
    config: QuantizeConfig | dict[str, Any] | str | None = None,
    verbose: bool = False,
    example: Any = None,
    *,
    dynamic: bool = True,
    progress: bool = True,
    max_items: int | None = None,
    search_state: str | os.PathLike[str] | None = None,
    distributed: Any = None,
) -> QuantizedModel:
    """Quantize ``model`` with SegQuant (SegLinear + DualScale) and return a :class:`QuantizedModel`.

    The float model is not modified. The result is called exactly like ``model``.

    Args:
        model: Any ``nn.Module`` (diffusers ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
            ``UNet2DConditionModel``, ControlNets, or your own).
        calib_data_loader: Iterable of calibration items: kwargs dicts keyed by forward's parameter
            names, positional tuples, or ``(args, kwargs)``. Streamed once; not kept in memory.
        config: A :class:`~segquant_fx.config.QuantizeConfig`, the seed's dict format, or a preset name
            (``w8a8`` (default), ``w8a8-fp8``, ``w8a8-dynamic``, ``w8a16``, ``w4a16``, ``w4a8``,
            ``w4a4``, and the paper's baselines ``baseline-w8a8``, ``ptq4dit-w8a8``,
            ``smooth-plus-w8a8``, ``svdquant-w4a8``, ``svdquant-w4a4``, ``segquant-a-w8a8``,
            ``segquant-g-w8a8``).
        verbose: Print the pattern report and the quantized-layer table.
        example: Inputs used to capture the graph (default: the first calibration item).
        dynamic: Keep batch/token/spatial dims dynamic in the captured graph.
        progress: Show tqdm progress bars.
        max_items: Use at most this many calibration items.
        search_state: JSON file of the alpha search (overrides ``search_alpha_config.state_file``):
            evaluated points found there are skipped, new ones are written after every layer.
        distributed: Share the calibration items among the processes of a ``torch.distributed``
            group (``torchrun``): None (automatic: when it is initialized with several processes),
            True, False, or a ``ProcessGroup``. Every process passes the same model, items and config;
            each calibrates its share, the statistics are reduced, and every process returns the
            model a single process would (bit-identical except GPTQ's Hessian summation order; see
            :mod:`segquant_fx.distributed`). Only process 0 writes the alpha-search state.

    Returns:
        The quantized model; ``.plan`` and ``.report()`` describe every quantized layer,
        ``.meta["optimizer"]`` what the optimizers chose (alphas per segment, GPTQ damping) and
        ``.meta["timings"]`` the seconds per phase.

    Raises:
        ConfigError: Bad config, or an optimizer/calibrator that is not available yet.
        CaptureError: The model cannot be captured.
        CalibrationError: Empty or mismatched calibration data, or non-finite activations.

    Example:
        >>> import torch
        >>> from segquant_fx import quantize
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
        >>> calib = [(torch.randn(4, 16),) for _ in range(4)]
        >>> q = quantize(m, calib, "w8a8", progress=False)
        >>> q(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"quantize() needs an nn.Module, got {type(model).__name__}")
    cfg = QuantizeConfig.coerce(config, known_patterns=PATTERNS)
    check_supported(cfg, SUPPORTED_OPT, SUPPORTED_CALIB)

    ctx = resolve_distributed(distributed)
    t0 = time.perf_counter()
    first, items = _first_and_rest(calib_data_loader)
    items = map_items(_unbatch, items)  # keeps len / indexing: a process reads only its share
    try:
        prepared = prepare(model, _unbatch(first) if example is None else example, cfg, dynamic=dynamic)
    except Exception as e:
        if ctx is not None:  # the others are waiting in calibrate_and_finish's first check
            ctx.sync("quantize", error=e)
        raise
    qmodel = calibrate_and_finish(
        prepared,
        items,
        progress=progress,
        max_items=max_items,
        search_state=search_state,
        timings={"prepare": time.perf_counter() - t0},
        distributed=ctx if ctx is not None else False,  # None would mean "automatic" again
    )
    if verbose:
        print(prepared.report.to_markdown())
        print(qmodel.report())
    return qmodel


def _state_file(prepared: Prepared, search_state: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    if search_state is not None:
        return search_state
    for ann in annotations(prepared.gm).values():
        if ann.search is not None and ann.search.state_file is not None:
            return ann.search.state_file
    return None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def calibrate_and_finish(
    prepared: Prepared,
    items: Iterable[Any],
    *,
    progress: bool = True,
    max_items: int | None = None,
    search_state: str | os.PathLike[str] | SearchState | None = None,
    timings: dict[str, float] | None = None,
    distributed: Any = None,
) -> QuantizedModel:
    """The back half of :func:`quantize`: one calibration pass, the optimizers, the rewrite.

    Args:
        prepared: From :func:`prepare`.
        items: Calibration items (streamed once).
        progress: Show progress bars.
        max_items: Use at most this many items.
        search_state: Alpha-search state: a JSON path (resumed and written) or a
            :class:`~segquant_fx.optim.search.SearchState`; default ``search_alpha_config.state_file``.
        timings: Phase timings measured before (added to ``meta["timings"]``).
        distributed: As in :func:`quantize` (``items`` is then the whole set, in every process).

    Returns:
        The quantized model.
    """
    ctx = resolve_distributed(distributed)
    timings = dict(timings or {})
    t = time.perf_counter()
    extra: dict[str, Any] = {}
    if ctx is None:
        observers, n_items = calibrate(
            prepared.gm, items, prepared.signature, prepared.constants, progress=progress, max_items=max_items
        )
    else:
        observers, n_items, per_process = calibrate_sharded(
            ctx, prepared, items, progress=progress, max_items=max_items
        )
        progress = progress and ctx.is_root
        extra["distributed"] = {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "items_per_process": per_process,
        }
    _sync()
    timings["calibrate"] = time.perf_counter() - t
    state = search_state if isinstance(search_state, SearchState) else SearchState(_state_file(prepared, search_state))
    if ctx is not None and not ctx.is_root and state.path is not None:
        state = copy.copy(state)  # the same resumed points; only process 0 writes the file
        state.path = None
    t = time.perf_counter()
    if ctx is not None:  # everyone has read the state file before process 0 rewrites it
        ctx.sync("quantize: alpha-search state")
    error: BaseException | None = None
    try:
        tensors, report = optimize(prepared.gm, observers, search_state=state, progress=progress)
    except Exception as e:
        if ctx is None:
            raise
        error = e
    if ctx is not None:
        ctx.sync("quantize: optimizers", error=error)
    del observers
    _sync()
    timings["optimize"] = time.perf_counter() - t
    t = time.perf_counter()
    qmodel = finish(
        prepared,
        QuantizeRewritePass(precomputed=tensors, progress=progress),
        extra_meta={"calibration_items": n_items, "optimizer": report.to_dict(), **extra},
    )
    timings["rewrite"] = time.perf_counter() - t
    qmodel.meta["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return qmodel


@dataclass
class Prepared:
    """A captured, pattern-matched, annotated graph, ready for calibration and rewriting."""

    model: torch.nn.Module
    gm: torch.fx.GraphModule
    config: QuantizeConfig
    signature: inspect.Signature | None
    constants: dict[str, Any]
    example_kwargs: dict[str, Any]
    report: Any
    annotate: AnnotatePass


def prepare(model: torch.nn.Module, example: Any, cfg: QuantizeConfig, *, dynamic: bool = True) -> Prepared:
    """Capture ``model`` on ``example``, match patterns and annotate (no calibration yet).

    Raises:
        ConfigError: If the config enables no linear layer.
    """
    args, kwargs = normalize_example(example)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    if signature is not None and args:
        try:
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            args = ()
        except TypeError:
            pass
    cm = capture(model, (args, kwargs) if args else kwargs, dynamic=dynamic)
    gm = prepare_graph_module(cm.exported.module())
    layer_names = _linear_names(model)
    patterns = sorted({p for lc in [cfg.default, *(cfg.layer_config(n) for n in layer_names)] for p in lc.search_patterns})
    report = find_patterns(gm, patterns=patterns)
    annotate = AnnotatePass(cfg, report.node_matches)
    gm = run_passes(gm, [annotate])
    if not annotations(gm):
        raise ConfigError("no linear layer is enabled by the config: check 'enable' in the default entry and globs")
    constants = {k: v for k, v in cm.example_kwargs.items() if not _has_tensor(v) and k != "return_dict"}
    if signature is not None:  # arguments the example left out were captured at their defaults
        for name, p in signature.parameters.items():
            if (
                name not in constants
                and name not in cm.example_kwargs
                and name != "return_dict"
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is not inspect.Parameter.empty
                and not _has_tensor(p.default)
            ):
                constants[name] = p.default
    return Prepared(model, gm, cfg, signature, constants, dict(cm.example_kwargs), report, annotate)


def finish(prepared: Prepared, rewrite: QuantizeRewritePass, extra_meta: dict[str, Any] | None = None) -> QuantizedModel:
    """Rewrite the annotated graph and wrap it as a :class:`QuantizedModel`."""
    anns = annotations(prepared.gm)
    gm = run_passes(prepared.gm, [rewrite])
    plan = {ann.module: _plan_entry(ann, rewrite.layer_tensors.get(ann.module, {})) for ann in anns.values()}
    _set_linear_widths(gm, anns)
    model = prepared.model
    cls = type(model)
    mcfg = getattr(model, "config", None)
    meta = {
        "segquant_fx": _version("segquant-fx"),
        "torch": torch.__version__,
        "config": prepared.config.to_dict(),
        "skipped": dict(prepared.annotate.skipped),
        "model_config": dict(mcfg) if hasattr(mcfg, "keys") else None,
        "example_kwargs": prepared.example_kwargs,
        **(extra_meta or {}),
    }
    return QuantizedModel(
        gm,
        signature=prepared.signature,
        constants=prepared.constants,
        plan=plan,
        attributes=_plain_attributes(model),
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        meta=meta,
    )


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _set_linear_widths(gm: torch.fx.GraphModule, anns: dict[str, Any]) -> None:
    """Give the graph's (plain) linear owner modules ``in_features``/``out_features`` (pipelines read them)."""
    for ann in anns.values():
        try:
            mod = gm.get_submodule(ann.module)
        except AttributeError:
            continue
        mod.in_features = ann.in_features
        mod.out_features = ann.out_features


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load(path: str, model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> QuantizedModel:
    """Load a quantized model saved with ``QuantizedModel.save`` (see :mod:`segquant_fx.serialization`).

    Args:
        path: The save directory.
        model: A float model of the same architecture; needed only for classes outside ``diffusers``.
        device: Where to put the loaded model.
    """
    from segquant_fx.serialization import load_quantized

    return load_quantized(path, model=model, device=device)
