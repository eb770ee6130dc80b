"""``activation_to_linear``: SiLU / GELU / gated-product inputs -> DualScale, per segment through a cat.

Positive tests assert structure (matched activation and linear nodes), count (every built-in pattern,
exact layers), numerics (exported program == eager) and the exact DualScale flags and detail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._toys import AdaLNToy, assert_counts, captured, host_targets, matches_of, report_of

_LINEAR = "aten.linear.default"
_SILU = "aten.silu.default"
_GELU = "aten.gelu.default"
_MUL = "aten.mul.Tensor"


class _ActLinear(nn.Module):
    """``lin(act(x))`` with ``act`` a module or a function."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.lin = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.act(x))


def _ex(b: int) -> tuple[torch.Tensor]:
    return (torch.randn(b, 5, 8),)


def _single_match(cm, module: str):
    view, found, _ = matches_of(cm, "activation_to_linear")
    assert [view.graph.nodes[m.anchor]["module"] for m in found] == [module]
    return view, found[0]


@pytest.mark.parametrize(
    ("act", "target", "kind", "approximate"),
    [
        pytest.param(nn.SiLU(), _SILU, "silu", None, id="SiLU-module"),
        pytest.param(F.silu, _SILU, "silu", None, id="F.silu"),
        pytest.param(nn.GELU(), _GELU, "gelu", "none", id="GELU-module"),
        pytest.param(nn.GELU(approximate="tanh"), _GELU, "gelu", "tanh", id="GELU-tanh-module"),
        pytest.param(F.gelu, _GELU, "gelu", "none", id="F.gelu"),
        pytest.param(lambda x: F.gelu(x, approximate="tanh"), _GELU, "gelu", "tanh", id="F.gelu-tanh"),
    ],
)
def test_activation_feeding_a_linear_is_dual_scale(act, target, kind, approximate):
    torch.manual_seed(0)
    cm = captured(_ActLinear(act), _ex)
    view, m = _single_match(cm, "lin")
    assert host_targets(view, m) == {target, _LINEAR}
    act_node = view.fx(m.node(target.rsplit(".", 1)[0]))
    assert view.producer(m.anchor, 0) == act_node.name
    if approximate is not None:
        assert act_node.kwargs.get("approximate", "none") == approximate
    assert m.contribution.dual_scale is True
    assert m.contribution.detail == {"activation": kind}

    report = report_of(cm)
    assert_counts(report, activation_to_linear=1)
    assert set(report.layers) == {"lin"}
    plan = report.layers["lin"]
    assert plan.patterns == ("activation_to_linear",)
    assert plan.dual_scale is True
    assert plan.dual_scale_segments is None
    assert plan.input_segments is None
    assert plan.output_segments is None
    assert report.rejections == []


class _GatedMLP(nn.Module):
    """``proj(x).chunk(2, -1)`` -> gated product -> ``out``."""

    def __init__(self, gate):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(8, 6)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)
        return self.out(self.gate(a, g))


@pytest.mark.parametrize(
    ("gate", "act", "kind"),
    [
        pytest.param(lambda a, g: a * F.gelu(g), _GELU, "geglu", id="geglu"),
        pytest.param(lambda a, g: F.gelu(g) * a, _GELU, "geglu", id="geglu-reversed"),
        pytest.param(lambda a, g: a * F.gelu(g, approximate="tanh"), _GELU, "geglu", id="geglu-tanh"),
        pytest.param(lambda a, g: F.silu(g) * a, _SILU, "swiglu", id="swiglu"),
        pytest.param(lambda a, g: a * F.silu(g), _SILU, "swiglu", id="swiglu-reversed"),
    ],
)
def test_gated_product_feeding_a_linear_is_dual_scale(gate, act, kind):
    torch.manual_seed(0)
    cm = captured(_GatedMLP(gate), _ex)
    view, m = _single_match(cm, "out")
    assert host_targets(view, m) == {act, _MUL, _LINEAR}
    mul = m.node("aten.mul")
    assert view.producer(m.anchor, 0) == mul
    assert sorted(view.target(p) for p in view.producers(mul, 0) + view.producers(mul, 1)) == sorted(
        [act, "getitem"]
    )
    assert m.contribution.detail == {"activation": kind}

    report = report_of(cm)
    assert_counts(report, activation_to_linear=1, linear_to_chunk=1)
    assert set(report.layers) == {"proj", "out"}
    assert report.layers["out"].dual_scale is True
    assert report.layers["out"].patterns == ("activation_to_linear",)
    # the projection is the chunk's: two output segments (hidden, gate), no DualScale
    assert report.layers["proj"].output_segments == (8, 8)
    assert report.layers["proj"].dual_scale is False


class _FluxSingleProjOut(nn.Module):
    """FLUX single block: ``proj_out(cat([attn, gelu(proj_mlp(x))], -1))``."""

    def __init__(self):
        super().__init__()
        self.proj_mlp = nn.Linear(8, 32)
        self.proj_out = nn.Linear(8 + 32, 8)

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        mlp = F.gelu(self.proj_mlp(x), approximate="tanh")
        return self.proj_out(torch.cat([attn, mlp], dim=-1))


