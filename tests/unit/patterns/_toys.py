"""Toy modules and assertion helpers shared by the pattern tests.

Every pattern test follows the same shape (style guide, section 14):

* **numerics**: :func:`captured` exports the toy and checks that the exported program reproduces the
  eager model, at the example batch and at another batch (the graph we match on is the real
  computation, and its batch dim really is dynamic);
* **structure**: :func:`matches_of` returns the accepted :class:`~segquant_fx.patterns.Match` records
  with the :class:`~segquant_fx.graph.GraphView` they were found in, so tests can look at the matched
  host nodes and their targets;
* **count**: :func:`assert_counts` pins the exact number of matches of *every* built-in pattern.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx import find_patterns
from segquant_fx.capture import CapturedModel, capture
from segquant_fx.graph import GraphView
from segquant_fx.patterns import BUILTIN_PATTERNS, Match, Rejection, find_matches, get_pattern
from segquant_fx.report import PatternReport

__all__ = [
    "TRANSPARENT_OPS",
    "AdaLNToy",
    "CatToy",
    "ChunkToy",
    "HeadMergeToy",
    "LinearThen",
    "SiluToy",
    "apply_ops",
    "assert_counts",
    "captured",
    "host_targets",
    "matches_of",
    "plan_tuple",
    "report_of",
]

MakeExample = Callable[[int], tuple[Any, ...]]


# ------------------------------------------------------------------------------------------ helpers


def captured(
    model: nn.Module,
    make_example: MakeExample,
    *,
    batch: int = 2,
    other_batches: Sequence[int] = (3,),
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> CapturedModel:
    """Capture ``model`` on ``make_example(batch)`` and check the exported program against eager.

    ``make_example(b)`` must return fresh positional inputs with batch ``b``; the exported program is
    run on the capture example and on one example per ``other_batches`` entry.
    """
    model.eval()
    torch.manual_seed(0)
    cm = capture(model, make_example(batch))
    cm.graph_module.graph.lint()
    exported = cm.exported.module()
    for b in (batch, *other_batches):
        torch.manual_seed(100 + b)
        args = make_example(b)
        # capture binds positional inputs to forward's parameter names: call the program the same way
        sig = inspect.signature(model.forward)
        if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
            kwargs = None  # *args forwards are captured positionally
        else:
            kwargs = dict(sig.bind(*args).arguments)
        with torch.no_grad():
            expected = model(*args)
            got = exported(*args) if kwargs is None else exported(**kwargs)
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    return cm


def report_of(cm: CapturedModel, patterns: Sequence[str] | None = None) -> PatternReport:
    """``find_patterns`` on an already captured model, in debug mode (rejections kept)."""
    return find_patterns(cm, patterns=patterns, debug=True)


def assert_counts(report: PatternReport, **expected: int) -> None:
    """Every built-in pattern matched exactly ``expected.get(name, 0)`` times."""
    unknown = set(expected) - set(BUILTIN_PATTERNS)
    assert not unknown, f"not built-in patterns: {unknown}"
    got = {name: report.counts.get(name) for name in BUILTIN_PATTERNS}
    want = {name: expected.get(name, 0) for name in BUILTIN_PATTERNS}
    assert got == want


def matches_of(cm: CapturedModel | GraphView, name: str) -> tuple[GraphView, list[Match], list[Rejection]]:
    """(view, accepted matches, rejections) of built-in or registered pattern ``name``."""
    view = cm if isinstance(cm, GraphView) else GraphView(cm.graph_module)
    rejections: list[Rejection] = []
    found = find_matches(view, get_pattern(name), rejections=rejections)
    return view, found, rejections


def host_targets(view: GraphView, m: Match) -> set[str]:
    """Targets of the host graph nodes a match covers."""
    return {view.target(h) for h in m.nodes_map.values()}


def plan_tuple(plan: Any) -> tuple[Any, ...]:
    """The segmentation of a LayerPlan, comparable across captures (node names aside)."""
    return (
        plan.patterns,
        plan.output_segments,
        plan.input_segments,
        plan.dual_scale,
        plan.dual_scale_segments,
        plan.in_features,
        plan.out_features,
    )


# --------------------------------------------------------------------------- transparent insertions

#: Ops that keep the meaning of the last dim of a 3-D ``[B, S, C]`` tensor, by name.
TRANSPARENT_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "to_f64_and_back": lambda x: x.to(torch.float64).to(torch.float32),
    "to_float32": lambda x: x.to(torch.float32),
    "float": lambda x: x.float(),
    "contiguous": lambda x: x.contiguous(),
    "clone": lambda x: x.clone(),
    "dropout_eval": lambda x: F.dropout(x, 0.25, training=False),
    "view_same_shape": lambda x: x.view(x.shape),
    "unsqueeze_squeeze": lambda x: x.unsqueeze(0).squeeze(0),
    "transpose_01_and_back": lambda x: x.transpose(0, 1).transpose(0, 1),
    "slice_all": lambda x: x[:, :],
    "reshape_2d_and_back": lambda x: x.reshape(-1, x.shape[-1]).reshape(x.shape[0], x.shape[1], x.shape[-1]),
}


def apply_ops(x: torch.Tensor, ops: Sequence[str]) -> torch.Tensor:
    """Apply the named :data:`TRANSPARENT_OPS` in order."""
    for name in ops:
        x = TRANSPARENT_OPS[name](x)
    return x


# -------------------------------------------------------------------------------------------- toys


class LinearThen(nn.Module):
    """``fn(lin(x))``: one linear and whatever ``fn`` does with its output."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], in_f: int = 8, out_f: int = 12, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.lin(x))


