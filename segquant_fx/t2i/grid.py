"""Image grids as PNG files, written with the standard library only (no Pillow on the GPU machine).

Example::

    save_png(make_grid(images, ncol=8, scale=4), "samples.png")   # images: [B, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch

from segquant_fx.errors import ConfigError
from segquant_fx.fileio import atomic_write_bytes

__all__ = ["make_grid", "save_png", "encode_png"]


def make_grid(
    images: torch.Tensor, ncol: int = 8, *, pad: int = 1, scale: int = 1, pad_value: float = 1.0
) -> torch.Tensor:
    """Tile ``images`` (``[B, 3, H, W]`` in ``[0, 1]``) into one ``[3, rows*(H+pad)+pad, ...]`` image.

    ``scale`` enlarges every pixel to ``scale x scale`` (nearest neighbour) so 32x32 images stay readable.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"make_grid expects images [B, 3, H, W], got shape {tuple(images.shape)}")
    if ncol < 1 or scale < 1 or pad < 0:
        raise ConfigError(f"make_grid: ncol={ncol}, scale={scale} must be >= 1 and pad={pad} >= 0")
    x = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    b, _, h, w = x.shape
    ncol = min(ncol, b)
    nrow = (b + ncol - 1) // ncol
    grid = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), float(pad_value))
    for i in range(b):
        r, c = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[i]
    return grid


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of an RGB image ``[3, H, W]`` in ``[0, 1]`` (8 bits per channel)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ConfigError(f"encode_png expects [3, H, W], got shape {tuple(image.shape)}")
    arr = (
        (image.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous()
    )
    h, w, _ = arr.shape
    raw = bytes(arr.reshape(-1).tolist())  # no numpy needed
    stride = w * 3
    # filter type 0 (None) in front of every scanline
    data = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(h))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + tag
            + payload
            + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(data, 9))
        + chunk(b"IEND", b"")
    )


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` (``[3, H, W]`` in ``[0, 1]``) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, encode_png(image), make_parents=True)
