"""Shared by ``tests/unit/test_compile.py`` and ``tests/unit/test_onnx.py``: quantized models, toys, metrics.

Quantized models are cached for the whole session (``functools.cache``), so each tiny backbone and
each toy preset is quantized once however many tests and modules use it; tests only read them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import segquant_fx
from segquant_fx.models import build_model, calibration_items

__all__ = [
    "BACKBONES",
    "Toy",
    "toy_calib",
    "toy_quantized",
    "quantized_zoo",
    "resolutions",
    "first",
    "rel",
]

#: The three tiny backbones the deployment issue names.
BACKBONES = ("tiny-sd3", "tiny-flux", "tiny-sdxl")


class Toy(nn.Module):
    """A DiT-style MLP: LayerNorm -> Linear -> GELU -> Linear (DualScale on fc2), plus a residual."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def toy_calib(n: int = 3, seed: int = 0, d: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` calibration items ``{"x": [2, 6, d]}``."""
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, 6, d, generator=g)} for _ in range(n)]


@functools.cache
def toy_quantized(preset: Any = "w8a8", d: int = 16) -> tuple[Toy, Any]:
    """(float toy, quantized toy) for a preset name, built once per session (weights: seed 0)."""
    torch.manual_seed(0)
    model = Toy(d).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, segquant_fx.quantize(model, toy_calib(3, seed=1, d=d), preset, progress=False)


@functools.cache
def quantized_zoo(name: str) -> tuple[nn.Module, Any]:
    """(float model, w8a8 quantized model) of a zoo backbone, built once per session."""
    model, _ = build_model(name, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, segquant_fx.quantize(model, calibration_items(name, 2), "w8a8", progress=False)


def _flux_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


def resolutions(name: str) -> list[dict[str, Any]]:
    """Three inputs of one backbone at different resolutions (token counts), batch 2."""
    _, base = build_model(name, batch_size=2, seed=11)
    g = torch.Generator().manual_seed(5)
    out = [base]
    if name == "tiny-flux":
        for h, w in ((4, 6), (6, 6)):
            out.append(
                {**base, "hidden_states": torch.randn(2, h * w, 16, generator=g), "img_ids": _flux_ids(h, w)}
            )
    else:
        key = "sample" if name == "tiny-sdxl" else "hidden_states"
        for s in (12, 24):
            out.append({**base, key: torch.randn(2, 4, s, s, generator=g)})
    return out


def first(out: Any) -> torch.Tensor:
    """The first tensor of a model output (``*Output``, tuple or tensor)."""
    return pytree.tree_leaves(out)[0]


def rel(a: Any, b: Any) -> float:
    """``|a - b| / |b|`` (Frobenius, float64) for tensors or arrays."""

    def arr(x: Any) -> np.ndarray:
        return np.asarray(x.detach().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)

    a, b = arr(a), arr(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
