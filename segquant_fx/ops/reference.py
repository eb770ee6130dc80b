"""Pure-PyTorch reference kernels of the ``torch.ops.segquant`` op set.

Each ``reference_<op>`` function implements ``segquant::<op>`` exactly as documented in
``segquant_fx/ops/README.md``. They are registered as the CPU implementation and as the CUDA
fallback, and they are usable standalone as a test oracle for compiled kernels. They run on any
device the inputs live on.

The ``infer_<op>`` functions validate arguments and compute output shapes. They are shared by the
reference kernels and the fake (meta) kernels, so eager and traced calls reject the same inputs
with the same :class:`~segquant_fx.errors.ConfigError` messages. They use ``torch._check_with``,
so they also work on symbolic shapes.

All quantization arithmetic happens in float32, whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from segquant_fx.errors import ConfigError
from segquant_fx.ops.formats import (
    QTYPES,
    QTypeInfo,
    _pack_int4,
    _unpack_int4,
    check_int4_last_dim,
    normalize_segments,
    qtype_info,
    refine_segments,
    scale_from_amax,
    segment_index,
)

__all__ = [
    "OP_NAMES",
    "NO_QUANT",
    "QLinearSpec",
    "infer_quantize",
    "infer_dequantize",
    "infer_quantize_dynamic",
    "infer_quantize_dual",
    "infer_qlinear",
    "reference_quantize",
    "reference_dequantize",
    "reference_quantize_dynamic",
    "reference_quantize_dual",
    "reference_qlinear",
    "reference_fake_quantize",
    "reference_fake_quantize_dual",
    "sample_inputs",
]

#: The op names of the ``segquant`` namespace, in registration order.
OP_NAMES: tuple[str, ...] = (
    "quantize",
    "dequantize",
    "quantize_dynamic",
    "quantize_dual",
    "qlinear",
    "fake_quantize",
    "fake_quantize_dual",
)

#: ``x_qtype`` of :func:`reference_qlinear` meaning "the activation is not quantized".
NO_QUANT = "none"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# validation and shape inference (shared with the fake kernels)
# --------------------------------------------------------------------------------------------------


def _require(cond: Any, message: Any) -> None:
    torch._check_with(ConfigError, cond, message)


def _check_float_tensor(t: torch.Tensor, name: str, op: str, *, min_dim: int = 1) -> None:
    _require(
        t.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )
    _require(
        t.dim() >= min_dim,
        lambda: f"{op}: {name} must have at least {min_dim} dim(s), got shape {list(t.shape)}",
    )


def _check_out_dtype(out_dtype: torch.dtype, op: str) -> None:
    _require(
        out_dtype in _FLOAT_DTYPES,
        lambda: f"{op}: out_dtype must be float16, bfloat16, float32 or float64, got {out_dtype}",
    )


def _check_scale(scale: torch.Tensor, lead: Sequence[int], nseg: int, op: str, name: str) -> None:
    _require(
        scale.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: {name} must be a floating tensor (float32 by convention), got {scale.dtype}",
    )
    target = (*lead, nseg)
    ok = scale.dim() <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(scale.shape), reversed(target), strict=False)
    )
    _require(
        ok,
        lambda: (
            f"{op}: {name} of shape {list(scale.shape)} is not broadcastable to "
            f"[*lead, nseg] = {list(target)}; use [1] (per tensor), [{nseg}] (per segment), "
            f"[*lead, 1] (per token) or [*lead, {nseg}] (per token and segment)"
        ),
    )


def _check_smooth(smooth: torch.Tensor | None, k: int, op: str) -> None:
    if smooth is None:
        return
    _check_float_tensor(smooth, "smooth", op)
    _require(
        smooth.dim() == 1 and smooth.shape[0] == k,
        lambda: (
            f"{op}: smooth must have shape [K] = [{k}] (one divisor per input channel), "
            f"got {list(smooth.shape)}"
        ),
    )


def _check_storage(q: torch.Tensor, info: QTypeInfo, name: str, op: str) -> None:
    _require(
        q.dtype == info.storage_dtype,
        lambda: (
            f"{op}: {name} has dtype {q.dtype} but qtype {info.name!r} is stored as "
            f"{info.storage_dtype}; pass a tensor produced by segquant::quantize with qtype {info.name!r}"
        ),
    )
    _require(q.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a 0-dim tensor")


def infer_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
    *,
    op: str = "segquant::quantize",
) -> tuple[tuple[int, ...], QTypeInfo, tuple[int, ...]]:
    """Validate ``segquant::quantize`` (and ``fake_quantize``) arguments.

    Returns:
        ``(sizes, info, out_shape)``: explicit segment sizes, the qtype, the stored output shape.

    Raises:
        ConfigError: unknown qtype, non-float ``x``, bad segments, scale or smooth shapes, or an odd
            last dim for int4.
    """
    info = qtype_info(qtype, op=op)
    _check_float_tensor(x, "x", op)
    k = x.shape[-1]
    sizes = normalize_segments(segments, k, op=op)
    _check_scale(scale, x.shape[:-1], len(sizes), op, "scale")
    _check_smooth(smooth, k, op)
    if info.per_byte == 2:
        check_int4_last_dim(k, op=op)
    return sizes, info, (*x.shape[:-1], k // info.per_byte)


def infer_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    out_dtype: torch.dtype,
    *,
    op: str = "segquant::dequantize",
) -> tuple[tuple[int, ...], QTypeInfo, tuple[int, ...]]:
    """Validate ``segquant::dequantize`` arguments.

    Returns:
        ``(sizes, info, out_shape)``; ``out_shape`` has the unpacked last dim.

    Raises:
        ConfigError: unknown qtype, ``q`` not stored as ``qtype``, bad segments or scale, or a
            non-float ``out_dtype``.
    """
    info = qtype_info(qtype, op=op)
    _check_storage(q, info, "q", op)
    k = q.shape[-1] * info.per_byte
    sizes = normalize_segments(segments, k, op=op)
    _check_scale(scale, q.shape[:-1], len(sizes), op, "scale")
    _check_out_dtype(out_dtype, op)
    return sizes, info, (*q.shape[:-1], k)


def infer_quantize_dynamic(
    x: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
    *,
    op: str = "segquant::quantize_dynamic",
) -> tuple[tuple[int, ...], QTypeInfo, tuple[int, ...], tuple[int, ...]]:
    """Validate ``segquant::quantize_dynamic`` arguments.

    Returns:
        ``(sizes, info, q_shape, scale_shape)`` with ``scale_shape = [*lead, nseg]``.

    Raises:
        ConfigError: as :func:`infer_quantize`.
    """
    info = qtype_info(qtype, op=op)
    _check_float_tensor(x, "x", op)
    k = x.shape[-1]
    sizes = normalize_segments(segments, k, op=op)
    _check_smooth(smooth, k, op)
    if info.per_byte == 2:
        check_int4_last_dim(k, op=op)
    return sizes, info, (*x.shape[:-1], k // info.per_byte), (*x.shape[:-1], len(sizes))


def infer_quantize_dual(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
    *,
    op: str = "segquant::quantize_dual",
) -> tuple[tuple[int, ...], QTypeInfo, tuple[int, ...]]:
    """Validate ``segquant::quantize_dual`` (and ``fake_quantize_dual``) arguments.

    Returns:
        ``(sizes, info, out_shape)`` with the stored output last dim ``2 * K / per_byte``.

    Raises:
        ConfigError: as :func:`infer_quantize`, for both scales.
    """
    info = qtype_info(qtype, op=op)
    _check_float_tensor(x, "x", op)
    k = x.shape[-1]
    sizes = normalize_segments(segments, k, op=op)
    _check_scale(scale_pos, x.shape[:-1], len(sizes), op, "scale_pos")
    _check_scale(scale_neg, x.shape[:-1], len(sizes), op, "scale_neg")
    _check_smooth(smooth, k, op)
    if info.per_byte == 2:
        check_int4_last_dim(k, op=op)
    return sizes, info, (*x.shape[:-1], 2 * k // info.per_byte)


@dataclass(frozen=True)
class QLinearSpec:
    """Validated facts about one ``segquant::qlinear`` call (see :func:`infer_qlinear`).

    Attributes:
        x_info: Activation qtype, or None for ``x_qtype="none"`` (weight-only).
        w_info: Weight qtype.
        k: Logical reduction size.
        n: Output features.
        lead: Leading dims of the activation.
        x_sizes: Explicit activation segments.
        w_sizes: Explicit weight segments.
        halves: 2 for DualScale, else 1.
        out_shape: ``[*lead, N]``.
    """

    x_info: QTypeInfo | None
    w_info: QTypeInfo
    k: int
    n: int
    lead: tuple[int, ...]
    x_sizes: tuple[int, ...]
    w_sizes: tuple[int, ...]
    halves: int
    out_shape: tuple[int, ...]


def infer_qlinear(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    x_segments: Sequence[int],
    x_qtype: str,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    w_segments: Sequence[int],
    w_qtype: str,
    bias: torch.Tensor | None,
    dual: bool,
    out_dtype: torch.dtype,
    *,
    op: str = "segquant::qlinear",
) -> QLinearSpec:
    """Validate ``segquant::qlinear`` arguments.

    Returns:
        A :class:`QLinearSpec`.

    Raises:
        ConfigError: unknown or incompatible qtypes, wrong storage dtypes, mismatched K, bad
            segments, scale or bias shapes, DualScale without a quantized activation, or a
            non-float ``out_dtype``.
    """
    if x_qtype == NO_QUANT:
        x_info = None
    else:
        _require(
            x_qtype in QTYPES,
            lambda: (
                f"{op}: unknown x_qtype {x_qtype!r}; use one of "
                f"{', '.join(map(repr, (*QTYPES, NO_QUANT)))} ('none' = float activation, weight-only)"
            ),
        )
        x_info = qtype_info(x_qtype, op=op)
    _require(
        w_qtype in QTYPES,
        lambda: f"{op}: unknown w_qtype {w_qtype!r}; use one of {', '.join(map(repr, QTYPES))}",
    )
    w_info = qtype_info(w_qtype, op=op)
    if x_info is not None:
        _require(
            x_info.is_float == w_info.is_float,
            lambda: (
                f"{op}: x_qtype={x_qtype!r} cannot be combined with w_qtype={w_qtype!r}; "
                f"integer activations need an integer weight (int8/int4), fp8 activations need an fp8 "
                f"weight; use x_qtype='none' for a weight-only layer"
            ),
        )
    _require(
        not (dual and x_info is None),
        lambda: (
            f"{op}: dual=True needs a quantized activation, got x_qtype='none'; "
            f"pass dual=False for a weight-only layer"
        ),
    )

    _check_storage(qw, w_info, "qw", op)
    _require(qw.dim() == 2, lambda: f"{op}: qw must be 2-D [N, K(/2 for int4)], got {list(qw.shape)}")
    n = qw.shape[0]
    k = qw.shape[1] * w_info.per_byte
    w_sizes = normalize_segments(w_segments, k, op=f"{op} (w_segments)")
    _check_scale(w_scale, (n,), len(w_sizes), op, "w_scale")

    halves = 2 if dual else 1
    if x_info is None:
        _check_float_tensor(qx, "qx", op)
        kx = qx.shape[-1]
    else:
        _check_storage(qx, x_info, "qx", op)
        _require(
            qx.shape[-1] % halves == 0,
            lambda: (
                f"{op}: with dual=True qx holds a positive and a negative half, so its last dim "
                f"must be even, got {qx.shape[-1]}"
            ),
        )
        kx = qx.shape[-1] // halves * x_info.per_byte
    _require(
        kx == k,
        lambda: (
            f"{op}: K mismatch: qx of shape {list(qx.shape)} (x_qtype={x_qtype!r}, dual={dual}) "
            f"has K={kx} but qw of shape {list(qw.shape)} (w_qtype={w_qtype!r}) has K={k}; "
            f"quantize the activation and the weight along the same input dim"
        ),
    )
    lead = tuple(qx.shape[:-1])
    x_sizes = normalize_segments(x_segments, k, op=f"{op} (x_segments)")
    if x_info is not None:
        _check_scale(x_scale, lead, halves * len(x_sizes), op, "x_scale")
    if bias is not None:
        _check_float_tensor(bias, "bias", op)
        _require(
            bias.dim() == 1 and bias.shape[0] == n,
            lambda: f"{op}: bias must have shape [N] = [{n}], got {list(bias.shape)}",
        )
    _check_out_dtype(out_dtype, op)
    return QLinearSpec(x_info, w_info, k, n, lead, x_sizes, w_sizes, halves, (*lead, n))


# --------------------------------------------------------------------------------------------------
# reference kernels
# --------------------------------------------------------------------------------------------------


def _prepare(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    v = x.to(torch.float32)
    if smooth is not None:
        v = v / smooth.to(torch.float32)
    return v


def _expand_scale(scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """float32 scale broadcastable to ``[*lead, K]``: column j holds the scale of segment seg(j)."""
    s = scale.to(torch.float32)
    if s.dim() > 0 and s.shape[-1] != 1:
        s = s.index_select(-1, segment_index(sizes, s.device))
    return s


def _to_grid(v: torch.Tensor, info: QTypeInfo, lo: float, hi: float) -> torch.Tensor:
    """Round scaled values onto the qtype grid; returns int8 (ints, unpacked) or float8."""
    if info.is_float:
        return v.clamp(lo, hi).to(info.storage_dtype)
    # torch.round is round-half-to-even.
    return torch.round(v).clamp(lo, hi).to(torch.int8)


def _to_storage(q: torch.Tensor, info: QTypeInfo) -> torch.Tensor:
    return _pack_int4(q) if info.per_byte == 2 else q.contiguous()


def _from_storage(q: torch.Tensor, info: QTypeInfo) -> torch.Tensor:
    return _unpack_int4(q) if info.per_byte == 2 else q


def reference_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``segquant::quantize``: ``q = clamp(round((x / smooth) / scale))``.

    Args:
        x: Float tensor ``[*lead, K]``.
        scale: Dequant scale broadcastable to ``[*lead, nseg]``.
        segments: Segment sizes along K (empty: one segment).
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        int8 ``[*lead, K]``, packed uint8 ``[*lead, K / 2]`` or float8_e4m3fn ``[*lead, K]``.
    """
    sizes, info, _ = infer_quantize(x, scale, segments, qtype, smooth)
    v = _prepare(x, smooth) / _expand_scale(scale, sizes)
    return _to_storage(_to_grid(v, info, info.qmin, info.qmax), info)


