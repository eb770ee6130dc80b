"""Quantization arithmetic shared by the optimizers, in plain torch (batched, any device).

Everything here reproduces the op contract of ``segquant_fx/ops/README.md`` exactly (float32 IEEE
division by the dequant scale, round half to even, clamp to ``[qmin, qmax]``, fp8 via the e4m3fn
cast), so that what a search or GPTQ measures is what the rewritten graph computes. The functions
work on already-expanded per-column scales and never validate shapes (callers build them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segquant_fx.ops.formats import pack_int4, qtype_info, scale_from_amax

__all__ = [
    "segment_sizes",
    "expand_columns",
    "fake_quant",
    "fake_quant_dual",
    "fake_quant_dynamic",
    "quant_codes",
    "store_codes",
    "weight_scales",
    "weight_scale_columns",
]


def segment_sizes(segments: Sequence[int], k: int) -> list[int]:
    """Segment sizes, ``[k]`` for ``()``."""
    return list(segments) if segments else [k]


def expand_columns(scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[..., nseg]`` -> ``[..., K]``: column ``j`` gets the scale of its segment."""
    if scale.dim() == 0 or scale.shape[-1] == 1:
        return scale
    idx = torch.repeat_interleave(
        torch.arange(len(sizes), device=scale.device), torch.tensor(list(sizes), device=scale.device)
    )
    return scale.index_select(-1, idx)


def _grid(v: torch.Tensor, qtype: str, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Values ``v`` (already divided by the scale) on the qtype grid, as float32."""
    info = qtype_info(qtype)
    lo = info.qmin if lo is None else lo
    hi = info.qmax if hi is None else hi
    if info.is_float:
        return v.clamp(lo, hi).to(info.storage_dtype).to(torch.float32)
    return torch.round(v).clamp_(lo, hi)


def fake_quant(v: torch.Tensor, scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """``q * s`` with ``q = grid(v / s)``; ``v`` float32, ``scale`` broadcastable per column."""
    s = scale.to(torch.float32)
    return _grid(v / s, qtype) * s


def quant_codes(v: torch.Tensor, scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """Integer codes ``clamp(round(v / s))`` as int8 (int qtypes only)."""
    return _grid(v / scale.to(torch.float32), qtype).to(torch.int8)


def fake_quant_dual(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, qtype: str) -> torch.Tensor:
    """DualScale: positive values on ``[0, qmax] * pos``, negative ones on ``[qmin, 0] * neg``."""
    info = qtype_info(qtype)
    p = pos.to(torch.float32)
    n = neg.to(torch.float32)
    qp = _grid(v.clamp(min=0) / p, qtype, 0.0, info.qmax) * p
    qn = _grid(v.clamp(max=0) / n, qtype, info.qmin, 0.0) * n
    return qp + qn


def fake_quant_dynamic(v: torch.Tensor, sizes: Sequence[int], qtype: str) -> torch.Tensor:
    """Per-row (token), per-segment absmax fake quantization, as ``segquant::quantize_dynamic``."""
    if len(sizes) == 1:
        amax = v.abs().amax(dim=-1, keepdim=True)
    else:
        amax = torch.stack([t.abs().amax(dim=-1) for t in v.split(list(sizes), dim=-1)], dim=-1)
    s = scale_from_amax(amax, qtype)
    return fake_quant(v, expand_columns(s, sizes), qtype)


def store_codes(q: torch.Tensor, qtype: str) -> torch.Tensor:
    """Integer codes -> the stored tensor of ``qtype`` (int4 packed two per byte)."""
    if qtype == "int4":
        return pack_int4(q.to(torch.int8))
    return q.to(torch.int8).contiguous()


def weight_scales(
    w: torch.Tensor,
    qtype: str,
    granularity: str,
    group_size: int | None = None,
    *,
    row_segments: Sequence[int] = (),
    col_segments: Sequence[int] = (),
) -> tuple[torch.Tensor, list[int]]:
    """Dequant scales of a float weight ``w`` ``[N, K]`` and its weight segments (along K).

    Layouts (``ncol = len(col_segments)`` when > 1: one scale per input segment as well):

    * ``per_group``: ``[N, K / g]``, segments ``[g] * (K / g)``;
    * ``per_channel``: ``[N, 1]`` (``[N, ncol]``);
    * ``per_tensor``: ``[1]`` (``[1, ncol]``), or with ``row_segments`` one scale per output
      segment expanded to ``[N, 1]`` (``[N, ncol]``).
    """
    wa = w.detach().abs().to(torch.float32)
    n, k = wa.shape
    if granularity == "per_group":
        g = int(group_size)  # type: ignore[arg-type]
        return scale_from_amax(wa.reshape(n, k // g, g).amax(dim=2), qtype), [g] * (k // g)
    cols = list(col_segments) if len(col_segments) > 1 else []
    per_col = (
        torch.stack([t.amax(dim=1) for t in wa.split(cols, dim=1)], dim=1)
        if cols
        else wa.amax(dim=1, keepdim=True)
    )  # [N, ncol]
    if granularity == "per_channel":
        amax = per_col
    elif len(row_segments) > 1:
        parts = [
            t.amax(dim=0, keepdim=True).expand(t.shape[0], -1)
            for t in per_col.split(list(row_segments), dim=0)
        ]
        amax = torch.cat(parts, dim=0)
    else:
        amax = per_col.amax(dim=0, keepdim=True) if cols else wa.amax().reshape(1)
    return scale_from_amax(amax, qtype), cols


def weight_scale_columns(scale: torch.Tensor, wsegs: Sequence[int], k: int) -> torch.Tensor:
    """A weight scale expanded to broadcast against ``[N, K]``."""
    s = scale.to(torch.float32)
    if s.dim() == 1:
        return s.reshape(1, 1) if s.numel() == 1 else s.reshape(1, -1)
    if wsegs and s.shape[-1] > 1:
        return expand_columns(s, wsegs)
    return s