class ChunkToy(nn.Module):
    """``lin(x)`` (12 features) chunked in 3 along the last dim, ``ops`` in between."""

    def __init__(self, ops: Sequence[str] = ()):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.ops = tuple(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = apply_ops(self.lin(x), self.ops).chunk(3, dim=-1)
        return a * b + c

    @staticmethod
    def example(b: int) -> tuple[torch.Tensor]:
        return (torch.randn(b, 5, 8),)


class CatToy(nn.Module):
    """``lin(cat([a, b], -1))`` with pieces of 4 and 12 features, ``ops`` between cat and linear."""

    def __init__(self, ops: Sequence[str] = ()):
        super().__init__()
        self.lin = nn.Linear(16, 6)
        self.ops = tuple(ops)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(apply_ops(torch.cat([a, b], dim=-1), self.ops))

    @staticmethod
    def example(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 5, 4), torch.randn(b, 5, 12)


class HeadMergeToy(nn.Module):
    """Attention output projection: ``[B, H, S, D] -> transpose -> [B, S, H*D] -> ops -> to_out``."""

    heads, head_dim = 4, 3

    def __init__(self, ops: Sequence[str] = ()):
        super().__init__()
        self.to_out = nn.Linear(self.heads * self.head_dim, 6)
        self.ops = tuple(ops)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = o.shape
        h = o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.to_out(apply_ops(h, self.ops))

    @classmethod
    def example(cls, b: int) -> tuple[torch.Tensor]:
        return (torch.randn(b, cls.heads, 5, cls.head_dim),)


class SiluToy(nn.Module):
    """``lin(ops(silu(x)))``."""

    def __init__(self, ops: Sequence[str] = ()):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.ops = tuple(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(apply_ops(F.silu(x), self.ops))

    @staticmethod
    def example(b: int) -> tuple[torch.Tensor]:
        return (torch.randn(b, 5, 8),)


class AdaLNToy(nn.Module):
    """adaLN modulation: ``silu -> ops -> linear -> ops -> chunk(3, -1)`` modulating ``h``."""

    def __init__(self, ops: Sequence[str] = ()):
        super().__init__()
        self.norm = nn.LayerNorm(4, elementwise_affine=False)
        self.ada = nn.Linear(8, 12)
        self.ops = tuple(ops)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        mod = apply_ops(self.ada(apply_ops(F.silu(emb), self.ops)), self.ops)
        shift, scale, gate = mod.chunk(3, dim=-1)
        return h + gate * (self.norm(h) * (1 + scale) + shift)

    @staticmethod
    def example(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 5, 4), torch.randn(b, 5, 8)
