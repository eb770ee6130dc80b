"""``linear_to_chunk`` / ``linear_to_split``: a linear whose output is cut into pieces along the last dim.

These give **output segments**: each piece is a semantically different tensor (adaLN shift/scale/gate,
GEGLU hidden/gate, fused Q/K/V), so its rows of W get their own quantization scale.

Cases:

1. ``chunk(linear(x), k, dim=-1)`` -> k segments (sizes from the traced values, so a remainder chunk is
   handled exactly).
2. ``split(linear(x), s, -1)`` / ``split(linear(x), [a, b], -1)`` / ``unbind(linear(x), -1)``.
3. adaLN-single style: ``linear(x).view(..., k, d)`` consumed only per row: ``chunk``/``split``/``unbind``
   along the k dim, ``select``/``index`` on it, optionally after an elementwise add/mul with a table
   broadcast along rows -> k segments of d.

The linear's output must flow only into the split (through transparent ops) in cases 1-2 (checked
in the pattern's check, per alternative); in case 3 every consumer must be such a per-row view, so
one linear shared by several blocks (PixArt's adaLN-single timestep projection) still matches.

Before/after (annotation only)::

    linear = aten.linear(silu, w, b)          linear = aten.linear(silu, w, b)  # output_segments=(d,)*6
    chunk = aten.chunk(linear, 6, 1)    ->    chunk = aten.chunk(linear, 6, 1)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import fx

from segquant_fx.graph.fx_utils import get_arg, shape_of, target_name
from segquant_fx.patterns._util import dim_of, fx_data_users, linear_features, split_sizes
from segquant_fx.patterns.base import Match, Pattern, PlanContribution
from segquant_fx.patterns.matcher import _outside_msg

__all__ = ["LINEAR_TO_CHUNK", "LINEAR_TO_SPLIT"]

_SPLITS = {
    "aten.chunk.default": (2, "dim", 0),
    "aten.split.Tensor": (2, "dim", 0),
    "aten.split_with_sizes.default": (2, "dim", 0),
    "aten.unbind.int": (1, "dim", 0),
}
_ROW_PICKS = {"aten.select.int": (1, "dim", None)}
_ROW_ELEMENTWISE = frozenset({"aten.add.Tensor", "aten.mul.Tensor", "aten.sub.Tensor", "aten.to.dtype"})


def _chunk_pattern(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return F.linear(x, w).chunk(2, -1)


def _split_pattern(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return F.linear(x, w).split(2, -1)


def _split_sizes_pattern(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.split(F.linear(x, w), [1, 3], -1)


def _unbind_pattern(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return F.linear(x, w).unbind(-1)


def _rows_view_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w).view(2, 2, 2)


def _rows_reshape_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w).reshape(2, 2, 2)


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4), torch.randn(4, 4)


def _split_node(m: Match) -> str:
    for t in _SPLITS:
        if m.has(t):
            return m.node(t)
    raise KeyError("no split node")


def _check_split(m: Match, view) -> object:
    split = view.fx(_split_node(m))
    others = tuple(c for c in view.consumers(m.anchor) if c != split.name)
    if others:
        return functools.partial(_outside_msg, m.anchor, others, tuple(view.target(o) for o in others))
    shape = shape_of(split.args[0])
    idx, name, default = _SPLITS[target_name(split)]
    d = dim_of(split, idx, name, default, len(shape) if shape else 0)
    if shape is None or d is None:
        return f"{split.name}: dim {get_arg(split, idx, name, default)!r} is not a static dim"
    if d != len(shape) - 1:
        return f"{split.name} splits dim {d}, not the last dim {len(shape) - 1}"
    sizes = split_sizes(split)
    if sizes is None:
        return f"{split.name}: segment sizes are symbolic"
    if len(sizes) < 2:
        return f"{split.name} yields a single piece"
    return None


def _plan_split(m: Match, view) -> PlanContribution:
    split = view.fx(_split_node(m))
    return PlanContribution(output_segments=split_sizes(split), detail={"op": target_name(split)})


def _row_consumer_ok(node: fx.Node, k: int, d: int, view, depth: int = 0) -> str | None:
    """None if every use of ``node`` ([..., k, d]) reads whole rows of d; else why not.

    Transparent ops that keep the rank (casts, clones, eval dropout, slices of a non-row dim or
    row subsets) are looked through; the rows dim stays the second to last.
    """
    shape = shape_of(node)
    if shape is None or len(shape) < 2:
        return f"{node.name}: unknown shape"
    rows_dim = len(shape) - 2
    for u in fx_data_users(node):
        t = target_name(u)
        us = shape_of(u)
        if (
            t not in _SPLITS
            and t not in _ROW_PICKS
            and view.transparency.is_transparent(u)
            and us is not None
            and len(us) == len(shape)
            and t not in ("aten.permute.default", "aten.transpose.int")
        ):
            if depth >= 4:
                return f"{u.name}: too many ops between the view and its row reads"
            why = _row_consumer_ok(u, k, d, view, depth + 1)
            if why:
                return why
            continue
        if t in _SPLITS:
            idx, name, default = _SPLITS[t]
            if dim_of(u, idx, name, default, len(shape)) != rows_dim:
                return f"{u.name} ({t}) does not split the row dim {rows_dim}"
            sizes = [v.shape[-2] for v in u.meta.get("val", [])] if t != "aten.unbind.int" else None
            if sizes is not None and any(int(s) != sizes[0] for s in sizes):
                return f"{u.name} splits rows unevenly"
        elif t in _ROW_PICKS:
            idx, name, default = _ROW_PICKS[t]
            if dim_of(u, idx, name, default, len(shape)) != rows_dim:
                return f"{u.name} ({t}) does not pick along the row dim {rows_dim}"
        elif t in _ROW_ELEMENTWISE and depth < 4:
            other = [a for a in u.args if isinstance(a, fx.Node) and a is not node]
            for o in other:
                os_ = shape_of(o)
                if os_ is not None and len(os_) >= 2 and int(os_[-1]) not in (1, d):
                    return f"{u.name} mixes row elements with {o.name} of shape {tuple(os_)}"
            why = _row_consumer_ok(u, k, d, view, depth + 1)
            if why:
                return why
        else:
            return f"{node.name} is used by {u.name} ({t}), which does not read whole rows"
    return None


def _check_rows(m: Match, view) -> object:
    lin = view.fx(m.anchor)
    _, out_f = linear_features(lin)
    if out_f is None:
        return "linear out_features unknown"
    views = [view.fx(c) for c in view.consumers(m.anchor)]
    ks = set()
    for v in views:
        t = target_name(v)
        if t not in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.unflatten.int"):
            return f"{lin.name} is also used by {v.name} ({t})"
        shape = shape_of(v)
        if shape is None or len(shape) < 2:
            return f"{v.name}: unknown shape"
        try:
            k, d = int(shape[-2]), int(shape[-1])
        except (TypeError, ValueError):
            return f"{v.name}: symbolic row shape"
        if k * d != out_f or k < 2:
            return f"{v.name} views {out_f} features as {k} x {d}, not as rows"
        why = _row_consumer_ok(v, k, d, view)
        if why:
            return why
        ks.add((k, d))
    if len(ks) != 1:
        return f"{lin.name} is viewed with different row shapes {sorted(ks)}"
    return None


def _plan_rows(m: Match, view) -> PlanContribution:
    v = view.fx(view.consumers(m.anchor)[0])
    shape = shape_of(v)
    k, d = int(shape[-2]), int(shape[-1])
    return PlanContribution(output_segments=(d,) * k, detail={"op": "rows"})


def _check_chunk(m: Match, view) -> object:
    if m.has("aten.chunk.default"):
        return _check_split(m, view)
    return _check_rows(m, view)


def _plan_chunk(m: Match, view) -> PlanContribution:
    if m.has("aten.chunk.default"):
        return _plan_split(m, view)
    return _plan_rows(m, view)


LINEAR_TO_CHUNK = Pattern(
    name="linear_to_chunk",
    search=(_chunk_pattern, _rows_view_pattern, _rows_reshape_pattern),
    example_inputs=_example,
    check=_check_chunk,
    plan=_plan_chunk,
    priority=10,
    description="linear output chunked along the last dim (adaLN modulation, GEGLU proj, fused QKV), "
    "or viewed as [..., k, d] and consumed per row (adaLN-single)",
)

LINEAR_TO_SPLIT = Pattern(
    name="linear_to_split",
    search=(_split_pattern, _split_sizes_pattern, _unbind_pattern),
    example_inputs=_example,
    check=_check_split,
    plan=_plan_split,
    priority=11,
    description="linear output split/split_with_sizes/unbound along the last dim, equal or unequal sizes",
)
