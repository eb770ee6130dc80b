"""ctypes binding of ``libsegquant_kernels.so`` and registration of the CUDA implementations.

:mod:`segquant_fx.ops.library` imports this module on the first CUDA call of a ``segquant`` op. On
import it loads the kernel library (see :func:`candidate_paths` for the search order), checks its
API version, and calls :func:`~segquant_fx.ops.library.register_cuda_impl` for ``quantize``,
``quantize_dynamic``, ``quantize_dual`` and (when the library has ``sq_gemm``) ``qlinear``.
Importing never fails: without CUDA or without the library nothing is registered and
:func:`unavailable_reason` says why.

Each implementation validates its arguments with the reference's shared checks
(``reference.infer_<op>``), so errors are the same :class:`~segquant_fx.errors.ConfigError` as on
CPU; then it runs the kernel on the current CUDA stream, or, for a case the library does not cover,
the reference implementation with one ``RuntimeWarning`` per (op, reason). What runs where:

* ``quantize`` / ``quantize_dynamic`` / ``quantize_dual``: CUDA for bf16/fp16/fp32 inputs, int8 /
  int4 / fp8_e4m3, any scale broadcastable to ``[*lead, nseg]``, up to 64 segments, with or without
  ``smooth``. Falls back for float64 inputs and more than 64 segments.
* ``qlinear``: CUDA (``sq_gemm``, sm_90 only) for int8 x int8 and fp8 x fp8, not DualScale, one
  segment for both the activation and the weight (so the scales are per tensor / per token and per
  tensor / per output channel), ``K % 16 == 0``, ``N % 8 == 0``, bf16/fp16 output (what the library
  reports it supports). Everything else (int4, weight-only, DualScale, segmented scales,
  group-wise weights, float32/float64 output, other GPUs) falls back.

Library search order: ``$SEGQUANT_KERNELS_LIB``; ``<repo>/kernels_cuda/build/libsegquant_kernels.so``
(the stable copy written by ``segquant-fx build-kernels``); the newest
``<repo>/kernels_cuda/build/<hash>/libsegquant_kernels.so``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from segquant_fx.errors import ConfigError, SegQuantError
from segquant_fx.ops import reference as _ref
from segquant_fx.ops.formats import QTypeInfo, segment_offsets

__all__ = [
    "ENV_LIBRARY",
    "API_VERSION",
    "MAX_SEGMENTS",
    "KernelLaunchError",
    "SqSegments",
    "SqScale",
    "candidate_paths",
    "library_path",
    "is_available",
    "unavailable_reason",
    "has_gemm",
    "registered_ops",
    "reset_fallback_warnings",
    "quantize_out",
    "quantize_dynamic_out",
    "quantize_dual_out",
    "qlinear_out",
    "qlinear_route",
    "GemmRoute",
    "has_segmented_gemm",
    "has_unpack_int4",
    "has_sm80_gemm",
    "set_gemm_path",
    "gemm_path",
    "current_gemm_path",
    "GEMM_PATHS",
    "COMPATIBLE_API_VERSIONS",
    "SEG_TILE_K",
    "qlinear_unsupported_reason",
    "quantize_unsupported_reason",
]

#: Environment variable naming the library file to load (first in the search order).
ENV_LIBRARY = "SEGQUANT_KERNELS_LIB"
#: The ``SQ_API_VERSION`` this binding was written for.
API_VERSION = 2
#: Library API versions this binding loads (2 only adds ``sq_set_gemm_path`` and the sm_80 / sm_89 GEMMs).
COMPATIBLE_API_VERSIONS = (1, 2)
#: ``sq_gemm_path`` values of :func:`set_gemm_path`.
GEMM_PATHS = {"auto": 0, "sm90": 1, "sm80": 2}
#: ``SQ_MAX_SEGMENTS`` of the C API.
MAX_SEGMENTS = 64
LIBRARY_NAME = "libsegquant_kernels.so"

# sq_status
SQ_OK, SQ_ERR_INVALID, SQ_ERR_UNSUPPORTED, SQ_ERR_CUDA, SQ_ERR_ARCH = 0, 1, 2, 3, 4
# sq_dtype
SQ_INT8, SQ_INT4, SQ_FP8E4M3, SQ_BF16, SQ_FP16, SQ_FP32 = 0, 1, 2, 10, 11, 12

_X_DTYPES = {torch.bfloat16: SQ_BF16, torch.float16: SQ_FP16, torch.float32: SQ_FP32}
_Q_DTYPES = {"int8": SQ_INT8, "int4": SQ_INT4, "fp8_e4m3": SQ_FP8E4M3}
_OUT_DTYPES = {torch.bfloat16: SQ_BF16, torch.float16: SQ_FP16, torch.float32: SQ_FP32}


class KernelLaunchError(SegQuantError, RuntimeError):
    """A kernel of ``libsegquant_kernels.so`` rejected its arguments or failed to launch."""


class SqSegments(ctypes.Structure):
    """``sq_segments``: ``n`` and ``offsets[SQ_MAX_SEGMENTS + 1]`` (passed by value)."""

    _fields_ = [("n", ctypes.c_int32), ("offsets", ctypes.c_int32 * (MAX_SEGMENTS + 1))]


class SqScale(ctypes.Structure):
    """``sq_scale``: float32 pointer, row stride and segment stride (elements; 0 = broadcast)."""

    _fields_ = [("ptr", ctypes.c_void_p), ("row_stride", ctypes.c_int64), ("seg_stride", ctypes.c_int64)]


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_reason: str | None = None
_has_gemm = False
_has_seg_gemm = False
_has_unpack = False
_has_gemm_path = False
_current_path = "auto"  # the sq_set_gemm_path setting, mirrored (set_gemm_path)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def candidate_paths() -> list[Path]:
    """Library files tried, in order: ``$SEGQUANT_KERNELS_LIB``, the stable copy, the newest cached build."""
    out: list[Path] = []
    env = os.environ.get(ENV_LIBRARY)
    if env:
        out.append(Path(env))
    build_dir = _repo_root() / "kernels_cuda" / "build"
    out.append(build_dir / LIBRARY_NAME)
    cached = sorted(
        (p for p in build_dir.glob(f"*/{LIBRARY_NAME}") if p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    out.extend(cached)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_i64, c_vp, c_sz = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t
    lib.sq_api_version.restype = c_int
    lib.sq_api_version.argtypes = []
    lib.sq_status_string.restype = ctypes.c_char_p
    lib.sq_status_string.argtypes = [c_int]
    lib.sq_last_error.restype = ctypes.c_char_p
    lib.sq_last_error.argtypes = []
    lib.sq_quantize.restype = c_int
    lib.sq_quantize.argtypes = [c_vp, c_int, c_vp, c_int, c_i64, c_i64, SqScale, SqSegments, c_vp, c_vp]
    lib.sq_quantize_dynamic.restype = c_int
    lib.sq_quantize_dynamic.argtypes = [c_vp, c_int, c_vp, c_int, c_vp, c_i64, c_i64, SqSegments, c_vp, c_vp]
    lib.sq_quantize_dual.restype = c_int
    lib.sq_quantize_dual.argtypes = [
        c_vp,
        c_int,
        c_vp,
        c_int,
        c_i64,
        c_i64,
        SqScale,
        SqScale,
        SqSegments,
        c_vp,
        c_vp,
    ]
    if hasattr(lib, "sq_gemm") and hasattr(lib, "sq_gemm_workspace_size"):
        lib.sq_gemm_workspace_size.restype = c_sz
        lib.sq_gemm_workspace_size.argtypes = [c_int, c_int, c_i64, c_i64, c_i64]
        lib.sq_gemm.restype = c_int
        lib.sq_gemm.argtypes = [
            c_vp,
            c_vp,
            c_int,
            c_vp,
            c_int,
            c_i64,
            c_i64,
            c_i64,
            c_vp,
            c_vp,
            c_vp,
            c_vp,
            c_sz,
            c_vp,
        ]
    if hasattr(lib, "sq_gemm_segmented") and hasattr(lib, "sq_gemm_segmented_workspace_size"):
        lib.sq_gemm_segmented_workspace_size.restype = c_sz
        lib.sq_gemm_segmented_workspace_size.argtypes = [c_int, c_int, c_i64, c_i64, c_i64, ctypes.c_int32]
        lib.sq_gemm_segmented.restype = c_int
        lib.sq_gemm_segmented.argtypes = [
            c_vp,  # A
            c_vp,  # B
            c_int,  # ab_dtype
            c_vp,  # D
            c_int,  # out_dtype
            c_i64,  # M
            c_i64,  # N
            c_i64,  # K
            ctypes.c_int32,  # halves
            SqSegments,  # segs
            c_vp,  # seg_scale
            c_vp,  # row_scale
            c_vp,  # col_scale
            c_vp,  # bias
            c_vp,  # workspace
            c_sz,  # workspace_size
            c_vp,  # stream
        ]

    if hasattr(lib, "sq_unpack_int4"):
        lib.sq_unpack_int4.restype = c_int
        lib.sq_unpack_int4.argtypes = [c_vp, c_vp, c_i64, c_i64, c_vp]
    if hasattr(lib, "sq_set_gemm_path"):
        lib.sq_set_gemm_path.restype = c_int
        lib.sq_set_gemm_path.argtypes = [c_int]


def _load() -> None:
    global _lib, _lib_path, _reason, _has_gemm, _has_seg_gemm, _has_unpack, _has_gemm_path
    _lib, _lib_path, _has_gemm, _has_seg_gemm, _has_unpack = None, None, False, False, False
    _has_gemm_path = False
    errors: list[str] = []
    for path in candidate_paths():
        if not path.is_file():
            errors.append(f"{path}: not found")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        missing = [
            s
            for s in ("sq_api_version", "sq_status_string", "sq_last_error", "sq_quantize")
            if not hasattr(lib, s)
        ]
        if missing:
            errors.append(f"{path}: missing symbols {', '.join(missing)}")
            continue
        lib.sq_api_version.restype = ctypes.c_int
        version = lib.sq_api_version()
        if version not in COMPATIBLE_API_VERSIONS:
            errors.append(
                f"{path}: sq_api_version() = {version}, this binding loads {list(COMPATIBLE_API_VERSIONS)}; rebuild"
            )
            continue
        _declare(lib)
        _lib, _lib_path = lib, path
        _has_gemm = hasattr(lib, "sq_gemm")
        _has_seg_gemm = hasattr(lib, "sq_gemm_segmented")
        _has_unpack = hasattr(lib, "sq_unpack_int4")
        _has_gemm_path = hasattr(lib, "sq_set_gemm_path")
        _reason = None
        return
    _reason = (
        "libsegquant_kernels.so could not be loaded ("
        + "; ".join(errors[:4])
        + "); build it with `segquant-fx build-kernels` or set "
        + ENV_LIBRARY
    )


def library_path() -> Path | None:
    """The loaded library file, or None."""
    return _lib_path


def is_available() -> bool:
    """Whether the library is loaded and a CUDA device is visible."""
    return _lib is not None and torch.cuda.is_available()


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (None when it is True)."""
    if _lib is None:
        return _reason or "libsegquant_kernels.so is not loaded"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


