"""The CUDA implementations as torch ops: opcheck, CUDA-graph capture and replay, torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from sq_gpu_utils import DEV, assert_same_bytes, cuda, gen, make_scale, rand_x, reference, rel_err

from segquant_fx.ops import reference as R
from segquant_fx.ops.formats import scale_from_amax
from segquant_fx.ops.kernel_preference import KernelPreference, use_kernel_preference

pytestmark = pytest.mark.gpu

CUDA_OPS = ["quantize", "quantize_dynamic", "quantize_dual", "qlinear"]


def _has_fp8(args):
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)


def _larger_samples(op):
    g = gen(7)
    x = rand_x((3, 5, 3072), torch.bfloat16, g)
    heads = [128] * 24
    if op == "quantize":
        return [(x, make_scale("segment", x.float(), heads, "int8", g), heads, "int8", None)]
    if op == "quantize_dynamic":
        return [(x, heads, "fp8_e4m3", (0.5 + torch.rand(3072, generator=g, device=DEV)))]
    if op == "quantize_dual":
        s = make_scale("token", x.float(), [], "int4", g)
        return [(x, s, s * 1.1, [], "int4", None)]
    # qlinear on the sq_gemm path.
    qx, xs = R.reference_quantize_dynamic(x.float(), [], "int8")
    w = torch.randn(256, 3072, generator=g, device=DEV)
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), "int8")
    qw = R.reference_quantize(w, ws, [], "int8")
    bias = torch.randn(256, generator=g, device=DEV).to(torch.bfloat16)
    return [(qx, xs, [], "int8", qw, ws, [], "int8", bias, False, torch.bfloat16)]


def _opcheck_cases():
    out = []
    for op in CUDA_OPS:
        n = len(R.sample_inputs(op))
        out += [(op, "sample", i) for i in range(n)]
        out.append((op, "large", 0))
    return out


@pytest.mark.parametrize(("op", "source", "index"), _opcheck_cases(), ids=lambda v: str(v))
def test_opcheck_cuda(kernels, op, source, index):
    if op == "qlinear" and not kernels.has_gemm():
        pytest.fail("the library has no sq_gemm")
    args = (
        R.sample_inputs(op, device=DEV, seed=index + 3)[index]
        if source == "sample"
        else _larger_samples(op)[0]
    )
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if _has_fp8(args):
        utils.remove("test_schema")  # SchemaCheckMode compares inputs with allclose, which float8 lacks
    with use_kernel_preference(KernelPreference.CUDA), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # some samples fall back (int4 / dual qlinear)
        torch.library.opcheck(getattr(torch.ops.segquant, op), args, test_utils=utils)


# --------------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------------


def _layer_inputs(g, m=96, k=3072, n=3072):
    w = torch.randn(n, k, generator=g, device=DEV) * 0.02
    ws = scale_from_amax(w.abs().amax(-1, keepdim=True), "int8")
    qw = R.reference_quantize(w, ws, [], "int8")
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    x = rand_x((m, k), torch.bfloat16, g, spread=0.5)
    xs = scale_from_amax(x.float().abs().amax(), "int8").reshape(1) * 1.5
    return x, xs, qw, ws, bias


def _static_layer(with_gemm):
    def f(x, xs, qw, ws, bias):
        qx = torch.ops.segquant.quantize(x, xs, [], "int8", None)
        if not with_gemm:
            return qx.float()
        return torch.ops.segquant.qlinear(qx, xs, [], "int8", qw, ws, [], "int8", bias, False, torch.bfloat16)

    return f


def _dynamic_layer(with_gemm):
    def f(x, xs, qw, ws, bias):
        qx, s = torch.ops.segquant.quantize_dynamic(x, [], "int8", None)
        if not with_gemm:
            return qx.float() * s
        return torch.ops.segquant.qlinear(qx, s, [], "int8", qw, ws, [], "int8", bias, False, torch.bfloat16)

    return f


@pytest.mark.parametrize("make_layer", [_static_layer, _dynamic_layer], ids=["static", "dynamic"])
def test_cuda_graph_capture_and_replay(kernels, no_fallback, make_layer):
    with_gemm = kernels.has_gemm() and torch.cuda.get_device_capability() == (9, 0)
    f = make_layer(with_gemm)
    g = gen(31)
    static = list(_layer_inputs(g))
    with use_kernel_preference(KernelPreference.CUDA):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up (module loading, workspace sizes) outside the capture
                f(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = f(*static)
        for trial in range(3):
            x_new, xs_new, *_ = _layer_inputs(gen(100 + trial))
            static[0].copy_(x_new)
            static[1].copy_(xs_new)
            graph.replay()
            torch.cuda.synchronize()
            eager = f(x_new, xs_new, *static[2:])
            assert torch.equal(y_static, eager), f"replay {trial} differs from eager"
    with use_kernel_preference(KernelPreference.REFERENCE):
        ref = f(static[0], static[1], *static[2:])
    if y_static.dtype == torch.float32 and not with_gemm:
        assert torch.equal(y_static, ref)
    else:
        assert rel_err(y_static, ref) <= 1e-3


def test_torch_compile_calls_the_cuda_kernels(kernels, no_fallback):
    g = gen(41)
    x = rand_x((33, 3072), torch.float16, g)
    heads = [128] * 24

    def f(x):
        q, s = torch.ops.segquant.quantize_dynamic(x, heads, "int8", None)
        return q, s

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    with use_kernel_preference(KernelPreference.CUDA):
        q, s = compiled(x)
    q_ref, s_ref = reference(torch.ops.segquant.quantize_dynamic, x, heads, "int8", None)
    assert_same_bytes(q, q_ref, "compiled quantize_dynamic")
    assert_same_bytes(s, s_ref, "compiled quantize_dynamic scale")
    x2 = rand_x((5, 3072), torch.float16, g)  # a new row count: no recompile needed (dynamic)
    with use_kernel_preference(KernelPreference.CUDA):
        q2, _ = compiled(x2)
    assert_same_bytes(q2, cuda(torch.ops.segquant.quantize_dynamic, x2, heads, "int8", None)[0], "dyn rows")
