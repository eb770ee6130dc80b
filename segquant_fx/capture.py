"""One capture routine for models and patterns: ``torch.export`` (non-strict) into un-decomposed ATen.

Everything downstream (pattern matching, annotation, calibration, rewriting, ONNX) works on the graph
this module produces, so it is deliberately the only place that calls ``torch.export``.

Choices, pinned here and in ``tests/unit/test_capture.py``:

* **IR.** The exported program is *not* run through ``run_decompositions``: ``aten.linear``,
  ``aten.chunk``, ``aten.split_with_sizes``, ``aten.cat``, ``aten.gelu`` … stay as the user wrote
  them, which is what semantic patterns are about.
* **Module names.** Every ``call_function`` node gets ``node.meta["segquant_module"]``, the fully
  qualified name of the innermost module it came from (from ``nn_module_stack``).
* **Dynamic shapes.** With ``dynamic=True`` every batch, token and spatial dim is ``Dim.AUTO``
  (export keeps it dynamic where the model allows and specializes the rest); feature dims (channels of
  4-D+ inputs, the last dim otherwise) are static because they size the weights. A size-1 dim is always specialized by
  torch (0/1 specialization), so a batch-1 example is captured with its batch dim doubled (tensors
  whose dim 0 equals the example batch are repeated); the graph then accepts any batch >= 1 at run
  time. If that fails, the original example is captured and the batch stays static (with a warning).
* **Shape branches.** A Python branch on a dynamic size (diffusers' ``Upsample2D`` calls ``.contiguous()``
  when the batch is >= 64) leaves the exported program an upper bound on that size (batch <= 63) and
  guards that reject larger inputs. For each such bound the model is exported again just past it; when
  both graphs run the same ops (ignoring layout-only ops: ``contiguous``, ``clone``, metadata asserts and
  symbolic-size arithmetic) the bound is dropped, with the guards only it made fail. Otherwise the bound
  stays and a warning names the input and the range the captured graph accepts.
"""

from __future__ import annotations

import functools
import inspect
import os
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from segquant_fx.errors import CaptureError

__all__ = [
    "MODULE_KEY",
    "CapturedModel",
    "capture",
    "capture_function",
    "normalize_example",
    "node_module",
]

#: ``node.meta`` key holding the fully qualified name of the module a node came from.
MODULE_KEY = "segquant_module"


@dataclass
class CapturedModel:
    """The result of :func:`capture`.

    Attributes:
        exported: The ``torch.export.ExportedProgram`` (un-decomposed).
        graph_module: ``exported.graph_module``; nodes carry ``meta[MODULE_KEY]``.
        model_name: Class name of the captured model, for messages.
        example_args: Positional example inputs as given by the user.
        example_kwargs: Keyword example inputs as given by the user.
        dynamic_dims: For each flattened input path (e.g. ``"hidden_states"``), the dims that stayed
            dynamic.
        batch_doubled: True when a batch-1 example was captured at batch 2 to keep the batch dynamic.
    """

    exported: torch.export.ExportedProgram
    graph_module: fx.GraphModule
    model_name: str
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    dynamic_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    batch_doubled: bool = False

    @property
    def graph(self) -> fx.Graph:
        """The captured ``fx.Graph``."""
        return self.graph_module.graph