def has_gemm() -> bool:
    """Whether the loaded library has ``sq_gemm`` (the qlinear kernel)."""
    return _lib is not None and _has_gemm


def has_unpack_int4() -> bool:
    """Whether the loaded library has ``sq_unpack_int4`` (the W4A8 / W4A4 path of qlinear)."""
    return _lib is not None and _has_unpack


def has_segmented_gemm() -> bool:
    """Whether the loaded library has ``sq_gemm_segmented`` (input-segmented and DualScale qlinear)."""
    return _lib is not None and _has_seg_gemm


def has_sm80_gemm() -> bool:
    """Whether the loaded library has the CUTLASS 2 GEMM path (sm_80+; API version 2, ``sq_set_gemm_path``)."""
    return _lib is not None and _has_gemm_path


def set_gemm_path(path: str) -> str:
    """Choose the library's GEMM implementation for this process; returns the previous choice.

    Args:
        path: ``"auto"`` (sm_90 runs the sm_90a kernels, sm_80..sm_89 the CUTLASS 2 kernels), ``"sm80"``
            (the CUTLASS 2 kernels everywhere, also on Hopper: how tests/gpu checks them on an H100) or
            ``"sm90"`` (only the sm_90a kernels).

    Raises:
        KernelLaunchError: the library is not loaded or predates the switch (API version 1).
        ConfigError: ``path`` is not one of the names above.
    """
    global _current_path
    if path not in GEMM_PATHS:
        raise ConfigError(f"unknown GEMM path {path!r}; use one of {sorted(GEMM_PATHS)}")
    lib = _require_lib("set_gemm_path")
    if not _has_gemm_path:
        raise KernelLaunchError(f"{_lib_path} has no sq_set_gemm_path (API version 1); rebuild the kernels")
    prev = int(lib.sq_set_gemm_path(GEMM_PATHS[path]))
    _current_path = path
    return {v: k for k, v in GEMM_PATHS.items()}.get(prev, "auto")