def reference_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference ``segquant::dequantize``: ``x_hat = float32(q) * scale``, cast to ``out_dtype``.

    Args:
        q: Stored quantized tensor (int8, packed uint8 or float8_e4m3fn).
        scale: Dequant scale broadcastable to ``[*lead, nseg]``.
        segments: Segment sizes along the unpacked last dim.
        qtype: The qtype ``q`` was quantized with.
        out_dtype: Float dtype of the result.

    Returns:
        ``[*lead, K]`` tensor of ``out_dtype``.
    """
    sizes, info, _ = infer_dequantize(q, scale, segments, qtype, out_dtype)
    v = _from_storage(q, info).to(torch.float32) * _expand_scale(scale, sizes)
    return v.to(out_dtype).contiguous()


def _segment_amax(v: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    a = v.abs()
    if len(set(sizes)) == 1:
        return a.reshape(*a.shape[:-1], len(sizes), sizes[0]).amax(-1)
    return torch.stack([c.amax(-1) for c in a.split(list(sizes), dim=-1)], dim=-1)


def reference_quantize_dynamic(
    x: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``segquant::quantize_dynamic``: per-token, per-segment absmax quantization.

    ``scale[..., s] = max(amax(|x / smooth|[..., segment s]), 2^-24) / qmax``, then
    ``q = quantize(x, scale, segments, qtype, smooth)``.

    Returns:
        ``(q, scale)`` with ``scale`` float32 ``[*lead, nseg]``.
    """
    sizes, info, _, _ = infer_quantize_dynamic(x, segments, qtype, smooth)
    v = _prepare(x, smooth)
    scale = scale_from_amax(_segment_amax(v, sizes), qtype).contiguous()
    q = _to_storage(_to_grid(v / _expand_scale(scale, sizes), info, info.qmin, info.qmax), info)
    return q, scale