def normalize_example(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a user example into ``(args, kwargs)``.

    Accepted forms: a kwargs mapping, a tuple/list of positional args, ``(args, kwargs)``, or a single
    tensor.

    Raises:
        CaptureError: If ``example`` has none of these forms.
    """
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if (
        isinstance(example, tuple)
        and len(example) == 2
        and isinstance(example[0], (tuple, list))
        and isinstance(example[1], Mapping)
    ):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise CaptureError(
        f"example has type {type(example).__name__}; pass a kwargs dict, a tuple of positional args, "
        "or (args, kwargs)"
    )


def node_module(node: fx.Node) -> str:
    """Fully qualified name of the innermost module ``node`` came from ("" for the root)."""
    fqn = node.meta.get(MODULE_KEY)
    if fqn is not None:
        return fqn
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_fqn(path)


def _clean_fqn(path: str) -> str:
    # non-strict export already uses real FQNs; strict export spells them L['self'].a.b or L__self___a_b
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _check_signature(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins or C++ modules: nothing to check
        return
    params = sig.parameters
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unexpected = [k for k in kwargs if k not in params and not takes_var_kw]
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        names = ", ".join(params)
        what = f"unexpected argument(s) {', '.join(map(repr, unexpected))}" if unexpected else str(e)
        raise CaptureError(
            f"example does not fit {type(model).__name__}.forward({names}): {what}. "
            "Pass the example as a dict keyed by forward's parameter names."
        ) from None


def _leading_batch(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2:
            return int(leaf.shape[0])
    return None


def _double_batch(tree: Any) -> Any:
    def double(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
            return torch.cat([x, x], dim=0)
        return x

    return pytree.tree_map(double, tree)


# Ops that change only layout or check metadata, and symbolic-size bookkeeping: a graph that differs from
# another only in these computes the same values.
_LAYOUT_ONLY = frozenset(
    {
        "aten.contiguous.default",
        "aten.clone.default",
        "aten.alias.default",
        "aten._assert_tensor_metadata.default",
        "aten._assert_scalar.default",
        "aten.sym_constrain_range_for_size.default",
        "aten.sym_constrain_range.default",
    }
)


def _op_sequence(ep: torch.export.ExportedProgram) -> list[str]:
    out = []
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        name = str(n.target)
        if name in _LAYOUT_ONLY or name.startswith(("aten.sym_", "_operator.", "<built-in function")):
            continue
        if "sym_size" in name or "sym_numel" in name or "sym_stride" in name:
            continue
        if name == "aten.slice.Tensor" and _full_slice(n):  # x[:, ...]: kept or elided by shape
            continue
        out.append(name)
    return out


def _full_slice(n: fx.Node) -> bool:
    """Whether an ``aten.slice.Tensor`` node takes the whole dim (start 0, open end, step 1)."""
    a = list(n.args) + [None] * (5 - len(n.args))
    start, end, step = n.kwargs.get("start", a[2]), n.kwargs.get("end", a[3]), n.kwargs.get("step", a[4])
    return (
        start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (1, None)
    )


def _tensor_leaves_with_placeholders(
    ep: torch.export.ExportedProgram, args: tuple, kwargs: dict
) -> list[tuple[Any, torch.Tensor, Any]] | None:
    """(pytree path, example tensor, placeholder value) for every tensor input, or None if they do not align."""
    leaves = [
        (p, v) for p, v in pytree.tree_flatten_with_path((args, kwargs))[0] if isinstance(v, torch.Tensor)
    ]
    user = set(ep.graph_signature.user_inputs)
    vals = [
        n.meta.get("val")
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in user and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    # compare by hint: comparing a SymInt with an int would add a guard and specialize the program
    if len(vals) != len(leaves) or any(
        tuple(_size_hint(d) for d in v.shape) != tuple(t.shape)
        for (_, t), v in zip(leaves, vals, strict=True)
    ):
        return None
    return [(p, t, v) for (p, t), v in zip(leaves, vals, strict=True)]


def _size_hint(d: Any) -> Any:
    """The example value of a (Sym)Int size, without guarding on it."""
    return d.node.hint if isinstance(d, torch.SymInt) else d


def _tile_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` repeated along ``dim`` and cut to ``size`` (real values, so the model runs as with real data)."""
    reps = -(-size // x.shape[dim])
    return torch.cat([x] * reps, dim=dim).narrow(dim, 0, size)


def _guard_holds(code: str, inputs: dict[str, Any]) -> bool | None:
    """Evaluate one export guard (Python over ``L[...]``) on ``inputs``; None if it cannot be evaluated."""
    import math

    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    try:
        return bool(eval(code, {**SYMPY_INTERP, "math": math, "inf": float("inf"), "L": inputs}))  # noqa: S307
    except Exception:  # noqa: BLE001 - a guard we cannot read is kept as it is
        return None


def _widen_shape_branch_bounds(
    model: torch.nn.Module, ep: torch.export.ExportedProgram, args: tuple, kwargs: dict, name: str
) -> None:
    """Drop upper bounds that only a layout branch put on a dynamic size (see the module docstring)."""
    from torch.utils._sympy.numbers import int_oo
    from torch.utils._sympy.value_ranges import ValueRanges

    bounded = [
        (sym, vr) for sym, vr in ep.range_constraints.items() if vr.upper != int_oo and int(vr.upper) < 2**20
    ]
    if not bounded:
        return
    aligned = _tensor_leaves_with_placeholders(ep, args, kwargs)
    base_ops = _op_sequence(ep)
    for sym, vr in bounded:
        upper = int(vr.upper)
        where = (
            []
            if aligned is None
            else [
                (path, i)
                for path, _, val in aligned
                for i, d in enumerate(val.shape)
                if isinstance(d, torch.SymInt) and d.node.expr == sym
            ]
        )
        what = ", ".join(f"{_input_name(p)}.shape[{i}]" for p, i in where) or str(sym)
        kept = f"{name}: the captured graph accepts {what} <= {upper} only (a Python branch on that size)"
        if not where:
            warnings.warn(kept, stacklevel=3)
            continue
        # Also the dims export gave a symbol of their own but that hold the same example size on the
        # same axis (diffusers' time_ids batch is not tied to the sample batch): they must grow together.
        hint = next(_size_hint(val.shape[i]) for path, _, val in aligned for p, i in where[:1] if p == path)
        axes = {i for _, i in where}
        targets = {(pytree.keystr(p), i) for p, i in where} | {
            (pytree.keystr(path), i)
            for path, _, val in aligned
            for i, d in enumerate(val.shape)
            if i in axes and isinstance(d, torch.SymInt) and _size_hint(d) == hint
        }
        big_args, big_kwargs = pytree.tree_map_with_path(
            functools.partial(_grow, targets=targets, size=upper + 1), (args, kwargs)
        )
        try:
            ep_big = _export(model, big_args, big_kwargs, dynamic=True)
        except Exception as e:  # noqa: BLE001 - the bound stays, with the reason
            warnings.warn(f"{kept}; capturing past it failed ({type(e).__name__})", stacklevel=3)
            continue
        if _op_sequence(ep_big) != base_ops:
            warnings.warn(
                f"{kept}: past it the model runs other ops; capture with a larger example", stacklevel=3
            )
            continue
        ep.range_constraints[sym] = ValueRanges(vr.lower, int_oo)
        guards = getattr(ep, "_guards_code", None)
        if isinstance(guards, list):
            named = _guard_inputs(model, big_args, big_kwargs)
            ep._guards_code = [g for g in guards if _guard_holds(g, named) is not False]


def _input_name(path: Any) -> str:
    """``added_cond_kwargs['text_embeds']`` for the pytree path of an ``(args, kwargs)`` leaf."""
    if len(path) >= 2 and getattr(path[0], "idx", None) == 1 and hasattr(path[1], "key"):
        return str(path[1].key) + pytree.keystr(path[2:])
    if len(path) >= 2 and getattr(path[0], "idx", None) == 0:
        return f"args{pytree.keystr(path[1:])}"
    return pytree.keystr(path)


def _grow(path: Any, x: Any, *, targets: set[tuple[str, int]], size: int) -> Any:
    """``x`` tiled to ``size`` along each of its dims listed in ``targets`` (by pytree path)."""
    if not isinstance(x, torch.Tensor):
        return x
    for i in range(x.dim()):
        if (pytree.keystr(path), i) in targets:
            x = _tile_to(x, i, size)
    return x


def _guard_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The inputs by parameter name, as export's guard code addresses them (``L['sample']``)."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
        return dict(bound.arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def _feature_dim(ndim: int) -> int | None:
    """The dim that holds features: channels for 4-D+ (NCHW) inputs, else the last dim."""
    if ndim == 0 or ndim == 1:
        return None
    return 1 if ndim >= 4 else ndim - 1


def _auto_dynamic_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Dim.AUTO on batch, token and spatial dims; feature dims stay static (they size the weights)."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            feat = _feature_dim(x.dim())
            return {i: torch.export.Dim.AUTO for i in range(x.dim()) if i != feat}
        return None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def _kwargs_for_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind positional args to parameter names so dynamic_shapes can be given as one dict."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return args, kwargs
    return (), dict(bound.arguments)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch itself: the model line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    found = None
    tb = exc.__traceback__
    frames = traceback.extract_tb(tb) if tb is not None else []
    for fr in frames:
        if not fr.filename.startswith(torch_dir) and not fr.filename.startswith(here):
            found = fr
    if found is None:
        return None
    return f"{found.filename}:{found.lineno} `{(found.line or '').strip()}`"


def _hint(exc: BaseException) -> str:
    text = str(exc)
    if "data-dependent" in text or "GuardOnDataDependentSymNode" in type(exc).__name__:
        return (
            "the model branches on tensor values; make that value a Python constant, precompute it "
            "outside forward, or rewrite the branch with torch.cond"
        )
    if "Constraints violated" in text or "specializ" in text:
        return "capture with dynamic=False, or pass an example whose dims are all > 1"
    return (
        "check that forward runs on the example as given, avoid Python side effects on tensors "
        "(prints, .item(), .numpy()), or capture a submodule"
    )


def _export(
    model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes: Any = None
) -> torch.export.ExportedProgram:
    if dynamic_shapes is not None:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    args, kwargs = _kwargs_for_export(model, args, kwargs)
    dyn: Any = None
    if dynamic:
        dyn_args, dyn_kwargs = _auto_dynamic_shapes(args, kwargs)
        if not args:
            dyn = dyn_kwargs
        elif not kwargs:
            dyn = _per_parameter(model, dyn_args)
        else:  # *args/**kwargs forward: export cannot name the inputs; keep shapes static
            warnings.warn("forward takes *args/**kwargs: capturing with static shapes", stacklevel=3)
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)


def _per_parameter(model: torch.nn.Module, dyn_args: tuple) -> tuple:
    """dynamic_shapes has one entry per *parameter*: a ``*args`` parameter takes a tuple of specs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return dyn_args
    out: list[Any] = []
    i = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            out.append(tuple(dyn_args[i:]))
            i = len(dyn_args)
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and i < len(dyn_args):
            out.append(dyn_args[i])
            i += 1
    return tuple(out)


def _normalize(ep: torch.export.ExportedProgram) -> None:
    """Dead-code-eliminate the captured graph.

    An unused call (``self.lin(x)`` whose result is dropped) must not count as a call site of its module.
    """
    if ep.graph_module.graph.eliminate_dead_code():
        ep.graph_module.recompile()


def _annotate_modules(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            stack = node.meta.get("nn_module_stack")
            node.meta[MODULE_KEY] = _clean_fqn(list(stack.values())[-1][0]) if stack else ""


def _dynamic_dims(ep: torch.export.ExportedProgram) -> dict[str, tuple[int, ...]]:
    user_inputs = set(ep.graph_signature.user_inputs)
    out: dict[str, tuple[int, ...]] = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = tuple(i for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt))
            if dims:
                out[node.name] = dims
    return out


def capture(
    model: torch.nn.Module, example: Any, dynamic: bool = True, dynamic_shapes: Any = None
) -> CapturedModel:
    """Capture ``model`` with ``torch.export`` (non-strict) into an un-decomposed ATen graph.

    Args:
        model: Any ``nn.Module``; it is captured in eval mode (its mode is restored afterwards).
        example: A kwargs dict, a tuple of positional args, or ``(args, kwargs)``.
        dynamic: Keep batch, token and spatial dims dynamic where the model allows (feature dims,
            which size the weights, stay static).
        dynamic_shapes: Explicit ``torch.export`` dynamic_shapes; overrides ``dynamic`` (and the
            batch-1 doubling) when given.

    Returns:
        A :class:`CapturedModel`; its graph nodes carry ``meta[MODULE_KEY]``.

    Raises:
        CaptureError: If the example does not fit ``forward`` or ``torch.export`` fails; the message
            names the model, the failing source line and what to try.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
        >>> cm = capture(m, (torch.randn(3, 4),))
        >>> sorted({n.meta["segquant_module"] for n in cm.graph.nodes if n.op == "call_function"})
        ['0', '1', '2']
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_example(example)
    _check_signature(model, args, kwargs)
    name = type(model).__name__

    was_training = model.training
    model.eval()
    try:
        batch = _leading_batch(args, kwargs)
        doubled = False
        ep = None
        first_error: BaseException | None = None
        if dynamic and batch == 1 and dynamic_shapes is None:
            try:
                ep = _export(model, _double_batch(args), _double_batch(kwargs), dynamic=True)
                doubled = True
            except Exception as e:  # noqa: BLE001 - retried below with the example as given
                first_error = e
        if ep is None:
            try:
                ep = _export(model, args, kwargs, dynamic, dynamic_shapes)
            except Exception as e:
                where = _user_frame(e)
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CaptureError(
                    f"torch.export could not capture {name}: {type(e).__name__}: {first_line}"
                    + (f"\n  failing source: {where}" if where else "")
                    + f"\n  what you can do: {_hint(e)}"
                ) from e
            if first_error is not None:
                warnings.warn(
                    f"{name}: capturing at batch 2 failed ({type(first_error).__name__}); the batch dim "
                    "of the captured graph is fixed to 1",
                    stacklevel=2,
                )
        if dynamic and dynamic_shapes is None:
            used = (_double_batch(args), _double_batch(kwargs)) if doubled else (args, kwargs)
            _widen_shape_branch_bounds(model, ep, *_kwargs_for_export(model, *used), name)
    finally:
        model.train(was_training)

    _normalize(ep)
    gm = ep.graph_module
    _annotate_modules(gm)
    return CapturedModel(
        exported=ep,
        graph_module=gm,
        model_name=name,
        example_args=args,
        example_kwargs=kwargs,
        dynamic_dims=_dynamic_dims(ep),
        batch_doubled=doubled,
    )


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def capture_function(fn: Any, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Capture a plain function (a pattern's search function) with the same routine as models.

    Shapes are static: pattern graphs are matched on structure, never on concrete sizes.
    """
    cm = capture(_FunctionModule(fn), tuple(example_inputs), dynamic=False)
    return cm.graph_module
