"""From calibration statistics to the tensors of every quantized layer (smoothing, SVD, GPTQ).

:func:`optimize` runs after the single calibration pass and before the rewrite. Per annotated
linear (one per module: call sites share statistics and tensors):

1. **Smoothing groups.** One group normally; one per output segment with ``smooth_groups``
   (``opt.per_segment_smoothing``), each with its own smoothing vector over all input channels.
2. **Alpha.** Fixed (``opt.alpha``), or searched per group and input segment on the layer's row
   reservoir (:mod:`segquant_fx.optim.search`). With several input segments the smoothing vector is
   the concatenation of the per-segment vectors.
3. **Weight target.** ``W_g * s_g``; with ``svd`` its rank-``r`` part goes to a float branch and the
   residual is quantized (:mod:`segquant_fx.optim.svd`).
4. **Scales.** Activation scales of ``x / s_g`` from the calibrator
   (:mod:`segquant_fx.optim.calibrators`); weight scales from the target's amax. A searched layer
   with several input segments gets one weight scale per output channel *and input segment*
   (the segments are then independent, which is what the per-segment search assumes).
5. **Rounding.** Round-to-nearest with ``segquant::quantize``, or GPTQ with the layer's Hessian
   transformed to the smoothed domain, ``H_s = H / (s s^T)`` (one Hessian per input tensor, shared
   by every group and by the linears reading the same tensor). GPTQ problems of equal shape are
   batched (:mod:`segquant_fx.optim.gptq`).

The result maps module FQN -> :class:`~segquant_fx.passes.rewrite.LayerTensors`, consumed by
``QuantizeRewritePass(precomputed=...)``; the same tensors are what ``QuantizedModel.save`` stores.

Stored tensors, besides the plain ones (``qweight``, ``w_scale``, ``x_scale``...):

* ``smooth``: ``[K]``, or ``[G, K]`` with ``G`` smoothing groups (then every activation scale gets a
  leading ``G`` dim too, and the rewrite emits one quantize + qlinear per group and a concat);
* ``lr_down`` ``[R, K]`` and ``lr_up`` ``[N, R]`` (activation dtype): the SVD branch
  ``linear(linear(x, lr_down), lr_up)``, with ``s`` folded into ``lr_down``; with ``G`` groups the
  ``down`` blocks are stacked and ``up`` is block diagonal (``R = G r``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from segquant_fx import ops
from segquant_fx.errors import CalibrationError
from segquant_fx.optim.calibrators import ActivationCalibrator
from segquant_fx.optim.common import (
    expand_columns,
    fake_quant,
    fake_quant_dual,
    fake_quant_dynamic,
    segment_sizes,
    store_codes,
    weight_scale_columns,
    weight_scales,
)
from segquant_fx.optim.gptq import gptq_quantize
from segquant_fx.optim.search import SearchState, pick_best
from segquant_fx.optim.svd import fold_smoothing, low_rank_split
from segquant_fx.passes.annotate import LinearAnnotation
from segquant_fx.passes.base import SEGQUANT_ANNOTATION_KEY
from segquant_fx.passes.observers import ChannelMinMaxObserver, merge_observers
from segquant_fx.passes.rewrite import LayerTensors, smoothing_vector

__all__ = ["optimize", "OptimizeReport", "layer_sites"]

#: Rough cap on the elements of one search product chunk (rows x outputs x segments).
_CHUNK_ELEMS = 1 << 25
#: Rough cap on the bytes of the per-candidate tensors of one batched search step.
_ALPHA_BATCH_BYTES = 1 << 30
#: Bytes of pending GPTQ weights (float32) per bucket before it runs.
_GPTQ_BUCKET_BYTES = 1 << 30
#: Bytes of pending GPTQ weights over all buckets before the largest bucket runs.
_GPTQ_PENDING_BYTES = 4 << 30


@dataclass
class OptimizeReport:
    """What the optimizers did (JSON-able through :meth:`to_dict`).

    Attributes:
        layers: Module -> facts: ``alphas`` ([group][input segment]), ``rank``, ``gptq`` (damping per
            group, None where rounded to nearest), ``gptq_fallback``.
        search_evaluations: Candidate evaluations run (one per layer, group and alpha).
        search_skipped: Candidate evaluations found in the resumed state and skipped.
        timings: Seconds per phase.
    """

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    search_evaluations: int = 0
    search_skipped: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "layers": self.layers,
            "search_evaluations": self.search_evaluations,
            "search_skipped": self.search_skipped,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def layer_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(first node, all call-site nodes)`` per quantized module (same weight), in graph order."""
    by_target: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if SEGQUANT_ANNOTATION_KEY in n.meta and n.target == torch.ops.aten.linear.default:
            w = n.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                by_target.setdefault(w.target, []).append(n)
    return [(nodes[0], nodes) for nodes in by_target.values()]


