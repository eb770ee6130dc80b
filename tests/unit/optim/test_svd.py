"""SVDQuant: the low-rank branch absorbs planted low-rank energy; graph form; folding of s."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import quantize
from segquant_fx.optim.svd import fold_smoothing, low_rank_split

from ._helpers import PLAIN, OneLinear, cache_capture, rel_error

K, N, R = 128, 96, 8


@pytest.fixture(scope="module")
def toy() -> OneLinear:
    torch.manual_seed(0)
    return cache_capture(OneLinear(K, N).eval())


W4A16 = {**PLAIN, "input_quant": {"type": "fp16"}, "weight_quant": {"type": "int4", "axis": 0}}


@pytest.mark.parametrize("amplitude", [1.0, 4.0])
def test_rank_r_branch_cuts_w4_error_by_the_planted_energy(toy, amplitude):
    g = torch.Generator().manual_seed(int(amplitude))
    low = torch.randn(N, R, generator=g) @ torch.randn(R, K, generator=g) / R**0.5 * amplitude
    noise = torch.randn(N, K, generator=g) * 0.5
    with torch.no_grad():
        toy.lin.weight.copy_(low + noise)
    energy = float(low.norm() ** 2 / (low + noise).norm() ** 2)
    items = [(torch.randn(2, 32, K, generator=g),) for _ in range(4)]
    plain = rel_error(
        toy, quantize(toy, items, {"default": {**W4A16, "opt": {"type": "default"}}}, progress=False), items
    )
    svd = rel_error(
        toy,
        quantize(toy, items, {"default": {**W4A16, "opt": {"type": "svd", "low_rank": R}}}, progress=False),
        items,
    )
    print(
        f"\nW4 per-channel, planted rank-{R} energy {energy:.3f}: plain {plain:.3e}, SVD r={R} {svd:.3e}; "
        f"error ratio {svd / plain:.4f}, predicted 1 - E = {1 - energy:.4f}; reduction {1 - svd / plain:.2%} "
        f"vs planted energy {energy:.2%}"
    )
    # the residual keeps (1 - E) of the energy; its rounding error (oc its range squared) drops about as much:
    # the reduction must reach the planted energy fraction within a 1.5x margin on what is left
    assert svd / plain <= 1.5 * (1 - energy)
    assert 1 - svd / plain >= 0.97 * energy


def test_branch_is_two_plain_linears_on_x_and_matches_the_math(toy):
    torch.manual_seed(1)
    with torch.no_grad():
        toy.lin.weight.copy_(torch.randn(N, K))
    g = torch.Generator().manual_seed(9)
    items = [(torch.randn(2, 16, K, generator=g),) for _ in range(3)]
    cfg = {
        "default": {
            **PLAIN,
            "weight_quant": {"type": "int4", "axis": 0},
            "opt": {"type": "svd", "low_rank": 4},
        }
    }
    q = quantize(toy, items, cfg, progress=False)
    nodes = list(q.graph_module.graph.nodes)
    lin = [n for n in nodes if n.target is torch.ops.aten.linear.default]
    adds = [n for n in nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(lin) == 2 and lin[0].args[0].op == "placeholder", "the branch reads x itself (s folded in)"
    assert len(adds) == 1
    m = q.graph_module.lin
    assert list(m.lr_down.shape) == [4, K] and list(m.lr_up.shape) == [N, 4]
    assert m.lr_down.dtype == m.lr_up.dtype == torch.float32  # the activation dtype
    # y = qlinear(Q(x/s), Q(R)) + (x/s) V S U^T, with W s = U S V^T + R
    x = items[0][0]
    with torch.no_grad():
        lr = torch.nn.functional.linear(torch.nn.functional.linear(x, m.lr_down), m.lr_up)
        xs = x / m.smooth
        w_s = toy.lin.weight * m.smooth
        down_s, up, res = low_rank_split(w_s, 4, "float64")
        torch.testing.assert_close(lr, (xs @ down_s.T) @ up.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(up @ down_s + res, w_s, rtol=1e-5, atol=1e-5)


def test_low_rank_split_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    down, up, res = low_rank_split(w, 5, "float64")
    sv = torch.linalg.svdvals(w.double())
    assert float(res.double().norm() ** 2) == pytest.approx(float((sv[5:] ** 2).sum()), rel=1e-5)
    s = torch.rand(24) + 0.5
    x = torch.randn(3, 24)
    torch.testing.assert_close(x @ fold_smoothing(down, s).T, (x / s) @ down.T)
    d32, _, _ = low_rank_split(w, 100, "float32")
    assert d32.shape == (24, 24), "the rank is clipped to min(N, K)"
