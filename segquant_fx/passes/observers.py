"""Observers: record activation statistics during calibration and turn them into scales.

An observer is an ``nn.Module`` whose ``forward(x)`` records and returns ``x`` unchanged. The linear-input
observer keeps only per-channel running maxima (positive max and negative min, two ``[K]`` vectors),
so memory is bounded by the layer width whatever the calibration set size. Every statistic the
quantizer needs derives from them, for any smoothing vector ``s > 0`` chosen afterwards:

* amax of segment ``t`` of ``x / s``: ``max_{k in t} max(pos_k, -neg_k) / s_k``;
* DualScale extremes of ``x / s`` per segment: ``max pos_k / s_k`` and ``min neg_k / s_k``;
* SmoothQuant's per-channel ``max|x|``: ``max(pos_k, -neg_k)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from segquant_fx.errors import CalibrationError

__all__ = ["ObserverBase", "ChannelMinMaxObserver"]


class ObserverBase(torch.nn.Module):
    """Records statistics in ``forward`` (returning the input unchanged); ``reset`` forgets them."""

    @classmethod
    def with_args(cls, **kwargs: Any) -> Any:
        """A factory that builds this observer with ``kwargs`` bound."""
        return functools.partial(cls, **kwargs)

    def reset(self) -> None:  # pragma: no cover - abstract
        """Forget everything recorded."""
        raise NotImplementedError

    def calculate_qparams(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        """Scales from the statistics."""
        raise NotImplementedError


class ChannelMinMaxObserver(ObserverBase):
    """Per-input-channel running positive max and negative min of a linear's input.

    Args:
        in_features: K, the last dim of the observed tensor.
        name: What is observed, for error messages (e.g. the graph node).
    """

    def __init__(self, in_features: int, name: str = ""):
        super().__init__()
        self.in_features = in_features
        self.name = name
        self.register_buffer("pos_max", torch.zeros(in_features, dtype=torch.float32))
        self.register_buffer("neg_min", torch.zeros(in_features, dtype=torch.float32))
        self.count = 0

    def reset(self) -> None:
        """Forget all statistics."""
        self.pos_max.zero_()
        self.neg_min.zero_()
        self.count = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``'s per-channel extremes; return ``x``."""
        if x.shape[-1] != self.in_features:
            raise CalibrationError(f"{self.name}: observed last dim {x.shape[-1]}, expected {self.in_features}")
        flat = x.detach().reshape(-1, self.in_features)
        if flat.numel() == 0:
            return x
        hi = flat.amax(dim=0).float()
        lo = flat.amin(dim=0).float()
        if not (torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            bad = int((~torch.isfinite(hi) | ~torch.isfinite(lo)).nonzero()[0])
            raise CalibrationError(
                f"non-finite activation at {self.name} (channel {bad}): the float model produces NaN/Inf on "
                "this calibration item; check the item's values and the model's dtype"
            )
        self.pos_max.copy_(torch.maximum(self.pos_max, hi.clamp(min=0).to(self.pos_max.device)))
        self.neg_min.copy_(torch.minimum(self.neg_min, lo.clamp(max=0).to(self.neg_min.device)))
        self.count += flat.shape[0]
        return x

    @property
    def absmax(self) -> torch.Tensor:
        """Per-channel ``max |x|``."""
        return torch.maximum(self.pos_max, -self.neg_min)

    def segment_stats(self, segments: tuple[int, ...], smooth: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-segment ``amax``, ``pos_max`` and ``neg_min`` of ``x / smooth`` (float32 ``[nseg]``)."""
        pos, neg = self.pos_max, self.neg_min
        if smooth is not None:
            s = smooth.float().to(pos.device)
            pos, neg = pos / s, neg / s
        sizes = list(segments) if segments else [self.in_features]
        p = torch.stack([t.max() for t in pos.split(sizes)])
        n = torch.stack([t.min() for t in neg.split(sizes)])
        return {"amax": torch.maximum(p, -n), "pos_max": p, "neg_min": n}