@contextlib.contextmanager
def gemm_path(path: str) -> Iterator[None]:
    """Run the block with :func:`set_gemm_path` ``(path)``, restoring the previous choice after."""
    prev = set_gemm_path(path)
    try:
        yield
    finally:
        set_gemm_path(prev)


def current_gemm_path() -> str:
    """The library's GEMM path setting (``"auto"`` unless :func:`set_gemm_path` changed it)."""
    return _current_path


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def reset_fallback_warnings() -> None:
    """Forget which (op, reason) fallback warnings were shown (tests)."""
    with _warn_lock:
        _warned.clear()


def _warn_fallback(op: str, reason: str, key: str | None = None) -> None:
    key_t = (op, key if key is not None else reason)
    with _warn_lock:
        if key_t in _warned:
            return
        _warned.add(key_t)
    warnings.warn(
        f"segquant::{op}: the CUDA kernel library does not cover this case ({reason}); using the pure-PyTorch "
        f"reference (slow). Shown once per op and reason.",
        RuntimeWarning,
        stacklevel=4,
    )


def _text(b: bytes | None) -> str:
    return b.decode(errors="replace") if b else ""


def _status_text(status: int) -> str:
    assert _lib is not None
    return f"{_text(_lib.sq_status_string(status))}: {_text(_lib.sq_last_error())}"


