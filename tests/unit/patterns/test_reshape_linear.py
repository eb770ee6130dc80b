"""``reshape_to_linear``: a head merge ``[..., H, D] -> [..., H*D]`` feeding a linear -> H segments of D.

Positive tests assert structure (matched merge node and its input shape), count (every built-in
pattern, exact layers), numerics (exported program == eager) and the exact input segments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._toys import assert_counts, captured, host_targets, matches_of, report_of

_LINEAR = "aten.linear.default"
H, D = 4, 3


class _Merge(nn.Module):
    """Attention output ``[B, H, S, D]`` -> transpose(1, 2) -> ``merge`` -> ``to_out``."""

    def __init__(self, merge):
        super().__init__()
        self.to_out = nn.Linear(H * D, 6)
        self.merge = merge

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.merge(o.transpose(1, 2)))


def _attn_out(b: int) -> tuple[torch.Tensor]:
    return (torch.randn(b, H, 7, D),)


def _assert_merge_match(cm, merge_target: str, module: str = "to_out"):
    view, found, _ = matches_of(cm, "reshape_to_linear")
    mods = [view.graph.nodes[m.anchor]["module"] for m in found]
    assert module in mods
    m = found[mods.index(module)]
    assert host_targets(view, m) == {merge_target, _LINEAR}
    merge = view.fx(next(h for h in m.nodes_map.values() if h != m.anchor))
    assert [int(s) for s in merge.args[0].meta["val"].shape[-2:]] == [H, D]
    assert int(merge.meta["val"].shape[-1]) == H * D
    assert m.contribution.input_segments == (D,) * H
    assert m.contribution.detail == {"heads": H}
    return view, m


@pytest.mark.parametrize(
    ("merge", "target"),
    [
        pytest.param(
            lambda t: t.reshape(t.shape[0], t.shape[1], H * D), "aten.reshape.default", id="reshape"
        ),
        pytest.param(
            lambda t: t.reshape(t.shape[0], -1, H * D), "aten.reshape.default", id="reshape-minus-1"
        ),
        pytest.param(
            lambda t: t.contiguous().view(t.shape[0], t.shape[1], H * D), "aten.view.default", id="view"
        ),
        pytest.param(lambda t: t.flatten(2, 3), "aten.flatten.using_ints", id="flatten-2-3"),
        pytest.param(lambda t: t.flatten(-2), "aten.flatten.using_ints", id="flatten-minus-2"),
        pytest.param(lambda t: t.flatten(start_dim=2), "aten.flatten.using_ints", id="flatten-start-dim"),
    ],
)
def test_head_merge_forms(merge, target):
    torch.manual_seed(0)
    cm = captured(_Merge(merge), _attn_out)
    view, m = _assert_merge_match(cm, target)
    # the transpose(1, 2) before the merge keeps the last dim: it is looked through
    (tr,) = (n for n in view.nodes.values() if str(n.target) == "aten.transpose.int")
    assert view.is_transparent(tr.name)

    report = report_of(cm)
    assert_counts(report, reshape_to_linear=1)
    assert set(report.layers) == {"to_out"}
    plan = report.layers["to_out"]
    assert plan.patterns == ("reshape_to_linear",)
    assert plan.input_segments == (3, 3, 3, 3)
    assert plan.output_segments is None
    assert plan.dual_scale is False
    assert report.rejections == []


def test_head_merge_then_sequence_slice():
    """``merged[:, :n]`` between the merge and the linear (dual-stream attention picks its tokens)."""
    torch.manual_seed(0)
    cm = captured(_Merge(lambda t: t.flatten(2)[:, :3]), _attn_out)
    view, m = _assert_merge_match(cm, "aten.flatten.using_ints")
    (edge,) = view.edges_between(next(h for h in m.nodes_map.values() if h != m.anchor), m.anchor)
    assert [str(view.fx(n).target) for n in edge["via"]] == ["aten.slice.Tensor"] * 2

    report = report_of(cm)
    assert_counts(report, reshape_to_linear=1)
    assert report.layers["to_out"].input_segments == (3, 3, 3, 3)


class _JointAttention(nn.Module):
    """MMDiT joint attention: fused QKV per stream, sequence concat, SDPA, merge, split back per stream."""

    dim = H * D

    def __init__(self):
        super().__init__()
        self.to_qkv = nn.Linear(self.dim, 3 * self.dim)
        self.add_qkv = nn.Linear(self.dim, 3 * self.dim)
        self.to_out = nn.Linear(self.dim, self.dim)
        self.to_add_out = nn.Linear(self.dim, self.dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n_ctx = x.shape[0], ctx.shape[1]
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        cq, ck, cv = self.add_qkv(ctx).chunk(3, dim=-1)
        q, k, v = (
            torch.cat([c, t], dim=1).view(b, -1, H, D).transpose(1, 2) for c, t in ((cq, q), (ck, k), (cv, v))
        )
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, -1, H * D)
        ctx_out, x_out = o[:, :n_ctx], o[:, n_ctx:]
        return self.to_out(x_out), self.to_add_out(ctx_out)


def test_joint_attention_outputs_both_get_head_segments():
    torch.manual_seed(0)
    cm = captured(_JointAttention(), lambda b: (torch.randn(b, 6, H * D), torch.randn(b, 4, H * D)))
    view, found, _ = matches_of(cm, "reshape_to_linear")
    assert sorted(view.graph.nodes[m.anchor]["module"] for m in found) == ["to_add_out", "to_out"]
    assert len({m.node("aten.view") for m in found}) == 1  # one merge, shared by both projections

    report = report_of(cm)
    assert_counts(report, reshape_to_linear=2, linear_to_chunk=2)
    assert set(report.layers) == {"to_qkv", "add_qkv", "to_out", "to_add_out"}
    for name in ("to_out", "to_add_out"):
        assert report.layers[name].input_segments == (3,) * 4
        assert report.layers[name].patterns == ("reshape_to_linear",)
    for name in ("to_qkv", "add_qkv"):
        assert report.layers[name].output_segments == (12, 12, 12)


# --------------------------------------------------------------------------------------- negatives


class _TokenMerge(nn.Module):
    """``[B*S, C] -> [B, S*C]``: merges tokens into features, not heads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(-1, 5 * 4))


