"""quantize / quantize_dynamic / quantize_dual: CUDA kernels bit-exact against the reference.

Grid: leading shapes (1,), (7,), (2, 65) (rows 1, odd, 3-D); K in 16, 64, 3072, 3072+16 and the
odd 3073 (scalar path; int8/fp8 only); bf16/fp16/fp32 inputs; int8/int4/fp8_e4m3; scales per
tensor, per segment (one, 24 heads, unequal with odd boundaries), per token, per token and
segment; smoothing on/off. Inputs are fresh random data (randn times random per-channel
magnitudes), never zeros. Every case runs (1) the registered op under KernelPreference.CUDA vs
KernelPreference.REFERENCE and (2) the kernel into outputs poisoned with two different sentinel
bytes, both compared byte for byte with the reference.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from sq_gpu_utils import (
    DEV,
    SENTINELS,
    assert_same_bytes,
    cuda,
    gen,
    make_scale,
    poisoned,
    rand_factor,
    rand_x,
    reference,
    segment_cases,
)

from segquant_fx.ops import reference as R
from segquant_fx.ops.formats import dual_scales_from_minmax, normalize_segments, qtype_info

pytestmark = pytest.mark.gpu

LEADS = [(1,), (7,), (2, 65)]
KS = [16, 64, 3072, 3072 + 16, 3073]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QTYPES = ["int8", "int4", "fp8_e4m3"]
SCALE_KINDS = ["tensor", "segment", "token", "token_segment"]
SEG_NAMES = ["one", "heads24", "unequal"]


def _cases(k, qtype):
    if qtype == "int4" and k % 2:
        pytest.skip("int4 needs an even K")
    return itertools.product(LEADS, DTYPES, (False, True))


def _smooth(k, g):
    return (0.25 + 2.0 * torch.rand(k, generator=g, device=DEV)).to(torch.float32)


def _v(x, smooth):
    v = x.float()
    return v / smooth if smooth is not None else v


@pytest.mark.parametrize("seg_name", SEG_NAMES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("k", KS)
def test_quantize_bit_exact(kernels, no_fallback, k, qtype, kind, seg_name):
    op = torch.ops.segquant.quantize
    info = qtype_info(qtype)
    segments = segment_cases(k)[seg_name]
    sizes = normalize_segments(segments, k)
    seed = torch.seed() % 2**31
    g = gen(seed)
    for lead, dtype, use_smooth in _cases(k, qtype):
        what = f"quantize seed={seed} lead={lead} K={k} {dtype} {qtype} {kind} {seg_name} smooth={use_smooth}"
        x = rand_x((*lead, k), dtype, g)
        smooth = _smooth(k, g) if use_smooth else None
        scale = make_scale(kind, _v(x, smooth), segments, qtype, g)
        args = (x, scale, segments, qtype, smooth)
        ref = reference(op, *args)
        assert_same_bytes(cuda(op, *args), ref, what)
        for byte in SENTINELS:
            out = poisoned(ref.shape, info.storage_dtype, byte)
            kernels.quantize_out(out, x, scale, sizes, info, smooth)
            assert_same_bytes(out, ref, f"{what} (poison 0x{byte:02X})")


@pytest.mark.parametrize("seg_name", SEG_NAMES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("k", KS)
def test_quantize_dynamic_bit_exact(kernels, no_fallback, k, qtype, seg_name):
    op = torch.ops.segquant.quantize_dynamic
    info = qtype_info(qtype)
    segments = segment_cases(k)[seg_name]
    sizes = normalize_segments(segments, k)
    seed = torch.seed() % 2**31
    g = gen(seed)
    for lead, dtype, use_smooth in _cases(k, qtype):
        what = (
            f"quantize_dynamic seed={seed} lead={lead} K={k} {dtype} {qtype} {seg_name} smooth={use_smooth}"
        )
        x = rand_x((*lead, k), dtype, g)
        smooth = _smooth(k, g) if use_smooth else None
        args = (x, segments, qtype, smooth)
        q_ref, s_ref = reference(op, *args)
        q, s = cuda(op, *args)
        assert_same_bytes(q, q_ref, what)
        assert_same_bytes(s, s_ref, what + " (scale)")
        for byte in SENTINELS:
            out = poisoned(q_ref.shape, info.storage_dtype, byte)
            s_out = torch.full(s_ref.shape, float("nan"), device=DEV)
            kernels.quantize_dynamic_out(out, s_out, x, sizes, info, smooth)
            assert_same_bytes(out, q_ref, f"{what} (poison 0x{byte:02X})")
            assert_same_bytes(s_out, s_ref, f"{what} (scale, NaN poison)")


def _dual_scales(kind, v, segments, qtype, g):
    sizes = normalize_segments(segments, v.shape[-1])
    lead_dims = tuple(range(v.dim() - 1))
    pos = [c.clamp(min=0).amax(-1, keepdim=True) for c in v.split(list(sizes), dim=-1)]
    neg = [c.clamp(max=0).amin(-1, keepdim=True) for c in v.split(list(sizes), dim=-1)]
    pos, neg = torch.cat(pos, -1), torch.cat(neg, -1)
    if kind == "tensor":
        pos, neg = pos.amax().reshape(1), neg.amin().reshape(1)
    elif kind == "segment":
        pos, neg = pos.amax(lead_dims).reshape(-1), neg.amin(lead_dims).reshape(-1)
    elif kind == "token":
        pos, neg = pos.amax(-1, keepdim=True), neg.amin(-1, keepdim=True)
    sp, sn = dual_scales_from_minmax(pos, neg, qtype)
    return sp * rand_factor(sp.shape, g), sn * rand_factor(sn.shape, g)


@pytest.mark.parametrize("seg_name", SEG_NAMES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("k", KS)
def test_quantize_dual_bit_exact(kernels, no_fallback, k, qtype, kind, seg_name):
    op = torch.ops.segquant.quantize_dual
    info = qtype_info(qtype)
    segments = segment_cases(k)[seg_name]
    sizes = normalize_segments(segments, k)
    fp8 = qtype == "fp8_e4m3"
    seed = torch.seed() % 2**31
    g = gen(seed)
    for lead, dtype, use_smooth in _cases(k, qtype):
        what = f"quantize_dual seed={seed} lead={lead} K={k} {dtype} {qtype} {kind} {seg_name} smooth={use_smooth}"
        x = rand_x((*lead, k), dtype, g)
        smooth = _smooth(k, g) if use_smooth else None
        sp, sn = _dual_scales(kind, _v(x, smooth), segments, qtype, g)
        args = (x, sp, sn, segments, qtype, smooth)
        ref = reference(op, *args)
        assert_same_bytes(cuda(op, *args), ref, what, signed_zero_ok=fp8)
        for byte in SENTINELS:
            out = poisoned(ref.shape, info.storage_dtype, byte)
            kernels.quantize_dual_out(out, x, sp, sn, sizes, info, smooth)
            assert_same_bytes(out, ref, f"{what} (poison 0x{byte:02X})", signed_zero_ok=fp8)


# --------------------------------------------------------------------------------------------------
# rounding ties, saturation, 64 segments, misaligned and strided inputs, empty inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_round_half_to_even_ties(kernels, no_fallback, dtype, qtype):
    op = torch.ops.segquant.quantize
    top = 60 if dtype == torch.bfloat16 else 130  # (k + 0.5) exact in bf16 up to 7 significant bits
    halves = torch.arange(-top, top, device=DEV, dtype=torch.float32) + 0.5
    x = torch.cat([halves, -halves, halves * 3]).to(dtype)
    x = x[: x.numel() // 16 * 16].reshape(-1, 16)
    scale = torch.tensor([0.25], device=DEV)  # x / 0.25 = 4 * x: ties when scale = 1 instead
    for s in (scale, torch.ones(1, device=DEV)):
        ref = reference(op, x, s, [], qtype, None)
        assert_same_bytes(cuda(op, x, s, [], qtype, None), ref, f"ties {dtype} {qtype} scale={float(s)}")


def test_fp8_ties_subnormals_and_saturation(kernels, no_fallback):
    op = torch.ops.segquant.quantize
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique().sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat(
        [
            grid,
            mids,
            torch.nextafter(mids, torch.tensor(float("inf"))),
            torch.nextafter(mids, torch.tensor(float("-inf"))),
            torch.tensor([500.0, -500.0, 448.0, -448.0, 464.0, -464.0, 1e30, -1e30, 2.0**-10, -(2.0**-10)]),
        ]
    )
    vals = vals[vals != 0]
    x = vals[: vals.numel() // 16 * 16].reshape(-1, 16).to(DEV)
    ref = reference(op, x, torch.ones(1, device=DEV), [], "fp8_e4m3", None)
    assert_same_bytes(cuda(op, x, torch.ones(1, device=DEV), [], "fp8_e4m3", None), ref, "fp8 ties")


def test_infinities_saturate(kernels, no_fallback):
    x = torch.tensor([[float("inf"), float("-inf")] * 8], device=DEV)
    for qtype in QTYPES:
        ref = reference(torch.ops.segquant.quantize, x, torch.ones(1, device=DEV), [], qtype, None)
        got = cuda(torch.ops.segquant.quantize, x, torch.ones(1, device=DEV), [], qtype, None)
        assert_same_bytes(got, ref, f"inf {qtype}")


def test_sixty_four_segments_and_scale_strides(kernels, no_fallback):
    g = gen(64)
    k = 64 * 48
    segments = [48] * 64
    x = rand_x((5, k), torch.bfloat16, g)
    # Per-token-and-segment scale given as a transposed (non-contiguous) view.
    scale = make_scale("token_segment", x.float(), segments, "int8", g).t().contiguous().t()
    ref = reference(torch.ops.segquant.quantize, x, scale, segments, "int8", None)
    assert_same_bytes(cuda(torch.ops.segquant.quantize, x, scale, segments, "int8", None), ref, "64 segments")
    q, s = reference(torch.ops.segquant.quantize_dynamic, x, segments, "fp8_e4m3", None)
    q2, s2 = cuda(torch.ops.segquant.quantize_dynamic, x, segments, "fp8_e4m3", None)
    assert_same_bytes(q2, q, "64 segments dynamic")
    assert_same_bytes(s2, s, "64 segments dynamic scale")


def test_scale_broadcast_over_some_lead_dims(kernels, no_fallback):
    g = gen(3)
    x = rand_x((2, 3, 64), torch.float16, g)
    scale = make_scale("tensor", x.float(), [], "int8", g).reshape(1, 1, 1) * rand_factor((2, 1, 1), g)
    ref = reference(torch.ops.segquant.quantize, x, scale, [], "int8", None)
    assert_same_bytes(cuda(torch.ops.segquant.quantize, x, scale, [], "int8", None), ref, "lead broadcast")
    scale64 = scale.double()  # any float dtype is accepted and converted to float32
    ref = reference(torch.ops.segquant.quantize, x, scale64, [], "int8", None)
    assert_same_bytes(cuda(torch.ops.segquant.quantize, x, scale64, [], "int8", None), ref, "float64 scale")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_strided_inputs(kernels, no_fallback, dtype, qtype):
    g = gen(11)
    k = 3072
    buf = rand_x((4 * k + 1,), dtype, g)
    x = buf[1:].view(4, k)  # contiguous, data pointer off by one element
    big = rand_x((4, 2 * k), dtype, g)
    xs = big[:, ::2]  # non-contiguous
    for xin, name in ((x, "misaligned"), (xs, "strided")):
        scale = make_scale("token", xin.float(), [], qtype, g)
        ref = reference(torch.ops.segquant.quantize, xin, scale, [], qtype, None)
        assert_same_bytes(cuda(torch.ops.segquant.quantize, xin, scale, [], qtype, None), ref, name)


@pytest.mark.parametrize("offset_elems", [1, 2, 4])
@pytest.mark.parametrize("qtype", QTYPES)
def test_c_api_narrow_chunks_on_misaligned_pointers(kernels, offset_elems, qtype):
    """Call sq_quantize directly with a misaligned x: the library picks a narrower chunk, same bytes."""
    info = qtype_info(qtype)
    g = gen(offset_elems)
    k, rows = 3072, 3
    buf = rand_x((rows * k + 8,), torch.bfloat16, g)
    x = buf[offset_elems : offset_elems + rows * k].view(rows, k)
    scale = make_scale("tensor", x.float(), [], qtype, g)
    ref = R.reference_quantize(x, scale, [], qtype)
    out = poisoned(ref.shape, info.storage_dtype, 0x5A)
    lib = kernels._lib
    status = lib.sq_quantize(
        x.data_ptr(),
        kernels.SQ_BF16,
        out.data_ptr(),
        kernels._Q_DTYPES[qtype],
        rows,
        k,
        kernels.SqScale(scale.data_ptr(), 0, 0),
        kernels._segments_struct((k,)),
        None,
        torch.cuda.current_stream().cuda_stream,
    )
    if status == kernels.SQ_ERR_UNSUPPORTED:  # int4 needs 4-byte aligned bf16 pairs
        assert qtype == "int4" and offset_elems % 2 == 1
        return
    assert status == kernels.SQ_OK, kernels._status_text(status)
    torch.cuda.synchronize()
    assert_same_bytes(out, ref, f"misaligned by {offset_elems} bf16 elements")


def test_empty_rows(kernels, no_fallback):
    x = torch.empty(0, 64, device=DEV, dtype=torch.bfloat16)
    q = cuda(torch.ops.segquant.quantize, x, torch.ones(1, device=DEV), [], "int8", None)
    assert q.shape == (0, 64) and q.dtype == torch.int8
    q, s = cuda(torch.ops.segquant.quantize_dynamic, x, [32, 32], "int4", None)
    assert q.shape == (0, 32) and s.shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# fallbacks of the quantize ops
# --------------------------------------------------------------------------------------------------


def _fallback_warnings(record, fragment):
    return [w for w in record if "does not cover this case" in str(w.message) and fragment in str(w.message)]


def test_more_than_64_segments_falls_back_once(kernels, fresh_warnings):
    g = gen(65)
    segments = [16] * 65
    x = rand_x((3, 16 * 65), torch.bfloat16, g)
    scale = make_scale("segment", x.float(), segments, "int8", g)
    ref = reference(torch.ops.segquant.quantize, x, scale, segments, "int8", None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert_same_bytes(
                cuda(torch.ops.segquant.quantize, x, scale, segments, "int8", None), ref, "65 seg"
            )
    assert len(_fallback_warnings(record, "65 segments")) == 1


def test_float64_input_falls_back(kernels, fresh_warnings):
    g = gen(64)
    x = rand_x((3, 64), torch.float64, g)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        q, s = cuda(torch.ops.segquant.quantize_dynamic, x, [], "int8", None)
    q_ref, s_ref = reference(torch.ops.segquant.quantize_dynamic, x, [], "int8", None)
    assert_same_bytes(q, q_ref, "float64 dynamic")
    assert_same_bytes(s, s_ref, "float64 dynamic scale")
    assert len(_fallback_warnings(record, "torch.float64")) == 1
