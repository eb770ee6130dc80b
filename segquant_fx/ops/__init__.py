"""The ``torch.ops.segquant`` op set: typed wrappers, qtype helpers and kernel selection.

Importing this package registers the ops (see :mod:`segquant_fx.ops.library`). Each wrapper below
calls ``torch.ops.segquant.<name>``, so it traces as one node under ``torch.export`` and
``torch.compile``. The exact contract (shapes, dtypes, scale conventions, arithmetic) is in
``README.md`` beside this file; :mod:`segquant_fx.ops.reference` implements it in pure PyTorch.

Conventions in brief:

* qtypes ``"int8"``, ``"int4"`` (packed two per byte in ``torch.uint8`` along the last dim, low
  nibble first) and ``"fp8_e4m3"``; ``qlinear`` also takes ``x_qtype="none"`` (weight-only).
* Scales are float32 *dequant* scales: ``q = clamp(round_half_even(x / scale))``,
  ``x_hat = q * scale``.
* ``segments`` are sizes along the last dim (empty: one segment); a scale broadcasts to
  ``[*lead, nseg]`` and element ``x[..., j]`` uses ``scale[..., seg(j)]``.
* ``smooth`` (``[K]``) is a SmoothQuant divisor applied first: ``x' = x / smooth``.

Example:
    >>> import torch
    >>> from segquant_fx import ops
    >>> x = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    >>> q, s = ops.quantize_dynamic(x, qtype="int8", segments=[2, 2])
    >>> q
    tensor([[  64, -127,  127,   16]], dtype=torch.int8)
    >>> ops.dequantize(q, s, qtype="int8", segments=[2, 2], out_dtype=torch.float32)
    tensor([[ 0.5039, -1.0000,  2.0000,  0.2520]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segquant_fx.ops import library
from segquant_fx.ops.formats import (
    AMAX_FLOOR,
    QTYPES,
    QTypeInfo,
    dual_scales_from_minmax,
    pack_int4,
    qtype_info,
    scale_from_amax,
    unpack_int4,
)
from segquant_fx.ops.kernel_preference import (
    KernelPreference,
    get_kernel_preference,
    set_kernel_preference,
    use_kernel_preference,
)
from segquant_fx.ops.library import has_cuda_impl, register_cuda_impl
from segquant_fx.ops.reference import NO_QUANT, OP_NAMES

__all__ = [
    "quantize",
    "dequantize",
    "quantize_dynamic",
    "quantize_dual",
    "qlinear",
    "fake_quantize",
    "fake_quantize_dual",
    "scale_from_amax",
    "dual_scales_from_minmax",
    "pack_int4",
    "unpack_int4",
    "qtype_info",
    "QTypeInfo",
    "QTYPES",
    "AMAX_FLOOR",
    "NO_QUANT",
    "OP_NAMES",
    "KernelPreference",
    "get_kernel_preference",
    "set_kernel_preference",
    "use_kernel_preference",
    "register_cuda_impl",
    "has_cuda_impl",
    "library",
]


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    qtype: str,
    segments: Sequence[int] = (),
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize with given dequant scales (``segquant::quantize``).

    ``q = clamp(round_half_even((x / smooth) / scale[..., seg(j)]), qmin, qmax)`` for int qtypes;
    ``((x / smooth) / scale).clamp(-448, 448).to(float8_e4m3fn)`` for fp8. Arithmetic in float32.

    Args:
        x: Float tensor ``[*lead, K]``.
        scale: Dequant scale broadcastable to ``[*lead, nseg]``.
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        segments: Segment sizes summing to K; empty for one segment.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        int8 ``[*lead, K]``, packed uint8 ``[*lead, K / 2]`` (int4) or float8_e4m3fn ``[*lead, K]``.

    Raises:
        ConfigError: unknown qtype, bad segments/scale/smooth shape, or odd K for int4.
    """
    return torch.ops.segquant.quantize(x, scale, list(segments), qtype, smooth)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    qtype: str,
    out_dtype: torch.dtype,
    segments: Sequence[int] = (),
) -> torch.Tensor:
    """Dequantize (``segquant::dequantize``): ``float32(q) * scale[..., seg(j)]`` cast to ``out_dtype``.

    Args:
        q: Output of :func:`quantize` (int8, packed uint8 or float8_e4m3fn).
        scale: Dequant scale broadcastable to ``[*lead, nseg]``.
        qtype: The qtype ``q`` was quantized with.
        out_dtype: Float dtype of the result.
        segments: Segment sizes along the *unpacked* last dim.

    Returns:
        ``[*lead, K]`` tensor of ``out_dtype``.

    Raises:
        ConfigError: ``q``'s dtype does not match ``qtype``, bad segments/scale, or non-float
            ``out_dtype``.
    """
    return torch.ops.segquant.dequantize(q, scale, list(segments), qtype, out_dtype)


