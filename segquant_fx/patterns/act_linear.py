"""``activation_to_linear``: SiLU / GELU / gated product feeding a linear -> DualScale.

The linear's input comes from SiLU, GELU (any ``approximate``) or a gated product, so it gets
**DualScale**: separate scales for the positive and negative parts of the input.

SiLU outputs lie in about [-0.28, inf) and GELU in about [-0.17, inf): one symmetric scale leaves the
narrow negative side only a handful of levels. DualScale gives each side its own grid.

**Gated products** (GEGLU ``a * gelu(g)``, SwiGLU ``silu(g) * a``) are treated as activation-derived,
always, and flagged with ``activation="geglu"|"swiglu"``. Why: the calibrator measures the positive
maximum and the negative minimum separately, so when the product is symmetric the two scales coincide
and DualScale equals per-tensor quantization (no loss), and when the gate saturates the product is
polarity-skewed and DualScale helps. Treating them one consistent way also keeps ablations comparable
with the reference implementation, which flags the GEGLU product too. A later pass may drop DualScale
where calibration finds the two halves symmetric (it costs a second GEMM).

Cases:

1. ``linear(silu(x))`` / ``linear(gelu(x))`` -> dual_scale.
2. ``linear(a * gelu(g))`` / ``linear(silu(g) * a)`` -> dual_scale (gated).
3. ``linear(cat([a, gelu(b)], -1))`` -> dual_scale with per-segment flags ``(False, True)`` (FLUX
   single-block ``proj_out``: only the MLP half is activation-derived).

The activation output must be consumed only by linears (through transparent ops); an activation that
also feeds something else (a residual add, a norm) is rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segquant_fx.patterns._util import linear_features
from segquant_fx.patterns.base import Match, Pattern, PlanContribution
from segquant_fx.patterns.cat_linear import _cat_sizes, _check_cat

__all__ = ["ACTIVATION_TO_LINEAR", "activation_kind"]

_ACT = {"aten.silu.default": "silu", "aten.silu_.default": "silu", "aten.gelu.default": "gelu", "aten.gelu_.default": "gelu"}
_LINEAR = "aten.linear.default"


def _silu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(x), w)


def _gelu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(x), w)


def _geglu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x * F.gelu(x), w)


def _swiglu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(x) * x, w)


def _cat_gelu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.cat([x, F.gelu(x)], -1), w)


def _cat_silu_pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.cat([x, F.silu(x)], -1), w)


def _example() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(2, 4)
    return [(x, torch.randn(3, 4))] * 4 + [(x, torch.randn(3, 8))] * 2


def activation_kind(view, name: str) -> str | None:
    """``silu``/``gelu``/``geglu``/``swiglu`` if contracted node ``name`` is activation-derived, else None."""
    t = view.target(name)
    if t in _ACT:
        return _ACT[t]
    if t in ("aten.mul.Tensor", "aten.mul_.Tensor"):
        operands = view.producers(name, 0) + view.producers(name, 1)
        if len(operands) != 2:  # a product with a scalar is a rescaled activation, not a gate
            return None
        widths = {(view.graph.nodes[p]["shape"] or ("?",))[-1] for p in operands}
        if len(widths) != 1:  # a gate multiplies elementwise; a broadcast row/column is not one
            return None
        kinds = [k for k in (_ACT.get(view.target(p)) for p in operands) if k]
        if len(kinds) == 1:
            return "geglu" if kinds[0] == "gelu" else "swiglu"
    return None


def _feeding(m: Match, view) -> str:
    return view.producer(m.anchor, 0)


def _only_linears(view, node: str) -> object:
    others = [c for c in view.consumers(node) if view.target(c) != _LINEAR]
    if others:
        return f"{node} also feeds {', '.join(f'{o} ({view.target(o)})' for o in others)}"
    return None


def _check(m: Match, view) -> object:
    feed = _feeding(m, view)
    if feed is None:
        return "linear input not found"
    if m.has("aten.cat"):
        why = _check_cat(m, view)
        if why is not None:
            return why
        flags = [activation_kind(view, p) is not None for p in view.producers(feed, 0)]
        if not any(flags):
            return f"no piece of {feed} is activation-derived"
        return None
    if activation_kind(view, feed) is None:
        return f"{feed} ({view.target(feed)}) is not an activation or gated product"
    return _only_linears(view, feed)


def _plan(m: Match, view) -> PlanContribution:
    feed = _feeding(m, view)
    if m.has("aten.cat"):
        cat = view.fx(feed)
        pieces = view.producers(feed, 0)
        kinds = [activation_kind(view, p) for p in pieces]
        sizes = _cat_sizes(cat, linear_features(view.fx(m.anchor))[0])
        # empty pieces were dropped from the sizes; keep flags aligned with non-empty pieces
        flags = tuple(k is not None for k, t in zip(kinds, cat.args[0], strict=False) if _nonempty(t))
        if sizes is None or len(flags) != len(sizes):
            flags = tuple(k is not None for k in kinds)
        return PlanContribution(
            dual_scale=True,
            dual_scale_segments=flags if not all(flags) else None,
            detail={"activation": next(k for k in kinds if k)},
        )
    return PlanContribution(dual_scale=True, detail={"activation": activation_kind(view, feed)})


def _nonempty(t) -> bool:
    from segquant_fx.graph.fx_utils import shape_of, static_int

    s = shape_of(t)
    return not s or static_int(s[-1]) != 0


ACTIVATION_TO_LINEAR = Pattern(
    name="activation_to_linear",
    search=(_silu_pattern, _gelu_pattern, _geglu_pattern, _swiglu_pattern, _cat_gelu_pattern, _cat_silu_pattern),
    example_inputs=_example,
    check=_check,
    plan=_plan,
    shareable=frozenset(
        {"aten.silu.default", "aten.gelu.default", "aten.mul.Tensor", "aten.cat.default"}
    ),
    priority=40,
    description="SiLU / GELU / gated-product output feeding a linear -> DualScale (per segment through a concat)",
)
