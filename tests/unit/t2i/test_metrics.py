"""PSNR and SSIM (segquant_fx.t2i.metrics) against closed forms and a loop-per-window reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.metrics import gaussian_window, psnr, ssim, summarize


def _ref_window() -> np.ndarray:
    """skimage's window for sigma 1.5: truncate 3.5 -> radius int(3.5 * 1.5 + 0.5) = 5, normalized."""
    sigma, radius = 1.5, int(3.5 * 1.5 + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def _ref_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. SSIM, one explicit window sum per position and channel (skimage's formulas with
    gaussian_weights=True, use_sample_covariance=False, borders where the window does not fit excluded)."""
    w = _ref_window()
    k = w.shape[0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for ch in range(a.shape[0]):
        vals = []
        for i in range(a.shape[1] - k + 1):
            for j in range(a.shape[2] - k + 1):
                x = a[ch, i : i + k, j : j + k]
                y = b[ch, i : i + k, j : j + k]
                mx, my = (w * x).sum(), (w * y).sum()
                vx = (w * x * x).sum() - mx**2
                vy = (w * y * y).sum() - my**2
                cxy = (w * x * y).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def _images(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_window_is_skimages_gaussian():
    w = gaussian_window()
    assert w.shape == (11, 11)
    np.testing.assert_allclose(w.numpy(), _ref_window(), rtol=0, atol=1e-15)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_identical_images():
    x = _images(0)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    s = summarize(x, x)
    assert s["psnr"] == float("inf") and s["ssim"] == pytest.approx(1.0)


def test_psnr_known_values():
    x = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x + 0.1  # MSE 0.01 -> 20 dB
    assert float(psnr(x, y)[0]) == pytest.approx(20.0, abs=1e-9)
    assert float(psnr(x * 255, y * 255, data_range=255.0)[0]) == pytest.approx(20.0, abs=1e-6)
    z = x.clone()
    z[0, 0, 0, 0] += 0.5  # one pixel of 192 off by 0.5: MSE 0.25 / 192
    assert float(psnr(x, z)[0]) == pytest.approx(10 * math.log10(192 / 0.25), abs=1e-9)


def test_ssim_constant_images_closed_form():
    # no variance: SSIM = (2 c d + C1) / (c^2 + d^2 + C1)
    c, d = 0.3, 0.6
    x, y = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (c, d))
    c1 = 0.01**2
    assert float(ssim(x, y)[0]) == pytest.approx((2 * c * d + c1) / (c * c + d * d + c1), abs=1e-6)


@pytest.mark.parametrize("kind", ["noise", "shift", "blur", "unrelated"])
def test_ssim_matches_reference(kind):
    a = _images(1, n=1, size=16)
    g = torch.Generator().manual_seed(2)
    if kind == "noise":
        b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    elif kind == "shift":
        b = torch.roll(a, shifts=(1, 2), dims=(2, 3))
    elif kind == "blur":
        b = torch.nn.functional.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)
    else:
        b = _images(3, n=1, size=16)
    got = float(ssim(a, b)[0])
    want = _ref_ssim(a[0].double().numpy(), b[0].double().numpy())
    assert got == pytest.approx(want, abs=1e-10)
    mse = float(((a.double() - b.double()) ** 2).mean())
    assert float(psnr(a, b)[0]) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)


def test_per_image_and_ordering():
    a = _images(4, n=3)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(a.shape, generator=g)
    b = torch.stack([(a[i] + s * noise[i]).clamp(0, 1) for i, s in enumerate((0.01, 0.05, 0.2))])
    p, s = psnr(a, b), ssim(a, b)
    assert p.shape == s.shape == (3,)
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]  # more noise, lower fidelity
    summary = summarize(a, b)
    assert summary["psnr"] == pytest.approx(float(p.mean()))
    assert summary["ssim_per_image"] == pytest.approx(s.tolist())


def test_summary_caps_identical_pairs():
    a = _images(6, n=2)
    b = a.clone()
    b[1] = (b[1] + 0.1).clamp(0, 1)
    s = summarize(a, b)
    assert math.isinf(s["psnr_per_image"][0])
    assert s["psnr"] == pytest.approx((100.0 + s["psnr_per_image"][1]) / 2)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 0.5))
def test_symmetric_and_bounded(seed, scale):
    a = _images(seed, n=1, size=12)
    b = (a + scale * _images(seed + 1, n=1, size=12)).clamp(0, 1)
    s_ab, s_ba = ssim(a, b), ssim(b, a)
    torch.testing.assert_close(s_ab, s_ba)
    assert float(s_ab[0]) <= 1.0 + 1e-12
    torch.testing.assert_close(psnr(a, b), psnr(b, a))


def test_bad_inputs():
    x = _images(0)
    with pytest.raises(ConfigError, match="same shape"):
        psnr(x, x[:1])
    with pytest.raises(ConfigError, match=r"\[B, C, H, W\]"):
        ssim(x[0], x[0])
    with pytest.raises(ConfigError, match="larger than the images"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ConfigError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(ConfigError, match="odd"):
        gaussian_window(10)
    with pytest.raises(ConfigError, match="image tensors"):
        ssim(x.numpy(), x)
