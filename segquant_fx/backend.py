"""The ``"segquant"`` ``torch.compile`` backend: quantize Dynamo graphs with SegQuant, compile with Inductor.

The name ``"segquant"`` needs no import: the package declares it as a ``torch_dynamo_backends`` entry
point, which ``torch.compile`` looks up (and loads this module from) when it meets an unknown backend
name. Importing this module also registers it, for source trees that are not installed::

    # 1. an already quantized model: compiled with Inductor, quantize/dequantize fused
    fast = torch.compile(qmodel, backend="segquant", dynamic=True)

    # 2. a float model: every graph Dynamo hands over is quantized, then compiled with Inductor
    fast = torch.compile(model, backend="segquant", options={"calib": items, "config": "w8a8"})

The backend follows the Dynamo contract exactly: :func:`make_backend` is a factory returning a
``(gm, example_inputs) -> Callable`` compiler, and the registered ``segquant`` function builds one
from ``options`` (``torch.compile`` passes ``options=`` and ``mode=`` to custom backends).

Options (everything else in ``options`` is an Inductor config patch, e.g. ``"max_autotune": True``):

* ``calib``: calibration data for float models: an iterable of items keyed like the compiled
  function's arguments (kwargs dicts, positional tuples or ``(args, kwargs)``, as for
  :func:`segquant_fx.quantize`), or an int ``N`` (calibrate on the first ``N`` calls, see below).
  Iterators are read once and kept.
* ``config``: a :class:`~segquant_fx.config.QuantizeConfig`, its dict form or a preset name
  (default ``"w8a8"``).
* ``calib_calls``: how many calls a graph that cannot be mapped to ``calib`` records (default 1).
* ``fuse``: decompose quantize/dequantize into ATen elementwise ops so Inductor fuses them
  (default True); False keeps every ``segquant`` op as an extern kernel call.

What the backend does with a graph Dynamo hands over:

1. **Already quantized** (the graph holds ``torch.ops.segquant.*`` calls, e.g. ``torch.compile(qmodel)``
   or :func:`segquant_fx.compile`): compile with Inductor. Both paths compile the quantized graph
   module's frame (``QuantizedModel.forward`` binds the arguments outside the trace) with the dims
   the export kept dynamic marked dynamic and every other dim static under ``dynamic=True``, so new
   resolutions do not recompile (:func:`segquant_fx.quantized.mark_export_dims` says why).
2. **Float, with linears**: re-capture with the project's one capture routine
   (:func:`segquant_fx.capture`, i.e. ``torch.export`` of a module built from Dynamo's graph), so
   patterns are matched in one IR only (export ATen). Module parameters and buffers (Dynamo lifts
   them to graph inputs) become attributes again under their original names, so ``aten.linear``
   reads its weight through ``get_attr`` and the per-layer config globs (``"*.proj_out"``) see the
   model's module names; sizes Dynamo passes as ``SymInt`` inputs become ``sym_size`` calls.
   Dims Dynamo kept dynamic stay dynamic in the export. The module is then quantized with
   :func:`segquant_fx.quantize`, the quantized graph is compiled with Inductor (a nested
   ``torch.compile(fullgraph=True)``), and the callable returned to Dynamo feeds it the inputs.
3. **Float, without linears**: plain Inductor.

**Calibration inside the backend.** A backend sees one graph and its example inputs, never the model
or the calibration set, so each graph is calibrated on its own inputs:

* *Graphs whose inputs are the compiled function's arguments* (the whole forward when nothing
  breaks the graph; the first graph otherwise): each ``calib`` item is bound to the function's
  parameters and mapped to the graph's placeholders through the input *sources* Dynamo records
  (``L['hidden_states']``, ``L['x'].size()[0]``, ``L['added_cond_kwargs']['time_ids']``).
  Placeholders read from module state or globals keep the value Dynamo compiled with. The graph is
  quantized at compile time, so the first call already runs quantized.
* *Graphs after a graph break* (Dynamo's ``torch_dynamo_resume_in_*`` functions) take intermediate
  values that no calibration item determines. They are calibrated on the inputs they receive at their
  first ``calib_calls`` calls; the first of those is the call that triggered compilation (Dynamo's
  example inputs), so with the default ``calib_calls=1`` the graph is quantized right away on the
  activations of that call. With ``calib_calls=N > 1`` the graph runs in float for its first ``N - 1``
  calls while recording, then switches to the quantized, compiled graph. A one-time warning says so.
* With ``calib=N`` (an int) every graph uses the second rule with ``calib_calls=N``.
* Each graph is quantized separately with the inputs it sees, so a graph break splits SegQuant
  patterns that straddle it (for example a linear before the break feeding a ``chunk`` after it) and
  every recompilation re-quantizes its graph. For one consistent model, remove graph breaks or
  quantize ahead of time with :func:`segquant_fx.quantize` / :func:`segquant_fx.compile`.

**Fusion.** Inductor treats a custom op with a fake kernel as an extern kernel call, so by default
quantize/dequantize would be separate passes over memory. The backend passes Inductor a
decomposition table (:func:`quant_decompositions`) that rewrites ``segquant::quantize``,
``quantize_dual``, ``quantize_dynamic``, ``dequantize``, ``fake_quantize`` and
``fake_quantize_dual`` into ATen elementwise/reduction ops that follow the op contract exactly
(float32, IEEE division, round-half-even, saturating casts; int4 packing), so Inductor fuses
SmoothQuant division and quantization into the producer of the activation (LayerNorm/modulation,
GELU/SiLU, residual adds) and writes int8/fp8 directly. The table is only used by this backend:
eager execution, ``torch.export`` and other backends keep the ops as single nodes (the table cannot be
a ``CompositeImplicitAutograd`` kernel because the ops already have CPU/CUDA kernels).
``segquant::qlinear`` is never decomposed: the GEMMs stay our kernels (CUTLASS on CUDA).
"""