def test_merging_tokens_into_features_is_not_a_head_merge():
    """A reshape of [B*S, C] to [B, S*C] feeding a linear(S*C) is not a head merge."""
    torch.manual_seed(0)
    cm = captured(_TokenMerge(), lambda b: (torch.randn(b * 5, 4),))
    _, found, rejections = matches_of(cm, "reshape_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "reshapes 2-d to 2-d, not a merge of the last two dims" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].input_segments is None


class _Regroup(nn.Module):
    """``[B, S, 24] -> [B, S, 4, 6] -> [B, 2S, 12]``: the last dim is regrouped, not a product."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return self.lin(x.view(b, s, 4, 6).reshape(b, 2 * s, 12))


def test_reshape_to_a_last_dim_that_is_not_the_product_is_not_a_head_merge():
    """``[..., 4, 6] -> [..., 12]`` only regroups features: 12 != 4 * 6, no head segments."""
    torch.manual_seed(0)
    cm = captured(_Regroup(), lambda b: (torch.randn(b, 5, 24),))
    _, found, rejections = matches_of(cm, "reshape_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "maps [..., 4, 6] to [..., 12], not a head merge" in rejections[0].message

    report = report_of(cm)
    assert_counts(report)
    assert report.layers["lin"].input_segments is None


def test_reshape_of_same_rank_is_not_a_head_merge():
    """``[B, S, 12] -> [B, 2S, 6]`` splits features into more tokens: not a merge."""
    torch.manual_seed(0)

    class Regroup3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.reshape(x.shape[0], -1, 6))

    cm = captured(Regroup3d(), lambda b: (torch.randn(b, 5, 12),))
    _, found, rejections = matches_of(cm, "reshape_to_linear")
    assert found == []
    assert len(rejections) == 1
    assert "reshapes 3-d to 3-d" in rejections[0].message
    assert_counts(report_of(cm))


def test_head_merge_behind_a_non_transparent_op_is_not_a_match():
    """``to_out(merged * 2)``: the mul hides the merge from the linear."""
    torch.manual_seed(0)
    cm = captured(_Merge(lambda t: t.flatten(2) * 2), _attn_out)
    assert matches_of(cm, "reshape_to_linear")[1] == []
    report = report_of(cm)
    assert_counts(report)
    assert report.layers["to_out"].input_segments is None
