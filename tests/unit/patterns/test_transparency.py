"""Transparency: ops that keep the meaning of the last dim never change what the patterns find.

A property test inserts random sequences of transparent ops (casts, copies, eval dropout, identity
views, non-last-dim transposes and slices, reshapes that keep the last dim) between a producer and
its consumer in a few base toys, and checks that every linear gets the same plan as without them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segquant_fx import find_patterns
from segquant_fx.capture import capture
from segquant_fx.graph import GraphView
from segquant_fx.graph.nx_view import Transparency

from ._toys import (
    TRANSPARENT_OPS,
    AdaLNToy,
    CatToy,
    ChunkToy,
    HeadMergeToy,
    SiluToy,
    apply_ops,
    assert_counts,
    captured,
    matches_of,
    plan_tuple,
    report_of,
)

#: base toy -> (expected counts, expected plan of its one planned layer)
BASES = {
    "chunk": (ChunkToy, {"linear_to_chunk": 1}, "lin", {"output_segments": (4, 4, 4)}),
    "cat": (CatToy, {"concat_to_linear": 1}, "lin", {"input_segments": (4, 12)}),
    "head_merge": (HeadMergeToy, {"reshape_to_linear": 1}, "to_out", {"input_segments": (3, 3, 3, 3)}),
    "silu": (SiluToy, {"activation_to_linear": 1}, "lin", {"dual_scale": True}),
    "adaln": (
        AdaLNToy,
        {"linear_to_chunk": 1, "activation_to_linear": 1},
        "ada",
        {"output_segments": (4, 4, 4), "dual_scale": True},
    ),
}

_BASELINE: dict[str, dict] = {}


def _plans(toy_cls, ops) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = toy_cls(ops).eval()
    cm = capture(model, toy_cls.example(2))
    report = find_patterns(cm)
    return {k: plan_tuple(v) for k, v in report.layers.items()}, report.counts


def _baseline(name: str) -> tuple[dict, dict]:
    if name not in _BASELINE:
        _BASELINE[name] = _plans(BASES[name][0], ())
    return _BASELINE[name]


@pytest.mark.parametrize("name", sorted(BASES))
def test_base_toys(name):
    """The bases themselves: structure, numerics and counts, before any insertion."""
    toy_cls, counts, layer, expected = BASES[name]
    cm = captured(toy_cls(), toy_cls.example)
    report = report_of(cm)
    assert_counts(report, **counts)
    plan = report.layers[layer]
    for field, value in expected.items():
        assert getattr(plan, field) == value
    assert report.rejections == []


@pytest.mark.parametrize("op", sorted(TRANSPARENT_OPS))
def test_each_insertion_is_numerically_a_no_op_and_looked_through(op):
    """Every op of the pool leaves the values alone and is contracted away by the view."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(apply_ops(x, [op]), x, atol=0, rtol=0)

    cm = captured(ChunkToy([op]), ChunkToy.example)
    view = GraphView(cm.graph_module)
    (lin,) = view.by_target["aten.linear.default"]
    (chunk,) = view.by_target["aten.chunk.default"]
    assert view.consumers(lin) == [chunk]
    between = {n.name for n in cm.graph.nodes if n.op == "call_function"} - set(view.graph.nodes)
    (edge,) = view.edges_between(lin, chunk)
    assert set(edge["via"]) <= between


_OPS = st.lists(st.sampled_from(sorted(TRANSPARENT_OPS)), min_size=1, max_size=4)


@pytest.mark.parametrize("name", sorted(BASES))
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_transparent_insertions_never_change_the_plans(name, ops):
    toy_cls = BASES[name][0]
    base_plans, base_counts = _baseline(name)
    plans, counts = _plans(toy_cls, ops)
    assert counts == base_counts
    assert plans == base_plans


def test_transparency_disabled_breaks_the_match():
    """Control: with transparency off, the cast between linear and chunk hides the chunk."""
    torch.manual_seed(0)
    cm = captured(ChunkToy(["float"]), ChunkToy.example)
    report = find_patterns(cm, transparency=Transparency(enabled=False))
    assert report.counts["linear_to_chunk"] == 0
    assert report_of(cm).counts["linear_to_chunk"] == 1


# ------------------------------------------------------------------------------- non-data nodes


class _ShapeQueries(torch.nn.Module):
    """A float32 -> float32 cast (``_assert_tensor_metadata``) and shape reads (``sym_size``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.lin(x).to(torch.float32)
        a, c, d = y.chunk(3, dim=-1)
        return (a * c + d).reshape(b * s, 4).reshape(b, s, 4)


def test_graph_view_drops_assert_metadata_and_sym_size():
    torch.manual_seed(0)
    cm = captured(_ShapeQueries(), lambda b: (torch.randn(b, 5, 8),))
    fx_targets = [str(n.target) for n in cm.graph.nodes if n.op == "call_function"]
    assert "aten._assert_tensor_metadata.default" in fx_targets
    assert "aten.sym_size.int" in fx_targets

    view = GraphView(cm.graph_module)
    dropped = {"aten._assert_tensor_metadata.default", "aten.sym_size.int"}
    assert not dropped & {d["target"] for _, d in view.graph.nodes(data=True)}
    assert not dropped & set(view.by_target)

    # on the raw graph the linear has two users (the metadata assert and the cast) ...
    lin_fx = next(n for n in cm.graph.nodes if str(n.target) == "aten.linear.default")
    assert sorted(str(u.target) for u in lin_fx.users) == [
        "aten._assert_tensor_metadata.default",
        "aten.to.dtype",
    ]
    # ... in the view, only the chunk consumes it, so the only-consumer constraint holds
    assert [view.target(c) for c in view.consumers(lin_fx.name)] == ["aten.chunk.default"]
    x = next(n for n in cm.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert any(str(u.target) == "aten.sym_size.int" for u in x.users)
    assert [view.target(c) for c in view.consumers("x")] == ["aten.linear.default"]

    _, found, rejections = matches_of(view, "linear_to_chunk")
    assert len(found) == 1
    assert rejections == []
