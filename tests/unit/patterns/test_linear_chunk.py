"""``linear_to_chunk`` and ``linear_to_split``: a linear's output cut into pieces along the last dim.

Each positive test asserts structure (matched host nodes and their targets), count (exact matches of
every built-in pattern, exact set of layers), numerics (the exported program reproduces eager) and
the exact output segments. Each near miss has its own test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._toys import ChunkToy, LinearThen, assert_counts, captured, host_targets, matches_of, report_of

_LINEAR = "aten.linear.default"
_CHUNK = "aten.chunk.default"


def _ex3(b: int) -> tuple[torch.Tensor]:
    return (torch.randn(b, 5, 8),)


def _ex2(b: int) -> tuple[torch.Tensor]:
    return (torch.randn(b, 8),)


def _assert_single_split_match(cm, pattern: str, split_target: str, module: str = "lin"):
    """One match of ``pattern``: the linear of ``module`` feeding a ``split_target`` node directly."""
    view, found, _ = matches_of(cm, pattern)
    assert len(found) == 1
    (m,) = found
    assert view.graph.nodes[m.anchor]["module"] == module
    assert view.target(m.anchor) == _LINEAR
    assert host_targets(view, m) == {_LINEAR, split_target}
    assert sorted(m.targets.values()) == sorted([_LINEAR, split_target])
    split = m.node(split_target.rsplit(".", 1)[0])
    assert view.producer(split, 0) == m.anchor
    return view, m


# ------------------------------------------------------------------------------------------- chunk


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda y: y.chunk(3, dim=-1), id="method-dim-keyword"),
        pytest.param(lambda y: y.chunk(3, -1), id="method-dim-positional"),
        pytest.param(lambda y: torch.chunk(y, 3, dim=-1), id="function-dim-keyword"),
        pytest.param(lambda y: torch.chunk(y, 3, -1), id="function-dim-positional"),
        pytest.param(lambda y: y.chunk(3, dim=2), id="method-dim-2-of-3d"),
    ],
)
def test_chunk_last_dim_forms(fn):
    torch.manual_seed(0)
    cm = captured(LinearThen(fn), _ex3)
    view, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    assert m.contribution.output_segments == (4, 4, 4)
    assert m.contribution.detail == {"op": _CHUNK}

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert set(report.layers) == {"lin"}
    plan = report.layers["lin"]
    assert plan.patterns == ("linear_to_chunk",)
    assert plan.output_segments == (4, 4, 4)
    assert plan.input_segments is None
    assert plan.dual_scale is False
    assert report.rejections == []


def test_chunk_dim_1_of_2d_is_the_last_dim():
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: y.chunk(3, dim=1)), _ex2)
    view, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    chunk = view.fx(m.node("aten.chunk"))
    assert chunk.args[1:] == (3, 1)  # dim 1 as written, not normalized to -1

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].output_segments == (4, 4, 4)


def test_uneven_chunk_keeps_the_remainder_piece():
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: y.chunk(3, dim=-1), out_f=10), _ex3)
    _, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    assert m.contribution.output_segments == (4, 4, 2)

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["lin"].output_segments == (4, 4, 2)
    assert sum(report.layers["lin"].output_segments) == report.layers["lin"].out_features == 10


@pytest.mark.parametrize(
    ("fn", "via_targets"),
    [
        pytest.param(lambda y: y.to(torch.float32).chunk(2, -1), ["aten.to.dtype"], id="to-float32"),
        pytest.param(lambda y: y.float().chunk(2, -1), ["aten.to.dtype"], id="float"),
        pytest.param(
            lambda y: y.to(torch.float64).to(torch.float32).chunk(2, -1),
            ["aten.to.dtype", "aten.to.dtype"],
            id="float64-round-trip",
        ),
        # export drops a contiguous() of a contiguous tensor: nothing is left between the two
        pytest.param(lambda y: y.contiguous().chunk(2, -1), [], id="contiguous"),
        pytest.param(lambda y: y.float().contiguous().chunk(2, -1), ["aten.to.dtype"], id="float-contiguous"),
    ],
)
def test_chunk_through_cast_and_contiguous(fn, via_targets):
    torch.manual_seed(0)
    cm = captured(LinearThen(fn), _ex3)
    view, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    (edge,) = view.edges_between(m.anchor, m.node("aten.chunk"))
    assert [str(view.fx(n).target) for n in edge["via"]] == via_targets
    assert all(view.is_transparent(n) for n in edge["via"])

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["lin"].output_segments == (6, 6)


class _Bf16ThenFloat(nn.Module):
    """A bf16 linear whose output is cast up to float32 before the chunk (a real dtype change)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b, c = self.lin(x.to(torch.bfloat16)).float().chunk(3, dim=-1)
        return a * b + c


