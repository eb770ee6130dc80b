"""W4A8 / W4A4 qlinear on CUDA: sq_unpack_int4 (byte-exact vs the reference unpacking) + the int8 GEMMs.

Hopper has no int4 tensor cores: the binding unpacks int4 operands into int8 scratch and runs sq_gemm /
sq_gemm_segmented, so the integer products are exactly the reference's. Grid: W4A8 and W4A4, plain
(per-tensor / per-token activation scales), 24-head segmented and DualScale, M in 1, 7, 256; outputs
written into NaN-poisoned buffers; relative error vs the reference <= 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from sq_gpu_utils import DEV, cuda, gen, rand_factor, rand_x, reference, rel_err

from segquant_fx.ops import reference as R
from segquant_fx.ops.formats import dual_scales_from_minmax, pack_int4, scale_from_amax, unpack_int4

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def unpack(gemm):
    if not gemm.has_unpack_int4():
        pytest.fail(f"{gemm.library_path()} has no sq_unpack_int4: was kernels_cuda/src/unpack.cu built?")
    return gemm


@pytest.mark.parametrize(("rows", "k"), [(1, 2), (3, 30), (7, 64), (129, 3072), (2, 12288 + 2)])
def test_unpack_int4_is_exact(unpack, rows, k):
    g = gen(rows * 1000 + k)
    q = torch.randint(-8, 8, (rows, k), generator=g, device=DEV, dtype=torch.int8)
    packed = pack_int4(q)
    for offset in (0, 1):  # an unaligned source takes the scalar path
        src = torch.empty(packed.numel() + offset, dtype=torch.uint8, device=DEV)[offset:].view(rows, -1)
        src.copy_(packed)
        out = unpack._unpack_int4(
            unpack._lib, src, rows, k, torch.device(DEV), unpack._stream(torch.device(DEV))
        )
        torch.cuda.synchronize()
        assert torch.equal(out, q), f"rows={rows} k={k} offset={offset}"
        assert torch.equal(out, unpack_int4(packed))


def _case(lead, k, n, x_qtype, g, *, segments, dual, per_token):
    sizes = segments or [k]
    x = rand_x((*lead, k), torch.float32, g, spread=0.5)
    if dual:
        x = torch.nn.functional.silu(3 * x)
        pos = torch.stack([c.clamp(min=0).amax() for c in x.split(sizes, -1)])
        neg = torch.stack([c.clamp(max=0).amin() for c in x.split(sizes, -1)])
        sp, sn = dual_scales_from_minmax(pos, neg, x_qtype)
        qx, xs = R.reference_quantize_dual(x, sp, sn, segments, x_qtype), torch.cat([sp, sn]).float()
    elif per_token:
        qx, xs = R.reference_quantize_dynamic(x, [], x_qtype)
    else:
        xs = scale_from_amax(torch.stack([c.abs().amax() for c in x.split(sizes, -1)]), x_qtype).float()
        qx = R.reference_quantize(x, xs, segments, x_qtype)
    w = torch.randn(n, k, generator=g, device=DEV) * 0.05
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), "int4") * rand_factor((n, 1), g, 0.9, 1.1)
    qw = R.reference_quantize(w, ws, [], "int4")
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    return (qx, xs, segments, x_qtype, qw, ws, [], "int4", bias, dual, torch.bfloat16)


@pytest.mark.parametrize("x_qtype", ["int8", "int4"], ids=["w4a8", "w4a4"])
@pytest.mark.parametrize(
    ("layout", "segments", "dual", "per_token"),
    [
        ("per-tensor", [], False, False),
        ("per-token", [], False, True),
        ("heads24", [64] * 24, False, False),
        ("dual", [], True, False),
    ],
)
def test_int4_qlinear_matches_reference(unpack, no_fallback, x_qtype, layout, segments, dual, per_token):
    seed = torch.seed() % 2**31
    g = gen(seed)
    for lead in [(1,), (7,), (256,)]:
        for n in (64, 1536):
            args = _case(lead, 1536, n, x_qtype, g, segments=segments, dual=dual, per_token=per_token)
            what = f"seed={seed} {x_qtype} x int4 {layout} lead={lead} N={n}"
            ref = reference(torch.ops.segquant.qlinear, *args)
            got = cuda(torch.ops.segquant.qlinear, *args)
            assert torch.isfinite(got).all(), what
            assert rel_err(got, ref) <= 1e-3, f"{what}: {rel_err(got, ref):.2e}"
            spec = R.infer_qlinear(*args)
            out = torch.full(spec.out_shape, float("nan"), dtype=torch.bfloat16, device=DEV)
            qx, xs, _, _, qw, ws, _, _, bias, _, _ = args
            assert unpack.qlinear_out(out, qx, xs, qw, ws, bias, spec) == unpack.SQ_OK, what
            assert not torch.isnan(out).any(), what
