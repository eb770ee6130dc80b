"""The CUTLASS 2 GEMM path (sm_80 / sm_89 kernels: mma.sync, Sm80 visitor epilogue) against the reference.

``sq_set_gemm_path(SQ_PATH_SM80)`` runs these kernels on the H100 as well, so the same checks as
test_gpu_qlinear.py / test_gpu_qlinear_segmented.py apply: registered op with fallbacks forbidden,
kernel into a NaN-poisoned output, relative error vs the reference and vs the float64 oracle. Grid:
M in 1, 7, 130 ([2, 65]), 256 / 1024 (both tile configurations: M <= 64 and M > 64); plain K in 16, 64,
3072 + 16; N in 8, 3072; segmented: SD3.5 heads, FLUX heads, unequal concat pieces, DualScale on each;
int8 and fp8; bf16 / fp16; bias on and off.
"""

from __future__ import annotations

import itertools

import pytest
import test_gpu_qlinear as plain
import test_gpu_qlinear_segmented as seg
import torch
from sq_gpu_utils import DEV, cuda, gen, reference, rel_err

from segquant_fx.errors import ConfigError
from segquant_fx.ops import reference as R

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("qtype", plain.QTYPES)
@pytest.mark.parametrize("n", [8, 3072])
@pytest.mark.parametrize("k", [16, 64, 3072 + 16])
def test_sm80_plain_qlinear_matches_reference(sm80_path, no_fallback, k, n, qtype):
    gemm = sm80_path
    op = torch.ops.segquant.qlinear
    seed = torch.seed() % 2**31
    g = gen(seed)
    for i, (lead, out_dtype) in enumerate(itertools.product(plain.LEADS, plain.OUT_DTYPES)):
        flags = dict(per_token=i % 2 == 0, per_channel=i % 3 != 2, with_bias=i % 4 != 3)
        what = f"sm80 path seed={seed} lead={lead} K={k} N={n} {qtype} -> {out_dtype} {flags}"
        args = plain.make_linear(lead, k, n, qtype, g, out_dtype=out_dtype, **flags)
        ref = reference(op, *args)
        got = cuda(op, *args)
        assert got.shape == ref.shape and got.dtype == out_dtype, what
        assert rel_err(got, ref) <= plain.TOL[qtype], f"{what}: {rel_err(got, ref):.2e}"
        exact = plain.oracle(args)
        assert rel_err(got, exact) <= 2 * rel_err(ref, exact) + 1e-6, what
        spec = R.infer_qlinear(*args)
        ab = gemm.SQ_FP8E4M3 if qtype == "fp8_e4m3" else gemm.SQ_INT8
        od = gemm.SQ_BF16 if out_dtype == torch.bfloat16 else gemm.SQ_FP16
        assert gemm._lib.sq_gemm_workspace_size(ab, od, spec.lead[0], n, k) == 0, what  # none on this path
        out = torch.full(spec.out_shape, float("nan"), dtype=out_dtype, device=DEV)
        qx, xs, _, _, qw, ws, _, _, bias, _, _ = args
        assert gemm.qlinear_out(out, qx, xs, qw, ws, bias, spec) == gemm.SQ_OK, what
        assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} outputs not written"
        assert rel_err(out, ref) <= plain.TOL[qtype], what


@pytest.mark.parametrize("qtype", seg.QTYPES)
@pytest.mark.parametrize("seg_name", ["sd35-heads", "flux-heads", "concat"])
@pytest.mark.parametrize("dual", [False, True], ids=["seg", "dual"])
def test_sm80_segmented_qlinear_matches_reference(sm80_path, no_fallback, dual, seg_name, qtype):
    seed = torch.seed() % 2**31
    g = gen(seed)
    for i, (lead, n) in enumerate(itertools.product(seg.LEADS, [64, 1536])):
        out_dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        with_bias = i % 3 != 2
        what = f"sm80 path seed={seed} lead={lead} {seg_name} dual={dual} N={n} {qtype} -> {out_dtype}"
        args = seg.make_case(
            lead, seg.SEGMENTS[seg_name], n, qtype, g, dual=dual, with_bias=with_bias, out_dtype=out_dtype
        )
        seg._check(sm80_path, args, what)


def test_sm80_segment_scales_matter(sm80_path, no_fallback):
    g = gen(7)
    args = list(
        seg.make_case((64,), [64] * 24, 256, "int8", g, dual=False, with_bias=False, out_dtype=torch.float16)
    )
    y = cuda(torch.ops.segquant.qlinear, *args)
    xs = args[1].clone()
    xs[[0, 5]] = xs[[5, 0]] * torch.tensor([3.0, 0.25], device=DEV)
    args[1] = xs
    y2 = cuda(torch.ops.segquant.qlinear, *args)
    assert rel_err(y2, y) > 1e-2
    assert rel_err(y2, reference(torch.ops.segquant.qlinear, *args)) <= seg.TOL["int8"]


def test_sm80_segmented_cuda_graph_replay(sm80_path, no_fallback):
    """The per-segment loop (memset + one GEMM per segment + finalize) captures and replays."""
    g = gen(11)
    args = list(
        seg.make_case((256,), [64] * 24, 1536, "int8", g, dual=True, with_bias=True, out_dtype=torch.bfloat16)
    )
    op = torch.ops.segquant.qlinear
    cuda(op, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda(op, *args)
    new = seg.make_case(
        (256,), [64] * 24, 1536, "int8", g, dual=True, with_bias=True, out_dtype=torch.bfloat16
    )
    args[0].copy_(new[0])
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(op, *args)) <= seg.TOL["int8"]


def test_gemm_path_switch_round_trips(gemm):
    if not gemm.has_sm80_gemm():
        pytest.fail("the library has no sq_set_gemm_path")
    assert gemm.current_gemm_path() == "auto"
    with gemm.gemm_path("sm80"):
        assert gemm.current_gemm_path() == "sm80"
        with gemm.gemm_path("sm90"):
            assert gemm.current_gemm_path() == "sm90"
        assert gemm.current_gemm_path() == "sm80"
    assert gemm.current_gemm_path() == "auto"
    with pytest.raises(ConfigError, match="unknown GEMM path 'sm75'"):
        gemm.set_gemm_path("sm75")


def test_paths_agree_on_hopper(sm80_path, no_fallback):
    """On an H100 both paths run the same call; int8 results agree to bf16 rounding."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90 to run both paths")
    g = gen(21)
    args = plain.make_linear(
        (300,),
        3072,
        3072,
        "int8",
        g,
        per_token=True,
        per_channel=True,
        with_bias=True,
        out_dtype=torch.bfloat16,
    )
    y80 = cuda(torch.ops.segquant.qlinear, *args)
    with sm80_path.gemm_path("auto"):
        y90 = cuda(torch.ops.segquant.qlinear, *args)
    assert rel_err(y80, y90) <= 1e-3
