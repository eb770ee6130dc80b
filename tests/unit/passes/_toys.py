"""A toy DiT-like block shared by the per-pass tests (annotate, calibrate, rewrite).

The block has one linear per structure the SegQuant patterns target, and one plain linear:

* ``ada``: adaLN modulation, ``silu(emb) -> ada -> chunk(3)`` -> output segments ``(16, 16, 16)``
  and DualScale (``linear_to_chunk`` + ``activation_to_linear``);
* ``to_v``: a plain projection (no pattern);
* ``to_out``: attention head merge ``[B, H, S, D] -> transpose -> [B, S, H*D] -> to_out`` -> input
  segments ``(4, 4, 4, 4)`` (``reshape_to_linear``);
* ``ff1``: FFN up-projection (no pattern);
* ``ff2``: ``gelu(ff1(x)) -> ff2`` -> DualScale (``activation_to_linear``).

:func:`prepared_toy` runs the public front half of ``quantize()`` (``segquant_fx.api.prepare``:
capture, pattern matching, annotate pass) and gives each call its own graph. The block is captured
with ``torch.export`` once per process (:func:`captured_toy`); ``prepare`` unlifts a fresh graph
module from that capture every time.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx import api
from segquant_fx.api import Prepared
from segquant_fx.capture import CapturedModel, capture
from segquant_fx.config import QuantizeConfig

__all__ = [
    "DIM",
    "EMB",
    "HEADS",
    "HEAD_DIM",
    "FF",
    "LINEARS",
    "DiTBlockToy",
    "calib_items",
    "captured_toy",
    "example_item",
    "prepared_toy",
    "toy_block",
]

DIM, EMB, HEADS, HEAD_DIM, FF = 16, 8, 4, 4, 32

#: Module name -> (in_features, out_features) of every linear of the block, in graph order.
LINEARS: dict[str, tuple[int, int]] = {
    "ada": (EMB, 3 * DIM),
    "to_v": (DIM, DIM),
    "to_out": (DIM, DIM),
    "ff1": (DIM, FF),
    "ff2": (FF, DIM),
}


class DiTBlockToy(nn.Module):
    """adaLN-modulated attention-like mixer plus a GELU FFN, on ``x: [B, S, 16]``, ``emb: [B, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.ada = nn.Linear(EMB, 3 * DIM)
        self.norm = nn.LayerNorm(DIM, elementwise_affine=False)
        self.to_v = nn.Linear(DIM, DIM)
        self.to_out = nn.Linear(DIM, DIM)
        self.ff1 = nn.Linear(DIM, FF)
        self.ff2 = nn.Linear(FF, DIM)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(emb)).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        b, s, _ = h.shape
        v = self.to_v(h).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)  # [B, H, S, D]
        att = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1) @ v
        o = att.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
        x = x + gate[:, None] * self.to_out(o)
        return x + self.ff2(F.gelu(self.ff1(x)))


def toy_block(seed: int = 0) -> DiTBlockToy:
    """A block with deterministic weights, in eval mode."""
    torch.manual_seed(seed)
    return DiTBlockToy().eval()


def calib_items(n: int, batch: int = 2, tokens: int = 5, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` kwargs items ``{"x": [batch, tokens, 16], "emb": [batch, 8]}`` from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(batch, tokens, DIM, generator=g), "emb": 2 * torch.randn(batch, EMB, generator=g)}
        for _ in range(n)
    ]


def example_item() -> dict[str, Any]:
    """The capture example (batch 2, 5 tokens; not one of the calibration items)."""
    return calib_items(1, seed=123)[0]


@functools.cache
def captured_toy() -> tuple[DiTBlockToy, CapturedModel]:
    """The block (seed 0) and its capture, computed once per process; do not mutate either."""
    model = toy_block()
    return model, capture(model, example_item())


def prepared_toy(config: Any = "w8a8") -> Prepared:
    """``segquant_fx.api.prepare`` of the shared block with ``config`` (anything ``coerce`` accepts).

    Every call returns a new graph module (``prepare`` unlifts one from the exported program), so
    tests may calibrate and rewrite it; only the capture itself is shared.
    """
    model, cm = captured_toy()
    with mock.patch.object(api, "capture", return_value=cm):
        return api.prepare(model, example_item(), QuantizeConfig.coerce(config))
