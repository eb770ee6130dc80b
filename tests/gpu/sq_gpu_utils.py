"""Helpers of the GPU tests: random inputs, scales, byte-exact comparisons, poisoned outputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from segquant_fx.ops.formats import normalize_segments, qtype_info
from segquant_fx.ops.kernel_preference import KernelPreference, use_kernel_preference

DEV = "cuda"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def rand_x(shape: Sequence[int], dtype: torch.dtype, g: torch.Generator, spread: float = 1.5) -> torch.Tensor:
    """randn times a random per-channel magnitude exp(spread * randn): outliers, tiny values, never 0."""
    k = shape[-1]
    x = torch.randn(*shape, generator=g, device=DEV)
    x = x * torch.exp(spread * torch.randn(k, generator=g, device=DEV))
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    out = x.to(dtype)
    return torch.where(out == 0, torch.full_like(out, 1e-3), out)


def rand_factor(shape: Sequence[int], g: torch.Generator, lo: float = 0.6, hi: float = 1.4) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, device=DEV)


def segment_cases(k: int) -> dict[str, list[int]]:
    """Segment lists of one last dim: one segment, 24 heads (unequal when 24 does not divide K), unequal."""
    heads = [k // 24] * 23 + [k - 23 * (k // 24)] if k >= 48 else [k // 2 - 1, k - (k // 2 - 1)]
    a = max(1, k // 3) | 1  # odd: a segment boundary inside an int4 byte
    b = max(1, k // 2 - 3)
    unequal = [a, b, k - a - b] if k - a - b > 0 else [1, k - 1]
    return {"one": [], "heads24": heads, "unequal": unequal}


def segment_amax(v: torch.Tensor, sizes: Sequence[int], dims: tuple[int, ...] | None) -> torch.Tensor:
    """|v| max per segment, over ``dims`` of the leading dims too (None: per row)."""
    parts = [c.abs().amax(-1, keepdim=True) for c in v.split(list(sizes), dim=-1)]
    a = torch.cat(parts, dim=-1)  # [*lead, nseg]
    if dims:
        a = a.amax(dim=dims, keepdim=True)
    return a


def make_scale(
    kind: str, v: torch.Tensor, segments: Sequence[int], qtype: str, g: torch.Generator
) -> torch.Tensor:
    """A dequant scale of granularity ``kind`` from the data's amax times a random factor in [0.6, 1.4]."""
    sizes = normalize_segments(segments, v.shape[-1])
    qmax = qtype_info(qtype).qmax
    lead_dims = tuple(range(v.dim() - 1))
    if kind == "tensor":
        a = v.abs().amax().reshape(1)
    elif kind == "segment":
        a = segment_amax(v, sizes, lead_dims).reshape(len(sizes))
    elif kind == "token":
        a = v.abs().amax(-1, keepdim=True)
    elif kind == "token_segment":
        a = segment_amax(v, sizes, None)
    else:
        raise ValueError(kind)
    s = a.clamp(min=2.0**-24) / qmax * rand_factor(a.shape, g)
    return s.to(torch.float32)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_bytes(
    got: torch.Tensor, ref: torch.Tensor, what: str, *, signed_zero_ok: bool = False
) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{what}: {got.dtype}{list(got.shape)} != {ref.dtype}{list(ref.shape)}"
    )
    assert got.is_contiguous(), f"{what}: output not contiguous"
    a, b = as_bytes(got), as_bytes(ref)
    if signed_zero_ok:  # fp8 DualScale halves: +0 and -0 are both allowed
        a = torch.where(a == 0x80, torch.zeros_like(a), a)
        b = torch.where(b == 0x80, torch.zeros_like(b), b)
    bad = a != b
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.reshape(-1).nonzero()[:8].flatten().tolist()
        raise AssertionError(
            f"{what}: {n_bad} of {a.numel()} bytes differ; first at flat {idx}: "
            f"got {a.reshape(-1)[idx].tolist()} ref {b.reshape(-1)[idx].tolist()}"
        )


def poisoned(shape: Sequence[int], dtype: torch.dtype, byte: int) -> torch.Tensor:
    """An output buffer of ``dtype`` whose every byte is ``byte`` (a sentinel the kernel must overwrite)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.full((math.prod(shape) * itemsize,), byte, dtype=torch.uint8, device=DEV)
    return raw.view(dtype).reshape(shape)


SENTINELS = (0x5A, 0xA5)  # two different poisons: an unwritten byte cannot match the reference twice


def reference(op, *args):
    with use_kernel_preference(KernelPreference.REFERENCE):
        return op(*args)


def cuda(op, *args):
    with use_kernel_preference(KernelPreference.CUDA):
        return op(*args)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.double(), ref.double()
    return float((g - r).norm() / r.norm().clamp(min=1e-300))
