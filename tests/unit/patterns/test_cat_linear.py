"""``concat_to_linear``, ``stack_to_linear`` (input segments) and ``concat_to_conv`` (reported only).

Positive tests assert structure (matched host nodes), count (every built-in pattern, exact layers),
numerics (exported program == eager) and the exact input segments; near misses each get a test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx.report import ConvReport

from ._toys import assert_counts, captured, host_targets, matches_of, report_of

_LINEAR = "aten.linear.default"


class _CatLinear(nn.Module):
    """``lin(fn(*pieces))``: a linear reading a combination of its inputs."""

    def __init__(self, fn, in_f: int, out_f: int = 6):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)
        self.fn = fn

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(self.fn(a, b) if c is None else self.fn(a, b, c))


def _pieces(*widths: int, seq: int | None = 5):
    """make_example for pieces ``[B, seq, w]`` (or ``[B, w]`` when ``seq`` is None)."""

    def make(b: int) -> tuple[torch.Tensor, ...]:
        lead = (b,) if seq is None else (b, seq)
        return tuple(torch.randn(*lead, w) for w in widths)

    return make


def _assert_cat_match(cm, host_cat: str, module: str = "lin"):
    view, found, _ = matches_of(cm, "concat_to_linear")
    mods = [view.graph.nodes[m.anchor]["module"] for m in found]
    assert module in mods
    m = found[mods.index(module)]
    assert set(m.targets.values()) == {"aten.cat.default", _LINEAR}
    assert host_targets(view, m) == {host_cat, _LINEAR}
    cat = m.node("aten.cat")
    assert view.producer(m.anchor, 0) == cat
    return view, m


# ------------------------------------------------------------------------------------------ concat


@pytest.mark.parametrize(
    ("fn", "host_cat"),
    [
        pytest.param(lambda a, b: torch.cat([a, b], -1), "aten.cat.default", id="cat-positional"),
        pytest.param(lambda a, b: torch.cat([a, b], dim=-1), "aten.cat.default", id="cat-keyword"),
        pytest.param(lambda a, b: torch.cat((a, b), dim=2), "aten.cat.default", id="cat-dim-2-of-3d"),
        pytest.param(lambda a, b: torch.concat([a, b], -1), "aten.concat.default", id="concat-positional"),
        pytest.param(lambda a, b: torch.concat([a, b], dim=-1), "aten.concat.default", id="concat-keyword"),
        pytest.param(lambda a, b: torch.concat([a, b], dim=2), "aten.concat.default", id="concat-dim-2"),
    ],
)
def test_cat_last_dim_forms(fn, host_cat):
    torch.manual_seed(0)
    cm = captured(_CatLinear(fn, in_f=16), _pieces(4, 12))
    view, m = _assert_cat_match(cm, host_cat)
    assert m.contribution.input_segments == (4, 12)

    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert set(report.layers) == {"lin"}
    plan = report.layers["lin"]
    assert plan.patterns == ("concat_to_linear",)
    assert plan.input_segments == (4, 12)
    assert plan.output_segments is None
    assert plan.dual_scale is False
    assert report.rejections == []


def test_cat_of_2d_pieces_dim_1():
    torch.manual_seed(0)
    cm = captured(_CatLinear(lambda a, b: torch.cat([a, b], 1), in_f=10), _pieces(3, 7, seq=None))
    _assert_cat_match(cm, "aten.cat.default")
    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].input_segments == (3, 7)


def test_cat_unequal_pieces_like_flux_proj_out():
    """FLUX single-block ``proj_out`` reads [attention, MLP] = [d, 4d]; here 24 + 96."""
    torch.manual_seed(0)
    cm = captured(_CatLinear(lambda a, b: torch.cat([a, b], dim=-1), in_f=120, out_f=24), _pieces(24, 96))
    _, m = _assert_cat_match(cm, "aten.cat.default")
    assert m.contribution.input_segments == (24, 96)

    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].input_segments == (24, 96)
    assert report.layers["lin"].in_features == 120


def test_cat_three_pieces():
    torch.manual_seed(0)
    cm = captured(_CatLinear(lambda a, b, c: torch.cat([a, b, c], -1), in_f=24), _pieces(4, 12, 8))
    view, m = _assert_cat_match(cm, "aten.cat.default")
    assert [view.target(p) for p in view.producers(m.node("aten.cat"), 0)] == ["placeholder"] * 3

    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].input_segments == (4, 12, 8)


class _CatTwoLinears(nn.Module):
    """One concatenation read by two linears (e.g. fused-free q and k projections of one input)."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 8)
        self.to_k = nn.Linear(16, 6)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([a, b], dim=-1)
        return self.to_q(h), self.to_k(h)