def _get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


class _Timer:
    def __init__(self, timings: dict[str, float], key: str, device: torch.device):
        self.timings, self.key, self.device = timings, key, device

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


@dataclass
class _Group:
    rows: tuple[int, int]
    smooth: torch.Tensor | None
    alphas: list[float]
    target: torch.Tensor | None  # float32 [n, K] to round (dropped once rounded)
    scale: torch.Tensor
    wsegs: list[int]
    act: dict[str, torch.Tensor]
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    damp: float | None = None
    fallback: bool = False


@dataclass
class _Layer:
    module: str
    ann: LinearAnnotation
    weight: torch.Tensor
    obs: ChannelMinMaxObserver | None
    groups: list[_Group] = field(default_factory=list)


@dataclass
class _Task:
    layer: _Layer
    group: _Group
    scale_index: torch.Tensor | None


class _Optimizer:
    def __init__(self, state: SearchState, progress: bool, device: torch.device | None):
        self.state = state
        self.progress = progress
        self.device = device
        self.report = OptimizeReport()
        self.buckets: dict[tuple, list[_Task]] = {}

    # -- per layer --------------------------------------------------------------------------------

    def layer(
        self, module: str, ann: LinearAnnotation, weight: torch.Tensor, obs: ChannelMinMaxObserver | None
    ) -> _Layer:
        needs_stats = ann.act_qtype is not None and (not ann.act_dynamic or ann.smooth_alpha is not None)
        needs_stats = needs_stats or ann.calib.type == "gptq"
        if needs_stats and (obs is None or obs.count == 0):
            raise CalibrationError(
                f"{module}: no calibration statistics were recorded (is the layer ever run?)"
            )
        dev = self.device or weight.device
        W = weight.detach().to(device=dev, dtype=torch.float32)
        n, k = W.shape
        sizes = segment_sizes(ann.in_segments, k)
        bounds = _bounds(ann.smooth_groups or (n,))
        smoothing = ann.smooth_alpha is not None
        col_segs = tuple(ann.in_segments) if smoothing and ann.search is not None and len(sizes) > 1 else ()
        row_segs = tuple(ann.out_segments) if len(bounds) == 1 else ()
        calibrator = None
        if ann.act_qtype is not None and not ann.act_dynamic:
            calibrator = ActivationCalibrator(
                ann.calib, ann.act_qtype, ann.in_segments, ann.dual, ann.dual_segments, obs
            )
        if smoothing and ann.search is not None:
            with _Timer(self.report.timings, "search", dev):
                alphas = self._search(module, ann, W, obs, calibrator, bounds, sizes, col_segs, row_segs)
        else:
            alphas = [[ann.smooth_alpha] * len(sizes) if smoothing else [] for _ in bounds]
        lay = _Layer(module, ann, weight, obs)
        for (a, b), al in zip(bounds, alphas, strict=True):
            Wg = W[a:b]
            s = _smoothing(obs, Wg, al, sizes) if smoothing else None
            target = Wg * s.to(dev)[None, :] if s is not None else Wg
            down = up = None
            if ann.low_rank is not None:
                with _Timer(self.report.timings, "svd", dev):
                    down_s, up, target = low_rank_split(target, ann.low_rank, ann.svd_precision)
                    down = fold_smoothing(down_s, s)
            scale, wsegs = weight_scales(
                target,
                ann.weight_qtype,
                ann.weight_granularity,
                ann.weight_group_size,
                row_segments=row_segs,
                col_segments=col_segs,
            )
            act = calibrator.scales(s) if calibrator is not None else {}
            lay.groups.append(_Group((a, b), s, list(al), target, scale, wsegs, act, down, up))
        self.report.layers[module] = {
            "alphas": [g.alphas for g in lay.groups] if smoothing else None,
            "rank": ann.low_rank,
        }
        for g in lay.groups:
            if ann.calib.type == "gptq":
                self._schedule_gptq(lay, g)
            else:
                self._round(lay, g)
        return lay

    def _round(self, lay: _Layer, g: _Group) -> None:
        """Round-to-nearest with the op itself (bit-identical to the rewrite's quantize_weight)."""
        g.qweight = ops.quantize(g.target, g.scale, qtype=lay.ann.weight_qtype, segments=g.wsegs)
        g.target = None

    # -- alpha search -----------------------------------------------------------------------------

    def _search(
        self, module, ann, W, obs, calibrator, bounds, sizes, col_segs, row_segs
    ) -> list[list[float]]:
        grid = ann.search.grid
        base = float(ann.smooth_alpha)
        res = getattr(obs, "reservoir", None)
        X = res.sample(device=W.device, dtype=torch.float32) if res is not None else None
        if X is None or X.shape[0] == 0:
            return [[base] * len(sizes) for _ in bounds]
        per_seg = len(sizes) > 1 and ann.low_rank is None
        absmax = obs.absmax.to(W.device)
        out = []
        shape = [*W.shape, _setting(ann)]
        for gi, (a, b) in enumerate(bounds):
            Wg = W[a:b]
            units = [f"g{gi}.t{t}" for t in range(len(sizes))] if per_seg else [f"g{gi}"]
            todo = self.state.missing(module, shape, units, grid)
            n, k = Wg.shape
            per_alpha = max(1, _ALPHA_BATCH_BYTES // (12 * n * k + 8 * min(X.shape[0], 4096) * k))
            for i in range(0, len(todo), per_alpha):
                chunk = todo[i : i + per_alpha]
                errs = self._score(
                    ann,
                    X,
                    Wg,
                    absmax,
                    chunk,
                    calibrator,
                    sizes,
                    col_segs,
                    row_segs if len(bounds) == 1 else (),
                    per_seg,
                )
                for alpha, e in zip(chunk, errs, strict=True):
                    self.state.record(module, shape, alpha, dict(zip(units, e, strict=True)))
            best = []
            for u in units:
                al = pick_best(self.state.errors(module, u), grid, base)
                self.state.set_best(module, u, al)
                best.append(al)
            out.append(best if per_seg else best * len(sizes))
        self.state.save()
        return out

    def _score(
        self, ann, X, Wg, absmax, alphas, calibrator, sizes, col_segs, row_segs, per_seg
    ) -> list[list[float]]:
        """Errors of the candidates ``alphas`` (batched: one ``[A, rows, K]`` pass), per unit."""
        A = len(alphas)
        n, k = Wg.shape
        S = torch.stack([smoothing_vector(absmax, Wg, a).to(Wg.device) for a in alphas])  # [A, K]
        Wq, downs, ups = [], [], []
        for i in range(A):
            Ws = Wg * S[i][None, :]
            if ann.low_rank is not None:
                down_s, up, Ws = low_rank_split(Ws, ann.low_rank, ann.svd_precision)
                downs.append(down_s)
                ups.append(up)
            scale, wsegs = weight_scales(
                Ws,
                ann.weight_qtype,
                ann.weight_granularity,
                ann.weight_group_size,
                row_segments=row_segs,
                col_segments=col_segs,
            )
            if ops.qtype_info(ann.weight_qtype).is_float:
                q = ops.quantize(Ws, scale, qtype=ann.weight_qtype, segments=wsegs)
                Wq.append(
                    ops.dequantize(q, scale, qtype=ann.weight_qtype, segments=wsegs, out_dtype=torch.float32)
                )
            else:
                Wq.append(fake_quant(Ws, weight_scale_columns(scale, wsegs, k), ann.weight_qtype))
        Wq_t = torch.stack(Wq)  # [A, n, K]
        del Wq
        act = _act_scales_batched(calibrator, S, sizes) if calibrator is not None else None
        nseg = len(sizes) if per_seg else 1
        equal = per_seg and len(set(sizes)) == 1
        errs = torch.zeros(A, nseg, dtype=torch.float64, device=Wg.device)
        step = max(1, _CHUNK_ELEMS // max(1, A * max(k, n * nseg)))
        for r0 in range(0, X.shape[0], step):
            Xc = X[r0 : r0 + step]
            Xs = Xc[None] / S[:, None, :]  # [A, r, K]
            Xq = _act_fake_quant(Xs, ann, act, sizes)
            if equal:  # segments batched too: [A, T, r, d] @ [A, T, d, n]
                t, d = nseg, sizes[0]
                ref = torch.bmm(
                    Xc.reshape(-1, t, d).transpose(0, 1), Wg.reshape(n, t, d).permute(1, 2, 0)
                )  # [T, r, n]
                xq = Xq.reshape(A, -1, t, d).transpose(1, 2)
                got = torch.matmul(xq, Wq_t.reshape(A, n, t, d).permute(0, 2, 3, 1))  # [A, T, r, n]
                errs += (ref[None] - got).double().square().sum(dim=(2, 3))
            elif per_seg:
                for t, (c0, c1) in enumerate(_bounds(sizes)):
                    ref = Xc[:, c0:c1] @ Wg[:, c0:c1].T
                    got = torch.matmul(Xq[:, :, c0:c1], Wq_t[:, :, c0:c1].transpose(1, 2))
                    errs[:, t] += (ref[None] - got).double().square().sum(dim=(1, 2))
            else:
                ref = Xc @ Wg.T
                got = torch.matmul(Xq, Wq_t.transpose(1, 2))  # [A, r, n]
                if downs:
                    got = got + torch.matmul(
                        torch.matmul(Xs, torch.stack(downs).transpose(1, 2)), torch.stack(ups).transpose(1, 2)
                    )
                errs[:, 0] += (ref[None] - got).double().square().sum(dim=(1, 2))
        return errs.tolist()

    # -- GPTQ -------------------------------------------------------------------------------------

    def _schedule_gptq(self, lay: _Layer, g: _Group) -> None:
        ann = lay.ann
        c = ann.calib
        n, k = g.target.shape
        group = ann.weight_group_size
        dynamic = group is not None and not c.static_groups and not c.actorder
        if dynamic:
            scale_index = None
        else:
            scale_index = torch.arange(k, device=g.target.device)
            ncol = g.scale.shape[-1] if g.scale.dim() == 2 else 1
            if ncol > 1:
                scale_index = torch.repeat_interleave(
                    torch.arange(len(g.wsegs), device=g.target.device),
                    torch.tensor(g.wsegs, device=g.target.device),
                )
            else:
                scale_index = torch.zeros(k, dtype=torch.long, device=g.target.device)
        hdtype = lay.obs.hessian.dtype if getattr(lay.obs, "hessian", None) is not None else torch.float32
        key = (
            n,
            k,
            ann.weight_qtype,
            dynamic,
            group if dynamic else None,
            c.blocksize,
            c.percdamp,
            c.actorder,
            None if dynamic else (tuple(_scale_nd(g.scale, n).shape), tuple(g.wsegs)),
            hdtype,
            str(g.target.device),
        )
        bucket = self.buckets.setdefault(key, [])
        bucket.append(_Task(lay, g, scale_index))
        if len(bucket) * n * k * 4 >= _GPTQ_BUCKET_BYTES:
            self._run_bucket(key)
        sizes = {kk: sum(t.group.target.numel() * 4 for t in b) for kk, b in self.buckets.items()}
        if sum(sizes.values()) > _GPTQ_PENDING_BYTES:
            self._run_bucket(max(sizes, key=sizes.get))

    def _run_bucket(self, key: tuple) -> None:
        tasks = self.buckets.pop(key, [])
        if not tasks:
            return
        dev = tasks[0].group.target.device
        with _Timer(self.report.timings, "gptq", dev):
            ann = tasks[0].layer.ann
            c = ann.calib
            n, k = tasks[0].group.target.shape
            dynamic = key[3]
            W = torch.stack([t.group.target for t in tasks])
            H = torch.stack([_smoothed_hessian(t.layer.obs, t.group.smooth, dev) for t in tasks])
            scale = None if dynamic else torch.stack([_scale_nd(t.group.scale, n) for t in tasks])
            res = gptq_quantize(
                W,
                H,
                ann.weight_qtype,
                scale=scale,
                scale_index=tasks[0].scale_index,
                group_size=ann.weight_group_size if dynamic else None,
                blocksize=c.blocksize,
                percdamp=c.percdamp,
                actorder=c.actorder,
                names=[t.layer.module for t in tasks],
            )
            del H, W
            for i, t in enumerate(tasks):
                g = t.group
                if dynamic:
                    g.scale = res.scale[i]
                g.qweight = store_codes(res.codes[i], ann.weight_qtype)
                g.damp = None if res.fallback[i] else res.damp[i]
                g.fallback = res.fallback[i]
                g.target = None

    def finish(self) -> None:
        for key in list(self.buckets):
            self._run_bucket(key)


def _scale_nd(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A weight scale as ``[n, S]`` (per-tensor layouts expanded over the rows)."""
    if scale.dim() == 1:
        return scale.reshape(1, -1).expand(n, -1)
    return scale.expand(n, -1)


def _smoothed_hessian(obs: Any, smooth: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    acc = getattr(obs, "hessian", None)
    if acc is None:
        raise CalibrationError(f"{getattr(obs, 'name', '?')}: GPTQ needs a Hessian, but none was accumulated")
    h = acc.hessian(device=device)
    if smooth is not None:
        s = smooth.to(device=device, dtype=h.dtype)
        h = h / (s[:, None] * s[None, :])
    return h


def _setting(ann: LinearAnnotation) -> str:
    """What an alpha-search score depends on besides the weight and the data."""
    return (
        f"a={ann.act_qtype}{'/dyn' if ann.act_dynamic else ''} w={ann.weight_qtype}/{ann.weight_granularity}"
        f"{ann.weight_group_size or ''} in={list(ann.in_segments)} out={list(ann.out_segments)} dual={ann.dual} "
        f"groups={list(ann.smooth_groups)} rank={ann.low_rank} calib={ann.calib.type}"
    )


def _bounds(sizes: Any) -> list[tuple[int, int]]:
    out, a = [], 0
    for s in sizes:
        out.append((a, a + int(s)))
        a += int(s)
    return out


def _smoothing(obs: Any, Wg: torch.Tensor, alphas: list[float], sizes: list[int]) -> torch.Tensor:
    """The smoothing vector of a group: per input segment with its own alpha, concatenated."""
    absmax = obs.absmax.to(Wg.device)
    if len(set(alphas)) <= 1:
        return smoothing_vector(absmax, Wg, alphas[0])
    parts = [
        smoothing_vector(absmax[a:b], Wg[:, a:b], al)
        for (a, b), al in zip(_bounds(sizes), alphas, strict=True)
    ]
    return torch.cat(parts)


def _segment_reduce(v: torch.Tensor, sizes: list[int], op: str) -> torch.Tensor:
    """``[..., K]`` -> ``[..., nseg]`` max (``op="max"``) or min per segment."""
    if len(set(sizes)) == 1:
        r = v.reshape(*v.shape[:-1], len(sizes), sizes[0])
        return r.amax(-1) if op == "max" else r.amin(-1)
    parts = v.split(sizes, dim=-1)
    return torch.stack([t.amax(-1) if op == "max" else t.amin(-1) for t in parts], dim=-1)


def _act_scales_batched(
    calibrator: ActivationCalibrator, S: torch.Tensor, sizes: list[int]
) -> dict[str, torch.Tensor]:
    """Static activation scales ``[A, nseg]`` for the smoothing vectors ``S`` ``[A, K]``.

    amax: vectorized, the same float32 arithmetic as :meth:`ActivationCalibrator.scales`;
    percentile/MSE: one histogram per candidate.
    """
    if calibrator.kind != "amax":
        per = [calibrator.scales(s) for s in S]
        return {key: torch.stack([p[key].to(S.device) for p in per]) for key in per[0]}
    obs = calibrator.obs
    pos = _segment_reduce(obs.pos_max.to(S.device)[None, :] / S.float(), sizes, "max")
    neg = _segment_reduce(obs.neg_min.to(S.device)[None, :] / S.float(), sizes, "min")
    amax = torch.maximum(pos, -neg)
    qtype = calibrator.qtype
    if not calibrator.dual:
        return {"x_scale": ops.scale_from_amax(amax, qtype)}
    sp, sn = ops.dual_scales_from_minmax(pos, neg, qtype)
    if calibrator.dual_segments is not None:
        sym = ops.scale_from_amax(amax, qtype)
        flags = torch.tensor(calibrator.dual_segments, device=sp.device)
        sp, sn = torch.where(flags, sp, sym), torch.where(flags, sn, sym)
    return {"x_scale_pos": sp, "x_scale_neg": sn}


def _act_fake_quant(
    xs: torch.Tensor, ann: LinearAnnotation, act: dict[str, torch.Tensor] | None, sizes: list[int]
) -> torch.Tensor:
    """Fake-quantize ``xs`` ``[A, r, K]`` with per-candidate scales ``[A, nseg]`` (or per token)."""
    aq = ann.act_qtype
    if aq is None:
        return xs
    if ann.act_dynamic:
        return fake_quant_dynamic(xs, sizes, aq)
    if "x_scale_pos" in act:
        pos = expand_columns(act["x_scale_pos"].to(xs.device), sizes)[:, None, :]
        neg = expand_columns(act["x_scale_neg"].to(xs.device), sizes)[:, None, :]
        return fake_quant_dual(xs, pos, neg, aq)
    return fake_quant(xs, expand_columns(act["x_scale"].to(xs.device), sizes)[:, None, :], aq)


def _assemble(lay: _Layer) -> LayerTensors:
    ann = lay.ann
    groups = lay.groups
    out = LayerTensors()
    many = len(groups) > 1
    if groups[0].smooth is not None:
        out["smooth"] = torch.stack([g.smooth for g in groups]) if many else groups[0].smooth
    for key in groups[0].act:
        out[key] = torch.stack([g.act[key] for g in groups]) if many else groups[0].act[key]
    out["qweight"] = torch.cat([g.qweight for g in groups], dim=0) if many else groups[0].qweight
    if many:
        out["w_scale"] = torch.cat(
            [_scale_nd(g.scale, g.rows[1] - g.rows[0]) for g in groups], dim=0
        ).contiguous()
    else:
        out["w_scale"] = groups[0].scale
    out["w_segments"] = list(groups[0].wsegs)
    if groups[0].down is not None:
        dtype = lay.weight.dtype if lay.weight.is_floating_point() else torch.float32
        if many:
            r = sum(g.down.shape[0] for g in groups)
            up = torch.zeros(ann.out_features, r, dtype=torch.float32, device=groups[0].up.device)
            c = 0
            for g in groups:
                a, b = g.rows
                up[a:b, c : c + g.up.shape[1]] = g.up
                c += g.up.shape[1]
            down = torch.cat([g.down for g in groups], dim=0)
        else:
            down, up = groups[0].down, groups[0].up
        out["lr_down"] = down.to(dtype).contiguous()
        out["lr_up"] = up.to(dtype).contiguous()
    dev = lay.weight.device  # every stored tensor beside the weight it replaces
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dev)
    return out


@torch.no_grad()
def optimize(
    gm: fx.GraphModule,
    observers: Mapping[str, ChannelMinMaxObserver],
    *,
    search_state: SearchState | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> tuple[dict[str, LayerTensors], OptimizeReport]:
    """Compute the stored tensors of every annotated linear of ``gm`` (see the module docstring).

    Args:
        gm: The annotated graph module (weights reachable through ``get_attr``).
        observers: Linear node name -> observer, from :func:`~segquant_fx.passes.calibrate.calibrate`.
        search_state: Resumable alpha-search state (default: in memory).
        progress: Show a progress bar over layers.
        device: Where to compute (default: each weight's device).

    Returns:
        ``(module -> LayerTensors, report)``.
    """
    from tqdm.auto import tqdm

    state = search_state if search_state is not None else SearchState(None)
    ev0, sk0 = state.evaluations, state.skipped
    opt = _Optimizer(state, progress, torch.device(device) if device is not None else None)
    layers: list[_Layer] = []
    t0 = time.perf_counter()
    for first, nodes in tqdm(
        layer_sites(gm), desc="optimizing", unit="layer", disable=not progress, leave=False
    ):
        ann: LinearAnnotation = first.meta[SEGQUANT_ANNOTATION_KEY]
        weight = _get_attr(gm, first.args[1].target)
        obs = merge_observers([observers[n.name] for n in nodes if n.name in observers])
        layers.append(opt.layer(ann.module, ann, weight, obs))
    opt.finish()
    out: dict[str, LayerTensors] = {}
    for lay in layers:
        out[lay.module] = _assemble(lay)
        if lay.ann.calib.type == "gptq":
            opt.report.layers[lay.module]["gptq"] = [g.damp for g in lay.groups]
            opt.report.layers[lay.module]["gptq_fallback"] = any(g.fallback for g in lay.groups)
    opt.report.timings["total"] = time.perf_counter() - t0
    opt.report.search_evaluations = state.evaluations - ev0
    opt.report.search_skipped = state.skipped - sk0
    return out, opt.report
