"""Toy layers and helpers shared by the optimizer tests."""

from __future__ import annotations

from typing import Any

import torch

_CACHED: dict[int, torch.nn.Module] = {}
_CAPTURES: dict[int, Any] = {}


def cache_capture(model: torch.nn.Module) -> torch.nn.Module:
    """Register ``model`` so that every ``quantize`` of it reuses one capture (kept alive here)."""
    _CACHED[id(model)] = model
    return model


class OneLinear(torch.nn.Module):
    """``lin(x)``: a single linear, no pattern."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


#: A layer config without SegLinear/DualScale (plain per-layer quantization), real kernels.
PLAIN = {
    "seglinear": False,
    "dual_scale": False,
    "search_patterns": [],
    "real_quant": True,
    "input_quant": {"type": "int8"},
    "weight_quant": {"type": "int8", "axis": 0},
}


def rel_error(
    model: torch.nn.Module, qmodel: torch.nn.Module, items: list[tuple[torch.Tensor, ...]]
) -> float:
    """``sum ||y - y_q||^2 / sum ||y||^2`` over ``items``."""
    e = r = 0.0
    with torch.no_grad():
        for args in items:
            y = model(*args)
            e += float(((y - qmodel(*args)) ** 2).sum())
            r += float((y**2).sum())
    return e / r
