"""Quantized formats of the ``segquant`` op set: qtype names, ranges, int4 packing, segments, scales.

Everything here is pure PyTorch and shared by the reference kernels, the fake (meta) kernels and
the callers that compute scales from calibration statistics.

Qtypes:

========== ======================= ============ =========== =====================================
name       storage dtype           range        ``qmax``    notes
========== ======================= ============ =========== =====================================
int8       ``torch.int8``          [-128, 127]  127         symmetric: scale = amax / 127
int4       ``torch.uint8`` packed  [-8, 7]      7           two per byte along the last dim,
                                                            low nibble = even element
fp8_e4m3   ``torch.float8_e4m3fn`` [-448, 448]  448         cast with round-to-nearest-even
========== ======================= ============ =========== =====================================

Segments are sizes along the last dim; an empty list means one segment covering the whole dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from segquant_fx.errors import ConfigError

__all__ = [
    "QTypeInfo",
    "QTYPES",
    "AMAX_FLOOR",
    "qtype_info",
    "check_int4_last_dim",
    "storage_dtype",
    "storage_last_dim",
    "logical_last_dim",
    "pack_int4",
    "unpack_int4",
    "num_segments",
    "normalize_segments",
    "segment_offsets",
    "segment_index",
    "refine_segments",
    "scale_from_amax",
    "dual_scales_from_minmax",
]

#: Smallest amax used to compute a scale, so that all-zero rows give a finite, positive scale.
AMAX_FLOOR: float = 2.0**-24


@dataclass(frozen=True)
class QTypeInfo:
    """Static description of one quantized format.

    Attributes:
        name: The qtype string used in op schemas (``"int8"``, ``"int4"``, ``"fp8_e4m3"``).
        storage_dtype: dtype of the tensors that hold quantized values.
        qmin: Smallest representable value.
        qmax: Largest representable value; symmetric scales divide the amax by it.
        is_float: True for floating-point formats (no rounding to integers, cast instead).
        per_byte: Quantized values stored per storage element (2 for packed int4, else 1).
    """

    name: str
    storage_dtype: torch.dtype
    qmin: float
    qmax: float
    is_float: bool
    per_byte: int

    @property
    def neg_range(self) -> float:
        """``|qmin|``: the divisor of the negative DualScale scale (128, 8 or 448)."""
        return -self.qmin


_QTYPES: dict[str, QTypeInfo] = {
    "int8": QTypeInfo("int8", torch.int8, -128.0, 127.0, False, 1),
    "int4": QTypeInfo("int4", torch.uint8, -8.0, 7.0, False, 2),
    "fp8_e4m3": QTypeInfo("fp8_e4m3", torch.float8_e4m3fn, -448.0, 448.0, True, 1),
}

#: Names of the quantized formats, in a stable order.
QTYPES: tuple[str, ...] = tuple(_QTYPES)


def qtype_info(qtype: str, *, op: str = "segquant") -> QTypeInfo:
    """Look up a qtype by name.

    Args:
        qtype: One of :data:`QTYPES`.
        op: Name used as the error-message prefix (the op being validated).

    Returns:
        The :class:`QTypeInfo` of ``qtype``.

    Raises:
        ConfigError: ``qtype`` is not a known name.

    Example:
        >>> qtype_info("int4").qmax
        7.0
    """
    info = _QTYPES.get(qtype) if isinstance(qtype, str) else None
    if info is None:
        raise ConfigError(f"{op}: unknown qtype {qtype!r}; use one of {', '.join(map(repr, QTYPES))}")
    return info


def storage_dtype(qtype: str) -> torch.dtype:
    """Return the dtype that stores values of ``qtype`` (``torch.uint8`` for packed int4)."""
    return qtype_info(qtype).storage_dtype


def storage_last_dim(k: int, qtype: str) -> int:
    """Return the stored last-dim size of ``k`` logical values (``k // 2`` for int4)."""
    return k // qtype_info(qtype).per_byte


def logical_last_dim(stored: int, qtype: str) -> int:
    """Return the logical last-dim size of ``stored`` storage elements (``2 * stored`` for int4)."""
    return stored * qtype_info(qtype).per_byte


def check_int4_last_dim(k: int, *, op: str = "segquant") -> None:
    """Check that a logical last dim of ``k`` int4 values can be packed two per byte.

    Raises:
        ConfigError: ``k`` is odd.
    """
    torch._check_with(
        ConfigError,
        k % 2 == 0,
        lambda: (
            f"{op}: int4 values are packed two per byte along the last dim, which must be even, "
            f"got last dim {k}; pad the last dim to an even size or use int8"
        ),
    )


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    # int16 detour: '& 0xF' of a negative int8 gives its two's-complement low nibble.
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    # Sign-extend 4-bit two's complement: (v ^ 8) - 8 maps 0..7 -> 0..7 and 8..15 -> -8..-1.
    lo = (lo ^ 8) - 8
    hi = (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values, two per byte along the last dim.

    Element ``2i`` goes to the low nibble and element ``2i + 1`` to the high nibble of byte ``i``,
    both in 4-bit two's complement.

    Args:
        q: ``torch.int8`` tensor with values in [-8, 7] and an even last dim.

    Returns:
        ``torch.uint8`` tensor of shape ``[*q.shape[:-1], q.shape[-1] // 2]``.

    Raises:
        ConfigError: wrong dtype, odd last dim, or a value outside [-8, 7].

    Example:
        >>> pack_int4(torch.tensor([1, -1], dtype=torch.int8))
        tensor([241], dtype=torch.uint8)
    """
    if q.dtype != torch.int8:
        raise ConfigError(f"pack_int4: expected a torch.int8 tensor, got {q.dtype}; quantize first")
    if q.dim() == 0:
        raise ConfigError("pack_int4: expected a tensor with at least one dim, got a 0-dim tensor")
    check_int4_last_dim(q.shape[-1], op="pack_int4")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ConfigError(
            f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]; clamp first"
        )
    return _pack_int4(q)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Unpack bytes produced by :func:`pack_int4` into ``torch.int8`` values in [-8, 7].

    Args:
        p: ``torch.uint8`` tensor.

    Returns:
        ``torch.int8`` tensor of shape ``[*p.shape[:-1], 2 * p.shape[-1]]``.

    Raises:
        ConfigError: ``p`` is not ``torch.uint8`` or is 0-dim.

    Example:
        >>> unpack_int4(torch.tensor([241], dtype=torch.uint8))
        tensor([ 1, -1], dtype=torch.int8)
    """
    if p.dtype != torch.uint8:
        raise ConfigError(f"unpack_int4: expected packed torch.uint8 storage, got {p.dtype}")
    if p.dim() == 0:
        raise ConfigError("unpack_int4: expected a tensor with at least one dim, got a 0-dim tensor")
    return _unpack_int4(p)


def num_segments(segments: Sequence[int]) -> int:
    """Return ``max(len(segments), 1)``: an empty list is one segment."""
    return max(len(segments), 1)


def normalize_segments(segments: Sequence[int], k: int, *, op: str = "segquant") -> tuple[int, ...]:
    """Validate a segment list against a last-dim size and return it as explicit sizes.

    Args:
        segments: Segment sizes along the last dim; empty means one segment of size ``k``.
        k: Size of the (logical, unpacked) last dim.
        op: Name used as the error-message prefix.

    Returns:
        A tuple of positive sizes summing to ``k`` (``(k,)`` for an empty list).

    Raises:
        ConfigError: a size is not positive (an empty list with ``k == 0`` too), or the sizes do
            not sum to ``k``.

    Example:
        >>> normalize_segments([], 8)
        (8,)
        >>> normalize_segments([2, 6], 8)
        (2, 6)
    """
    sizes = (k,) if len(segments) == 0 else tuple(segments)
    for s in sizes:
        # torch._check_with accepts SymInt comparisons, so fake kernels can share this check.
        torch._check_with(
            ConfigError,
            s > 0,
            lambda: (
                f"{op}: segment sizes must be positive (and the last dim non-empty), "
                f"got segments={list(segments)} for last dim {k}"
            ),
        )
    total = sum(sizes)
    torch._check_with(
        ConfigError,
        total == k,
        lambda: (
            f"{op}: segments={list(segments)} sum to {total} but the last dim is {k}; "
            f"the segment sizes must sum to the last dim (pass [] for a single segment)"
        ),
    )
    return sizes


def segment_offsets(segments: Sequence[int]) -> tuple[int, ...]:
    """Return the boundaries ``(0, s0, s0 + s1, ..., K)`` of explicit segment sizes."""
    out = [0]
    for s in segments:
        out.append(out[-1] + int(s))
    return tuple(out)


def segment_index(segments: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Return the ``int64`` tensor mapping each last-dim position ``j`` to its segment ``seg(j)``.

    Args:
        segments: Explicit (non-empty) segment sizes.
        device: Device of the result.

    Example:
        >>> segment_index([1, 3]).tolist()
        [0, 1, 1, 1]
    """
    sizes = torch.tensor([int(s) for s in segments], dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(segments), device=device), sizes)


def refine_segments(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Return the common refinement of two explicit segmentations of the same dim.

    Args:
        a: Explicit segment sizes (for example the activation segments).
        b: Explicit segment sizes (for example the weight segments), same total as ``a``.

    Returns:
        Pieces ``(start, stop, ia, ib)`` in increasing order, where ``[start, stop)`` lies inside
        segment ``ia`` of ``a`` and segment ``ib`` of ``b``.

    Raises:
        ConfigError: the totals differ.

    Example:
        >>> refine_segments([2, 2], [1, 3])
        [(0, 1, 0, 0), (1, 2, 0, 1), (2, 4, 1, 1)]
    """
    oa, ob = segment_offsets(a), segment_offsets(b)
    if oa[-1] != ob[-1]:
        raise ConfigError(
            f"refine_segments: totals differ ({oa[-1]} vs {ob[-1]}) for {list(a)} and {list(b)}"
        )
    cuts = sorted(set(oa) | set(ob))
    pieces = []
    ia = ib = 0
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        while oa[ia + 1] <= start:
            ia += 1
        while ob[ib + 1] <= start:
            ib += 1
        pieces.append((start, stop, ia, ib))
    return pieces


def scale_from_amax(amax: torch.Tensor | float, qtype: str) -> torch.Tensor:
    """Symmetric dequant scale from an absolute maximum: ``max(amax, 2^-24) / qmax``.

    ``qmax`` is 127 for int8, 7 for int4 and 448 for fp8_e4m3.

    Args:
        amax: Absolute maxima (any shape); NaN stays NaN.
        qtype: Target qtype.

    Returns:
        float32 scales of ``amax``'s shape.

    Example:
        >>> scale_from_amax(torch.tensor([127.0, 0.0]), "int8").tolist()
        [1.0, 4.693279098688663e-10]
    """
    info = qtype_info(qtype, op="scale_from_amax")
    amax_t = torch.clamp(torch.as_tensor(amax).to(torch.float32), min=AMAX_FLOOR)
    # elementwise IEEE division: CUDA divides by a Python scalar as a multiply by its reciprocal,
    # which is 1 ulp off for some values and would make the CPU and CUDA references disagree
    return amax_t / torch.full_like(amax_t, float(info.qmax))


def dual_scales_from_minmax(
    pos_max: torch.Tensor | float, neg_min: torch.Tensor | float, qtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """DualScale dequant scales from the positive maximum and the negative minimum.

    ``scale_pos = max(pos_max, 2^-24) / qmax`` and ``scale_neg = max(|neg_min|, 2^-24) / |qmin|``,
    with ``|qmin|`` = 128 (int8), 8 (int4), 448 (fp8_e4m3). So ``x = neg_min`` quantizes to
    exactly ``qmin`` and ``x = pos_max`` to exactly ``qmax``.

    Args:
        pos_max: Maximum of the positive part ``max(x, 0)``.
        neg_min: Minimum of the negative part ``min(x, 0)`` (a value <= 0; its magnitude is used).
        qtype: Target qtype.

    Returns:
        ``(scale_pos, scale_neg)``, float32, both positive.

    Example:
        >>> [s.item() for s in dual_scales_from_minmax(1.27, -2.56, "int8")]
        [0.009999999776482582, 0.019999999552965164]
    """
    info = qtype_info(qtype, op="dual_scales_from_minmax")
    pos = torch.clamp(torch.as_tensor(pos_max).to(torch.float32), min=AMAX_FLOOR)
    neg = torch.clamp(torch.as_tensor(neg_min).to(torch.float32).abs(), min=AMAX_FLOOR)
    pos = pos / torch.full_like(pos, float(info.qmax))  # elementwise division, as in scale_from_amax
    neg = neg / torch.full_like(neg, float(info.neg_range))
    return pos, neg
