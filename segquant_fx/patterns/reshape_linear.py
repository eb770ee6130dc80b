"""``reshape_to_linear``: a head merge ``[..., H, D] -> [..., H*D]`` feeding a linear.

Attention output projections (``to_out.0``, ``to_add_out``, FLUX single-block attention) read the
concatenated heads; each head is its own input segment (H segments of D). The merge may be ``view``,
``reshape`` or ``flatten``; transposes of other dims and sequence slices in between are looked through.

Before/after (annotation only)::

    view = aten.view(transpose, [b, s, 64])     view = aten.view(transpose, [b, s, 64])
    linear = aten.linear(view, w, bias)   ->    linear = aten.linear(view, w, bias)  # input_segments=(16,)*4
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segquant_fx.graph.fx_utils import shape_of, static_int
from segquant_fx.patterns._util import linear_features
from segquant_fx.patterns.base import Match, Pattern, PlanContribution

__all__ = ["RESHAPE_TO_LINEAR"]

_MERGES = ("aten.view", "aten.reshape", "aten.flatten", "aten._unsafe_view")


def _reshape_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.reshape(2, 3, 8), w)


def _view_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.view(2, 3, 8), w)


def _flatten_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.flatten(-2), w)


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 2, 4), torch.randn(5, 8)


def _merge_node(m: Match) -> str:
    for t in _MERGES:
        if m.has(t):
            return m.node(t)
    raise KeyError("no merge node")


def _heads(m: Match, view) -> tuple[int, int] | str:
    merge = view.fx(_merge_node(m))
    ins, outs = shape_of(merge.args[0]), shape_of(merge)
    if ins is None or outs is None:
        return f"{merge.name}: unknown shapes"
    if len(ins) != len(outs) + 1 or len(ins) < 3:
        return f"{merge.name} reshapes {len(ins)}-d to {len(outs)}-d, not a merge of the last two dims"
    h, d, o = static_int(ins[-2]), static_int(ins[-1]), static_int(outs[-1])
    if h is None or d is None or o is None:
        return f"{merge.name}: head dims are symbolic"
    if h * d != o:
        return f"{merge.name} maps [..., {h}, {d}] to [..., {o}], not a head merge"
    if h < 2:
        return f"{merge.name} merges a single head"
    in_f, _ = linear_features(view.fx(m.anchor))
    if in_f is not None and in_f != o:
        return f"linear in_features {in_f} != merged width {o}"
    return h, d


def _check(m: Match, view) -> object:
    r = _heads(m, view)
    return r if isinstance(r, str) else None


def _plan(m: Match, view) -> PlanContribution:
    h, d = _heads(m, view)  # type: ignore[misc]
    return PlanContribution(input_segments=(d,) * h, detail={"heads": h})


RESHAPE_TO_LINEAR = Pattern(
    name="reshape_to_linear",
    search=(_reshape_pattern, _view_pattern, _flatten_pattern),
    example_inputs=_example,
    check=_check,
    plan=_plan,
    shareable=frozenset({"aten.view.default", "aten.flatten.using_ints"}),
    priority=30,
    description="head merge [..., H, D] -> [..., H*D] feeding a linear (attention output projections) -> H input segments",
)