def _dual_grids(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    sizes: Sequence[int],
    info: QTypeInfo,
    smooth: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    v = _prepare(x, smooth)
    sp = _expand_scale(scale_pos, sizes)
    sn = _expand_scale(scale_neg, sizes)
    pos = _to_grid(v.clamp(min=0) / sp, info, 0.0, info.qmax)
    neg = _to_grid(v.clamp(max=0) / sn, info, info.qmin, 0.0)
    return pos, neg, sp, sn


def reference_quantize_dual(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``segquant::quantize_dual`` (DualScale).

    ``Q+ = clamp(round(max(x', 0) / scale_pos), 0, qmax)`` and
    ``Q- = clamp(round(min(x', 0) / scale_neg), qmin, 0)`` with ``x' = x / smooth``; the output is
    ``cat([store(Q+), store(Q-)], -1)`` (each half packed separately for int4).

    Returns:
        ``[*lead, 2K]`` int8 / float8_e4m3fn, or ``[*lead, K]`` packed uint8 for int4.
    """
    sizes, info, _ = infer_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth)
    pos, neg, _, _ = _dual_grids(x, scale_pos, scale_neg, sizes, info, smooth)
    return torch.cat([_to_storage(pos, info), _to_storage(neg, info)], dim=-1)


def reference_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``segquant::fake_quantize``: ``dequantize(quantize(x), out_dtype=x.dtype)``.

    Bit-identical to the composition; the result lives in the smoothed domain ``x / smooth``.
    """
    sizes, info, _ = infer_quantize(x, scale, segments, qtype, smooth, op="segquant::fake_quantize")
    s = _expand_scale(scale, sizes)
    q = _to_grid(_prepare(x, smooth) / s, info, info.qmin, info.qmax)
    return (q.to(torch.float32) * s).to(x.dtype).contiguous()


def reference_fake_quantize_dual(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``segquant::fake_quantize_dual``: ``float32(Q+) * scale_pos + float32(Q-) * scale_neg``.

    The sum is exact (one term is zero); the result is cast to ``x.dtype``.
    """
    sizes, info, _ = infer_quantize_dual(
        x, scale_pos, scale_neg, segments, qtype, smooth, op="segquant::fake_quantize_dual"
    )
    pos, neg, sp, sn = _dual_grids(x, scale_pos, scale_neg, sizes, info, smooth)
    return (pos.to(torch.float32) * sp + neg.to(torch.float32) * sn).to(x.dtype).contiguous()


def reference_qlinear(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    x_segments: Sequence[int],
    x_qtype: str,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    w_segments: Sequence[int],
    w_qtype: str,
    bias: torch.Tensor | None,
    dual: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference ``segquant::qlinear``: ``Y = dequant(qx) @ dequant(qw)^T + bias``.

    Integer activations times integer weights are emulated exactly: K is split into the common
    refinement of ``x_segments`` and ``w_segments``; per piece ``p`` the integer dot products are
    computed exactly (float64), rounded to float32, and multiplied by
    ``float32(x_scale[m, seg_x(p)] * w_scale[n, seg_w(p)])``; pieces are summed in float32 in
    increasing K order, the DualScale negative half after the whole positive half; then
    ``+ float32(bias)`` and a cast to ``out_dtype``. fp8 x fp8 uses float32 products instead.
    With ``x_qtype="none"`` the weight is dequantized to float32 and multiplied with
    ``float32(qx)``.

    Returns:
        ``[*lead, N]`` tensor of ``out_dtype``.
    """
    spec = infer_qlinear(
        qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype
    )
    m = math.prod(spec.lead)
    w_vals = _from_storage(qw, spec.w_info)
    if spec.x_info is None:
        w_hat = w_vals.to(torch.float32) * _expand_scale(w_scale, spec.w_sizes)
        y = qx.reshape(m, spec.k).to(torch.float32) @ w_hat.T
    else:
        acc_dtype = torch.float32 if spec.x_info.is_float else torch.float64
        nx = len(spec.x_sizes)
        xs = torch.broadcast_to(x_scale.to(torch.float32), (*spec.lead, spec.halves * nx))
        xs = xs.reshape(m, spec.halves * nx)
        ws = torch.broadcast_to(w_scale.to(torch.float32), (spec.n, len(spec.w_sizes)))
        w_acc = w_vals.to(acc_dtype)
        pieces = refine_segments(spec.x_sizes, spec.w_sizes)
        y_halves = []
        for half, part in enumerate(qx.reshape(m, qx.shape[-1]).chunk(spec.halves, dim=-1)):
            x_acc = _from_storage(part, spec.x_info).to(acc_dtype)
            y_half = torch.zeros(m, spec.n, dtype=torch.float32, device=qx.device)
            for start, stop, ix, iw in pieces:
                dot = (x_acc[:, start:stop] @ w_acc[:, start:stop].T).to(torch.float32)
                alpha = xs[:, half * nx + ix, None] * ws[None, :, iw]
                y_half = y_half + dot * alpha
            y_halves.append(y_half)
        # DualScale: the whole positive GEMM, then the whole negative GEMM added to it.
        y = y_halves[0] if spec.halves == 1 else y_halves[0] + y_halves[1]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(spec.out_shape).to(out_dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# sample inputs (for opcheck and kernel tests)
# --------------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int, device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _rand_scale(
    g: torch.Generator, *shape: int, device: Any, lo: float = 0.005, hi: float = 0.05
) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(*shape, generator=g)).to(device)


def _quantized_weight(
    g: torch.Generator, n: int, k: int, qtype: str, segments: Sequence[int], device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    nseg = max(len(segments), 1)
    w = _randn(g, n, k, device=device)
    sizes = normalize_segments(segments, k)
    amax = torch.stack([c.abs().amax(-1) for c in w.split(list(sizes), dim=-1)], dim=-1)
    w_scale = scale_from_amax(amax, qtype).reshape(n, nseg)
    return reference_quantize(w, w_scale, segments, qtype), w_scale


def sample_inputs(op: str, device: torch.device | str = "cpu", seed: int = 0) -> list[tuple[Any, ...]]:
    """Positional-argument tuples covering the main configurations of one ``segquant`` op.

    Covers per-tensor, per-segment (unequal), per-token and per-token-per-segment scales, SmoothQuant,
    int8 / int4 / fp8, DualScale, group-wise and weight-only ``qlinear``. Values are random (seeded),
    never all zero.

    Args:
        op: One of :data:`OP_NAMES`.
        device: Device of the tensors.
        seed: Seed of the generator.

    Returns:
        A list of argument tuples in schema order.

    Raises:
        ConfigError: ``op`` is not a segquant op.
    """
    g = torch.Generator().manual_seed(seed)
    d = device
    if op in ("quantize", "fake_quantize"):
        return [
            (_randn(g, 4, 16, device=d), _rand_scale(g, 1, device=d), [], "int8", None),
            (
                _randn(g, 3, 12, device=d, dtype=torch.bfloat16),
                _rand_scale(g, 3, device=d),
                [2, 4, 6],
                "int4",
                _rand_scale(g, 12, device=d, lo=0.5, hi=2.0),
            ),
            (_randn(g, 2, 3, 8, device=d), _rand_scale(g, 2, 3, 1, device=d, hi=0.01), [], "fp8_e4m3", None),
            (
                _randn(g, 5, 10, device=d, dtype=torch.float16),
                _rand_scale(g, 5, 2, device=d),
                [3, 7],
                "int8",
                None,
            ),
        ]
    if op == "dequantize":
        out = []
        for dtype, (x, scale, segments, qtype, smooth) in zip(
            (torch.float32, torch.float16, torch.bfloat16, torch.float32),
            sample_inputs("quantize", device, seed),
            strict=True,
        ):
            out.append((reference_quantize(x, scale, segments, qtype, smooth), scale, segments, qtype, dtype))
        return out
    if op == "quantize_dynamic":
        return [
            (_randn(g, 4, 16, device=d), [], "int8", None),
            (
                _randn(g, 2, 3, 12, device=d, dtype=torch.bfloat16),
                [4, 8],
                "int4",
                _rand_scale(g, 12, device=d, lo=0.5, hi=2.0),
            ),
            (_randn(g, 6, 8, device=d), [5, 3], "fp8_e4m3", None),
        ]
    if op in ("quantize_dual", "fake_quantize_dual"):
        return [
            (
                _randn(g, 4, 16, device=d),
                _rand_scale(g, 1, device=d),
                _rand_scale(g, 1, device=d),
                [],
                "int8",
                None,
            ),
            (
                _randn(g, 3, 12, device=d),
                _rand_scale(g, 3, device=d, lo=0.1, hi=0.4),
                _rand_scale(g, 3, device=d, lo=0.1, hi=0.4),
                [5, 3, 4],
                "int4",
                _rand_scale(g, 12, device=d, lo=0.5, hi=2.0),
            ),
            (
                _randn(g, 2, 3, 8, device=d, dtype=torch.bfloat16),
                _rand_scale(g, 2, 3, 1, device=d, hi=0.01),
                _rand_scale(g, 2, 3, 1, device=d, hi=0.01),
                [],
                "fp8_e4m3",
                None,
            ),
        ]
    if op == "qlinear":
        return _qlinear_samples(g, d)
    raise ConfigError(f"sample_inputs: unknown op {op!r}; use one of {', '.join(OP_NAMES)}")


def _qlinear_samples(g: torch.Generator, d: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    # W8A8, per-tensor activation, per-channel weight, bias.
    x = _randn(g, 2, 3, 16, device=d)
    qw, ws = _quantized_weight(g, 5, 16, "int8", [], d)
    xs = scale_from_amax(x.abs().amax(), "int8").reshape(1)
    out.append(
        (
            reference_quantize(x, xs, [], "int8"),
            xs,
            [],
            "int8",
            qw,
            ws,
            [],
            "int8",
            _randn(g, 5, device=d),
            False,
            torch.float32,
        )
    )
    # W4A8, per-token unequal activation segments, group-wise weight (g=4).
    x = _randn(g, 4, 16, device=d)
    qx, xs = reference_quantize_dynamic(x, [6, 10], "int8")
    qw, ws = _quantized_weight(g, 6, 16, "int4", [4] * 4, d)
    out.append((qx, xs, [6, 10], "int8", qw, ws, [4] * 4, "int4", None, False, torch.bfloat16))
    # W4A4, per-token activation, per-channel weight.
    x = _randn(g, 3, 8, device=d)
    qx, xs = reference_quantize_dynamic(x, [], "int4")
    qw, ws = _quantized_weight(g, 4, 8, "int4", [], d)
    out.append((qx, xs, [], "int4", qw, ws, [], "int4", _randn(g, 4, device=d), False, torch.float16))
    # DualScale int8, per-segment scales [pos..., neg...].
    x = _randn(g, 3, 12, device=d)
    sp, sn = _rand_scale(g, 2, device=d), _rand_scale(g, 2, device=d)
    qx = reference_quantize_dual(x, sp, sn, [7, 5], "int8")
    qw, ws = _quantized_weight(g, 4, 12, "int8", [], d)
    out.append((qx, torch.cat([sp, sn]), [7, 5], "int8", qw, ws, [], "int8", None, True, torch.float32))
    # DualScale int4 activation, int8 weight with segments.
    x = _randn(g, 2, 8, device=d)
    sp, sn = _rand_scale(g, 1, device=d, lo=0.1, hi=0.4), _rand_scale(g, 1, device=d, lo=0.1, hi=0.4)
    qx = reference_quantize_dual(x, sp, sn, [], "int4")
    qw, ws = _quantized_weight(g, 3, 8, "int8", [2, 6], d)
    out.append(
        (
            qx,
            torch.cat([sp, sn]),
            [],
            "int4",
            qw,
            ws,
            [2, 6],
            "int8",
            _randn(g, 3, device=d),
            True,
            torch.float32,
        )
    )
    # fp8 x fp8, per-token activation.
    x = _randn(g, 4, 16, device=d)
    qx, xs = reference_quantize_dynamic(x, [], "fp8_e4m3")
    qw, ws = _quantized_weight(g, 5, 16, "fp8_e4m3", [], d)
    out.append((qx, xs, [], "fp8_e4m3", qw, ws, [], "fp8_e4m3", None, False, torch.bfloat16))
    # Weight-only W8A16 and group-wise W4A16.
    x = _randn(g, 3, 16, device=d, dtype=torch.bfloat16)
    qw, ws = _quantized_weight(g, 5, 16, "int8", [], d)
    out.append((x, torch.ones(1, device=d), [], NO_QUANT, qw, ws, [], "int8", None, False, torch.bfloat16))
    qw, ws = _quantized_weight(g, 5, 16, "int4", [8, 8], d)
    out.append(
        (
            x,
            torch.ones(1, device=d),
            [],
            NO_QUANT,
            qw,
            ws,
            [8, 8],
            "int4",
            _randn(g, 5, device=d),
            False,
            torch.float32,
        )
    )
    return out