def test_cat_of_attention_and_gelu_is_dual_scale_per_segment():
    torch.manual_seed(0)
    cm = captured(_FluxSingleProjOut(), lambda b: (torch.randn(b, 5, 8), torch.randn(b, 5, 8)))
    view, m = _single_match(cm, "proj_out")
    assert host_targets(view, m) == {"aten.cat.default", _GELU, _LINEAR}
    assert m.contribution.dual_scale_segments == (False, True)
    assert m.contribution.detail == {"activation": "gelu"}

    report = report_of(cm)
    assert_counts(report, activation_to_linear=1, concat_to_linear=1)
    assert set(report.layers) == {"proj_mlp", "proj_out"}
    plan = report.layers["proj_out"]
    assert plan.patterns == ("concat_to_linear", "activation_to_linear")
    assert plan.input_segments == (8, 32)
    assert plan.dual_scale is True
    assert plan.dual_scale_segments == (False, True)
    assert plan.notes == ()
    assert report.layers["proj_mlp"].patterns == ()


def test_adaln_modulation_has_output_segments_and_dual_scale():
    """silu -> linear -> chunk: one plan with both axes (output segments AND DualScale)."""
    torch.manual_seed(0)
    cm = captured(AdaLNToy(), AdaLNToy.example)
    view, m = _single_match(cm, "ada")
    assert host_targets(view, m) == {_SILU, _LINEAR}

    report = report_of(cm)
    assert_counts(report, activation_to_linear=1, linear_to_chunk=1)
    assert set(report.layers) == {"ada"}
    plan = report.layers["ada"]
    assert plan.patterns == ("linear_to_chunk", "activation_to_linear")
    assert plan.output_segments == (4, 4, 4)
    assert plan.dual_scale is True
    assert plan.input_segments is None
    assert plan.dual_scale_segments is None


def test_silu_shared_by_two_linears():
    """One SiLU read by two linears (only linears): both are DualScale."""
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.silu(x)
            return self.a(h) * self.b(h)

    cm = captured(TwoHeads(), _ex)
    view, found, _ = matches_of(cm, "activation_to_linear")
    assert [view.graph.nodes[m.anchor]["module"] for m in found] == ["a", "b"]
    assert found[0].node("aten.silu") == found[1].node("aten.silu")

    report = report_of(cm)
    assert_counts(report, activation_to_linear=2)
    assert report.layers["a"].dual_scale and report.layers["b"].dual_scale


# --------------------------------------------------------------------------------------- negatives


def test_activation_also_feeding_a_residual_is_not_dual_scale():
    """``h = silu(x); lin(h) + h``: the activation also feeds an add, so it is not a pure linear input."""
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.silu(x)
            return self.lin(h) + h

    cm = captured(Residual(), _ex)
    _, found, rejections = matches_of(cm, "activation_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "silu also feeds add (aten.add.Tensor)" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].dual_scale is False


def test_activation_also_returned_is_not_dual_scale():
    """``h = gelu(x); return lin(h), h``: the activation leaves the graph too."""
    torch.manual_seed(0)
    cm = captured(_ReturnsActivation(), _ex)
    _, found, rejections = matches_of(cm, "activation_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "also feeds output" in rejections[0].message
    assert_counts(report_of(cm))


class _ReturnsActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(x)
        return self.lin(h), h


@pytest.mark.parametrize(
    "act", [nn.ReLU(), F.relu, torch.tanh, torch.sigmoid], ids=["ReLU", "F.relu", "tanh", "sigmoid"]
)
def test_other_activations_are_not_flagged(act):
    """ReLU (and tanh/sigmoid) are not the skewed activations DualScale is for."""
    torch.manual_seed(0)
    cm = captured(_ActLinear(act), _ex)
    _, found, rejections = matches_of(cm, "activation_to_linear")
    assert found == []
    assert rejections == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].dual_scale is False


def test_activation_behind_a_scale_is_not_dual_scale():
    """``lin(silu(x) * 2)``: a scale is not transparent and not a gate; no DualScale."""
    torch.manual_seed(0)
    cm = captured(_ActLinear(lambda x: F.silu(x) * 2), _ex)
    _, found, _ = matches_of(cm, "activation_to_linear")
    assert found == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].dual_scale is False


def test_activation_behind_an_add_is_not_dual_scale():
    """``lin(silu(x) + 1)``: the add is not transparent, the linear input is no longer the activation."""
    torch.manual_seed(0)
    cm = captured(_ActLinear(lambda x: F.silu(x) + 1), _ex)
    assert matches_of(cm, "activation_to_linear")[1] == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].dual_scale is False


def test_cat_without_activation_pieces_is_not_dual_scale():
    """``lin(cat([a, b], -1))`` of plain inputs: input segments, but no DualScale."""
    torch.manual_seed(0)

    class PlainCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.cat([a, b], -1))

    cm = captured(PlainCat(), lambda b: (torch.randn(b, 5, 8), torch.randn(b, 5, 8)))
    assert matches_of(cm, "activation_to_linear")[1] == []
    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].dual_scale is False
    assert report.layers["lin"].input_segments == (8, 8)
