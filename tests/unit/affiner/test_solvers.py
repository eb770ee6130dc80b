"""Affiner solvers: closed forms against brute-force least squares on synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.affiner.config import MSERelConfig, PTQDConfig, TACConfig
from segquant_fx.affiner.solvers import (
    MSERelSolver,
    PTQDSolver,
    TACSolver,
    blend,
    tac_mask,
    variance_schedule_calibration,
)
from segquant_fx.errors import CalibrationError


def _pair(b=3, c=2, h=6, w=5, seed=0, k=1.2, bias=0.1, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, c, h, w, generator=g)
    q = k * r + bias + noise * torch.randn(b, c, h, w, generator=g)
    return q, r


def _mserel_bruteforce(q, r, cfg, ys, xs):
    """Minimise the mean objective over samples and the elements (ys, xs) of channel 0 with lstsq."""
    qv = q[:, 0, ys][:, :, xs].reshape(-1).double()
    rv = r[:, 0, ys][:, :, xs].reshape(-1).double()
    a = cfg.alpha + (1 - cfg.alpha) / (rv * rv + cfg.eps)
    n = qv.numel()
    rows = torch.stack([qv, torch.ones_like(qv)], 1) * (a / n).sqrt()[:, None]
    tgt = rv * (a / n).sqrt()
    reg = torch.tensor([[math.sqrt(cfg.lambda1), 0.0], [0.0, math.sqrt(cfg.lambda2)]], dtype=torch.float64)
    regt = torch.tensor([math.sqrt(cfg.lambda1), 0.0], dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([rows, reg]), torch.cat([tgt, regt])[:, None]).solution[:, 0]
    return float(sol[0]), float(sol[1])


@pytest.mark.parametrize(("blocksize", "alpha"), [(1, 0.5), (2, 1.0), (4, 0.3), (3, 0.0)])
def test_mserel_block_matches_lstsq(blocksize, alpha):
    """Block mode: every block's (K, b) is the least-squares minimiser, partial edge blocks included."""
    cfg = MSERelConfig(blocksize=blocksize, alpha=alpha, sample_mode="block", lambda1=0.05, lambda2=0.2)
    q, r = _pair(h=7, w=5)
    s = MSERelSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    gh, gw = math.ceil(7 / blocksize), math.ceil(5 / blocksize)
    assert sol["K"].shape == (2, gh, gw) and sol["b"].shape == (2, gh, gw)
    for by in range(gh):
        for bx in range(gw):
            ys = list(range(by * blocksize, min(7, (by + 1) * blocksize)))
            xs = list(range(bx * blocksize, min(5, (bx + 1) * blocksize)))
            k, b = _mserel_bruteforce(q, r, cfg, ys, xs)
            assert sol["K"][0, by, bx].item() == pytest.approx(k, rel=1e-4, abs=1e-5)
            assert sol["b"][0, by, bx].item() == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_mserel_single_sample_is_reference_formula():
    """With one sample per location the solution is the reference's per-sample closed form."""
    cfg = MSERelConfig(blocksize=1, sample_mode="block", alpha=0.5, lambda1=0.1, lambda2=0.1)
    q, r = _pair(b=1, h=4, w=4)
    s = MSERelSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    qd, rd = q[0].double(), r[0].double()
    a = cfg.alpha + (1 - cfg.alpha) / (rd * rd + cfg.eps)
    b_ref = (rd - qd) / (1 + cfg.lambda2 * qd * qd / cfg.lambda1 + cfg.lambda2 / a)
    k_ref = 1 + cfg.lambda2 * qd / cfg.lambda1 * b_ref
    torch.testing.assert_close(sol["b"].double(), b_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sol["K"].double(), k_ref, rtol=1e-4, atol=1e-6)