def test_cat_feeding_two_linears_is_shared():
    torch.manual_seed(0)
    cm = captured(_CatTwoLinears(), _pieces(4, 12))
    view, found, rejections = matches_of(cm, "concat_to_linear")
    assert rejections == []
    assert [view.graph.nodes[m.anchor]["module"] for m in found] == ["to_q", "to_k"]
    assert found[0].node("aten.cat") == found[1].node("aten.cat")  # the cat is shareable
    assert len(view.by_target["aten.cat.default"]) == 1

    report = report_of(cm)
    assert_counts(report, concat_to_linear=2)
    assert set(report.layers) == {"to_q", "to_k"}
    assert report.layers["to_q"].input_segments == (4, 12)
    assert report.layers["to_k"].input_segments == (4, 12)


@pytest.mark.parametrize(
    ("fn", "via_targets"),
    [
        pytest.param(lambda a, b: torch.cat([a, b], -1).to(torch.float32), ["aten.to.dtype"], id="to"),
        pytest.param(
            lambda a, b: torch.cat([a, b], -1).to(torch.float64).float(),
            ["aten.to.dtype", "aten.to.dtype"],
            id="float64-round-trip",
        ),
        pytest.param(
            lambda a, b: torch.cat([a, b], -1).float().contiguous(), ["aten.to.dtype"], id="float-contiguous"
        ),
    ],
)
def test_cat_through_a_cast(fn, via_targets):
    torch.manual_seed(0)
    cm = captured(_CatLinear(fn, in_f=16), _pieces(4, 12))
    view, m = _assert_cat_match(cm, "aten.cat.default")
    (edge,) = view.edges_between(m.node("aten.cat"), m.anchor)
    assert [str(view.fx(n).target) for n in edge["via"]] == via_targets

    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].input_segments == (4, 12)


# ------------------------------------------------------------------------------------------- stack


def test_stack_last_dim_gives_segments_of_one():
    """``stack([a, b, c], -1)`` of [B, S] tensors: every input column comes from its own tensor."""
    torch.manual_seed(0)
    fn = lambda a, b, c: torch.stack([a, b, c], dim=-1)  # noqa: E731
    cm = captured(_CatLinear(fn, in_f=3), lambda b: tuple(torch.randn(b, 5) for _ in range(3)))
    view, found, _ = matches_of(cm, "stack_to_linear")
    assert len(found) == 1
    (m,) = found
    assert m.alternative == 0
    assert host_targets(view, m) == {"aten.stack.default", _LINEAR}
    assert m.contribution.input_segments == (1, 1, 1)

    report = report_of(cm)
    assert_counts(report, stack_to_linear=1)
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].input_segments == (1, 1, 1)


@pytest.mark.parametrize(
    ("fn", "merge"),
    [
        pytest.param(
            lambda a, b, c: torch.stack([a, b, c], -2).flatten(-2), "aten.flatten.using_ints", id="flatten"
        ),
        pytest.param(
            lambda a, b, c: torch.stack([a, b, c], dim=-2).reshape(a.shape[0], -1),
            "aten.reshape.default",
            id="reshape",
        ),
        pytest.param(
            lambda a, b, c: torch.stack([a, b, c], dim=-2).view(a.shape[0], 12),
            "aten.view.default",
            id="view",
        ),
    ],
)
def test_stack_rows_then_merge_gives_segments_of_d(fn, merge):
    """``stack(dim=-2)`` then merging the last two dims: n segments of d (also a head-merge shape)."""
    torch.manual_seed(0)
    cm = captured(_CatLinear(fn, in_f=12), _pieces(4, 4, 4, seq=None))
    view, found, _ = matches_of(cm, "stack_to_linear")
    assert len(found) == 1
    (m,) = found
    assert m.alternative > 0
    assert host_targets(view, m) == {"aten.stack.default", merge, _LINEAR}
    assert m.contribution.input_segments == (4, 4, 4)

    report = report_of(cm)
    # the merge of [B, 3, 4] -> [B, 12] is also a head merge; both agree on the segments
    assert_counts(report, stack_to_linear=1, reshape_to_linear=1)
    plan = report.layers["lin"]
    assert plan.patterns == ("stack_to_linear", "reshape_to_linear")
    assert plan.input_segments == (4, 4, 4)
    assert plan.notes == ()


