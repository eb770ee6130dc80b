"""Image fidelity metrics of quantized against float images: PSNR and SSIM.

Both compare images ``[B, 3, H, W]`` with values in ``[0, data_range]`` image by image and return one
value per image (float64 on the CPU).

* :func:`psnr`: ``10 log10(data_range² / MSE)`` over all pixels and channels of an image; ``inf`` for
  identical images (as ``skimage.metrics.peak_signal_noise_ratio``).
* :func:`ssim`: the structural similarity of Wang et al. (2004) with their settings: an 11x11 Gaussian
  window with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population (not sample) statistics, computed per
  channel on the positions where the window fits inside the image, averaged over positions and channels.
  This equals ``skimage.metrics.structural_similarity(a, b, channel_axis=0, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=data_range)`` (skimage filters the whole image and
  then crops the border where the window does not fit, which leaves the same positions).

:func:`summarize` turns per-image values into the table entries the demo and the fidelity benchmark report.
"""

from __future__ import annotations

import math

import torch

from segquant_fx.errors import ConfigError

__all__ = ["psnr", "ssim", "gaussian_window", "summarize", "SSIM_WINDOW", "SSIM_SIGMA"]

#: SSIM window size and Gaussian sigma (Wang et al. 2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ConfigError(f"expected two image tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 4 or a.shape != b.shape:
        raise ConfigError(
            f"expected two image batches [B, C, H, W] of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ConfigError(f"data_range must be a finite number > 0, got {data_range!r}")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair (``[B]``; ``inf`` where the images are equal).

    Raises:
        ConfigError: Shapes differ or are not ``[B, C, H, W]``, or ``data_range <= 0``.
    """
    x, y = _check_pair(a, b, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)  # mse 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized ``[size, size]`` Gaussian window (float64), the outer product of two 1-D Gaussians."""
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"SSIM window size must be a positive odd int, got {size}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity of each image pair (``[B]``, 1 where the images are equal).

    Args:
        a: Images ``[B, C, H, W]``.
        b: Images of the same shape.
        data_range: Value range of the pixels (1 for images in ``[0, 1]``).
        window: Gaussian window size (odd, at most ``min(H, W)``).
        sigma: Gaussian sigma.
        k1: Stability constant of the luminance term, ``C1 = (k1 data_range)²``.
        k2: Stability constant of the contrast-structure term, ``C2 = (k2 data_range)²``.

    Raises:
        ConfigError: Bad shapes, a window larger than the images, or ``data_range <= 0``.
    """
    x, y = _check_pair(a, b, data_range)
    c = x.shape[1]
    if window > min(x.shape[2], x.shape[3]):
        raise ConfigError(
            f"SSIM window {window} is larger than the images ({x.shape[2]}x{x.shape[3]}); pass a smaller window"
        )
    w = gaussian_window(window, sigma).expand(c, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:  # weighted local mean, valid positions only
        return torch.nn.functional.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


def summarize(reference: torch.Tensor, images: torch.Tensor) -> dict[str, float | list[float]]:
    """PSNR and SSIM of ``images`` against ``reference`` (both ``[B, 3, H, W]`` in ``[0, 1]``).

    Returns:
        ``{"psnr", "ssim"}`` means over the images (PSNR ``inf`` only if every pair is identical; pairs
        that are identical count as 100 dB in the mean otherwise) and ``{"psnr_per_image",
        "ssim_per_image"}`` lists.
    """
    p = psnr(reference, images)
    s = ssim(reference, images)
    finite = torch.where(torch.isinf(p), torch.full_like(p, 100.0), p)
    mean_psnr = float("inf") if bool(torch.isinf(p).all()) else _mean(finite)
    return {
        "psnr": mean_psnr,
        "ssim": _mean(s),
        "psnr_per_image": [float(v) for v in p],
        "ssim_per_image": [float(v) for v in s],
    }