def test_mserel_interpolate_is_block1_on_downsampled():
    """Interpolate mode = per-element solve on bilinearly downsampled predictions, upsampled back."""
    cfg = MSERelConfig(blocksize=2, sample_mode="interpolate")
    q, r = _pair(h=8, w=8)
    s = MSERelSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    down = dict(size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    s1 = MSERelSolver(MSERelConfig(blocksize=1, sample_mode="block"))
    s1.update(F.interpolate(q, **down), F.interpolate(r, **down))
    ref = s1.solve()
    torch.testing.assert_close(sol["K"], ref["K"])
    out = MSERelSolver.apply(sol, q, cfg)
    kf = F.interpolate(sol["K"][None], size=(8, 8), mode="bilinear", align_corners=False)
    bf = F.interpolate(sol["b"][None], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, kf * q + bf)


def test_mserel_recovers_affine_error_and_streams():
    """A noiseless affine error is undone (lambda -> 0), and split updates equal one update."""
    cfg = MSERelConfig(blocksize=1, sample_mode="block", lambda1=1e-9, lambda2=1e-9, alpha=1.0)
    q, r = _pair(b=4, noise=0.0, k=1.3, bias=-0.2)
    s = MSERelSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    torch.testing.assert_close(MSERelSolver.apply(sol, q, cfg), r, atol=1e-4, rtol=1e-4)
    s2 = MSERelSolver(cfg)
    s2.update(q[:1], r[:1])
    s2.update(q[1:], r[1:])
    torch.testing.assert_close(s2.solve()["K"], sol["K"])


def test_mserel_block_expand_to_other_resolution():
    """Block solutions repeat exactly over their blocks; another resolution falls back to nearest."""
    cfg = MSERelConfig(blocksize=4, sample_mode="block")
    k = torch.arange(6.0).reshape(1, 2, 3)
    full = MSERelSolver.expand(k, (8, 10), cfg)
    assert full.shape == (1, 1, 8, 10)
    assert full[0, 0, 5, 9] == k[0, 1, 2] and full[0, 0, 3, 4] == k[0, 0, 1]
    assert MSERelSolver.expand(k, (16, 16), cfg).shape == (1, 1, 16, 16)


def test_mserel_mixed_resolution_and_bad_inputs():
    """Mixing resolutions, shape mismatches and non-finite inputs raise CalibrationError."""
    s = MSERelSolver(MSERelConfig())
    s.update(*_pair(h=8, w=8))
    with pytest.raises(CalibrationError, match="one resolution at a time"):
        s.update(*_pair(h=16, w=16))
    with pytest.raises(CalibrationError, match="same shape"):
        s.update(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 4))
    with pytest.raises(CalibrationError, match="non-finite"):
        s.update(torch.full((1, 2, 8, 8), float("nan")), torch.zeros(1, 2, 8, 8))
    with pytest.raises(CalibrationError, match="channels"):
        s.update(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(CalibrationError, match="no samples"):
        MSERelSolver(MSERelConfig()).solve()


def test_mserel_apply_wrong_channels():
    """Applying a solution to a prediction with other channels names the mismatch."""
    cfg = MSERelConfig()
    s = MSERelSolver(cfg)
    s.update(*_pair(h=8, w=8))
    with pytest.raises(CalibrationError, match="learned for 2 latent channels"):
        MSERelSolver.apply(s.solve(), torch.zeros(1, 4, 8, 8), cfg)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    alpha=st.floats(0.0, 1.0),
    l1=st.floats(0.0, 2.0),
    l2=st.floats(0.0, 2.0),
    bs=st.integers(1, 3),
)
def test_mserel_never_worse_than_identity(seed, alpha, l1, l2, bs):
    """Property: each block's objective at the solution is at most the identity's (K=1, b=0)."""
    cfg = MSERelConfig(blocksize=bs, sample_mode="block", alpha=alpha, lambda1=l1, lambda2=l2)
    q, r = _pair(b=2, c=1, h=3, w=3, seed=seed, k=1.0 + (seed % 7) / 10, noise=0.3)
    s = MSERelSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    qd, rd = q.double()[:, 0], r.double()[:, 0]
    a = alpha + (1 - alpha) / (rd * rd + cfg.eps)
    for by in range(sol["K"].shape[1]):
        for bx in range(sol["K"].shape[2]):
            blk = (slice(None), slice(by * bs, (by + 1) * bs), slice(bx * bs, (bx + 1) * bs))
            k, b = sol["K"][0, by, bx].double(), sol["b"][0, by, bx].double()
            got = (a[blk] * (k * qd[blk] + b - rd[blk]) ** 2).mean() + l1 * (k - 1) ** 2 + l2 * b**2
            ident = (a[blk] * (qd[blk] - rd[blk]) ** 2).mean()
            assert got <= ident * (1 + 1e-5) + 1e-9