# -------------------------------------------------------------------------------------------- conv


class _UNetUpBlock(nn.Module):
    """A UNet up block: time-embedding linear, then ``conv(cat([h, skip], 1))`` and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.time_emb_proj = nn.Linear(8, 4)
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4 + 6, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv1(torch.cat([F.silu(h), skip], dim=1))
        return self.conv_out(h)


def _unet_example(b: int) -> tuple[torch.Tensor, ...]:
    return torch.randn(b, 3, 8, 8), torch.randn(b, 6, 8, 8), torch.randn(b, 8)


def test_concat_to_conv_is_reported_not_planned():
    torch.manual_seed(0)
    cm = captured(_UNetUpBlock(), _unet_example)
    view, found, _ = matches_of(cm, "concat_to_conv")
    assert len(found) == 1
    (m,) = found
    assert host_targets(view, m) == {"aten.cat.default", "aten.conv2d.default"}
    assert view.graph.nodes[m.anchor]["module"] == "conv1"
    assert m.contribution.input_segments == (4, 6)

    report = report_of(cm)
    assert_counts(report, concat_to_conv=1)
    assert report.convs == {"conv1": ConvReport(name="conv1", input_segments=(4, 6), node=m.anchor)}
    assert set(report.layers) == {"time_emb_proj"}  # convs never become layer plans
    assert report.layers["time_emb_proj"].patterns == ()


def test_conv_fed_by_a_spatial_concat_is_not_reported():
    """``conv(cat([a, b], dim=2))`` joins feature maps along height: not a channel segmentation."""
    torch.manual_seed(0)

    class SpatialCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.cat([a, b], dim=2))

    cm = captured(SpatialCat(), lambda b: (torch.randn(b, 4, 4, 8), torch.randn(b, 4, 4, 8)))
    _, found, rejections = matches_of(cm, "concat_to_conv")
    assert found == []
    assert len(rejections) == 1
    assert "does not concatenate channels" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert report.convs == {}


class _CatVarargs(nn.Module):
    """``lin(cat(pieces, -1))`` with ``forward(self, *pieces)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)

    def forward(self, *pieces: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat(pieces, dim=-1))


def test_cat_of_varargs_forward():
    torch.manual_seed(0)
    cm = captured(_CatVarargs(), _pieces(4, 12))
    report = report_of(cm)
    assert_counts(report, concat_to_linear=1)
    assert report.layers["lin"].input_segments == (4, 12)


# --------------------------------------------------------------------------------------- negatives


def test_sequence_concat_is_not_an_input_segmentation():
    """MMDiT joins text and image tokens along dim 1: the linear sees one kind of feature."""
    torch.manual_seed(0)
    fn = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
    make = lambda b: (torch.randn(b, 5, 16), torch.randn(b, 3, 16))  # noqa: E731
    cm = captured(_CatLinear(fn, in_f=16), make)
    _, found, rejections = matches_of(cm, "concat_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "concatenates along dim 1, not the last dim 2" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].input_segments is None


def test_batch_concat_is_not_an_input_segmentation():
    """Classifier-free guidance concatenates along the batch: not a segmentation either."""
    torch.manual_seed(0)
    cm = captured(_CatLinear(lambda a, b: torch.cat([a, b]), in_f=16), _pieces(16, 16))
    assert matches_of(cm, "concat_to_linear")[1] == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].input_segments is None


def test_stack_along_dim_0_is_not_an_input_segmentation():
    """``stack([a, b, c], 0)`` adds a leading dim; the linear reads each tensor's own features."""
    torch.manual_seed(0)
    fn = lambda a, b, c: torch.stack([a, b, c], 0)  # noqa: E731
    cm = captured(_CatLinear(fn, in_f=4), _pieces(4, 4, 4, seq=None))
    _, found, rejections = matches_of(cm, "stack_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "stacks along dim 0" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].input_segments is None


def test_cat_behind_a_non_transparent_op_is_not_a_match():
    """``lin(cat([a, b], -1) * 2)``: the mul sits between the concatenation and the linear."""
    torch.manual_seed(0)
    cm = captured(_CatLinear(lambda a, b: torch.cat([a, b], -1) * 2, in_f=16), _pieces(4, 12))
    assert matches_of(cm, "concat_to_linear")[1] == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].input_segments is None