def _check(status: int, op: str) -> None:
    if status != SQ_OK:
        raise KernelLaunchError(f"segquant::{op}: the CUDA kernel failed: {_status_text(status)}")


@functools.lru_cache(maxsize=256)
def _segments_struct(sizes: tuple[int, ...]) -> SqSegments:
    s = SqSegments()
    s.n = len(sizes)
    for i, off in enumerate(segment_offsets(sizes)):
        s.offsets[i] = off
    return s


def _aligned(t: torch.Tensor, align: int = 16) -> torch.Tensor:
    """Contiguous, with a data pointer aligned to ``align`` bytes (copies only when needed)."""
    t = t.contiguous()
    if t.data_ptr() % align:
        t = t.clone()
    return t


def _stream(device: torch.device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _scale_struct(
    scale: torch.Tensor, lead: Sequence[int], nseg: int, device: torch.device
) -> tuple[SqScale, torch.Tensor]:
    """``sq_scale`` for a scale broadcastable to ``[*lead, nseg]`` (and the tensor to keep alive)."""
    s = scale.to(device=device, dtype=torch.float32)
    if s.numel() == 1:
        s = s.reshape(1)
        return SqScale(s.data_ptr(), 0, 0), s
    rows = math.prod(lead)
    s2 = torch.broadcast_to(s, (*lead, nseg)).reshape(rows, nseg)  # a view when the strides allow
    return SqScale(s2.data_ptr(), s2.stride(0), s2.stride(1)), s2


def _smooth_arg(smooth: torch.Tensor | None, device: torch.device) -> tuple[int | None, torch.Tensor | None]:
    if smooth is None:
        return None, None
    sm = _aligned(smooth.to(device=device, dtype=torch.float32))
    return sm.data_ptr(), sm


def _require_lib(op: str) -> ctypes.CDLL:
    if _lib is None:
        raise KernelLaunchError(f"segquant::{op}: {unavailable_reason()}")
    return _lib


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_guard(device: torch.device) -> Any:
    # The library's (static) CUDA runtime uses the calling thread's current context: make it the
    # tensor's device. One device: nothing to switch.
    if torch.cuda.device_count() > 1:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# quantize ops
# --------------------------------------------------------------------------------------------------


def quantize_unsupported_reason(x: torch.Tensor, sizes: Sequence[int]) -> str | None:
    """Why the quantize kernels cannot run ``x`` with ``sizes`` (None when they can)."""
    if x.device.type != "cuda":
        return f"x is on {x.device}, not a CUDA device"
    if x.dtype not in _X_DTYPES:
        return f"x dtype {x.dtype} (the kernels read bfloat16, float16 and float32)"
    if len(sizes) > MAX_SEGMENTS:
        return f"{len(sizes)} segments (the kernels handle at most {MAX_SEGMENTS})"
    if x.shape[-1] >= 2**31:
        return f"last dim {x.shape[-1]} >= 2^31"
    return None


def quantize_out(
    out: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    sizes: Sequence[int],
    info: QTypeInfo,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``sq_quantize`` into ``out`` (contiguous, the op's output shape and dtype); no fallback.

    Arguments must already be validated (``reference.infer_quantize``) and supported
    (:func:`quantize_unsupported_reason` is None).

    Raises:
        KernelLaunchError: the library is missing or the kernel failed.
    """
    lib = _require_lib("quantize")
    if out.numel() == 0:
        return out
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    xc = _aligned(x)
    sc, _keep_scale = _scale_struct(scale, lead, len(sizes), x.device)
    sm_ptr, _keep_smooth = _smooth_arg(smooth, x.device)
    with _device_guard(x.device):
        status = lib.sq_quantize(
            xc.data_ptr(),
            _X_DTYPES[x.dtype],
            out.data_ptr(),
            _Q_DTYPES[info.name],
            math.prod(lead),
            k,
            sc,
            _segments_struct(tuple(sizes)),
            sm_ptr,
            _stream(x.device),
        )
    _check(status, "quantize")
    return out


def quantize_dynamic_out(
    out: torch.Tensor,
    scale_out: torch.Tensor,
    x: torch.Tensor,
    sizes: Sequence[int],
    info: QTypeInfo,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``sq_quantize_dynamic`` into ``out`` and ``scale_out`` (float32 ``[*lead, nseg]``); no fallback."""
    lib = _require_lib("quantize_dynamic")
    if out.numel() == 0:
        return out, scale_out
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    xc = _aligned(x)
    sm_ptr, _keep_smooth = _smooth_arg(smooth, x.device)
    with _device_guard(x.device):
        status = lib.sq_quantize_dynamic(
            xc.data_ptr(),
            _X_DTYPES[x.dtype],
            out.data_ptr(),
            _Q_DTYPES[info.name],
            scale_out.data_ptr(),
            math.prod(lead),
            k,
            _segments_struct(tuple(sizes)),
            sm_ptr,
            _stream(x.device),
        )
    _check(status, "quantize_dynamic")
    return out, scale_out


def quantize_dual_out(
    out: torch.Tensor,
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    sizes: Sequence[int],
    info: QTypeInfo,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``sq_quantize_dual`` into ``out``; no fallback."""
    lib = _require_lib("quantize_dual")
    if out.numel() == 0:
        return out
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    xc = _aligned(x)
    sp, _keep_pos = _scale_struct(scale_pos, lead, len(sizes), x.device)
    sn, _keep_neg = _scale_struct(scale_neg, lead, len(sizes), x.device)
    sm_ptr, _keep_smooth = _smooth_arg(smooth, x.device)
    with _device_guard(x.device):
        status = lib.sq_quantize_dual(
            xc.data_ptr(),
            _X_DTYPES[x.dtype],
            out.data_ptr(),
            _Q_DTYPES[info.name],
            math.prod(lead),
            k,
            sp,
            sn,
            _segments_struct(tuple(sizes)),
            sm_ptr,
            _stream(x.device),
        )
    _check(status, "quantize_dual")
    return out


def _quantize_impl(
    x: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    sizes, info, shape = _ref.infer_quantize(x, scale, segments, qtype, smooth)
    reason = quantize_unsupported_reason(x, sizes)
    if reason is not None:
        _warn_fallback("quantize", reason)
        return _ref.reference_quantize(x, scale, segments, qtype, smooth)
    out = torch.empty(shape, dtype=info.storage_dtype, device=x.device)
    return quantize_out(out, x, scale, sizes, info, smooth)


def _quantize_dynamic_impl(
    x: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes, info, q_shape, s_shape = _ref.infer_quantize_dynamic(x, segments, qtype, smooth)
    reason = quantize_unsupported_reason(x, sizes)
    if reason is not None:
        _warn_fallback("quantize_dynamic", reason)
        return _ref.reference_quantize_dynamic(x, segments, qtype, smooth)
    out = torch.empty(q_shape, dtype=info.storage_dtype, device=x.device)
    scale_out = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    return quantize_dynamic_out(out, scale_out, x, sizes, info, smooth)


def _quantize_dual_impl(
    x: torch.Tensor,
    scale_pos: torch.Tensor,
    scale_neg: torch.Tensor,
    segments: Sequence[int],
    qtype: str,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    sizes, info, shape = _ref.infer_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth)
    reason = quantize_unsupported_reason(x, sizes)
    if reason is not None:
        _warn_fallback("quantize_dual", reason)
        return _ref.reference_quantize_dual(x, scale_pos, scale_neg, segments, qtype, smooth)
    out = torch.empty(shape, dtype=info.storage_dtype, device=x.device)
    return quantize_dual_out(out, x, scale_pos, scale_neg, sizes, info, smooth)


# --------------------------------------------------------------------------------------------------
# qlinear
# --------------------------------------------------------------------------------------------------


#: Segment boundaries (and K) of ``sq_gemm_segmented`` must be multiples of this (its tile K).
SEG_TILE_K = 64


@dataclasses.dataclass(frozen=True)
class GemmRoute:
    """How a supported ``qlinear`` call runs on the library.

    Attributes:
        kind: ``"plain"`` (``sq_gemm``: per-token x per-channel scales) or ``"segmented"``
            (``sq_gemm_segmented``: per-segment activation scales along K, DualScale halves).
        halves: 2 for DualScale, else 1.
        segments: Activation segment sizes of one half (``segmented`` only).
        row_scale: Whether the activation scale varies per token (goes to the epilogue's row scale).
        unpack_x: The activation is packed int4: unpacked to int8 scratch before the int8 GEMM.
        unpack_w: The weight is packed int4 (W4A8 / W4A4): unpacked to int8 scratch per call.
    """

    kind: str
    halves: int
    segments: tuple[int, ...]
    row_scale: bool
    unpack_x: bool = False
    unpack_w: bool = False


def _scale_variation(x_scale: torch.Tensor | None) -> tuple[bool, bool]:
    """(varies per token, varies per segment) of an activation scale broadcastable to ``[*lead, nseg]``."""
    if x_scale is None or x_scale.dim() == 0:
        return False, False
    return math.prod(x_scale.shape[:-1]) > 1, x_scale.shape[-1] > 1


def _arch_reason(cap: tuple[int, int], xq: str) -> str | None:
    """Why the library has no GEMM for a device of compute capability ``cap`` (None when it has one)."""
    sm = f"sm_{cap[0]}{cap[1]}"
    path = current_gemm_path()
    if cap == (9, 0) and path != "sm80":
        return None
    if path == "sm90":
        return f"the GEMM path is forced to sm90 (set_gemm_path) and this device is {sm}"
    if cap[0] < 8:
        return f"the GEMMs need sm_80 or newer (CUTLASS 2 path) or sm_90 (sm_90a path); this device is {sm}"
    if not has_sm80_gemm():
        return f"{_lib_path} has only the sm_90a GEMMs (API version 1) and this device is {sm}; rebuild the kernels"
    if xq == "fp8_e4m3" and cap < (8, 9):
        return f"fp8 e4m3 GEMMs need sm_89 or newer; this device is {sm}"
    return None


def qlinear_route(
    spec: _ref.QLinearSpec, qx: torch.Tensor, out_dtype: torch.dtype, x_scale: torch.Tensor | None = None
) -> tuple[GemmRoute | None, str | None]:
    """Which library GEMM runs a validated ``qlinear`` call, or why none can.

    Args:
        spec: ``reference.infer_qlinear(...)`` of the call.
        qx: The activation (for its device).
        out_dtype: The requested output dtype.
        x_scale: The activation scale (decides per-token vs per-segment); None = per tensor.

    Returns:
        ``(route, None)`` when a kernel covers the call, else ``(None, reason)``.
    """
    if not has_gemm():
        return None, "the kernel library was built without sq_gemm"
    if spec.x_info is None:
        return None, "weight-only (x_qtype='none') has no CUDA kernel"
    xq, wq = spec.x_info.name, spec.w_info.name
    ints = ("int8", "int4")
    if not ((xq == wq == "fp8_e4m3") or (xq in ints and wq in ints)):
        return None, (f"x_qtype={xq!r} x w_qtype={wq!r} (the GEMMs do int8/int4 x int8/int4 and fp8 x fp8)")
    unpack_x, unpack_w = xq == "int4", wq == "int4"
    if (unpack_x or unpack_w) and not has_unpack_int4():
        return None, f"x_qtype={xq!r} x w_qtype={wq!r}: the kernel library was built without sq_unpack_int4"
    if len(spec.w_sizes) != 1:
        return None, "weight segments along K (group-wise weight scales; the GEMM takes a per-channel scale)"
    if spec.n % 8 != 0:
        return None, f"N = {spec.n} is not a multiple of 8"
    if out_dtype not in (torch.bfloat16, torch.float16):
        return None, f"out_dtype {out_dtype} (the GEMMs write bfloat16 / float16)"
    if qx.device.type != "cuda":
        return None, f"qx is on {qx.device}"
    cap = _capability(qx.device.index if qx.device.index is not None else torch.cuda.current_device())
    reason = _arch_reason(cap, xq)
    if reason is not None:
        return None, reason
    if spec.k * spec.halves >= 2**31 or spec.n >= 2**31 or math.prod(spec.lead) >= 2**31:
        return None, "a dimension >= 2^31"
    per_token, per_segment = _scale_variation(x_scale)
    segments = tuple(spec.x_sizes) if spec.x_sizes else (spec.k,)
    if spec.halves == 1 and (len(segments) == 1 or not per_segment):
        if spec.k % 16 != 0:
            return None, f"K = {spec.k} is not a multiple of 16"
        return GemmRoute("plain", 1, (spec.k,), per_token, unpack_x, unpack_w), None
    what = "DualScale" if spec.halves == 2 else f"{len(segments)} input segments"
    if per_token and per_segment:
        return None, (
            f"{what} with per-token x per-segment activation scales (dynamic segmented); the GEMMs take "
            "per-segment or per-token activation scales"
        )
    if not has_segmented_gemm():
        return None, f"{what}: the kernel library was built without sq_gemm_segmented"
    if len(segments) > MAX_SEGMENTS:
        return None, f"{what}: {len(segments)} segments > {MAX_SEGMENTS}"
    bounds = segment_offsets(segments)[1:]
    if any(b % SEG_TILE_K for b in bounds):
        return None, (
            f"{what}: segment boundaries {list(bounds)} are not all multiples of {SEG_TILE_K} "
            "(the segmented GEMM's tile K)"
        )
    return GemmRoute("segmented", spec.halves, segments, per_token, unpack_x, unpack_w), None


def qlinear_unsupported_reason(
    spec: _ref.QLinearSpec, qx: torch.Tensor, out_dtype: torch.dtype, x_scale: torch.Tensor | None = None
) -> str | None:
    """Why no library GEMM can run a validated ``qlinear`` call (None when one can; see :func:`qlinear_route`)."""
    return qlinear_route(spec, qx, out_dtype, x_scale)[1]


def _unpack_int4(
    lib: ctypes.CDLL, packed: torch.Tensor, rows: int, k: int, dev: torch.device, stream: ctypes.c_void_p
) -> torch.Tensor:
    """Packed int4 ``[rows, k/2]`` bytes -> a fresh int8 ``[rows, k]`` (``sq_unpack_int4`` on ``stream``)."""
    src = _aligned(packed)
    out = torch.empty(rows, k, dtype=torch.int8, device=dev)
    with _device_guard(dev):
        status = lib.sq_unpack_int4(src.data_ptr(), out.data_ptr(), rows, k, stream)
    _check(status, "qlinear")
    return out


_ONES: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    t = _ONES.get((device, n))
    if t is None:
        t = _ONES[(device, n)] = torch.ones(n, dtype=torch.float32, device=device)
    return t


def qlinear_out(
    out: torch.Tensor,
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    spec: _ref.QLinearSpec,
) -> int:
    """Run ``sq_gemm`` or ``sq_gemm_segmented`` into ``out`` (contiguous ``[*lead, N]``); no fallback.

    ``spec`` is ``reference.infer_qlinear(...)``; :func:`qlinear_route` must give a route.

    Returns:
        The ``sq_status`` (``SQ_OK``, or ``SQ_ERR_UNSUPPORTED`` / ``SQ_ERR_ARCH`` when the library
        declines the case and the caller should fall back).

    Raises:
        KernelLaunchError: the library is missing, the call has no route, or the library returned
            another error.
    """
    lib = _require_lib("qlinear")
    route, reason = qlinear_route(spec, qx, out.dtype, x_scale)
    if route is None:
        raise KernelLaunchError(f"segquant::qlinear: no CUDA GEMM for this call: {reason}")
    m, n, k = math.prod(spec.lead), spec.n, spec.k
    if m == 0:
        return SQ_OK
    dev = qx.device
    assert spec.x_info is not None
    ab = SQ_FP8E4M3 if spec.x_info.name == "fp8_e4m3" else SQ_INT8  # int4 operands run as int8
    od = _OUT_DTYPES[out.dtype]
    stream = _stream(dev)
    if route.unpack_x:
        a = _unpack_int4(lib, qx.reshape(m, -1), m, k * spec.halves, dev, stream)
    else:
        a = _aligned(qx.reshape(m, k * spec.halves))
    b = _unpack_int4(lib, qw, n, k, dev, stream) if route.unpack_w else _aligned(qw)
    xs = x_scale.to(device=dev, dtype=torch.float32)
    col_scale = _aligned(torch.broadcast_to(w_scale.to(device=dev, dtype=torch.float32), (n, 1)).reshape(n))
    bias_t = _aligned(bias.to(device=dev, dtype=out.dtype)) if bias is not None else None
    bias_p = bias_t.data_ptr() if bias_t is not None else None
    if route.kind == "plain":
        row_scale = _aligned(torch.broadcast_to(xs, (*spec.lead, 1)).reshape(m))
        ws_size = int(lib.sq_gemm_workspace_size(ab, od, m, n, k))
        workspace = torch.empty(ws_size, dtype=torch.uint8, device=dev) if ws_size else None
        with _device_guard(dev):
            status = lib.sq_gemm(
                a.data_ptr(), b.data_ptr(), ab, out.data_ptr(), od, m, n, k,
                row_scale.data_ptr(), col_scale.data_ptr(), bias_p,
                workspace.data_ptr() if workspace is not None else None, ws_size, stream,
            )  # fmt: skip
    else:
        nvals = route.halves * len(route.segments)
        if route.row_scale:  # per token only: the segments share it
            row_scale = _aligned(torch.broadcast_to(xs, (*spec.lead, nvals))[..., 0].reshape(m))
            seg_scale = _ones(nvals, dev)
        else:
            row_scale = None
            flat = xs.reshape(-1)
            seg_scale = _aligned(flat.expand(nvals) if flat.numel() == 1 else flat)
        ws_size = int(lib.sq_gemm_segmented_workspace_size(ab, od, m, n, k, route.halves))
        workspace = torch.empty(ws_size, dtype=torch.uint8, device=dev) if ws_size else None
        with _device_guard(dev):
            status = lib.sq_gemm_segmented(
                a.data_ptr(), b.data_ptr(), ab, out.data_ptr(), od, m, n, k, route.halves,
                _segments_struct(route.segments), seg_scale.data_ptr(),
                row_scale.data_ptr() if row_scale is not None else None, col_scale.data_ptr(), bias_p,
                workspace.data_ptr() if workspace is not None else None, ws_size, stream,
            )  # fmt: skip
    if status in (SQ_ERR_UNSUPPORTED, SQ_ERR_ARCH):
        return status
    _check(status, "qlinear")
    return SQ_OK


def _qlinear_impl(
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
    args = (qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype)
    spec = _ref.infer_qlinear(*args)
    reason = qlinear_unsupported_reason(spec, qx, out_dtype, x_scale)
    if reason is None:
        out = torch.empty(spec.out_shape, dtype=out_dtype, device=qx.device)
        status = qlinear_out(out, qx, x_scale, qw, w_scale, bias, spec)
        if status == SQ_OK:
            return out
        assert spec.x_info is not None
        assert _lib is not None
        reason = (
            f"the GEMM returned {_text(_lib.sq_status_string(status))} for {spec.x_info.name} -> {out_dtype} "
            f"(M={math.prod(spec.lead)}, N={spec.n}, K={spec.k})"
        )
        _warn_fallback(
            "qlinear", reason, key=f"sq_gemm status {status} for {spec.x_info.name} -> {out_dtype}"
        )
    else:
        _warn_fallback("qlinear", reason)
    return _ref.reference_qlinear(*args)


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------

_IMPLS: dict[str, Callable[..., Any]] = {
    "quantize": _quantize_impl,
    "quantize_dynamic": _quantize_dynamic_impl,
    "quantize_dual": _quantize_dual_impl,
    "qlinear": _qlinear_impl,
}
_registered: list[str] = []


def registered_ops() -> tuple[str, ...]:
    """The ops this module registered with ``register_cuda_impl``."""
    return tuple(_registered)


def _register() -> None:
    from segquant_fx.ops import library

    if not is_available():
        # Tell the dispatcher why, so its one fallback warning names the cause.
        if getattr(library, "_cuda_module_error", "unset") is None:
            library._cuda_module_error = unavailable_reason()
        return
    for name, fn in _IMPLS.items():
        if name == "qlinear" and not has_gemm():
            continue
        library.register_cuda_impl(name, fn)
        _registered.append(name)


_load()
_register()