# ------------------------------------------------------------------------------------------- ptqd


def _ptqd_data(seed=0, k=0.15, n=4, c=3, hw=16, sigma=0.2):
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([0.5, -0.3, 0.0])[:c].view(1, c, 1, 1)
    stds = torch.tensor([1.0, 0.5, 2.0])[:c].view(1, c, 1, 1)
    r = means + stds * torch.randn(n, c, hw, hw, generator=g)
    mu = torch.tensor([0.05, -0.1, 0.2])[:c].view(1, c, 1, 1)
    q = (1 + k) * r + mu + sigma * torch.randn(n, c, hw, hw, generator=g)
    return q, r


def test_ptqd_matches_lstsq_shared_slope_channel_intercepts():
    """k and mu_c are the joint least-squares fit of d = k r + mu_c (one-hot channel intercepts)."""
    q, r = _ptqd_data()
    s = PTQDSolver(PTQDConfig(variance_mode="none"))
    s.update(q[:2], r[:2])
    s.update(q[2:], r[2:])
    sol = s.solve()
    d = (q - r).double()
    c = q.shape[1]
    x = r.double().permute(1, 0, 2, 3).reshape(c, -1)
    y = d.permute(1, 0, 2, 3).reshape(c, -1)
    n = x.shape[1]
    design = torch.zeros(c * n, 1 + c, dtype=torch.float64)
    design[:, 0] = x.reshape(-1)
    for ch in range(c):
        design[ch * n : (ch + 1) * n, 1 + ch] = 1
    coef = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution[:, 0]
    assert sol["k"].item() == pytest.approx(coef[0].item(), rel=1e-5)
    torch.testing.assert_close(sol["mu"].double(), coef[1:], rtol=1e-4, atol=1e-6)
    resid = y - coef[0] * x - coef[1:, None]
    torch.testing.assert_close(
        sol["residual_var"].double(), resid.var(1, unbiased=False) / (1 + coef[0]) ** 2, rtol=1e-4, atol=1e-7
    )
    assert torch.equal(sol["rho"], torch.ones(c))


def test_ptqd_recovers_model_and_shrink_reduces_mse():
    """On data from PTQD's noise model: k is recovered, and shrinkage beats plain correction."""
    q, r = _ptqd_data(n=16, sigma=0.5)
    none = PTQDSolver(PTQDConfig(variance_mode="none"))
    shrink = PTQDSolver(PTQDConfig(variance_mode="shrink"))
    for s in (none, shrink):
        s.update(q, r)
    sn, ss = none.solve(), shrink.solve()
    assert sn["k"].item() == pytest.approx(0.15, abs=0.01)
    torch.testing.assert_close(sn["mu"], torch.tensor([0.05, -0.1, 0.2]), atol=0.03, rtol=0)
    mse_q = F.mse_loss(q, r).item()
    mse_none = F.mse_loss(PTQDSolver.apply(sn, q, none.config), r).item()
    mse_shrink = F.mse_loss(PTQDSolver.apply(ss, q, shrink.config), r).item()
    assert mse_shrink < mse_none < mse_q
    # theory: the corrected noise variance is sigma^2/(1+k)^2, shrinkage removes a v/(v+s) share of it
    assert mse_none == pytest.approx(0.25 / 1.15**2, rel=0.05)
    v = torch.tensor([1.0, 0.25, 4.0])
    s2 = 0.25 / 1.15**2
    assert mse_shrink == pytest.approx(float((v * s2 / (v + s2)).mean()), rel=0.05)