def test_chunk_after_real_dtype_cast():
    torch.manual_seed(0)
    cm = captured(_Bf16ThenFloat(), _ex3)
    view, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    (edge,) = view.edges_between(m.anchor, m.node("aten.chunk"))
    (cast,) = edge["via"]
    assert view.fx(cast).args[1] == torch.float32
    assert view.graph.nodes[m.anchor]["dtype"] == "torch.bfloat16"

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["lin"].output_segments == (4, 4, 4)


def test_chunk_of_bias_free_linear():
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: y.chunk(2, dim=-1), bias=False), _ex3)
    view, m = _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)
    lin = view.fx(m.anchor)
    assert len(lin.args) == 2 or lin.args[2] is None

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["lin"].output_segments == (6, 6)


def test_chunk_at_batch_1_is_captured_with_dynamic_batch():
    torch.manual_seed(0)
    cm = captured(ChunkToy(), ChunkToy.example, batch=1, other_batches=(2, 4))
    assert cm.batch_doubled
    _assert_single_split_match(cm, "linear_to_chunk", _CHUNK)

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].output_segments == (4, 4, 4)


# --------------------------------------------------------------------------------- adaLN-single rows


class _AdaLNSingle(nn.Module):
    """PixArt adaLN-single: one timestep linear viewed as 6 rows of d, each row one modulation."""

    d = 4

    def __init__(self, pick: str):
        super().__init__()
        self.t_block = nn.Linear(8, 6 * self.d)
        self.table = nn.Parameter(torch.randn(6, self.d) / 2)
        self.pick = pick

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        if self.pick == "reshape-minus-1":
            v = self.t_block(t).reshape(b, 6, -1)
        else:
            v = self.t_block(t).view(b, 6, self.d)
        if self.pick in ("table-chunk", "reshape-minus-1"):
            rows = (self.table[None] + v).chunk(6, dim=1)
        elif self.pick == "unbind":
            rows = v.unbind(1)
        elif self.pick == "select":
            rows = [v.select(1, i) for i in range(6)]
        elif self.pick == "index":
            rows = [v[:, i] for i in range(6)]
        elif self.pick == "clone-then-chunk":
            rows = v.clone().chunk(6, dim=1)
        elif self.pick == "eval-dropout-then-chunk":
            rows = F.dropout(v, 0.1, training=False).chunk(6, dim=1)
        else:
            raise ValueError(self.pick)
        shift, scale, gate, shift2, scale2, gate2 = (r.reshape(b, 1, self.d) for r in rows)
        h = h + gate * (h * (1 + scale) + shift)
        return h + gate2 * (h * (1 + scale2) + shift2)


def _ex_rows(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 5, 4), torch.randn(b, 8)


def _assert_rows_match(cm) -> None:
    view, found, _ = matches_of(cm, "linear_to_chunk")
    assert len(found) == 1
    (m,) = found
    assert view.graph.nodes[m.anchor]["module"] == "t_block"
    assert set(m.targets.values()) == {_LINEAR, "aten.view.default"}
    rows_view = view.fx(m.node("aten.view"))
    assert [int(s) for s in rows_view.meta["val"].shape[1:]] == [6, 4]
    assert m.contribution.output_segments == (4,) * 6
    assert m.contribution.detail == {"op": "rows"}

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert set(report.layers) == {"t_block"}
    assert report.layers["t_block"].output_segments == (4, 4, 4, 4, 4, 4)
    assert report.rejections == []


@pytest.mark.parametrize("pick", ["table-chunk", "reshape-minus-1", "unbind", "select"])
def test_adaln_single_rows(pick):
    torch.manual_seed(0)
    cm = captured(_AdaLNSingle(pick), _ex_rows)
    _assert_rows_match(cm)


@pytest.mark.parametrize("pick", ["index", "clone-then-chunk", "eval-dropout-then-chunk"])
def test_adaln_single_rows_through_transparent_ops(pick):
    torch.manual_seed(0)
    cm = captured(_AdaLNSingle(pick), _ex_rows)
    _assert_rows_match(cm)


class _SharedRowsOneView(nn.Module):
    """One timestep linear, viewed once, the view read per row by two blocks with their own tables."""

    def __init__(self):
        super().__init__()
        self.t_block = nn.Linear(8, 24)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(6, 4)) for _ in range(2)])

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = self.t_block(t).view(t.shape[0], 6, 4)
        for table in self.tables:
            a, b, c, d, e, f = (table[None] + v).chunk(6, dim=1)
            h = h * (1 + b) + a
            h = h + c * (h * (1 + e) + d) * f
        return h


