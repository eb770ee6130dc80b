"""``concat_to_linear`` / ``stack_to_linear`` (input segments) and ``concat_to_conv`` (reported only).

A linear whose input is a last-dim concatenation reads semantically different pieces (FLUX single-block
``proj_out`` = [attention 3072, MLP 12288]; SDXL ``add_embedding`` = [text_embeds, time embeds]); each
piece gets its own activation scale. Unequal sizes are supported.

Cases:

1. ``linear(cat([a, b, ...], -1))`` (``torch.cat`` or ``torch.concat``) -> segments = last dims of a, b.
2. ``linear(stack([a, b, ...], -1))`` -> n segments of size 1 (each column is its own source).
3. ``linear(stack([a, b, ...], -2).flatten(-2))`` (or view/reshape merging the last two dims) -> n
   segments of size d.
4. ``conv(cat([a, b], 1))`` -> reported only (UNet skip connections; Q-Diffusion's shortcut splitting).

A concatenation along any other dim (e.g. MMDiT's text+image *sequence* concat, dim 1) does not match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segquant_fx.graph.fx_utils import shape_of, static_int, target_name
from segquant_fx.patterns._util import dim_of, linear_features
from segquant_fx.patterns.base import Match, Pattern, PlanContribution

__all__ = ["CONCAT_TO_LINEAR", "STACK_TO_LINEAR", "CONCAT_TO_CONV"]


def _cat_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.cat([a, b], -1), w)


def _concat_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.concat([a, b], -1), w)


def _cat_example() -> tuple[torch.Tensor, ...]:
    return torch.randn(2, 3), torch.randn(2, 5), torch.randn(4, 8)


def _cat_sizes(cat, total: int | None = None) -> tuple[int, ...] | None:
    """Last-dim sizes of the non-empty pieces of ``cat``.

    One symbolic piece (e.g. ``reshape(B, -1)`` when two inputs carry different batch symbols) is
    inferred from ``total`` (the consuming linear's in_features) when given.
    """
    sizes: list[int | None] = []
    for t in cat.args[0]:
        s = shape_of(t)
        if s is None or not s:
            return None
        v = static_int(s[-1])
        if v != 0:  # empty pieces contribute nothing
            sizes.append(v)
    unknown = [i for i, v in enumerate(sizes) if v is None]
    if len(unknown) == 1 and total is not None:
        sizes[unknown[0]] = total - sum(v for v in sizes if v is not None)
        if sizes[unknown[0]] <= 0:
            return None
    elif unknown:
        return None
    return tuple(sizes)  # type: ignore[arg-type]


def _check_cat(m: Match, view) -> object:
    cat = view.fx(m.node("aten.cat"))
    out = shape_of(cat)
    if out is None:
        return f"{cat.name}: unknown shape"
    d = dim_of(cat, 1, "dim", 0, len(out))
    if d != len(out) - 1:
        return f"{cat.name} concatenates along dim {d}, not the last dim {len(out) - 1}"
    in_f, _ = linear_features(view.fx(m.anchor))
    sizes = _cat_sizes(cat, in_f)
    if sizes is None:
        return f"{cat.name}: piece sizes are symbolic"
    if len(sizes) < 2:
        return f"{cat.name} has fewer than two non-empty pieces"
    if in_f is not None and sum(sizes) != in_f:
        return f"{cat.name} pieces {sizes} do not add up to in_features {in_f}"
    return None


def _plan_cat(m: Match, view) -> PlanContribution:
    in_f, _ = linear_features(view.fx(m.anchor))
    return PlanContribution(input_segments=_cat_sizes(view.fx(m.node("aten.cat")), in_f))


CONCAT_TO_LINEAR = Pattern(
    name="concat_to_linear",
    search=(_cat_pattern, _concat_pattern),
    example_inputs=_cat_example,
    check=_check_cat,
    plan=_plan_cat,
    shareable=frozenset({"aten.cat.default"}),
    priority=20,
    description="linear whose input is a last-dim concatenation (unequal pieces allowed) -> input segments",
)


def _stack_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.stack([a, b], -1), w)


def _stack_flatten_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.stack([a, b], -2).flatten(-2), w)


def _stack_view_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.stack([a, b], -2).view(3, 4), w)


def _stack_reshape_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.stack([a, b], -2).reshape(3, 4), w)


def _stack_example() -> list[tuple[torch.Tensor, ...]]:
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    return [(a, b, torch.randn(4, 2)), (a, b, torch.randn(4, 4)), (a, b, torch.randn(4, 4)), (a, b, torch.randn(4, 4))]


def _check_stack(m: Match, view) -> object:
    stack = view.fx(m.node("aten.stack"))
    out = shape_of(stack)
    if out is None:
        return f"{stack.name}: unknown shape"
    d = dim_of(stack, 1, "dim", 0, len(out))
    if m.alternative == 0:
        if d != len(out) - 1:
            return f"{stack.name} stacks along dim {d}, not as the new last dim"
        return None
    if d != len(out) - 2:
        return f"{stack.name} stacks along dim {d}; only dim -2 followed by a merge of the last two dims is a segmentation"
    merge = next(view.fx(n) for n in m.nodes_map.values() if view.fx(n) is not stack and view.fx(n).name != m.anchor)
    mo = shape_of(merge)
    if mo is None or len(mo) != len(out) - 1 or static_int(mo[-1]) != (static_int(out[-1]) or -1) * (static_int(out[-2]) or -1):
        return f"{merge.name} does not merge exactly the last two dims of {stack.name}"
    return None


def _plan_stack(m: Match, view) -> PlanContribution:
    stack = view.fx(m.node("aten.stack"))
    out = shape_of(stack)
    n = static_int(out[-1] if m.alternative == 0 else out[-2])
    d = 1 if m.alternative == 0 else static_int(out[-1])
    return PlanContribution(input_segments=(d,) * n, detail={"op": target_name(stack)})


STACK_TO_LINEAR = Pattern(
    name="stack_to_linear",
    search=(_stack_pattern, _stack_flatten_pattern, _stack_view_pattern, _stack_reshape_pattern),
    example_inputs=_stack_example,
    check=_check_stack,
    plan=_plan_stack,
    shareable=frozenset({"aten.stack.default"}),
    priority=21,
    description="linear whose input stacks n tensors along the last dim (or along -2, then merged) -> input segments",
)


def _conv_cat_pattern(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(torch.cat([a, b], 1), w)


def _conv_example() -> tuple[torch.Tensor, ...]:
    return torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(4, 5, 1, 1)


def _check_conv_cat(m: Match, view) -> object:
    cat = view.fx(m.node("aten.cat"))
    out = shape_of(cat)
    if out is None or len(out) < 3:
        return f"{cat.name}: not a feature map"
    if dim_of(cat, 1, "dim", 0, len(out)) != 1:
        return f"{cat.name} does not concatenate channels (dim 1)"
    if m.nodes_map and view.producer(m.anchor, 0) != cat.name:
        return f"{cat.name} is not the conv's input"
    return None


def _plan_conv_cat(m: Match, view) -> PlanContribution:
    cat = view.fx(m.node("aten.cat"))
    sizes = tuple(static_int(shape_of(t)[1]) for t in cat.args[0])
    return PlanContribution(input_segments=sizes)


CONCAT_TO_CONV = Pattern(
    name="concat_to_conv",
    search=(_conv_cat_pattern,),
    example_inputs=_conv_example,
    check=_check_conv_cat,
    plan=_plan_conv_cat,
    anchor="aten.conv2d.default",
    shareable=frozenset({"aten.cat.default"}),
    kind="conv",
    priority=90,
    description="channel concatenation feeding a convolution (UNet skip connections); reported only",
)
