"""Observers: record activation statistics during calibration and turn them into scales.

An observer is an ``nn.Module`` whose ``forward(x)`` records and returns ``x`` unchanged. The linear-input
observer keeps only per-channel running maxima (positive max and negative min, two ``[K]`` vectors),
so memory is bounded by the layer width whatever the calibration set size. Every statistic the
quantizer needs derives from them, for any smoothing vector ``s > 0`` chosen afterwards:

* amax of segment ``t`` of ``x / s``: ``max_{k in t} max(pos_k, -neg_k) / s_k``;
* DualScale extremes of ``x / s`` per segment: ``max pos_k / s_k`` and ``min neg_k / s_k``;
* SmoothQuant's per-channel ``max|x|``: ``max(pos_k, -neg_k)``.

The optimizers need more than extremes, always with bounded memory:

* :class:`RowReservoir`: a uniform random sample of at most ``capacity`` input rows (bottom-k of
  random keys, so the sample is exactly uniform over all rows seen, whatever the batch sizes). The
  alpha search scores every candidate on it layer-locally, and percentile/MSE calibration of a
  smoothed layer bins ``x / s`` from it once ``s`` is known. During ``calibrate`` the keys of an
  item's rows come from a generator seeded by (observer, item index), so the sample does not depend
  on which process saw which item (:mod:`segquant_fx.distributed` merges reservoirs exactly).
* :class:`HessianAccumulator`: ``sum x x^T`` and the row count for GPTQ (``H = 2/n sum x x^T``), of
  the *raw* input: the Hessian of the smoothed input ``x / s`` is ``H / (s s^T)``, so one Hessian
  serves every smoothing vector (alpha candidates, output segments) without recomputation.
* :class:`StreamingHistogram`: per segment and sign, counts of ``|x|`` in ``bins`` bins over
  ``[0, r)``; ``r`` is a power of two that doubles when a larger value arrives (bin pairs merge
  exactly), so the histogram covers every value seen at a resolution of ``r / bins``.

:class:`LinearInputObserver` bundles them (it *is* a :class:`ChannelMinMaxObserver`, so everything
that reads extremes keeps working); what it collects is set per layer by the optimizers' needs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from segquant_fx.errors import CalibrationError

__all__ = [
    "ObserverBase",
    "ChannelMinMaxObserver",
    "RowReservoir",
    "HessianAccumulator",
    "StreamingHistogram",
    "ObserverNeeds",
    "LinearInputObserver",
    "merge_observers",
    "ObserverSession",
]


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
            raise CalibrationError(
                f"{self.name}: observed last dim {x.shape[-1]}, expected {self.in_features}"
            )
        flat = x.detach().reshape(-1, self.in_features)
        if flat.numel() == 0:
            return x
        hi = flat.amax(dim=0).float()
        lo = flat.amin(dim=0).float()
        self._check_finite(hi, lo)
        self.pos_max.copy_(torch.maximum(self.pos_max, hi.clamp(min=0).to(self.pos_max.device)))
        self.neg_min.copy_(torch.minimum(self.neg_min, lo.clamp(max=0).to(self.neg_min.device)))
        self.count += flat.shape[0]
        return x

    def _check_finite(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        """Raise :class:`CalibrationError` if the per-channel maximum ``hi`` or minimum ``lo`` is not finite.

        The message names this observer and the first such channel.
        """
        if not (torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            bad = int((~torch.isfinite(hi) | ~torch.isfinite(lo)).nonzero()[0])
            raise CalibrationError(
                f"non-finite activation at {self.name} (channel {bad}): the float model produces NaN/Inf on "
                "this calibration item; check the item's values and the model's dtype"
            )

    @property
    def absmax(self) -> torch.Tensor:
        """Per-channel ``max |x|``."""
        return torch.maximum(self.pos_max, -self.neg_min)

    def segment_stats(
        self, segments: tuple[int, ...], smooth: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-segment ``amax``, ``pos_max`` and ``neg_min`` of ``x / smooth`` (float32 ``[nseg]``)."""
        pos, neg = self.pos_max, self.neg_min
        if smooth is not None:
            s = smooth.float().to(pos.device)
            pos, neg = pos / s, neg / s
        sizes = list(segments) if segments else [self.in_features]
        p = torch.stack([t.max() for t in pos.split(sizes)])
        n = torch.stack([t.min() for t in neg.split(sizes)])
        return {"amax": torch.maximum(p, -n), "pos_max": p, "neg_min": n}


class RowReservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream of ``[M, K]`` batches.

    Every row gets a random key from a seeded generator; the reservoir holds the rows with the
    ``capacity`` smallest keys seen so far (bottom-k sampling), which is a uniform sample without
    replacement of all rows, deterministic for a given seed and stream. Rows are kept in arrival
    order; ``order`` holds each kept row's position (``index << 32 | row`` within calibration item
    ``index`` after :meth:`begin_item`, else the running row count).

    Keys: one generator for the whole stream by default; after :meth:`begin_item` the keys of that
    item's rows come from a generator seeded by ``(seed, index)`` alone, so the rows (and keys) kept
    from a set of items do not depend on the order in which, or the process by which, items were
    seen: bottom-k over the union of several reservoirs' rows, sorted by ``order``, is the reservoir of
    one process that saw every item.

    Args:
        in_features: K.
        capacity: Most rows kept.
        cpu_storage: Keep the rows in CPU memory (else on the device of the observed tensors).
        seed: Seed of the key generator.
    """

    def __init__(self, in_features: int, capacity: int, *, cpu_storage: bool = False, seed: int = 0):
        self.in_features = in_features
        self.capacity = int(capacity)
        self.cpu_storage = cpu_storage
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0, dtype=torch.float64)
        self.order = torch.empty(0, dtype=torch.int64)
        self.seen = 0
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._item: int | None = None
        self._item_rows = 0

    def begin_item(self, index: int) -> None:
        """The next rows belong to calibration item ``index``: key them by ``(seed, index)`` only."""
        # torch's CPU generator keeps 32 bits of a seed: hash (seed, index) down to 32 bits
        digest = hashlib.blake2b(f"{self.seed}:{int(index)}".encode(), digest_size=4).digest()
        self._gen.manual_seed(int.from_bytes(digest, "little"))
        self._item, self._item_rows = int(index), 0

    def update(self, flat: torch.Tensor) -> None:
        """Offer the rows of ``flat`` ``[M, K]``."""
        m = flat.shape[0]
        if m == 0:
            return
        # Atomic: the state changes only at the end and the key generator rewinds on a failure, so a
        # batch offered again after a failed offer gets the keys it would have got the first time.
        gen_state = self._gen.get_state()
        try:
            u = torch.rand(m, generator=self._gen, dtype=torch.float64)
            full = self.keys.numel() >= self.capacity
            if full:
                cand = (u < self.keys.max()).nonzero().flatten()
                if cand.numel() == 0:
                    self._advance(m)
                    return
            else:
                cand = torch.arange(m)
            store = torch.device("cpu") if self.cpu_storage else flat.device
            new_rows = flat.detach()[cand.to(flat.device)].to(store)
            keys = torch.cat([self.keys, u[cand]])
            base = self.seen if self._item is None else (self._item << 32) + self._item_rows
            order = torch.cat([self.order, cand + base])
            rows = new_rows if self.rows is None else torch.cat([self.rows, new_rows.to(self.rows.dtype)])
            if keys.numel() > self.capacity:
                keep = torch.topk(keys, self.capacity, largest=False).indices.sort().values
                keys, order = keys[keep], order[keep]
                rows = rows[keep.to(rows.device)]
        except BaseException:
            self._gen.set_state(gen_state)
            raise
        self.keys, self.rows, self.order = keys, rows, order
        self._advance(m)

    def _advance(self, m: int) -> None:
        self.seen += m
        self._item_rows += m

    def sample(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The kept rows ``[n, K]`` (``n = min(capacity, rows seen)``)."""
        if self.rows is None:
            return torch.empty(0, self.in_features, dtype=dtype, device=device)
        return self.rows.to(device=device if device is not None else self.rows.device, dtype=dtype)

    @staticmethod
    def merged(parts: Sequence[RowReservoir]) -> RowReservoir:
        """One reservoir holding the bottom-k rows of several (call sites of one module)."""
        first = parts[0]
        out = RowReservoir(first.in_features, max(p.capacity for p in parts), cpu_storage=first.cpu_storage)
        rows = [p.rows for p in parts if p.rows is not None]
        if rows:
            dev = rows[0].device
            keys = torch.cat([p.keys for p in parts if p.rows is not None])
            order = torch.cat([p.order for p in parts if p.rows is not None])
            allrows = torch.cat([r.to(dev, rows[0].dtype) for r in rows])
            keep = torch.topk(keys, min(out.capacity, keys.numel()), largest=False).indices.sort().values
            out.keys, out.order, out.rows = keys[keep], order[keep], allrows[keep.to(dev)]
        out.seen = sum(p.seen for p in parts)
        return out


