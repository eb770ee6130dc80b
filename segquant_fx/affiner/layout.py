"""Latent layouts: FLUX's packed ``[B, N, C*4]`` predictions to and from ``[B, C, H, W]``.

The solvers work on ``[B, C, H, W]`` so that a channel means a latent channel and ``(H, W)`` a
position of the latent grid, whatever the model. FLUX packs each 2x2 patch of its ``C``-channel
latent into one token of ``C*4`` features (``diffusers.FluxPipeline._pack_latents``): feature
``c*4 + 2*dy + dx`` of token ``(h, w)`` is channel ``c`` at ``(2h + dy, 2w + dx)``. :func:`unpack`
inverts that exactly, given the unpacked grid size from :attr:`StepInfo.latent_hw`.
"""

from __future__ import annotations

import torch

from segquant_fx.errors import ConfigError
from segquant_fx.stepper import StepInfo

__all__ = ["pack", "unpack", "to_bchw", "from_bchw"]


def _check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    if len(hw) != 2 or any(type(v) is not int or v < 2 or v % 2 for v in hw):
        raise ConfigError(
            f"latent_hw = {hw!r}: a packed (FLUX) latent needs an even (height, width) of the unpacked grid"
        )
    return hw[0], hw[1]


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)*(W/2), C*4]`` (FLUX's 2x2 patch packing)."""
    if x.dim() != 4:
        raise ConfigError(f"pack expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    _check_hw((h, w))
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, (H/2)*(W/2), C*4]`` -> ``[B, C, H, W]`` for the unpacked grid size ``hw = (H, W)``."""
    h, w = _check_hw(tuple(hw))
    if x.dim() != 3:
        raise ConfigError(f"a packed latent must be [B, tokens, C*4], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ConfigError(
            f"packed latent of shape {tuple(x.shape)} does not fit latent_hw={hw}: expected "
            f"{(h // 2) * (w // 2)} tokens of C*4 features"
        )
    x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def to_bchw(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
    """A prediction in the layout ``info`` describes, as ``[B, C, H, W]``."""
    if info.latent_layout == "packed":
        return unpack(x, info.latent_hw)
    if info.latent_layout != "bchw":
        raise ConfigError(f"latent_layout = {info.latent_layout!r}: expected 'bchw' or 'packed'")
    if x.dim() != 4:
        raise ConfigError(f"latent_layout 'bchw' expects a 4-D prediction, got shape {tuple(x.shape)}")
    return x


def from_bchw(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
    """Inverse of :func:`to_bchw`."""
    return pack(x) if info.latent_layout == "packed" else x