class _SharedRowsPixArt(nn.Module):
    """PixArt: the timestep linear is computed once; every block reshapes it itself and reads rows."""

    def __init__(self):
        super().__init__()
        self.t_block = nn.Linear(8, 24)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(6, 4)) for _ in range(2)])

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.t_block(t)
        for table in self.tables:
            a, b, c, d, e, f = (table[None] + emb.reshape(t.shape[0], 6, -1)).chunk(6, dim=1)
            h = h * (1 + b) + a
            h = h + c * (h * (1 + e) + d) * f
        return h


def _ex_shared(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 5, 4), torch.randn(b, 1, 8)


def test_rows_view_shared_by_two_blocks():
    torch.manual_seed(0)
    cm = captured(_SharedRowsOneView(), _ex_shared)
    view, found, _ = matches_of(cm, "linear_to_chunk")
    assert len(found) == 1
    (m,) = found
    rows_view = m.node("aten.view")
    assert [view.target(c) for c in view.consumers(rows_view)] == ["aten.add.Tensor"] * 2

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert set(report.layers) == {"t_block"}
    assert report.layers["t_block"].output_segments == (4,) * 6


def test_rows_reshaped_separately_by_two_blocks():
    torch.manual_seed(0)
    cm = captured(_SharedRowsPixArt(), _ex_shared)
    view = matches_of(cm, "linear_to_chunk")[0]
    (lin,) = view.by_target[_LINEAR]
    assert [view.target(c) for c in view.consumers(lin)] == ["aten.reshape.default"] * 2

    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["t_block"].output_segments == (4,) * 6


# ------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize(
    ("fn", "target", "segments"),
    [
        pytest.param(lambda y: y.split(4, -1), "aten.split.Tensor", (4, 4, 4), id="split-int"),
        pytest.param(lambda y: y.split(4, dim=-1), "aten.split.Tensor", (4, 4, 4), id="split-int-kw"),
        pytest.param(
            lambda y: y.split([2, 4, 6], -1), "aten.split_with_sizes.default", (2, 4, 6), id="split-sizes"
        ),
        pytest.param(lambda y: torch.split(y, 4, dim=-1), "aten.split.Tensor", (4, 4, 4), id="torch-split"),
        pytest.param(
            lambda y: torch.split(y, [6, 1, 5], -1),
            "aten.split_with_sizes.default",
            (6, 1, 5),
            id="torch-split-sizes",
        ),
        pytest.param(lambda y: y.split(5, -1), "aten.split.Tensor", (5, 5, 2), id="split-remainder"),
    ],
)
def test_split_last_dim_forms(fn, target, segments):
    torch.manual_seed(0)
    cm = captured(LinearThen(fn), _ex3)
    view, m = _assert_single_split_match(cm, "linear_to_split", target)
    assert m.contribution.output_segments == segments
    assert m.contribution.detail == {"op": target}

    report = report_of(cm)
    assert_counts(report, linear_to_split=1)
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].patterns == ("linear_to_split",)
    assert report.layers["lin"].output_segments == segments


def test_unbind_last_dim_gives_segments_of_one():
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: y.unbind(-1), out_f=3), _ex2)
    _, m = _assert_single_split_match(cm, "linear_to_split", "aten.unbind.int")
    assert m.contribution.output_segments == (1, 1, 1)

    report = report_of(cm)
    assert_counts(report, linear_to_split=1)
    assert report.layers["lin"].output_segments == (1, 1, 1)


def test_unbind_last_dim_static_shapes():
    from segquant_fx import find_patterns

    torch.manual_seed(0)
    report = find_patterns(LinearThen(lambda y: y.unbind(-1), out_f=3), _ex3(2), dynamic=False)
    assert report.layers["lin"].output_segments == (1, 1, 1)


class _DeadCallSite(nn.Module):
    """The module is called twice; the first result is never used (dead code in forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unused = self.lin(x)  # noqa: F841 - a leftover, e.g. from debugging
        a, b, c = self.lin(x).chunk(3, dim=-1)
        return a * b + c


def test_dead_call_site_does_not_drop_the_plan():
    torch.manual_seed(0)
    cm = captured(_DeadCallSite(), _ex3)
    report = report_of(cm)
    assert_counts(report, linear_to_chunk=1)
    assert report.layers["lin"].output_segments == (4, 4, 4)
    assert report.layers["lin"].notes == ()


# --------------------------------------------------------------------------------------- negatives


def test_linear_output_also_returned_is_not_a_chunk_match():
    """The linear's output is chunked *and* returned: the rows of W do not split cleanly."""
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: (*y.chunk(3, -1), y)), _ex3)
    view, found, rejections = matches_of(cm, "linear_to_chunk")
    assert found == []
    assert len(rejections) == 1
    (r,) = rejections
    assert "also used outside the pattern by output" in r.message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].output_segments is None
    assert report.layers["lin"].patterns == ()