from __future__ import annotations

import collections.abc
import functools
import hashlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from segquant_fx import ops as _ops  # noqa: F401 - registers torch.ops.segquant
from segquant_fx.errors import CalibrationError, ConfigError
from segquant_fx.ops import reference as _ref
from segquant_fx.quantized import export_dynamic_dims, mark_export_dims

__all__ = [
    "BACKEND_NAME",
    "BACKEND_OPTIONS",
    "make_backend",
    "segquant_backend",
    "quant_decompositions",
    "inductor_compiler",
    "is_quantized_graph",
    "without_export_guards",
    "copy_graph",
]

#: Name the backend is registered under.
BACKEND_NAME = "segquant"

#: Option keys the backend reads itself; every other key is an Inductor config patch.
BACKEND_OPTIONS = frozenset({"calib", "config", "calib_calls", "fuse"})

_SEGQUANT = "segquant"
_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)


# --------------------------------------------------------------------------------------------------
# decompositions: quantize / dequantize as ATen elementwise ops (Inductor fuses them)
# --------------------------------------------------------------------------------------------------


def _expand_scale(scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """float32 scale broadcastable to ``[*lead, K]`` without data-dependent ops (traceable)."""
    s = scale.to(torch.float32)
    if s.dim() == 0 or s.shape[-1] == 1 or len(sizes) == 1:
        return s
    lead = s.shape[:-1]
    return torch.cat([s.narrow(-1, i, 1).expand(*lead, n) for i, n in enumerate(sizes)], dim=-1)


def _d_quantize(x, scale, segments, qtype, smooth=None):
    sizes, info, _ = _ref.infer_quantize(x, scale, segments, qtype, smooth)
    v = _ref._prepare(x, smooth) / _expand_scale(scale, sizes)
    return _ref._to_storage(_ref._to_grid(v, info, info.qmin, info.qmax), info)


def _d_dequantize(q, scale, segments, qtype, out_dtype):
    sizes, info, _ = _ref.infer_dequantize(q, scale, segments, qtype, out_dtype)
    v = _ref._from_storage(q, info).to(torch.float32) * _expand_scale(scale, sizes)
    return v.to(out_dtype)


def _d_fake_quantize(x, scale, segments, qtype, smooth=None):
    sizes, info, _ = _ref.infer_quantize(x, scale, segments, qtype, smooth, op="segquant::fake_quantize")
    s = _expand_scale(scale, sizes)
    q = _ref._to_grid(_ref._prepare(x, smooth) / s, info, info.qmin, info.qmax)
    return (q.to(torch.float32) * s).to(x.dtype)


def _dual_grids(x, scale_pos, scale_neg, sizes, info, smooth):
    v = _ref._prepare(x, smooth)
    sp, sn = _expand_scale(scale_pos, sizes), _expand_scale(scale_neg, sizes)
    pos = _ref._to_grid(v.clamp(min=0) / sp, info, 0.0, info.qmax)
    neg = _ref._to_grid(v.clamp(max=0) / sn, info, info.qmin, 0.0)
    return pos, neg, sp, sn


def _d_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth=None):
    sizes, info, _ = _ref.infer_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth)
    pos, neg, _, _ = _dual_grids(x, scale_pos, scale_neg, sizes, info, smooth)
    return torch.cat([_ref._to_storage(pos, info), _ref._to_storage(neg, info)], dim=-1)


