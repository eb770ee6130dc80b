"""PNG grids written without Pillow decode to the same pixels with Pillow."""

from __future__ import annotations

import io

import pytest
import torch

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.grid import encode_png, make_grid, save_png


def test_grid_layout_and_png_round_trip(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    images = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    grid = make_grid(images, ncol=2, pad=1, scale=2, pad_value=0.0)
    assert grid.shape == (3, 3 * (8 + 1) + 1, 2 * (12 + 1) + 1)
    assert torch.equal(grid[:, 1:9, 14:26], images[1].repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert grid[:, 19:27, 14:26].eq(0).all()  # the empty sixth cell keeps the pad value
    path = save_png(grid, tmp_path / "g.png")
    decoded = torch.tensor(list(pil.open(path).convert("RGB").tobytes()), dtype=torch.float32).reshape(-1, 3)
    want = (grid.permute(1, 2, 0).reshape(-1, 3) * 255 + 0.5).floor()
    assert torch.equal(decoded, want)
    assert encode_png(grid) == path.read_bytes()
    assert pil.open(io.BytesIO(encode_png(torch.ones(3, 1, 1)))).size == (1, 1)


def test_grid_errors():
    """Wrong shapes or sizes raise ConfigError."""
    with pytest.raises(ConfigError, match=r"\[B, 3, H, W\]"):
        make_grid(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ConfigError, match="ncol=0"):
        make_grid(torch.zeros(2, 3, 4, 4), ncol=0)
    with pytest.raises(ConfigError, match=r"\[3, H, W\]"):
        encode_png(torch.zeros(4, 4))