def test_linear_output_also_added_is_not_a_chunk_match():
    """The linear's output is chunked and also added to a residual: not only consumed by the chunk."""
    torch.manual_seed(0)

    def fn(y):
        a, b, c = y.chunk(3, dim=-1)
        return y + torch.cat([a * b, c, c], -1)

    cm = captured(LinearThen(fn), _ex3)
    _, found, rejections = matches_of(cm, "linear_to_chunk")
    assert found == []
    assert len(rejections) == 1
    (r,) = rejections
    assert "aten.add.Tensor" in r.message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].output_segments is None


def test_split_output_also_returned_is_not_a_split_match():
    """Same near miss for split: the linear's output also leaves the graph."""
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: (*y.split([4, 8], -1), y)), _ex3)
    _, found, rejections = matches_of(cm, "linear_to_split")
    assert found == []
    assert len(rejections) == 1
    assert_counts(report_of(cm))


@pytest.mark.parametrize(
    ("fn", "example"),
    [
        pytest.param(lambda y: y.chunk(2, dim=0), _ex2, id="dim0-of-2d"),  # pieces depend on B
        pytest.param(lambda y: y.chunk(5, dim=1), _ex3, id="dim1-of-3d"),
        pytest.param(lambda y: y.chunk(2, dim=-2), _ex3, id="dim-minus-2-of-3d"),
    ],
)
def test_chunk_on_a_non_last_dim_is_not_a_match(fn, example):
    """Chunking batch or sequence splits tokens, not features: no output segments."""
    torch.manual_seed(0)
    # chunking the batch makes the number of pieces depend on it: check numerics at the capture batch
    cm = captured(LinearThen(fn), example, other_batches=())
    view, found, _ = matches_of(cm, "linear_to_chunk")
    assert found == []
    # the non-last-dim chunk is looked through, so the linear feeds the outputs directly
    (chunk,) = (n for n in view.nodes.values() if str(n.target) == "aten.chunk.default")
    assert view.is_transparent(chunk.name)

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].output_segments is None


def test_split_on_a_non_last_dim_is_not_a_match():
    """``split(2, dim=1)`` of [B, S, C] cuts the sequence: no output segments."""
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: y.split(2, dim=1)), _ex3)
    assert matches_of(cm, "linear_to_split")[1] == []
    assert_counts(report_of(cm))


class _HeadSplit(nn.Module):
    """Attention head split: ``q(x).view(B, S, H, D).transpose(1, 2)`` fed to matmul."""

    def __init__(self, transpose: bool):
        super().__init__()
        self.to_q = nn.Linear(8, 12)
        self.transpose = transpose

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.to_q(x).view(b, s, 3, 4)
        if self.transpose:
            q = q.transpose(1, 2)  # [B, H, S, D]
            return torch.softmax(q @ q.transpose(-1, -2), dim=-1) @ q
        return torch.matmul(q, k)  # [B, S, H, D] @ [D, 5]


@pytest.mark.parametrize("transpose", [True, False], ids=["transpose-matmul", "matmul"])
def test_head_split_view_is_not_rows(transpose):
    """``view(..., H, D)`` for attention mixes features across rows: not adaLN-single rows."""
    torch.manual_seed(0)
    cm = captured(_HeadSplit(transpose), lambda b: (torch.randn(b, 5, 8), torch.randn(4, 5)))
    _, found, rejections = matches_of(cm, "linear_to_chunk")
    assert found == []
    assert len(rejections) == 1
    (r,) = rejections
    assert "does not read whole rows" in r.message

    report = report_of(cm)
    assert_counts(report)
    assert set(report.layers) == {"to_q"}
    assert report.layers["to_q"].output_segments is None


def test_chunk_behind_a_scale_is_not_a_match():
    """``(lin(x) * 2).chunk(...)``: the mul is not transparent, so the chunk does not split the linear."""
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: (y * 2).chunk(3, -1)), _ex3)
    view, found, rejections = matches_of(cm, "linear_to_chunk")
    assert found == []
    assert rejections == []
    (lin,) = view.by_target[_LINEAR]
    assert [view.target(c) for c in view.consumers(lin)] == ["aten.mul.Tensor"]

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].output_segments is None


def test_split_behind_an_activation_is_not_a_match():
    """``F.gelu(lin(x)).split(...)``: the activation sits between the linear and the split."""
    torch.manual_seed(0)
    cm = captured(LinearThen(lambda y: F.gelu(y).split(6, -1)), _ex3)
    assert matches_of(cm, "linear_to_split")[1] == []
    assert_counts(report_of(cm))
