"""qlinear through sq_gemm (sm_90a CUTLASS) against the reference, and its fallbacks.

Grid: M in 1, 7 (odd), 130 (3-D [2, 65]), 256; K in 16, 64, 3072, 3072+16; N in 8, 3072, 9216;
int8 x int8 and fp8 x fp8; bf16 / fp16 outputs; per-tensor or per-token activation scale,
per-channel or per-tensor weight scale, bias on/off (rotated through the cases). Each case checks
the registered op (KernelPreference.CUDA, no fallback allowed) and the kernel written into a
NaN-poisoned output: every element written and finite, relative error vs the reference at the same
output dtype <= 1e-3 (int8) / 4e-3 (fp8: one bf16 ulp), and the error vs a float64 dequantize-then-matmul oracle
at most twice the reference's own (README tolerance for fp8).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from sq_gpu_utils import DEV, cuda, gen, rand_factor, rand_x, reference, rel_err

from segquant_fx.ops import reference as R
from segquant_fx.ops.formats import scale_from_amax

pytestmark = pytest.mark.gpu

LEADS = [(1,), (7,), (2, 65), (256,)]
KS = [16, 64, 3072, 3072 + 16]
NS = [8, 3072, 9216]
QTYPES = ["int8", "fp8_e4m3"]
OUT_DTYPES = [torch.bfloat16, torch.float16]
# vs the reference at the same output dtype: int8 differs only by float summation order; fp8 accumulates in
# float in a different order, and with few outputs one bf16 rounding flip (2^-8 relative) dominates the norm
TOL = {"int8": 1e-3, "fp8_e4m3": 4e-3}


def make_linear(lead, k, n, qtype, g, *, per_token, per_channel, with_bias, out_dtype):
    """Quantized activation and weight (reference quantizers), scales and bias for one case."""
    x = rand_x((*lead, k), torch.float32, g, spread=0.5)
    w = torch.randn(n, k, generator=g, device=DEV) * 0.05
    if per_token:
        xs = scale_from_amax(x.abs().amax(-1, keepdim=True), qtype)
    else:
        xs = scale_from_amax(x.abs().amax(), qtype).reshape(1)
    qx = R.reference_quantize(x, xs, [], qtype)
    if per_channel:
        ws = scale_from_amax(w.abs().amax(-1, keepdim=True), qtype) * rand_factor((n, 1), g, 0.9, 1.1)
    else:
        ws = scale_from_amax(w.abs().amax(), qtype).reshape(1)
    qw = R.reference_quantize(w, ws, [], qtype)
    bias = torch.randn(n, generator=g, device=DEV).to(out_dtype) if with_bias else None
    return (qx, xs, [], qtype, qw, ws, [], qtype, bias, False, out_dtype)


def oracle(args):
    """float64 dequantize-then-matmul (+ bias)."""
    qx, xs, _, qtype, qw, ws, _, _, bias, _, _ = args
    x = qx.double() * xs.double()
    w = qw.double() * ws.double()
    y = x @ w.T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
def test_qlinear_matches_reference(gemm, no_fallback, k, n, qtype):
    op = torch.ops.segquant.qlinear
    seed = torch.seed() % 2**31
    g = gen(seed)
    for i, (lead, out_dtype) in enumerate(itertools.product(LEADS, OUT_DTYPES)):
        flags = dict(per_token=i % 2 == 0, per_channel=i % 3 != 2, with_bias=i % 4 != 3)
        what = f"qlinear seed={seed} lead={lead} K={k} N={n} {qtype} -> {out_dtype} {flags}"
        args = make_linear(lead, k, n, qtype, g, out_dtype=out_dtype, **flags)
        ref = reference(op, *args)
        got = cuda(op, *args)
        assert got.shape == ref.shape and got.dtype == out_dtype and got.is_contiguous(), what
        assert torch.isfinite(got).all(), f"{what}: non-finite outputs"
        err = rel_err(got, ref)
        assert err <= TOL[qtype], f"{what}: relative error {err:.2e} vs reference > {TOL[qtype]}"
        exact = oracle(args)
        err_ref, err_got = rel_err(ref, exact), rel_err(got, exact)
        assert err_got <= 2 * err_ref + 1e-6, (
            f"{what}: oracle error {err_got:.2e} > 2 x reference's {err_ref:.2e}"
        )
        # The kernel into a NaN-poisoned output: every element must be written.
        spec = R.infer_qlinear(*args)
        out = torch.full(spec.out_shape, float("nan"), dtype=out_dtype, device=DEV)
        qx, xs, _, _, qw, ws, _, _, bias, _, _ = args
        status = gemm.qlinear_out(out, qx, xs, qw, ws, bias, spec)
        assert status == gemm.SQ_OK, what
        assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} outputs not written"
        assert rel_err(out, ref) <= TOL[qtype], what


def test_qlinear_int8_fp32_accumulation_is_exact(gemm, no_fallback):
    """Large |dot| products: int32 accumulation must be exact (bf16 output rounding only)."""
    g = gen(5)
    k, n = 3072, 3072
    qx = torch.full((64, k), 127, dtype=torch.int8, device=DEV)
    qx[:, ::2] = -128
    qw = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    xs = torch.full((1,), 1e-3, device=DEV)
    ws = torch.full((n, 1), 1e-3, device=DEV)
    args = (qx, xs, [], "int8", qw, ws, [], "int8", None, False, torch.bfloat16)
    ref = reference(torch.ops.segquant.qlinear, *args)
    got = cuda(torch.ops.segquant.qlinear, *args)
    assert rel_err(got, ref) <= 1e-3


def test_qlinear_empty_rows(gemm, no_fallback):
    args = make_linear(
        (0,),
        64,
        8,
        "int8",
        gen(1),
        per_token=True,
        per_channel=True,
        with_bias=True,
        out_dtype=torch.bfloat16,
    )
    y = cuda(torch.ops.segquant.qlinear, *args)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# fallbacks: warn once per (op, reason), same result as the reference
# --------------------------------------------------------------------------------------------------


def _fallbacks(record):
    return [str(w.message) for w in record if "does not cover this case" in str(w.message)]


def _segmented_args(g):
    k = 3072
    segments = [k // 24] * 24
    x = rand_x((9, k), torch.float32, g)
    qx, xs = R.reference_quantize_dynamic(x, segments, "int8")
    w = torch.randn(64, k, generator=g, device=DEV)
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), "int8")
    qw = R.reference_quantize(w, ws, [], "int8")
    return (qx, xs, segments, "int8", qw, ws, [], "int8", None, False, torch.bfloat16)


def _fp32_out_args(g):
    return make_linear(
        (5,), 64, 16, "int8", g, per_token=True, per_channel=True, with_bias=True, out_dtype=torch.float32
    )


def _odd_n_args(g):
    return make_linear(
        (5,),
        64,
        12,
        "fp8_e4m3",
        g,
        per_token=False,
        per_channel=True,
        with_bias=False,
        out_dtype=torch.bfloat16,
    )


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_segmented_args, "per-token x per-segment"),
        (_fp32_out_args, "out_dtype torch.float32"),
        (_odd_n_args, "N = 12 is not a multiple of 8"),
    ],
    ids=["dynamic-segmented-24-heads", "fp32-out", "odd-N"],
)
def test_qlinear_fallback_warns_once_and_is_correct(gemm, fresh_warnings, make, fragment):
    args = make(gen(17))
    ref = reference(torch.ops.segquant.qlinear, *args)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            got = cuda(torch.ops.segquant.qlinear, *args)
            assert torch.equal(got, ref)
    msgs = _fallbacks(record)
    assert len(msgs) == 1, msgs
    assert fragment in msgs[0], msgs[0]


def test_quantize_then_qlinear_w8a8_pipeline(gemm, no_fallback):
    """The usual layer: dynamic per-token int8 quantize + qlinear, all on the CUDA path."""
    g = gen(23)
    m, k, n = 333, 3072, 3072
    x = rand_x((m, k), torch.bfloat16, g, spread=0.5)
    w = torch.randn(n, k, generator=g, device=DEV) * 0.02
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), "int8")
    qw = R.reference_quantize(w, ws, [], "int8")
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    qx, xs = cuda(torch.ops.segquant.quantize_dynamic, x, [], "int8", None)
    y = cuda(torch.ops.segquant.qlinear, qx, xs, [], "int8", qw, ws, [], "int8", bias, False, torch.bfloat16)
    qx_r, xs_r = reference(torch.ops.segquant.quantize_dynamic, x, [], "int8", None)
    assert torch.equal(qx, qx_r) and torch.equal(xs, xs_r)
    y_r = reference(
        torch.ops.segquant.qlinear, qx_r, xs_r, [], "int8", qw, ws, [], "int8", bias, False, torch.bfloat16
    )
    assert rel_err(y, y_r) <= 1e-3
    # Sanity against the unquantized layer: per-token int8 activations cost a few percent here.
    y_float = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    err = rel_err(y, y_float)
    assert math.isfinite(err) and err < 0.1, f"W8A8 vs float64 linear: {err:.2e}"