def _d_fake_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth=None):
    sizes, info, _ = _ref.infer_quantize_dual(
        x, scale_pos, scale_neg, segments, qtype, smooth, op="segquant::fake_quantize_dual"
    )
    pos, neg, sp, sn = _dual_grids(x, scale_pos, scale_neg, sizes, info, smooth)
    return (pos.to(torch.float32) * sp + neg.to(torch.float32) * sn).to(x.dtype)


def _d_quantize_dynamic(x, segments, qtype, smooth=None):
    sizes, info, _, _ = _ref.infer_quantize_dynamic(x, segments, qtype, smooth)
    v = _ref._prepare(x, smooth)
    scale = _ops.scale_from_amax(_ref._segment_amax(v, sizes), qtype)
    q = _ref._to_grid(v / _expand_scale(scale, sizes), info, info.qmin, info.qmax)
    return _ref._to_storage(q, info), scale


def quant_decompositions() -> dict[Any, Callable[..., Any]]:
    """``segquant`` op overload -> pure-ATen implementation, for Inductor's decomposition table.

    Every entry computes exactly what the op contract (``segquant_fx/ops/README.md``) specifies,
    with the same validation. ``qlinear`` is deliberately absent: the GEMM stays an extern kernel.

    Example:
        >>> import torch
        >>> table = quant_decompositions()
        >>> torch.ops.segquant.quantize.default in table, torch.ops.segquant.qlinear.default in table
        (True, False)
    """
    seg = torch.ops.segquant
    return {
        seg.quantize.default: _d_quantize,
        seg.dequantize.default: _d_dequantize,
        seg.fake_quantize.default: _d_fake_quantize,
        seg.quantize_dual.default: _d_quantize_dual,
        seg.fake_quantize_dual.default: _d_fake_quantize_dual,
        seg.quantize_dynamic.default: _d_quantize_dynamic,
    }


@functools.cache
def _decomposition_key() -> str:
    """Hash of the code the decompositions run (changes when their arithmetic could change)."""
    from segquant_fx.ops import formats

    fns = [
        _expand_scale, _d_quantize, _d_dequantize, _d_fake_quantize, _dual_grids, _d_quantize_dual,
        _d_fake_quantize_dual, _d_quantize_dynamic, _ref._prepare, _ref._to_grid, _ref._to_storage,
        _ref._from_storage, _ref._segment_amax, formats._pack_int4, formats._unpack_int4, formats.scale_from_amax,
    ]  # fmt: skip
    h = hashlib.sha256()
    for fn in fns:
        try:
            h.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):
            h.update(fn.__qualname__.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Inductor
# --------------------------------------------------------------------------------------------------


def _inductor_patches(
    options: Mapping[str, Any] | None, mode: str | None, dynamic: bool | None
) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode, dynamic))
    known = set(inductor_config.get_config_copy())
    for key, value in (options or {}).items():
        if key not in known:
            raise ConfigError(
                f"backend 'segquant': unknown option {key!r}; use one of {sorted(BACKEND_OPTIONS)} or an "
                f"Inductor config name (torch._inductor.config), e.g. 'max_autotune'"
            )
        patches[key] = value
    return patches


