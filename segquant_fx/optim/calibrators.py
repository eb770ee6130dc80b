"""Activation calibrators: static scales per segment and per DualScale half.

* ``amax`` (and ``gptq``, which calibrates activations with amax): the range is the largest
  magnitude of the segment of ``x / s``, from the per-channel extremes (exact over all data).
* ``percentile``: the range is the ``p``-th percentile of the segment's magnitudes (``|x|`` for a
  symmetric scale; the positive values, resp. the magnitudes of the negative values, for the two
  halves of DualScale).
* ``mse``: the range among ``amax * i / n`` (``i = 1..n``) that minimizes the expected squared
  quantization error of the observed distribution (rounding inside the range, clipping outside).

``percentile``/``mse`` work on a :class:`~segquant_fx.passes.observers.StreamingHistogram`: the
streaming one collected over all calibration values for an unsmoothed layer, or one binned from
the layer's row reservoir divided by ``s`` for a smoothed layer (``s`` is known only after the
calibration pass; see :class:`~segquant_fx.config.CalibConfig`).

Histogram estimates: the percentile lies in the bin of the order statistic of rank ``p/100 * (n-1)``
(linear interpolation inside the bin), so it is within one bin width of the order statistics
around that rank. MSE integrates every bin at 8 evenly spread points (values above the exact
maximum are clamped to it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from segquant_fx.ops.formats import dual_scales_from_minmax, qtype_info, scale_from_amax
from segquant_fx.passes.observers import ChannelMinMaxObserver, StreamingHistogram

__all__ = ["hist_percentile", "hist_mse_amax", "ActivationCalibrator"]

_SUB = 8


def hist_percentile(counts: torch.Tensor, rng: float, p: float) -> float:
    """The ``p``-th percentile (0-100] of the values binned in ``counts`` over ``[0, rng)``.

    Rank convention as ``numpy.percentile`` (linear): the target is the order statistic of 0-based
    rank ``h = p/100 * (n - 1)``; the estimate interpolates linearly inside the first bin whose
    cumulative count reaches ``h + 1``.

    Returns:
        The estimate (0.0 for an empty histogram).
    """
    c = counts.double().cpu()
    n = float(c.sum())
    if n <= 0 or rng <= 0:
        return 0.0
    target = p / 100.0 * (n - 1) + 1.0
    cum = torch.cumsum(c, 0)
    b = int(torch.searchsorted(cum, torch.tensor([target - 1e-9], dtype=torch.float64)).item())
    b = min(b, c.numel() - 1)
    before = float(cum[b - 1]) if b > 0 else 0.0
    inside = float(c[b])
    w = rng / c.numel()
    frac = (target - before) / inside if inside > 0 else 1.0
    return (b + min(max(frac, 0.0), 1.0)) * w


def hist_mse_amax(
    counts: torch.Tensor, rng: float, maxval: float, qtype: str, half: str, num_candidates: int = 100
) -> float:
    """The clipping range ``amax * i / n`` minimizing the expected quantization MSE of the histogram.

    Args:
        counts: Bin counts over ``[0, rng)`` of magnitudes.
        rng: Upper edge of the histogram.
        maxval: Exact largest magnitude (candidates are fractions of it).
        qtype: The activation qtype.
        half: ``"sym"`` (symmetric scale ``amax / qmax``), ``"pos"`` (``amax / qmax``, grid
            ``[0, qmax]``) or ``"neg"`` (``amax / |qmin|``, grid ``[0, |qmin|]``).
        num_candidates: ``n``.

    Returns:
        The best range (``maxval`` when the histogram is empty).
    """
    if maxval <= 0 or rng <= 0 or float(counts.sum()) <= 0:
        return float(max(maxval, 0.0))
    info = qtype_info(qtype)
    levels = info.neg_range if half == "neg" else info.qmax
    c = counts.double().cpu()
    bins = c.numel()
    w = rng / bins
    nz = (c > 0).nonzero().flatten()
    pts = ((nz[:, None].double() + (torch.arange(_SUB, dtype=torch.float64) + 0.5) / _SUB) * w).flatten()
    wts = (c[nz][:, None] / _SUB).expand(-1, _SUB).flatten()
    v = pts.clamp(max=maxval).to(torch.float32)
    cands = maxval * torch.arange(1, num_candidates + 1, dtype=torch.float64) / num_candidates
    best, best_err = maxval, float("inf")
    chunk = max(1, (1 << 22) // max(1, v.numel()))
    for i in range(0, num_candidates, chunk):
        s = (cands[i : i + chunk] / levels).to(torch.float32)[:, None]
        if info.is_float:
            q = (v[None, :] / s).clamp(max=levels).to(info.storage_dtype).to(torch.float32) * s
        else:
            q = torch.round(v[None, :] / s).clamp(0, levels) * s
        err = ((q.double() - v.double()[None, :]) ** 2 * wts[None, :]).sum(1)
        j = int(torch.argmin(err))
        if float(err[j]) < best_err:
            best_err, best = float(err[j]), float(cands[i + j])
    return best


class ActivationCalibrator:
    """Static activation scales of one layer for any smoothing vector.

    Args:
        calib: The layer's :class:`~segquant_fx.config.CalibConfig`.
        qtype: Activation op qtype.
        in_segments: Input segments (``()``: one).
        dual: DualScale.
        dual_segments: Per-segment DualScale flags (None: all).
        obs: The layer's observer (extremes; reservoir or histograms for percentile/MSE).
    """

    def __init__(
        self,
        calib: Any,
        qtype: str,
        in_segments: Sequence[int],
        dual: bool,
        dual_segments: Sequence[bool] | None,
        obs: ChannelMinMaxObserver,
    ):
        self.calib = calib
        self.qtype = qtype
        self.in_segments = tuple(in_segments)
        self.dual = dual
        self.dual_segments = tuple(dual_segments) if dual_segments is not None else None
        self.obs = obs
        self.kind = calib.type if calib.type in ("percentile", "mse") else "amax"
        self._warned = False

    # -- ranges -----------------------------------------------------------------------------------

    def _histogram(self, smooth: torch.Tensor | None) -> StreamingHistogram | None:
        hists = getattr(self.obs, "histograms", {}) or {}
        if smooth is None and self.in_segments in hists:
            return hists[self.in_segments]
        res = getattr(self.obs, "reservoir", None)
        if res is None or res.rows is None:
            return None
        rows = res.sample(dtype=torch.float32)
        if smooth is not None:
            rows = rows / smooth.to(device=rows.device, dtype=torch.float32)
        h = StreamingHistogram(self.obs.in_features, self.in_segments, self.calib.bins)
        h.update(rows)
        return h

    def _range(self, h: StreamingHistogram, t: int, which: str) -> float:
        counts, rng, maxval, _ = h.half(t, which)
        if self.kind == "percentile":
            return min(hist_percentile(counts, rng, self.calib.percentile), maxval)
        half = {"abs": "sym", "pos": "pos", "neg": "neg"}[which]
        return hist_mse_amax(counts, rng, maxval, self.qtype, half, self.calib.num_candidates)

    def ranges(self, smooth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-segment ``amax``, ``pos_max`` and ``neg_min`` (float32 ``[nseg]``) of ``x / smooth``."""
        st = self.obs.segment_stats(self.in_segments, smooth)
        if self.kind == "amax":
            return st
        h = self._histogram(smooth)
        if h is None:
            if not self._warned:
                warnings.warn(
                    f"{self.obs.name}: no histogram or reservoir for {self.kind} calibration; using amax",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned = True
            return st
        nseg = h.num_segments
        amax = torch.tensor([self._range(h, t, "abs") for t in range(nseg)], dtype=torch.float32)
        out = {"amax": amax.to(st["amax"].device)}
        if self.dual:
            pos = torch.tensor([self._range(h, t, "pos") for t in range(nseg)], dtype=torch.float32)
            neg = torch.tensor([-self._range(h, t, "neg") for t in range(nseg)], dtype=torch.float32)
            out["pos_max"], out["neg_min"] = pos.to(st["amax"].device), neg.to(st["amax"].device)
        else:
            out["pos_max"], out["neg_min"] = st["pos_max"], st["neg_min"]
        return out

    # -- scales -----------------------------------------------------------------------------------

    def scales(self, smooth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``x_scale`` (and ``x_scale_pos``/``x_scale_neg`` with DualScale) for ``x / smooth``."""
        st = self.ranges(smooth)
        if not self.dual:
            return {"x_scale": scale_from_amax(st["amax"], self.qtype)}
        pos, neg = dual_scales_from_minmax(st["pos_max"], st["neg_min"], self.qtype)
        if self.dual_segments is not None:
            sym = scale_from_amax(st["amax"], self.qtype)
            flags = torch.tensor(self.dual_segments, device=pos.device)
            pos, neg = torch.where(flags, pos, sym), torch.where(flags, neg, sym)
        return {"x_scale_pos": pos, "x_scale_neg": neg, "x_scale": torch.cat([pos, neg])}
