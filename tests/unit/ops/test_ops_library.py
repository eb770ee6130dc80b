"""Registration of the segquant op set: schemas, opcheck, meta tensors, export and compile."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import ops
from segquant_fx.errors import ConfigError
from segquant_fx.ops import library
from segquant_fx.ops.reference import OP_NAMES, sample_inputs

_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]

_EXPECTED_SCHEMAS = {
    "quantize": "segquant::quantize(Tensor x, Tensor scale, SymInt[] segments, str qtype, "
    "Tensor? smooth=None) -> Tensor",
    "dequantize": "segquant::dequantize(Tensor q, Tensor scale, SymInt[] segments, str qtype, "
    "ScalarType out_dtype) -> Tensor",
    "quantize_dynamic": "segquant::quantize_dynamic(Tensor x, SymInt[] segments, str qtype, "
    "Tensor? smooth=None) -> (Tensor, Tensor)",
    "quantize_dual": "segquant::quantize_dual(Tensor x, Tensor scale_pos, Tensor scale_neg, "
    "SymInt[] segments, str qtype, Tensor? smooth=None) -> Tensor",
    "qlinear": "segquant::qlinear(Tensor qx, Tensor x_scale, SymInt[] x_segments, str x_qtype, Tensor qw, "
    "Tensor w_scale, SymInt[] w_segments, str w_qtype, Tensor? bias, bool dual, ScalarType out_dtype) "
    "-> Tensor",
    "fake_quantize": "segquant::fake_quantize(Tensor x, Tensor scale, SymInt[] segments, str qtype, "
    "Tensor? smooth=None) -> Tensor",
    "fake_quantize_dual": "segquant::fake_quantize_dual(Tensor x, Tensor scale_pos, Tensor scale_neg, "
    "SymInt[] segments, str qtype, Tensor? smooth=None) -> Tensor",
}

_SAMPLES = [(name, i) for name in OP_NAMES for i in range(len(sample_inputs(name)))]


def _has_fp8(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)


def _to_meta(a):
    return a.to("meta") if isinstance(a, torch.Tensor) else a


def test_schemas_are_the_contract():
    assert set(OP_NAMES) == set(_EXPECTED_SCHEMAS)
    for name, expected in _EXPECTED_SCHEMAS.items():
        op = getattr(torch.ops.segquant, name).default
        assert str(op._schema) == expected
        assert torch.Tag.pt2_compliant_tag in op.tags


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize(("name", "index"), _SAMPLES, ids=[f"{n}-{i}" for n, i in _SAMPLES])
def test_opcheck(name, index, device):
    args = sample_inputs(name, device=device, seed=index + 1)[index]
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if _has_fp8(args):
        # SchemaCheckMode compares inputs with allclose, which float8 does not implement (CPU or CUDA).
        utils.remove("test_schema")
    torch.library.opcheck(getattr(torch.ops.segquant, name), args, test_utils=utils)


@pytest.mark.parametrize(("name", "index"), _SAMPLES, ids=[f"{n}-{i}" for n, i in _SAMPLES])
def test_meta_matches_reference_shapes(name, index):
    """The fake kernel (Meta key) predicts the reference output's shape, dtype and strides."""
    args = sample_inputs(name, seed=index + 7)[index]
    real = getattr(torch.ops.segquant, name)(*args)
    meta = getattr(torch.ops.segquant, name)(*[_to_meta(a) for a in args])
    real_t = real if isinstance(real, tuple) else (real,)
    meta_t = meta if isinstance(meta, tuple) else (meta,)
    assert len(real_t) == len(meta_t)
    for r, m in zip(real_t, meta_t, strict=True):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())


def test_meta_rejects_bad_inputs_with_our_error():
    """Fake kernels validate like the reference: the same ConfigError, without real data."""
    qx = torch.empty(2, 16, dtype=torch.int8, device="meta")
    qw = torch.empty(4, 12, dtype=torch.int8, device="meta")
    scale = torch.empty(1, device="meta")
    with pytest.raises(ConfigError, match=r"K mismatch: qx .* has K=16 but qw .* has K=12"):
        torch.ops.segquant.qlinear(qx, scale, [], "int8", qw, scale, [], "int8", None, False, torch.float32)


class _TinyQuantBlock(torch.nn.Module):
    """quantize_dynamic -> qlinear (W4A8, segmented) -> fake_quantize_dual."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(6, 16, generator=g)
        w_scale = ops.scale_from_amax(w.abs().reshape(6, 4, 4).amax(-1), "int4")
        self.register_buffer("qw", ops.quantize(w, w_scale, qtype="int4", segments=[4] * 4))
        self.register_buffer("w_scale", w_scale)
        self.bias = torch.nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("s_pos", torch.tensor([0.02]))
        self.register_buffer("s_neg", torch.tensor([0.03]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, x_scale = ops.quantize_dynamic(x, qtype="int8", segments=[6, 10])
        y = ops.qlinear(
            qx,
            x_scale,
            self.qw,
            self.w_scale,
            x_qtype="int8",
            w_qtype="int4",
            x_segments=[6, 10],
            w_segments=[4] * 4,
            bias=self.bias,
            out_dtype=x.dtype,
        )
        return ops.fake_quantize_dual(y, self.s_pos, self.s_neg, qtype="int8")


def test_export_yields_single_segquant_nodes():
    model = _TinyQuantBlock()
    x = torch.randn(2, 5, 16)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    seg = [t for t in targets if getattr(t, "namespace", None) == "segquant"]
    assert seg == [
        torch.ops.segquant.quantize_dynamic.default,
        torch.ops.segquant.qlinear.default,
        torch.ops.segquant.fake_quantize_dual.default,
    ]
    # Nothing of the reference leaked into the graph (only the tuple unpacking remains).
    assert all(t in seg or t.__name__ == "getitem" for t in targets)
    x2 = torch.randn(3, 5, 16)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=0, atol=0)


def test_compile_fullgraph_matches_eager():
    model = _TinyQuantBlock()
    x = torch.randn(4, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # the ops are inference-only (no autograd formula)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_wrappers_forward_to_the_ops():
    x = torch.randn(3, 8)
    s = torch.tensor([0.05])
    assert torch.equal(
        ops.quantize(x, s, qtype="int4", segments=[3, 5]),
        torch.ops.segquant.quantize(x, s, [3, 5], "int4", None),
    )
    q, sc = ops.quantize_dynamic(x, qtype="int8")
    assert sc.shape == (3, 1)
    assert ops.dequantize(q, sc, qtype="int8", out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown segquant op 'nope'"):
        library.register_cuda_impl("nope", None)