def inductor_compiler(
    *, fuse: bool = True, options: Mapping[str, Any] | None = None, mode: str | None = None
) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """A Dynamo backend: Inductor, plus :func:`quant_decompositions` when ``fuse`` is True.

    Args:
        fuse: Decompose quantize/dequantize so Inductor fuses them with their neighbours.
        options: Inductor config patches (as ``torch.compile(options=...)``).
        mode: A ``torch.compile`` mode (``"max-autotune"`` ...), turned into config patches.

    Raises:
        ConfigError: An option is not an Inductor config name.
    """
    patches = _inductor_patches(options, mode, None)

    def compile_with_inductor(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        decomps = {**select_decomp_table(), **quant_decompositions()} if fuse else None
        # Inductor's FX-graph and AOTAutograd caches key on the graph before decomposition, not on
        # the decomposition table: tag the key with ours so a cached artifact compiled with other
        # decompositions (fuse=False, or an older version of them) is never reused.
        tag = f"{torch.compiler.config.cache_key_tag}|segquant:{_decomposition_key() if fuse else 'extern'}"
        with torch.compiler.config.patch(cache_key_tag=tag):
            return compile_fx(gm, example_inputs, config_patches=dict(patches), decompositions=decomps)

    return compile_with_inductor


def is_quantized_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` already calls ``torch.ops.segquant`` ops (a quantized model's graph)."""
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == _SEGQUANT for n in gm.graph.nodes
    )


def _has_linear(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in _LINEAR_TARGETS for n in gm.graph.nodes)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """``copy.deepcopy`` of an ``fx.Graph`` (nodes, codegen with its pytree specs; metadata shallow)."""
    import copy

    with warnings.catch_warnings():
        # deep-copying the pytree specs of export's codegen trips a torch-internal FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def without_export_guards(gm: fx.GraphModule, *, copy: bool = False) -> fx.GraphModule:
    """An unlifted exported module without its ``_guards_fn`` call, sharing ``gm``'s tensors.

    ``ExportedProgram.module()`` checks the export-time input shapes eagerly in a ``_guards_fn``
    submodule. Code that traces the module again with its own shape checks (the ONNX exporter, the
    nested compile of a graph Dynamo has already guarded) drops that call. Returns ``gm`` itself
    when it has no such call, unless ``copy`` (a new graph the caller may rewrite).
    """
    if not copy and not any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes):
        return gm
    graph = copy_graph(gm.graph)
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(getattr(gm, "meta", {}))
    return out.train(gm.training)


# --------------------------------------------------------------------------------------------------
# re-capture: Dynamo graph -> exportable module (state as attributes, module names restored)
# --------------------------------------------------------------------------------------------------

_STATE_SOURCE = re.compile(r"NNModule|ParamBuffer")
_SKIP_MEMBERS = {"_modules", "_parameters", "_buffers"}
_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


class _Unmapped(Exception):
    pass


def _chain(source: Any) -> list[Any]:
    """Sources from the leaf down to the root."""
    out = [source]
    while getattr(out[-1], "base", None) is not None:
        out.append(out[-1].base)
    return out


def _is_state(source: Any) -> bool:
    chain = _chain(source)
    if any(_STATE_SOURCE.search(type(s).__name__) for s in chain):
        return True
    return type(chain[-1]).__name__ != "LocalSource"


def _state_name(source: Any) -> str | None:
    parts: list[str] = []
    for s in _chain(source)[:-1]:
        member, index = getattr(s, "member", None), getattr(s, "index", None)
        if isinstance(index, (str, int)) and not isinstance(index, bool):
            parts.append(str(index))
        elif isinstance(member, str) and member not in _SKIP_MEMBERS:
            parts.append(member)
    parts.reverse()
    ok = parts and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts)
    return ".".join(parts) if ok else None


def _clean_module_path(path: str) -> str:
    path = _DYNAMO_PREFIX.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _register(root: nn.Module, name: str, value: torch.Tensor) -> str:
    *path, attr = name.split(".")
    mod = root
    for p in path:
        if p not in mod._modules:
            mod.add_module(p, nn.Module())
        mod = mod._modules[p]
    if hasattr(mod, attr):
        return ""
    if isinstance(value, nn.Parameter):
        mod.register_parameter(attr, value)
    else:
        mod.register_buffer(attr, value)
    return name


def _copy_missing(root: nn.Module, gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Give ``root`` the submodules and constants Dynamo's graph module holds (``get_attr``/``call_module``)."""
    for n in graph.nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        try:
            root.get_submodule(n.target) if n.op == "call_module" else _lookup(root, n.target)
            continue
        except AttributeError:
            pass
        *path, attr = n.target.split(".")
        owner = root
        for p in path:
            if p not in owner._modules:
                owner.add_module(p, nn.Module())
            owner = owner._modules[p]
        value = gm.get_submodule(n.target) if n.op == "call_module" else _lookup(gm, n.target)
        if isinstance(value, nn.Module):
            owner.add_module(attr, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(attr, value)
        else:
            setattr(owner, attr, value)


def _lookup(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _scalar_reads(node: fx.Node) -> bool:
    """Whether every use of ``node`` reads it as a Python scalar (``.item()``)."""
    users = list(node.users)
    return bool(users) and all(
        (u.op == "call_method" and u.target == "item")
        or u.target is torch.ops.aten._local_scalar_dense.default
        for u in users
    )


class _Recaptured:
    """Dynamo's graph as an exportable module plus what maps Dynamo's inputs onto it."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise ConfigError(
                f"backend 'segquant': the graph has {len(placeholders)} inputs but Dynamo passed "
                f"{len(example_inputs)} example inputs"
            )
        graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, val_map)
        graph.output(out)
        new_ph = {p: val_map[p] for p in placeholders}
        self.sources = [
            p.meta.get("grapharg").source if p.meta.get("grapharg") is not None else None
            for p in placeholders
        ]
        root = nn.Module()
        anchor = next(n for n in graph.nodes if n.op != "placeholder")
        current = {
            s.name: new_ph[p] for p, s in zip(placeholders, self.sources, strict=True) if s is not None
        }
        self.input_index: list[int] = []
        self.dynamic = False
        replaced: dict[int, fx.Node] = {}
        # module state first (a size may be read from a parameter), then sizes
        for i, (src, value) in enumerate(zip(self.sources, example_inputs, strict=True)):
            if (
                isinstance(value, torch.Tensor)
                and src is not None
                and _is_state(src)
                and _scalar_reads(new_ph[placeholders[i]])
            ):
                # a Python float/int attribute Dynamo left unspecialized (``LayerNorm.eps`` under
                # dynamic=True) and reads with .item(): module state, so it is a constant here
                for user in list(new_ph[placeholders[i]].users):
                    user.replace_all_uses_with(value.item())
                    graph.erase_node(user)
                replaced[i] = None  # type: ignore[assignment]
                continue
            if isinstance(value, torch.Tensor) and src is not None and _is_state(src):
                name = _state_name(src) or f"_segquant_const_{i}"
                if not _register(root, name, value):
                    name = _register(root, f"_segquant_const_{i}", value)
                with graph.inserting_before(anchor):
                    replaced[i] = graph.get_attr(name)
                current[src.name] = replaced[i]
        for i, (src, value) in enumerate(zip(self.sources, example_inputs, strict=True)):
            if i in replaced or not isinstance(value, (int, torch.SymInt)):
                continue
            if type(src).__name__ != "TensorPropertySource":
                continue
            base = current.get(src.base.name)
            fn = {"SIZE": torch.ops.aten.sym_size.int, "STRIDE": torch.ops.aten.sym_stride.int}.get(
                src.prop.name
            )
            if base is not None and fn is not None:
                with graph.inserting_before(anchor):
                    replaced[i] = graph.call_function(fn, (base, src.idx))
                self.dynamic = True
        for i, p in enumerate(placeholders):
            node = new_ph[p]
            if i in replaced and replaced[i] is None:
                graph.erase_node(node)
                continue
            if i in replaced:
                replaced[i].meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value")})
                node.replace_all_uses_with(replaced[i])
                graph.erase_node(node)
                continue
            self.input_index.append(i)
            ev = p.meta.get("example_value")
            if isinstance(ev, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in ev.shape):
                self.dynamic = True
        for n in graph.nodes:
            stack = n.meta.get("nn_module_stack")
            if stack:
                n.meta["nn_module_stack"] = {
                    k: (_clean_module_path(v[0]), v[1]) if isinstance(v, tuple) else v
                    for k, v in stack.items()
                }
        graph.eliminate_dead_code()
        _copy_missing(root, gm, graph)
        self.module = fx.GraphModule(root, graph, class_name="SegQuantSubgraph")
        self.placeholders = placeholders
        self.example_inputs = list(example_inputs)

    def inputs(self, flat: Sequence[Any]) -> tuple[Any, ...]:
        """The module's inputs taken from Dynamo's flat inputs."""
        return tuple(flat[i] for i in self.input_index)


def _current_code() -> Any:
    """Code object Dynamo is compiling (None if that cannot be determined)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return tx.f_code if tx is not None else None
    except Exception:  # noqa: BLE001 - private API: treat as unknown
        return None


def _bind_item(item: Any, code: Any, module_locals: set[str]) -> dict[str, Any]:
    from segquant_fx.capture import normalize_example

    args, kwargs = normalize_example(item)
    nargs = code.co_argcount + code.co_kwonlyargcount
    names = [n for n in code.co_varnames[:nargs] if n not in module_locals]
    if len(args) > len(names):
        raise _Unmapped(f"{len(args)} positional values for parameters {names}")
    bound = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k in bound:
            raise _Unmapped(f"argument {k!r} given twice")
        bound[k] = v
    return bound


def _resolve(source: Any, frame: Mapping[str, Any]) -> Any:
    kind = type(source).__name__
    if kind == "LocalSource":
        if source.local_name in frame:
            return frame[source.local_name]
        raise _Unmapped(source.name)
    if kind == "TensorPropertySource":
        base = _resolve(source.base, frame)
        prop = source.prop.name
        if prop == "SIZE":
            return base.size(source.idx)
        if prop == "STRIDE":
            return base.stride(source.idx)
        return base.storage_offset()
    if kind in ("DictGetItemSource", "GetItemSource", "ListGetItemSource") and isinstance(
        source.index, (str, int)
    ):
        return _resolve(source.base, frame)[source.index]
    if kind == "AttrSource":
        return getattr(_resolve(source.base, frame), source.member)
    raise _Unmapped(source.name)


def _map_items(rc: _Recaptured, items: Sequence[Any], code: Any) -> list[tuple[Any, ...]]:
    """Calibration items (keyed like the compiled function) -> tuples of the module's inputs."""
    module_locals = {"self"}
    for s in rc.sources:
        root = _chain(s)[-1] if s is not None else None
        if root is not None and _is_state(s) and type(root).__name__ == "LocalSource":
            module_locals.add(root.local_name)
    mapped = []
    for item in items:
        frame = _bind_item(item, code, module_locals)
        values = []
        for i in rc.input_index:
            src, example = rc.sources[i], rc.example_inputs[i]
            root = _chain(src)[-1] if src is not None else None
            if root is None or type(root).__name__ != "LocalSource" or root.local_name not in frame:
                values.append(example)  # module state, globals, defaults: as compiled
                continue
            value = _resolve(src, frame)
            if isinstance(example, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    value = torch.as_tensor(value, dtype=example.dtype, device=example.device)
                if value.dim() != example.dim():
                    raise _Unmapped(f"{src.name} has {value.dim()} dims, the graph expects {example.dim()}")
                ev = rc.placeholders[i].meta.get("example_value")
                shape = ev.shape if isinstance(ev, torch.Tensor) else example.shape
                for d, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
                    if not isinstance(want, torch.SymInt) and int(want) != int(got):
                        raise CalibrationError(
                            f"backend 'segquant': calibration input {src.name} has shape {list(value.shape)} "
                            f"but the graph was compiled for size {int(want)} at dim {d}; pass items with "
                            f"the shapes of the first call, or compile with dynamic=True"
                        )
            values.append(value)
        mapped.append(tuple(values))
    return mapped


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


class _QuantizedSubgraph:
    """The callable returned to Dynamo for a float graph: records, quantizes, then runs compiled.

    Quantization happens at the first call, outside Dynamo's compilation: ``torch.export`` inside a
    backend would add its shape symbols (and guards) to the shape environment of the frame Dynamo is
    compiling, and a ``torch.compile`` created there would not install its own frame hook.
    """

    def __init__(self, gm, rc, config, compiler, calls: int, items: list[tuple] | None):
        self.float_gm = gm
        self.rc = rc
        self.config = config
        self.compiler = compiler
        self.calls = max(int(calls), 1)
        self.items = items
        self.recorded: list[tuple] = []
        self.compiled: Callable[..., Any] | None = None
        self.dims: list[tuple[int, ...]] = []
        self.qmodel: Any = None

    def _finish(self, items: list[tuple]) -> None:
        from segquant_fx.api import quantize

        qmodel = quantize(
            self.rc.module, items, self.config, example=items[0], dynamic=self.rc.dynamic, progress=False
        )
        gm = without_export_guards(qmodel.graph_module)
        self.compiled = torch.compile(gm, backend=self.compiler, fullgraph=True)
        self.dims = export_dynamic_dims(gm) if self.rc.dynamic else []
        self.qmodel, self.items, self.recorded = qmodel, None, []
        self.rc.example_inputs = []

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            if self.items is None:
                self.recorded.append(tuple(_clone(v) for v in self.rc.inputs(args)))
                if len(self.recorded) < self.calls:
                    return self.float_gm(*args)
                self.items = self.recorded
            self._finish(self.items)
        inputs = self.rc.inputs(args)
        if self.dims:
            inputs = mark_export_dims(inputs, self.dims)
        return self.compiled(*inputs)


def _materialize(calib: Any) -> Any:
    if calib is None or isinstance(calib, int) and not isinstance(calib, bool):
        return calib
    if isinstance(calib, collections.abc.Sequence) and not isinstance(calib, (str, bytes)):
        return calib
    if isinstance(calib, Iterable):
        return list(calib)
    raise ConfigError(
        f"backend 'segquant': calib must be an iterable of items or an int, got {type(calib).__name__}"
    )


def make_backend(
    calib: Iterable[Any] | int | None = None,
    config: Any = None,
    *,
    calib_calls: int = 1,
    fuse: bool = True,
    mode: str | None = None,
    inductor_options: Mapping[str, Any] | None = None,
) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """Build a SegQuant Dynamo backend ``(gm, example_inputs) -> Callable`` (see the module docstring).

    Args:
        calib: Calibration items keyed like the compiled function's arguments, or an int ``N``
            (calibrate every graph on its first ``N`` calls). Needed only for float models.
        config: Quantization config or preset name (default ``"w8a8"``).
        calib_calls: Calls recorded by graphs that ``calib`` items cannot be mapped to (graphs after a
            graph break).
        fuse: Let Inductor fuse quantize/dequantize (:func:`quant_decompositions`).
        mode: A ``torch.compile`` mode for Inductor.
        inductor_options: Inductor config patches.

    Returns:
        A backend for ``torch.compile(model, backend=make_backend(...))``. Its ``graphs`` attribute lists
        the float graphs it quantized, in compile order; after a graph's first call(s), ``.qmodel`` is
        its :class:`~segquant_fx.quantized.QuantizedModel` (``.plan``, ``.report()``).

    Raises:
        ConfigError: A bad option (raised at once), or a float graph with linears and no ``calib``
            (raised when Dynamo compiles it).
    """
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.patterns import PATTERNS

    cfg = QuantizeConfig.coerce(config, known_patterns=PATTERNS)
    calib = _materialize(calib)
    if isinstance(calib, int) and calib < 1:
        raise ConfigError(
            f"backend 'segquant': calib={calib} calls; pass a positive number of calls or items"
        )
    if isinstance(calib_calls, bool) or not isinstance(calib_calls, int) or calib_calls < 1:
        raise ConfigError(f"backend 'segquant': calib_calls must be a positive int, got {calib_calls!r}")
    compiler = inductor_compiler(fuse=fuse, options=inductor_options, mode=mode)

    def segquant_compiler(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if is_quantized_graph(gm) or not _has_linear(gm):
            return compiler(gm, example_inputs)
        if calib is None:
            raise ConfigError(
                "backend 'segquant': this graph has float linears and no calibration data; pass "
                "options={'calib': items} (items keyed like forward's arguments) or {'calib': N} "
                "(calibrate on the first N calls), or compile a model quantized with segquant_fx.quantize"
            )
        rc = _Recaptured(gm, example_inputs)
        first_items = None
        calls = calib if isinstance(calib, int) else calib_calls
        if not isinstance(calib, int):
            code = _current_code()
            name = getattr(code, "co_name", "")
            if code is not None and not name.startswith("torch_dynamo_resume_in_"):
                try:
                    first_items = _map_items(rc, calib, code)
                except _Unmapped as e:
                    warnings.warn(
                        f"backend 'segquant': calibration items do not map onto the inputs of graph {name!r} "
                        f"({e}); it is calibrated on its first {calls} call(s) instead",
                        stacklevel=2,
                    )
            else:
                warnings.warn(
                    f"backend 'segquant': graph {name or '?'!r} starts after a graph break, so calibration items "
                    f"cannot be mapped onto its inputs; it is calibrated on its first {calls} call(s)",
                    stacklevel=2,
                )
            if first_items is not None and not first_items:
                raise CalibrationError("backend 'segquant': the calibration set is empty")
        graph = _QuantizedSubgraph(gm, rc, cfg, compiler, calls, first_items)
        segquant_compiler.graphs.append(graph)
        return graph

    segquant_compiler.graphs = []  # type: ignore[attr-defined]
    return segquant_compiler


def segquant_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The registered ``"segquant"`` backend: ``torch.compile(model, backend="segquant", options=...)``.

    ``options`` holds the :data:`BACKEND_OPTIONS` (``calib``, ``config``, ``calib_calls``, ``fuse``) and
    Inductor config patches; see :func:`make_backend`. An iterator given as ``calib`` is read once and
    stored back into ``options`` (Dynamo calls the backend once per graph).
    """
    opts = dict(options or {})
    if (
        options is not None
        and "calib" in options
        and not isinstance(options["calib"], (collections.abc.Sequence, int))
    ):
        try:
            options["calib"] = _materialize(options["calib"])  # type: ignore[index]
            opts["calib"] = options["calib"]
        except TypeError:
            pass
    ours = {k: opts.pop(k) for k in list(opts) if k in BACKEND_OPTIONS}
    return make_backend(**ours, mode=mode, inductor_options=opts)(gm, example_inputs)


def _register_backend() -> None:
    """Register ``"segquant"`` unless torch is about to do it from the entry point.

    ``torch._dynamo.backends.registry.lookup_backend`` (torch 2.13; the same code in the other
    ``registry.py`` versions checked) puts discovered ``torch_dynamo_backends`` entry points in
    ``_BACKENDS`` and then calls ``register_backend(entry_point.load(), name)``, which raises on a name
    already registered; so while it loads this module for the entry point (``_BACKENDS[name]`` is an
    ``EntryPoint``), this module leaves the registration to it. (Older torches registered a loaded entry
    point only when the name was not listed yet, which registering here satisfies.)
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    if getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME) is not None:
        return
    registry.register_backend(segquant_backend, name=BACKEND_NAME)


_register_backend()
