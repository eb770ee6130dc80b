"""A toy DiT block, its calibration items and configs for the distributed-calibration tests.

The block has one linear per structure SegQuant treats specially: adaLN modulation
``silu(emb) -> ada -> chunk(3)`` (output segments + DualScale), a head merge before ``to_out``
(input segments), a GELU FFN (DualScale on ``ff2``) and plain projections. Items have different
token counts, so the shards of two processes differ in shape too.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx.config import QuantizeConfig

__all__ = ["CONFIGS", "ToyBlock", "items", "quantize_toy", "state", "toy"]

DIM, EMB, HEADS, FF = 16, 8, 4, 32


class ToyBlock(nn.Module):
    """adaLN-modulated attention-like mixer plus a GELU FFN, on ``x: [B, S, 16]``, ``emb: [B, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.ada = nn.Linear(EMB, 3 * DIM)
        self.to_v = nn.Linear(DIM, DIM)
        self.to_out = nn.Linear(DIM, DIM)
        self.ff1 = nn.Linear(DIM, FF)
        self.ff2 = nn.Linear(FF, DIM)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(emb)).chunk(3, dim=-1)
        h = F.layer_norm(x, (DIM,)) * (1 + scale[:, None]) + shift[:, None]
        b, s, _ = h.shape
        v = self.to_v(h).view(b, s, HEADS, DIM // HEADS).transpose(1, 2)
        att = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1) @ v
        x = x + gate[:, None] * self.to_out(att.transpose(1, 2).reshape(b, s, DIM))
        return x + self.ff2(F.gelu(self.ff1(x)))


@functools.cache
def toy() -> ToyBlock:
    """The block with seeded weights (one per process)."""
    torch.manual_seed(0)
    return ToyBlock().eval()


def items(n: int = 7, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` items with 4..6 tokens; the first token of item 2 holds 8.0 (a power of two: histogram edge)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = 2 * torch.randn(2, 4 + i % 3, DIM, generator=g)
        if i == 2:
            x[0, 0, 0] = 8.0
        out.append({"x": x, "emb": 2 * torch.randn(2, EMB, generator=g)})
    return out


_W8A8 = QuantizeConfig.coerce("w8a8").to_dict()["default"]

#: name -> config: every statistic the reduction handles, and the presets of the issue.
CONFIGS: dict[str, Any] = {
    "w8a8": "w8a8",  # SegLinear + DualScale extremes + SmoothQuant channel maxima (amax)
    "dualscale-amax": {"default": {**_W8A8, "opt": {"type": "default"}}},
    "percentile": {
        "default": {**_W8A8, "opt": {"type": "default"}, "calib": {"type": "percentile", "bins": 64}}
    },
    "mse": {"default": {**_W8A8, "opt": {"type": "default"}, "calib": {"type": "mse", "bins": 64}}},
    "mse-smoothed": {"default": {**_W8A8, "calib": {"type": "mse", "rows": 24, "bins": 64}}},
    "alpha-search": {
        "default": {
            **_W8A8,
            "opt": {
                "type": "smooth",
                "alpha": 0.5,
                "search_alpha_config": {"enable": True, "step": 0.25, "rows": 24},
            },
        }
    },
    "w4a8": "w4a8",  # SVD branch + GPTQ (float32 Hessians)
    "segquant-g-w8a8": "segquant-g-w8a8",  # GPTQ
}


@functools.cache
def _capture() -> Any:
    from segquant_fx.capture import capture

    return capture(toy(), items(1, seed=99)[0])


def quantize_toy(calib: Any, config: Any, **kwargs: Any) -> Any:
    """``segquant_fx.quantize(toy(), calib, config, ...)`` with the capture done once per process."""
    from segquant_fx import api

    with mock.patch.object(api, "capture", return_value=_capture()):
        return api.quantize(toy(), calib, config, progress=False, example=items(1, seed=99)[0], **kwargs)


def state(qmodel: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized model (weights, scales, smoothing vectors, low-rank branches)."""
    return {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