def test_ptqd_rejects_nonpositive_slope():
    """A quantized output anti-correlated with the float one is a clear CalibrationError."""
    r = torch.randn(2, 2, 4, 4)
    s = PTQDSolver(PTQDConfig())
    s.update(-r, r)
    with pytest.raises(CalibrationError, match=r"\(1 \+ k\) is not positive"):
        s.solve()


def test_variance_schedule_calibration():
    """sigma'^2 = max(sigma^2 - g^2 var, 0); deterministic samplers stay at 0; negatives rejected."""
    got = variance_schedule_calibration(0.5, 2.0, torch.tensor([0.01, 0.1]))
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.25 - 0.04), 0.0], dtype=torch.float64))
    assert variance_schedule_calibration(0.0, 1.0, 0.3).item() == 0.0
    with pytest.raises(CalibrationError, match="non-negative"):
        variance_schedule_calibration(-1.0, 1.0, 0.1)


# -------------------------------------------------------------------------------------------- tac


def test_tac_matches_bruteforce_on_masked_elements():
    """K per channel minimises the mixed abs/rel objective over exactly the masked elements."""
    cfg = TACConfig(lambda1=0.6, lambda2=0.05, threshold=1.0)
    q, r = _pair(b=4, c=2, h=6, w=6, k=1.4, noise=0.1)
    s = TACSolver(cfg)
    s.update(q, r)
    sol = s.solve()
    mask = tac_mask(q, cfg.threshold)
    for ch in range(2):
        m = mask[:, ch]
        qv, rv = q[:, ch][m].double(), r[:, ch][m].double()
        n = qv.numel()
        w = ((1 - cfg.lambda1) / n + cfg.lambda1 / (n * (rv * rv + cfg.eps))).sqrt()
        a = torch.cat([(w * qv)[:, None], torch.tensor([[math.sqrt(cfg.lambda2)]], dtype=torch.float64)])
        y = torch.cat([(w * rv)[:, None], torch.tensor([[math.sqrt(cfg.lambda2)]], dtype=torch.float64)])
        k = torch.linalg.lstsq(a, y).solution.item()
        assert sol["K"][ch].item() == pytest.approx(k, rel=1e-5)
    out = TACSolver.apply(sol, q, cfg)
    assert torch.equal(out[~mask], q[~mask])
    assert F.mse_loss(out, r) < F.mse_loss(q, r)


def test_tac_mask_is_two_sided_and_threshold_zero_corrects_all():
    """Negative outliers count (the reference's one-sided test missed them); threshold 0 -> all."""
    q = torch.tensor([[[[0.1, -5.0], [0.2, 0.1]]]])
    assert tac_mask(q, 2.0).tolist() == [[[[False, True], [False, False]]]]
    assert tac_mask(q, 0.0).all()
    s = TACSolver(TACConfig(threshold=100.0))
    s.update(q, q)
    assert s.solve()["K"].item() == 1.0  # nothing masked -> identity


# ------------------------------------------------------------------------------------------ blend


def test_blend_percentile_and_scale():
    """Percentile selects the largest (or smallest) |q| share per sample; scale blends."""
    q = torch.arange(1.0, 11.0).view(1, 1, 2, 5)
    c = torch.zeros_like(q)
    assert torch.equal(blend(q, c), c)
    assert torch.equal(blend(q, c, percentile=0), q)
    assert torch.equal(blend(q, c, scale=0.0), q)
    torch.testing.assert_close(blend(q, c, scale=0.25), 0.75 * q)
    top = blend(q, c, percentile=30, greater=True)
    assert top.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    low = blend(q, c, percentile=20, greater=False)
    assert low.flatten().tolist() == [0, 0, 3, 4, 5, 6, 7, 8, 9, 10]
    two = torch.cat([q, -q * 10])
    assert (blend(two, torch.zeros_like(two), percentile=10) == 0).sum() == 2  # one per sample
