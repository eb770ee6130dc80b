"""Input-segmented and DualScale qlinear through sq_gemm_segmented against the reference.

Grid: M in 1, 7 (odd), 130 ([2, 65]), 1024; (K, segments) = SD3.5 heads (1536 = 24 x 64), FLUX heads
(3072 = 24 x 128), unequal concat pieces (640 + 3072 + 384), one segment; DualScale on top of each
(and the FF down-projection K = 12288); N in 64, 1536, 3072; int8 and fp8; bf16 / fp16 outputs; bias on
and off; per-segment activation scales whose magnitudes differ by up to 100x. Each case runs the
registered op with fallbacks forbidden and the kernel into a NaN-poisoned output: every element
written, relative error vs the reference at the same output dtype <= 1e-3 (int8) / 2e-3 (fp8), and the
error vs a float64 dequantize-then-matmul oracle at most twice the reference's own.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from sq_gpu_utils import DEV, cuda, gen, rand_factor, rand_x, reference, rel_err

from segquant_fx.ops import reference as R
from segquant_fx.ops.formats import dual_scales_from_minmax, scale_from_amax

pytestmark = pytest.mark.gpu

LEADS = [(1,), (7,), (2, 65), (1024,)]
SEGMENTS = {
    "sd35-heads": [64] * 24,
    "flux-heads": [128] * 24,
    "concat": [640, 3072, 384],
    "one": [],
}
NS = [64, 1536, 3072]
QTYPES = ["int8", "fp8_e4m3"]
TOL = {"int8": 1e-3, "fp8_e4m3": 2e-3}


def _seg_amax(x, sizes, fn):
    return torch.stack([fn(c) for c in x.split(sizes, dim=-1)])


def make_case(lead, segments, n, qtype, g, *, dual, with_bias, out_dtype):
    k = sum(segments) if segments else 1536
    sizes = segments or [k]
    x = rand_x((*lead, k), torch.float32, g, spread=0.5)
    # Segments of very different magnitude (the reason for per-segment scales), SiLU-like skew for dual.
    gain = torch.cat(
        [torch.full((s,), float(10 ** (2 * (i % 3) / 2 - 1)), device=DEV) for i, s in enumerate(sizes)]
    )
    x = x * gain
    if dual:
        x = torch.nn.functional.silu(x * 3)
        pos = _seg_amax(x, sizes, lambda c: c.clamp(min=0).amax())
        neg = _seg_amax(x, sizes, lambda c: c.clamp(max=0).amin())
        sp, sn = dual_scales_from_minmax(pos, neg, qtype)
        qx = R.reference_quantize_dual(x, sp, sn, segments, qtype)
        xs = torch.cat([sp, sn]).float()
    else:
        xs = scale_from_amax(_seg_amax(x, sizes, lambda c: c.abs().amax()), qtype).float()
        if not segments:
            xs = xs.reshape(1)
        qx = R.reference_quantize(x, xs, segments, qtype)
    w = torch.randn(n, k, generator=g, device=DEV) * 0.05
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), qtype) * rand_factor((n, 1), g, 0.9, 1.1)
    qw = R.reference_quantize(w, ws, [], qtype)
    bias = torch.randn(n, generator=g, device=DEV).to(out_dtype) if with_bias else None
    return (qx, xs, segments, qtype, qw, ws, [], qtype, bias, dual, out_dtype)


def oracle(args):
    qx, xs, segments, qtype, qw, ws, _, _, bias, dual, _ = args
    k = qw.shape[-1]
    sizes = list(segments) or [k]

    def deq(q, s):
        return torch.cat([c.double() * s[i].double() for i, c in enumerate(q.split(sizes, dim=-1))], dim=-1)

    if dual:
        x = deq(qx[..., :k], xs[: len(sizes)]) + deq(qx[..., k:], xs[len(sizes) :])
    else:
        x = deq(qx, xs.expand(len(sizes)))
    y = x @ (qw.double() * ws.double()).T
    return y + bias.double() if bias is not None else y


def _check(gemm, args, what):
    qtype, out_dtype = args[3], args[10]
    op = torch.ops.segquant.qlinear
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
    spec = R.infer_qlinear(*args)
    route, reason = gemm.qlinear_route(spec, args[0], out_dtype, args[1])
    assert route is not None and route.kind == "segmented", f"{what}: {route} {reason}"
    out = torch.full(spec.out_shape, float("nan"), dtype=out_dtype, device=DEV)
    qx, xs, _, _, qw, ws, _, _, bias, _, _ = args
    assert gemm.qlinear_out(out, qx, xs, qw, ws, bias, spec) == gemm.SQ_OK, what
    assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} outputs not written"
    assert rel_err(out, ref) <= TOL[qtype], what


@pytest.fixture(scope="module")
def seg_gemm(gemm):
    if not gemm.has_segmented_gemm():
        pytest.fail(f"{gemm.library_path()} has no sq_gemm_segmented: was gemm_seg_sm90*.cu built?")
    return gemm


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("dual", [False, True], ids=["seg", "dual"])
def test_segmented_qlinear_matches_reference(seg_gemm, no_fallback, dual, seg_name, n, qtype):
    if seg_name == "one" and not dual:
        pytest.skip("one segment without DualScale is the plain GEMM (test_gpu_qlinear.py)")
    seed = torch.seed() % 2**31
    g = gen(seed)
    for i, (lead, out_dtype) in enumerate(itertools.product(LEADS, [torch.bfloat16, torch.float16])):
        with_bias = i % 3 != 2
        what = f"seed={seed} lead={lead} {seg_name} dual={dual} N={n} {qtype} -> {out_dtype} bias={with_bias}"
        args = make_case(
            lead, SEGMENTS[seg_name], n, qtype, g, dual=dual, with_bias=with_bias, out_dtype=out_dtype
        )
        _check(seg_gemm, args, what)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dual_ff_down_projection(seg_gemm, no_fallback, qtype):
    """The largest DualScale layer of the DiTs: GELU output (K = 12288) -> 3072, long segments (fp8 cadence)."""
    g = gen(31)
    for lead in [(3,), (512,)]:
        segments = [12288]
        args = make_case(lead, segments, 3072, qtype, g, dual=True, with_bias=True, out_dtype=torch.bfloat16)
        _check(seg_gemm, args, f"ff-down lead={lead} {qtype}")


def test_segment_scales_matter(seg_gemm, no_fallback):
    """Swapping two segment scales must change the output (the kernel reads scale[s] for segment s)."""
    g = gen(7)
    args = list(
        make_case((64,), [64] * 24, 256, "int8", g, dual=False, with_bias=False, out_dtype=torch.float16)
    )
    y = cuda(torch.ops.segquant.qlinear, *args)
    xs = args[1].clone()
    xs[[0, 5]] = xs[[5, 0]] * torch.tensor([3.0, 0.25], device=DEV)
    args[1] = xs
    y2 = cuda(torch.ops.segquant.qlinear, *args)
    ref2 = reference(torch.ops.segquant.qlinear, *args)
    assert rel_err(y2, y) > 1e-2
    assert rel_err(y2, ref2) <= TOL["int8"]


def test_unaligned_segments_fall_back_once(seg_gemm, fresh_warnings):
    """Boundaries off the 64-element tile: the reference, with one warning naming the boundaries."""
    g = gen(3)
    args = make_case((5,), [96, 160], 64, "int8", g, dual=False, with_bias=False, out_dtype=torch.bfloat16)
    ref = reference(torch.ops.segquant.qlinear, *args)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(cuda(torch.ops.segquant.qlinear, *args), ref)
    msgs = [str(w.message) for w in record if "does not cover this case" in str(w.message)]
    assert len(msgs) == 1 and "not all multiples of 64" in msgs[0], msgs


def test_segmented_cuda_graph_replay(seg_gemm, no_fallback):
    """Capture a DualScale + heads qlinear in a CUDA graph, replay on new inputs copied in place."""
    g = gen(11)
    args = list(
        make_case((256,), [64] * 24, 1536, "int8", g, dual=True, with_bias=True, out_dtype=torch.bfloat16)
    )
    op = torch.ops.segquant.qlinear
    cuda(op, *args)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = cuda(op, *args)
    new = make_case((256,), [64] * 24, 1536, "int8", g, dual=True, with_bias=True, out_dtype=torch.bfloat16)
    args[0].copy_(new[0])
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(op, *args)) <= TOL["int8"]