class HessianAccumulator:
    """Running ``sum x x^T`` over rows, for GPTQ's ``H = 2/n sum x x^T`` of a linear's input.

    Args:
        in_features: K.
        dtype: Accumulation dtype (float32 or float64).
        cpu_storage: Keep the sum in (pinned) CPU memory; each batch's ``x^T x`` is still computed on
            the device of ``x``.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, cpu_storage: bool = False):
        self.in_features = in_features
        self.dtype = dtype
        self.cpu_storage = cpu_storage
        self.sum: torch.Tensor | None = None
        self.n = 0

    def _alloc(self, device: torch.device) -> torch.Tensor:
        k = self.in_features
        if self.cpu_storage:
            t = torch.zeros(k, k, dtype=self.dtype)
            if torch.cuda.is_available():
                try:
                    t = t.pin_memory()
                except RuntimeError:  # pragma: no cover - pinning can fail under memory pressure
                    pass
            return t
        return torch.zeros(k, k, dtype=self.dtype, device=device)

    def update(self, flat: torch.Tensor) -> None:
        """Add the rows of ``flat`` ``[M, K]``."""
        if flat.shape[0] == 0:
            return
        x = flat.detach().to(self.dtype)
        if self.sum is None:
            self.sum = self._alloc(x.device)
        if self.cpu_storage and x.device.type != "cpu":
            self.sum.add_((x.T @ x).cpu())
        else:
            self.sum.addmm_(x.T, x)
        self.n += flat.shape[0]

    def hessian(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``2/n sum x x^T`` (zeros if nothing was seen)."""
        dev = device if device is not None else (self.sum.device if self.sum is not None else "cpu")
        dt = dtype or self.dtype
        if self.sum is None or self.n == 0:
            return torch.zeros(self.in_features, self.in_features, dtype=dt, device=dev)
        return (
            self.sum.to(device=dev, dtype=torch.float64 if dt == torch.float64 else self.dtype)
            * (2.0 / self.n)
        ).to(dt)

    @staticmethod
    def merged(parts: Sequence[HessianAccumulator]) -> HessianAccumulator:
        """The accumulator of all rows of ``parts``."""
        out = HessianAccumulator(parts[0].in_features, dtype=parts[0].dtype, cpu_storage=parts[0].cpu_storage)
        for p in parts:
            if p.sum is None:
                continue
            out.sum = p.sum.clone() if out.sum is None else out.sum + p.sum.to(out.sum.device)
            out.n += p.n
        return out


def _segment_index(segments: Sequence[int], k: int, device: torch.device) -> torch.Tensor:
    sizes = list(segments) if segments else [k]
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )


class StreamingHistogram:
    """Per segment and sign half, a histogram of ``|x|`` over all observed values.

    ``counts[t, 0]`` counts positive values, ``counts[t, 1]`` negative ones (by magnitude), each in
    ``bins`` bins of width ``range[t] / bins`` over ``[0, range[t])``; exact zeros are counted in
    ``zeros[t]``. ``range[t]`` is the smallest power of two >= the largest magnitude seen; when a
    larger value arrives the range doubles (as often as needed) and bin pairs merge, which is exact.
    ``maxval[t, h]`` keeps the exact largest magnitude of each half.

    A magnitude equal to the range (a power of two) goes to the last bin, and ``top[t, h]`` counts
    those values: when the range doubles they move to the bin they fall in at the new range (bin
    ``bins / 2``, not the merged last bin). So the counts are always those of binning every value at
    the final range, whatever the order of the values and however they were split into batches or
    histograms (:meth:`merged`; :mod:`segquant_fx.distributed` sums per-process histograms exactly).

    Args:
        in_features: K.
        segments: Segment sizes along K (``()``: one segment).
        bins: Number of bins, even.
    """

    def __init__(self, in_features: int, segments: Sequence[int] = (), bins: int = 2048):
        if bins % 2 or bins < 2:
            raise ValueError(f"bins must be even, got {bins}")
        self.in_features = in_features
        self.segments = tuple(segments)
        self.bins = bins
        n = len(self.segments) if self.segments else 1
        self.counts = torch.zeros(n, 2, bins, dtype=torch.float64)
        self.zeros = torch.zeros(n, dtype=torch.float64)
        self.range = torch.zeros(n, dtype=torch.float64)
        self.maxval = torch.zeros(n, 2, dtype=torch.float64)
        self.top = torch.zeros(n, 2, dtype=torch.float64)
        self._seg: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        """Number of segments."""
        return self.counts.shape[0]

    def _to(self, device: torch.device) -> None:
        if self.counts.device != device:
            self.counts = self.counts.to(device)
            self.zeros = self.zeros.to(device)
            self.range = self.range.to(device)
            self.maxval = self.maxval.to(device)
            self.top = self.top.to(device)
            self._seg = None
        if self._seg is None:
            self._seg = _segment_index(self.segments, self.in_features, device)

    def _grow(self, new_max: torch.Tensor) -> None:
        """Double the range of every segment whose values exceed it (merging bin pairs)."""
        need = new_max > self.range
        if not bool(need.any()):
            return
        for t in need.nonzero().flatten().tolist():
            m = float(new_max[t])
            if not math.isfinite(m):  # an infinite range would never be reached by doubling
                raise CalibrationError(f"histogram of segment {t}: non-finite value {m} observed")
            r = float(self.range[t])
            target = 2.0 ** math.ceil(math.log2(m)) if m > 0 else 0.0
            if target < m:  # log2 rounding
                target *= 2.0
            if r == 0.0:
                self.range[t] = target
                continue
            c = self.counts[t].clone()
            top = self.top[t].clone()
            if bool((top > 0).any()):  # values == the old range leave the last bin for bin bins/2
                c[:, -1] -= top
            while r < target:
                merged = c.reshape(2, self.bins // 2, 2).sum(-1)
                c = torch.cat([merged, torch.zeros_like(merged)], dim=-1)
                if bool((top > 0).any()):
                    c[:, self.bins // 2] += top
                    top = torch.zeros_like(top)
                r *= 2.0
            self.counts[t] = c
            self.top[t] = top
            self.range[t] = r

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add every value of ``x`` (``[..., K]``)."""
        flat = x.detach().reshape(-1, self.in_features)
        if flat.numel() == 0:
            return
        self._to(flat.device)
        v = flat.to(torch.float32)
        mag = v.abs()
        nseg = self.num_segments
        colmax_pos = v.clamp(min=0).amax(0).double()
        colmax_neg = (-v).clamp(min=0).amax(0).double()
        seg_pos = torch.zeros(nseg, dtype=torch.float64, device=v.device).scatter_reduce(
            0, self._seg, colmax_pos, "amax"
        )
        seg_neg = torch.zeros(nseg, dtype=torch.float64, device=v.device).scatter_reduce(
            0, self._seg, colmax_neg, "amax"
        )
        # Growing the range first is safe if the rest fails: the range only depends on the largest
        # magnitude seen and re-binning is exact, so offering the batch again ends in the same state.
        self._grow(torch.maximum(seg_pos, seg_neg))
        r = self.range.to(torch.float32)[self._seg]  # [K]
        safe = torch.where(r > 0, r, torch.ones_like(r))
        raw = torch.floor(mag * (self.bins / safe))
        idx = raw.clamp(0, self.bins - 1).long()
        neg = (v < 0).long()
        nz = mag > 0
        flat_idx = ((self._seg[None, :] * 2 + neg) * self.bins + idx)[nz]
        counts = torch.bincount(flat_idx, minlength=nseg * 2 * self.bins).reshape(nseg, 2, self.bins).double()
        at_top = nz & (raw >= self.bins)
        top = None
        if bool(at_top.any()):
            top_idx = (self._seg[None, :] * 2 + neg)[at_top]
            top = torch.bincount(top_idx, minlength=nseg * 2).reshape(nseg, 2).double()
        zeros_per_col = (~nz).sum(0).double()
        zeros = torch.zeros(nseg, dtype=torch.float64, device=v.device).index_add_(
            0, self._seg, zeros_per_col
        )
        self.maxval[:, 0] = torch.maximum(self.maxval[:, 0], seg_pos)
        self.maxval[:, 1] = torch.maximum(self.maxval[:, 1], seg_neg)
        self.counts += counts
        self.zeros += zeros
        if top is not None:
            self.top += top

    def half(self, t: int, which: str) -> tuple[torch.Tensor, float, float, float]:
        """``(counts [bins], range, maxval, zeros)`` of segment ``t``.

        ``which``: ``"pos"`` (positive values), ``"neg"`` (magnitudes of negative values) or ``"abs"``
        (every value's magnitude, zeros included).
        """
        r = float(self.range[t])
        if which == "pos":
            return self.counts[t, 0].cpu(), r, float(self.maxval[t, 0]), 0.0
        if which == "neg":
            return self.counts[t, 1].cpu(), r, float(self.maxval[t, 1]), 0.0
        c = (self.counts[t, 0] + self.counts[t, 1]).cpu()
        z = float(self.zeros[t])
        c[0] += z
        return c, r, float(self.maxval[t].max()), z

    @staticmethod
    def merged(parts: Sequence[StreamingHistogram]) -> StreamingHistogram:
        """One histogram with the counts of several (ranges aligned by doubling)."""
        first = parts[0]
        out = StreamingHistogram(first.in_features, first.segments, first.bins)
        dev = first.counts.device
        out._to(dev)
        out._grow(torch.stack([p.range.to(dev) for p in parts]).amax(0))
        for p in parts:
            q = StreamingHistogram(p.in_features, p.segments, p.bins)
            q._to(dev)
            q.counts, q.range = p.counts.to(dev).clone(), p.range.to(dev).clone()
            q.top = p.top.to(dev).clone()
            q._grow(out.range)
            out.counts += q.counts
            out.top += q.top
            out.zeros += p.zeros.to(dev)
            out.maxval = torch.maximum(out.maxval, p.maxval.to(dev))
        return out


@dataclass(frozen=True)
class ObserverNeeds:
    """What a :class:`LinearInputObserver` collects besides per-channel extremes.

    Attributes:
        reservoir_rows: Row-reservoir capacity (0: none).
        reservoir_cpu: Keep the reservoir in CPU memory.
        hessian: Accumulate ``sum x x^T`` (GPTQ).
        hessian_dtype: Its dtype.
        hessian_cpu: Keep it in CPU memory.
        histograms: Segment layouts to keep streaming histograms for.
        bins: Histogram bins.
    """

    reservoir_rows: int = 0
    reservoir_cpu: bool = False
    hessian: bool = False
    hessian_dtype: torch.dtype = torch.float32
    hessian_cpu: bool = False
    histograms: tuple[tuple[int, ...], ...] = ()
    bins: int = 2048

    def union(self, other: ObserverNeeds) -> ObserverNeeds:
        """Collect what either needs (one observer serves every linear reading the same tensor)."""
        dtype = torch.float64 if torch.float64 in (self.hessian_dtype, other.hessian_dtype) else torch.float32
        return ObserverNeeds(
            reservoir_rows=max(self.reservoir_rows, other.reservoir_rows),
            reservoir_cpu=self.reservoir_cpu or other.reservoir_cpu,
            hessian=self.hessian or other.hessian,
            hessian_dtype=dtype,
            hessian_cpu=self.hessian_cpu or other.hessian_cpu,
            histograms=tuple(dict.fromkeys(self.histograms + other.histograms)),
            bins=max(self.bins, other.bins),
        )


class LinearInputObserver(ChannelMinMaxObserver):
    """Per-channel extremes plus what the optimizers need (:class:`ObserverNeeds`).

    Args:
        in_features: K.
        name: What is observed, for error messages; also seeds the reservoir.
        needs: What to collect besides the extremes.
    """

    def __init__(self, in_features: int, name: str = "", needs: ObserverNeeds | None = None):
        super().__init__(in_features, name=name)
        self.needs = needs or ObserverNeeds()
        n = self.needs
        seed = zlib.crc32(name.encode())
        self.reservoir = (
            RowReservoir(in_features, n.reservoir_rows, cpu_storage=n.reservoir_cpu, seed=seed)
            if n.reservoir_rows > 0
            else None
        )
        self.hessian = (
            HessianAccumulator(in_features, dtype=n.hessian_dtype, cpu_storage=n.hessian_cpu)
            if n.hessian
            else None
        )
        self.histograms = {segs: StreamingHistogram(in_features, segs, n.bins) for segs in n.histograms}

    def reset(self) -> None:
        """Forget all statistics."""
        super().reset()
        self.__init__(self.in_features, self.name, self.needs)

    def extra_updates(self) -> list[Callable[[torch.Tensor], None]]:
        """The update functions of the statistics besides the extremes, in ``forward``'s order.

        Each takes the observed rows ``[M, K]``. If one raises, calling it again with the same rows
        ends in the state a single successful call gives (nothing is counted twice).
        """
        ups: list[Callable[[torch.Tensor], None]] = []
        if self.reservoir is not None:
            ups.append(self.reservoir.update)
        if self.hessian is not None:
            ups.append(self.hessian.update)
        ups += [h.update for h in self.histograms.values()]
        return ups

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``; return it."""
        if self.pos_max.device != x.device:  # keep the extremes where the activations are
            self.to(x.device)
        super().forward(x)
        flat = x.detach().reshape(-1, self.in_features)
        if flat.shape[0] == 0:
            return x
        if self.reservoir is not None:
            self.reservoir.update(flat)
        if self.hessian is not None:
            self.hessian.update(flat)
        for h in self.histograms.values():
            h.update(flat)
        return x


_FAST_TYPES = (ChannelMinMaxObserver, LinearInputObserver)


class _ExtremesGroup:
    """The per-channel extremes of several observers of one width ``K``, batched.

    The members' ``pos_max`` / ``neg_min`` buffers are rows of two ``[n, K]`` tensors owned here. Each
    member's per-channel maximum and minimum of one item are *staged* (``[K]`` each) and folded into the
    rows together when the item is committed: one ``stack``, one ``maximum`` and one ``minimum`` per
    group and item instead of two in-place updates and a NaN check per observer and call.

    ``follow``: the storage moves to the device of the activations on the first commit (what
    :class:`LinearInputObserver` does); otherwise the staged values move to the storage's device.
    """

    def __init__(self, members: list[ChannelMinMaxObserver], follow: bool):
        self.members = members
        self.follow = follow
        dev = members[0].pos_max.device
        # counts are plain attributes: updating them through the instance dicts skips
        # nn.Module.__setattr__ (about 1 us a member and item)
        self._attrs = [m.__dict__ for m in members]
        self.pos = torch.stack([m.pos_max.detach().to(dev) for m in members])
        self.neg = torch.stack([m.neg_min.detach().to(dev) for m in members])
        self._point()
        n = len(members)
        self.hi: list[Any] = [None] * n
        self.lo: list[Any] = [None] * n
        self.rows: list[int] = [0] * n  # 0: nothing staged for that member in this item

    def _point(self) -> None:
        for j, m in enumerate(self.members):
            m.pos_max, m.neg_min = self.pos[j], self.neg[j]

    def drop(self) -> None:
        """Forget what is staged."""
        n = len(self.members)
        self.hi[:], self.lo[:], self.rows[:] = [None] * n, [None] * n, [0] * n

    def stacked(self) -> tuple[torch.Tensor, list[int] | None] | None:
        """``([2m, K] staged maxima then minima, staged member indices or None for all)``, None if none."""
        rows = self.rows
        if 0 not in rows:
            return torch.stack(self.hi + self.lo), None
        present = [j for j, r in enumerate(rows) if r]
        if not present:
            return None
        return torch.stack([self.hi[j] for j in present] + [self.lo[j] for j in present]), present

    def apply(self, s: torch.Tensor, present: list[int] | None) -> None:
        """Fold the staged extremes ``s`` (from :meth:`stacked`) in and count the rows; then drop them."""
        if s.device != self.pos.device:
            if self.follow:
                self.pos, self.neg = self.pos.to(s.device), self.neg.to(s.device)
                self._point()
            else:
                s = s.to(self.pos.device)
        # pos_max >= 0 >= neg_min always hold, so max(pos, hi) = max(pos, max(hi, 0)): no clamp needed
        if present is None:
            n = len(self.members)
            torch.maximum(self.pos, s[:n], out=self.pos)
            torch.minimum(self.neg, s[n:], out=self.neg)
            for d, r in zip(self._attrs, self.rows, strict=True):
                d["count"] += r
        else:
            n = len(present)
            idx = torch.tensor(present, device=self.pos.device)
            self.pos[idx] = torch.maximum(self.pos[idx], s[:n])
            self.neg[idx] = torch.minimum(self.neg[idx], s[n:])
            for j in present:
                self._attrs[j]["count"] += self.rows[j]
        self.drop()

    def detach(self) -> None:
        """Give every member buffers of its own (the current values)."""
        for j, m in enumerate(self.members):
            m.pos_max, m.neg_min = self.pos[j].clone(), self.neg[j].clone()


_REDUCE_DIMS = tuple(tuple(range(n - 1)) for n in range(9))  # ndim -> all but the last dim


class ObserverSession:
    """Feeds a fixed set of observers item by item; an item's statistics count once, when it completes.

    ``feeds[i](x)`` records ``x`` for ``observers[i]``. Around every calibration item: :meth:`begin`,
    the feeds (from a graph run), then :meth:`commit`. If the run fails and the same item is run again
    from the start (a re-run that names the failing node), call :meth:`retry` in between: nothing the
    failed run recorded is counted twice.

    * :class:`ChannelMinMaxObserver` and :class:`LinearInputObserver` (exactly these classes): the
      per-channel extremes of an item are staged and committed together, batched per width (see
      ``_ExtremesGroup``); the members' ``pos_max`` / ``neg_min`` are views of the batched storage
      until :meth:`close`. A NaN/Inf is reported at commit (or, for observers with sums, before
      their sums are touched), naming the first observer in ``observers`` order that saw one, exactly
      as the observer's own ``forward`` would. The sums of a :class:`LinearInputObserver` (reservoir,
      Hessian, histograms; each update atomic) are updated at once, each at most once per item: a
      re-run skips those already done. So statistics equal those of calling each observer's
      ``forward`` once per item, bit for bit.
    * Any other observer (a custom factory's, a subclass): called as ``observer(x)`` at most once per
      item; a re-run skips the observers the failed run already called.

    Args:
        observers: Distinct observers, in the order the graph runs them.
    """

    def __init__(self, observers: Sequence[Any]):
        self.observers = list(observers)
        # observer index -> updates applied in this item (n calls x m updates counts n * m), and
        # calls seen in this run of the item: a re-run skips the updates its failed run applied
        self._done: dict[int, int] = {}
        self._calls: dict[int, int] = {}
        self._order: list[tuple[_ExtremesGroup, int, ChannelMinMaxObserver]] = []
        self.groups: list[_ExtremesGroup] = []
        slots: dict[int, tuple[int, int]] = {}
        by_key: dict[tuple[Any, ...], list[int]] = {}
        seen: set[int] = set()
        for i, o in enumerate(self.observers):
            if type(o) in _FAST_TYPES and id(o) not in seen:
                b = o.pos_max
                key = (o.in_features, b.device, b.dtype, type(o) is LinearInputObserver)
                by_key.setdefault(key, []).append(i)
            seen.add(id(o))
        for key, idxs in by_key.items():
            g = _ExtremesGroup([self.observers[i] for i in idxs], follow=key[3])
            for j, i in enumerate(idxs):
                slots[i] = (len(self.groups), j)
            self.groups.append(g)
        self._reservoirs = [
            r
            for o in {id(o): o for o in self.observers}.values()
            if isinstance(r := getattr(o, "reservoir", None), RowReservoir)
        ]
        self.feeds: list[Callable[[torch.Tensor], None]] = []
        for i, o in enumerate(self.observers):
            if i in slots:
                g = self.groups[slots[i][0]]
                self._order.append((g, slots[i][1], o))
                extras = o.extra_updates() if isinstance(o, LinearInputObserver) else []
                self.feeds.append(self._extremes_feed(i, o, g, slots[i][1], extras))
            else:
                self.feeds.append(self._plain_feed(i, o))

    # ---------------------------------------------------------------------------------------- items

    def begin(self, item: int | None = None) -> None:
        """Start an item; with its index ``item``, row reservoirs key its rows by that index.

        (:meth:`RowReservoir.begin_item`: then the sample does not depend on which process saw the item.)
        """
        if item is not None:
            for r in self._reservoirs:
                r.begin_item(item)
        self._done.clear()
        self._calls.clear()
        for g in self.groups:
            g.drop()

    def retry(self) -> None:
        """The current item runs again from the start: drop what it staged, keep what it applied."""
        self._calls.clear()
        for g in self.groups:
            g.drop()

    @torch.no_grad()
    def commit(self) -> None:
        """The item completed: count its staged statistics.

        Raises:
            CalibrationError: If an observed value was NaN/Inf (nothing is counted then).
        """
        stacks = [(g, g.stacked()) for g in self.groups]
        for _, st in stacks:
            if st is not None and not math.isfinite(float(st[0].sum())):
                self._raise_first_nonfinite()  # (a finite sum overflowing to inf is a false alarm)
        for g, st in stacks:
            if st is not None:
                g.apply(*st)
        self._done.clear()
        self._calls.clear()

    def close(self) -> None:
        """End of calibration: the observers get buffers of their own again."""
        for g in self.groups:
            g.detach()

    # ---------------------------------------------------------------------------------------- feeds

    def _raise_first_nonfinite(self) -> None:
        for g, j, o in self._order:
            if g.rows[j]:
                o._check_finite(g.hi[j], g.lo[j])

    def _extremes_feed(
        self,
        i: int,
        obs: ChannelMinMaxObserver,
        g: _ExtremesGroup,
        j: int,
        extras: list[Callable[[torch.Tensor], None]],
    ) -> Callable[[torch.Tensor], None]:
        k, name = obs.in_features, obs.name
        his, los, rows_ = g.hi, g.lo, g.rows
        done, calls = self._done, self._calls
        n_up = len(extras)
        dims = _REDUCE_DIMS
        f32 = torch.float32

        def observe(x: torch.Tensor) -> None:
            if x.shape[-1] != k:
                raise CalibrationError(f"{name}: observed last dim {x.shape[-1]}, expected {k}")
            rows = x.numel() // k
            if rows == 0:
                return
            nd = x.dim()
            if nd == 2:
                hi, lo = x.amax(0), x.amin(0)
            elif 2 < nd < len(dims):
                hi, lo = x.amax(dims[nd]), x.amin(dims[nd])
            else:
                flat = x.reshape(-1, k)
                hi, lo = flat.amax(0), flat.amin(0)
            if hi.dtype != f32:
                hi, lo = hi.float(), lo.float()
            if rows_[j]:  # a second call in one item
                hi, lo = torch.maximum(his[j], hi), torch.minimum(los[j], lo)
            his[j], los[j] = hi, lo
            rows_[j] += rows
            if extras:
                # the sums must never see NaN/Inf (a histogram range would grow forever): check now
                if not math.isfinite(float((hi - lo).sum())):
                    self._raise_first_nonfinite()
                start = calls.get(i, 0) * n_up
                calls[i] = calls.get(i, 0) + 1
                d = max(done.get(i, 0), start)
                if d < start + n_up:
                    flat = x.detach().reshape(-1, k)
                    while d < start + n_up:
                        extras[d - start](flat)
                        d += 1
                        done[i] = d

        return observe

    def _plain_feed(self, i: int, obs: Any) -> Callable[[torch.Tensor], None]:
        done, calls = self._done, self._calls

        def observe(x: torch.Tensor) -> None:
            c = calls.get(i, 0)
            calls[i] = c + 1
            if done.get(i, 0) <= c:
                obs(x)
                done[i] = c + 1

        return observe


def merge_observers(observers: Sequence[ChannelMinMaxObserver]) -> ChannelMinMaxObserver | None:
    """One observer with the statistics of several (the call sites of one module); shared ones once."""
    uniq = list({id(o): o for o in observers}.values())
    if not uniq:
        return None
    if len(uniq) == 1:
        return uniq[0]
    first = uniq[0]
    if all(isinstance(o, LinearInputObserver) for o in uniq):
        needs = functools.reduce(ObserverNeeds.union, [o.needs for o in uniq])  # type: ignore[attr-defined]
        out: ChannelMinMaxObserver = LinearInputObserver(first.in_features, first.name, needs)
        res = [o.reservoir for o in uniq if o.reservoir is not None]  # type: ignore[attr-defined]
        out.reservoir = RowReservoir.merged(res) if res else None  # type: ignore[attr-defined]
        hs = [o.hessian for o in uniq if o.hessian is not None]  # type: ignore[attr-defined]
        out.hessian = HessianAccumulator.merged(hs) if hs else None  # type: ignore[attr-defined]
        for segs in needs.histograms:
            parts = [o.histograms[segs] for o in uniq if segs in o.histograms]  # type: ignore[attr-defined]
            out.histograms[segs] = StreamingHistogram.merged(parts)  # type: ignore[attr-defined]
    else:
        out = ChannelMinMaxObserver(first.in_features, name=first.name)
    dev = first.pos_max.device
    out.to(dev)
    for o in uniq:
        out.pos_max.copy_(torch.maximum(out.pos_max, o.pos_max.to(dev)))
        out.neg_min.copy_(torch.minimum(out.neg_min, o.neg_min.to(dev)))
        out.count += o.count
    return out