def quantize_dynamic(
    x: torch.Tensor,
    *,
    qtype: str,
    segments: Sequence[int] = (),
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with per-token, per-segment absmax scales (``segquant::quantize_dynamic``).

    ``scale[..., s] = max(amax_segment_s(|x / smooth|), 2^-24) / qmax`` (qmax 127, 7 or 448), then
    :func:`quantize` with that scale.

    Args:
        x: Float tensor ``[*lead, K]``; every row of the leading dims is one token.
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        segments: Segment sizes summing to K; empty for one segment.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        ``(q, scale)`` with ``scale`` float32 ``[*lead, nseg]``.

    Raises:
        ConfigError: as :func:`quantize`.
    """
    q, scale = torch.ops.segquant.quantize_dynamic(x, list(segments), qtype, smooth)
    return q, scale


def quantize_dual(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    *,
    qtype: str,
    segments: Sequence[int] = (),
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """DualScale quantization (``segquant::quantize_dual``).

    The positive part ``max(x', 0)`` goes to ``[0, qmax]`` with ``scale_pos``, the negative part
    ``min(x', 0)`` to ``[qmin, 0]`` with ``scale_neg`` (both scales positive), ``x' = x / smooth``.
    By convention ``scale_pos = max(x+) / qmax`` and ``scale_neg = max(|x-|) / |qmin|``; see
    :func:`dual_scales_from_minmax`.

    Args:
        x: Float tensor ``[*lead, K]``.
        scale_pos: Scale of the positive half, broadcastable to ``[*lead, nseg]``.
        scale_neg: Scale of the negative half, broadcastable to ``[*lead, nseg]``.
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        segments: Segment sizes summing to K; empty for one segment.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        ``cat([Q+, Q-], -1)``: ``[*lead, 2K]`` (int8, fp8), or ``[*lead, K]`` for int4 (each half
        packed separately).

    Raises:
        ConfigError: as :func:`quantize`.
    """
    return torch.ops.segquant.quantize_dual(x, scale_pos, scale_neg, list(segments), qtype, smooth)


def qlinear(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    x_qtype: str,
    w_qtype: str,
    x_segments: Sequence[int] = (),
    w_segments: Sequence[int] = (),
    bias: torch.Tensor | None = None,
    dual: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantized linear (``segquant::qlinear``): ``Y = dequant(qx) @ dequant(qw)^T + bias``.

    Integer x integer is computed as exact integer GEMMs over the common refinement of the
    activation and weight segments, rescaled per piece in float32. With ``dual=True`` the
    positive and negative halves of ``qx`` (from :func:`quantize_dual`) are two GEMMs against the
    same weight. ``x_qtype="none"`` means ``qx`` is a float activation (weight-only).

    Args:
        qx: Quantized activation ``[*lead, K]`` (int4: ``K / 2``; dual: twice that), or float.
        x_scale: Broadcastable to ``[*lead, nseg_x]`` (dual: ``[*lead, 2 * nseg_x]``, positive
            scales first); ignored for ``x_qtype="none"``.
        qw: Quantized weight ``[N, K]`` (int4: ``[N, K / 2]``).
        w_scale: Broadcastable to ``[N, nseg_w]``.
        x_qtype: ``"int8"``, ``"int4"``, ``"fp8_e4m3"`` or ``"none"``.
        w_qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``; int activations need int weights, fp8
            activations fp8 weights.
        x_segments: Activation segment sizes along K.
        w_segments: Weight segment sizes along K (``[g] * (K // g)`` for group-wise).
        bias: Optional ``[N]`` float bias.
        dual: Whether ``qx`` holds DualScale halves.
        out_dtype: Float dtype of the result.

    Returns:
        ``[*lead, N]`` tensor of ``out_dtype``.

    Raises:
        ConfigError: unknown or incompatible qtypes, K mismatch, bad segments, scale or bias.
    """
    return torch.ops.segquant.qlinear(
        qx, x_scale, list(x_segments), x_qtype, qw, w_scale, list(w_segments), w_qtype, bias, dual, out_dtype
    )


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    qtype: str,
    segments: Sequence[int] = (),
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize in one op (``segquant::fake_quantize``), for research mode.

    Bit-identical to ``dequantize(quantize(x, ...), ..., out_dtype=x.dtype)``. With ``smooth`` the
    result is in the smoothed domain ``x / smooth``.

    Args:
        x: Float tensor ``[*lead, K]``.
        scale: Dequant scale broadcastable to ``[*lead, nseg]``.
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        segments: Segment sizes summing to K; empty for one segment.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Raises:
        ConfigError: as :func:`quantize`.
    """
    return torch.ops.segquant.fake_quantize(x, scale, list(segments), qtype, smooth)


def fake_quantize_dual(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    *,
    qtype: str,
    segments: Sequence[int] = (),
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """DualScale quantize-dequantize (``segquant::fake_quantize_dual``): ``x_hat+ + x_hat-``.

    ``x_hat+ = Q+ * scale_pos`` and ``x_hat- = Q- * scale_neg`` as in :func:`quantize_dual`.

    Args:
        x: Float tensor ``[*lead, K]``.
        scale_pos: Scale of the positive half, broadcastable to ``[*lead, nseg]``.
        scale_neg: Scale of the negative half, broadcastable to ``[*lead, nseg]``.
        qtype: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        segments: Segment sizes summing to K; empty for one segment.
        smooth: Optional SmoothQuant divisor ``[K]``.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Raises:
        ConfigError: as :func:`quantize`.
    """
    return torch.ops.segquant.fake_quantize_dual(x, scale_pos, scale_neg, list(segments), qtype, smooth)
