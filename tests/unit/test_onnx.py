"""``segquant_fx.export_onnx``: QDQ and ``com.segquant`` formats, checker, op types, ONNX Runtime numerics.

ONNX Runtime is compared with the eager quantized model at ``ORT_ENABLE_BASIC``, which runs the QDQ
graph as written (float emulation of every Q/DQ): small models match to float rounding. At the default
``ORT_ENABLE_ALL`` level ORT rewrites ``DQ -> MatMul`` into its own integer kernels (requantizing, and
on CPUs without VNNI with saturating u8s8 arithmetic), which moves outputs by up to about one
quantization step; that level is checked against the quantization error instead. ``segquant``-format
files are evaluated with onnx's reference evaluator, ``com.segquant.QLinear`` implemented by our ops
from the node's inputs and attributes alone, which shows the format carries everything a kernel needs.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.fx._pytree as fx_pytree
from _utils.deploy import BACKBONES, Toy, first, quantized_zoo, rel, toy_calib, toy_quantized

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import segquant_fx  # noqa: E402
from segquant_fx.export.onnx import OnnxExportError  # noqa: E402
from segquant_fx.export.onnx_translations import DOMAIN, register_schemas  # noqa: E402
from segquant_fx.models import build_model  # noqa: E402

BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: Toy width: w4a16 quantizes weights in groups of 64 input channels.
D = 64


def feeds(qmodel, kwargs: dict) -> dict[str, np.ndarray]:
    """ONNX inputs (named after the flattened forward arguments) for forward kwargs."""
    call, _ = qmodel._bind((), dict(kwargs))
    gm = qmodel.graph_module
    flat = fx_pytree.tree_flatten_spec(((), call), gm._in_spec)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v.numpy() for n, v in zip(names, flat, strict=True) if isinstance(v, torch.Tensor)}


def run_ort(path, inputs: dict, level=BASIC) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in inputs.items() if k in names})


def segquant_counts(qmodel) -> Counter:
    return Counter(
        n.target.__name__.split(".")[0]
        for n in qmodel.graph_module.graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "segquant"
    )


@pytest.fixture(
    scope="module",
    params=[(m, f) for m in BACKBONES for f in ("qdq", "segquant")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def exported(request, tmp_path_factory):
    name, fmt = request.param
    model, qmodel = quantized_zoo(name)
    path = tmp_path_factory.mktemp("onnx") / f"{name}-{fmt}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The exporter's ONNX optimizer (onnxscript rewrite rules) is most of an export's time (about
        # 100 s of 180 on tiny SDXL) and has nothing to fold around com.segquant nodes: it runs on
        # tiny SD3's QDQ export (and the toys' below), which shows it keeps every Q/DQ and the numerics.
        segquant_fx.export_onnx(qmodel, path, format=fmt, optimize=(name, fmt) == ("tiny-sd3", "qdq"))
    return {
        "name": name,
        "format": fmt,
        "path": path,
        "model": model,
        "qmodel": qmodel,
        "proto": onnx.load(str(path)),
    }


def test_checker_passes(exported):
    """The file loads and passes the full checker (our schemas registered for the segquant format)."""
    register_schemas()
    onnx.checker.check_model(exported["proto"], full_check=True)


def test_op_types(exported):
    """qdq: standard Q/DQ per quantized activation and weight; segquant: one QLinear per linear."""
    proto, qmodel = exported["proto"], exported["qmodel"]
    ops = Counter(n.op_type for n in proto.graph.node)
    domains = {n.domain for n in proto.graph.node}
    seg = segquant_counts(qmodel)
    if exported["format"] == "qdq":
        assert DOMAIN not in domains
        # one Q per static quantize, two per DualScale quantize
        assert ops["QuantizeLinear"] == seg["quantize"] + 2 * seg["quantize_dual"]
        # per linear: the weight DQ, plus one activation DQ (two for DualScale)
        assert ops["DequantizeLinear"] == seg["qlinear"] + seg["quantize"] + 2 * seg["quantize_dual"]
        assert ops["MatMul"] >= seg["qlinear"]
    else:
        assert ops["QLinear"] == seg["qlinear"] == len(qmodel.plan)
        assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
        assert {(o.domain, o.version) for o in proto.opset_import} >= {(DOMAIN, 1)}
        acts = Counter(
            next(a.s.decode() for a in n.attribute if a.name == "act")
            for n in proto.graph.node
            if n.op_type == "QLinear"
        )
        assert acts == {"static": seg["quantize"], "dual": seg["quantize_dual"]}


def test_inputs_named_after_forward_with_dynamic_axes(exported):
    """Graph inputs carry the forward's argument names; batch and token/spatial dims are dynamic."""
    proto, qmodel = exported["proto"], exported["qmodel"]
    placeholders = [n.name for n in qmodel.graph_module.graph.nodes if n.op == "placeholder"]
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert list(inputs) == [p for p in placeholders if p in inputs] and len(inputs) >= 4
    first = inputs[placeholders[0]]
    assert first[0] == "batch"
    assert any(isinstance(d, str) for d in first[1:])  # tokens (FLUX) or height/width (SD3, SDXL)
    assert [o.name for o in proto.graph.output] in (["sample"], ["sample_out"])


def test_numerics_match_quantized_model(exported):
    """The exported model at another batch size and resolution reproduces the PyTorch quantized model.

    qdq: ONNX Runtime (CPU). segquant: onnx's reference evaluator, with ``com.segquant.QLinear``
    evaluated by our ops from nothing but the node's inputs and attributes (ORT has no kernels for it).
    SD3 matches to float rounding; FLUX's rotary embeddings and SDXL's GroupNorm differ in the last bits
    outside PyTorch, which moves a few static int8 codes by one step (the effect test_compile
    describes), so there the bound is a fraction of the quantization error.
    """
    name, qmodel, model = exported["name"], exported["qmodel"], exported["model"]
    if exported["format"] == "segquant" and name == "tiny-sdxl":
        # onnx's reference Conv is Python loops: batch 1 and a 12x12 latent keep it to seconds
        _, kwargs = build_model(name, batch_size=1, seed=7)
        kwargs["sample"] = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(7))
    else:
        _, kwargs = build_model(name, batch_size=3, seed=7)
    with torch.no_grad():
        ref = first(qmodel(**kwargs, return_dict=False)).numpy()
        flt = first(model(**kwargs, return_dict=False)).numpy()
    quant_err = rel(ref, flt)
    bound = 1e-5 if name == "tiny-sd3" else 0.25 * quant_err
    inputs = feeds(qmodel, kwargs)
    if exported["format"] == "segquant":
        evaluator = semantics_evaluator(exported["path"])
        out = evaluator.run(None, {k: v for k, v in inputs.items() if k in set(evaluator.input_names)})[0]
        assert out.shape == ref.shape and rel(out, ref) <= bound, (rel(out, ref), quant_err)
        return
    basic = run_ort(exported["path"], inputs, BASIC)[0]
    assert basic.shape == ref.shape
    assert rel(basic, ref) <= bound, (rel(basic, ref), quant_err)
    full = run_ort(exported["path"], inputs, ALL)[0]  # ORT's integer kernels: about one step per layer
    assert rel(full, ref) <= quant_err


# --------------------------------------------------------------------------------------------------
# small models: every preset, exact numerics, errors, CLI
# --------------------------------------------------------------------------------------------------


def toy(preset: str):
    """(float, quantized) toy of width ``D`` for ``preset``, from the session cache."""
    return toy_quantized(preset, D)


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-fp8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8"])
def test_qdq_presets_exact_in_onnxruntime(preset, tmp_path):
    """Every expressible preset: checker passes and ORT reproduces the quantized model to float rounding.

    Covers int8 and fp8 (e4m3) Q/DQ, DualScale, SmoothQuant, per-token dynamic activations, weight-only
    int8, group-wise int4 weights (blocked DequantizeLinear) and the low-rank branch of w4a8.
    """
    _, qmodel = toy(preset)
    path = segquant_fx.export_onnx(qmodel, tmp_path / "toy.onnx", format="qdq")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["DequantizeLinear"] >= 2
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    out = run_ort(path, {"x": x.numpy()}, BASIC)[0]
    assert rel(out, ref) < 1e-5, preset
    out_all = run_ort(path, {"x": x.numpy()}, ALL)[0]  # ORT's integer kernels: about one step
    assert rel(out_all, ref) < 1e-2


def test_qdq_fp8_uses_float8_qdq(tmp_path):
    """fp8 activations and weights are FLOAT8E4M3FN QuantizeLinear/DequantizeLinear (opset >= 19)."""
    _, qmodel = toy("w8a8-fp8")
    proto = onnx.load(str(segquant_fx.export_onnx(qmodel, tmp_path / "fp8.onnx", format="qdq")))
    f8 = onnx.TensorProto.FLOAT8E4M3FN
    weights = [i for i in proto.graph.initializer if i.data_type == f8 and len(i.dims) == 2]
    assert sorted(tuple(w.dims) for w in weights) == [(64, 256), (256, 64)]  # transposed float8 weights
    consts = [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute]
    zero_points = [t for t in [*consts, *proto.graph.initializer] if t.data_type == f8 and len(t.dims) <= 1]
    assert zero_points  # QuantizeLinear emits float8 through a float8 zero point


def semantics_evaluator(path):
    """onnx's reference evaluator with com.segquant.QLinear implemented by our torch ops."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    def t(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    class QLinear(OpRun):
        op_domain = DOMAIN

        def _run(self, x, qweight, w_scale, bias=None, x_scale=None, x_scale_neg=None, smooth=None, act=None,
                 act_qtype=None, x_segments=None, w_qtype=None, w_segments=None, dual=None, out_dtype=None):  # fmt: skip
            y = torch.ops.segquant_onnx.linear(
                t(x), t(smooth), t(x_scale), t(x_scale_neg), list(x_segments or []), act_qtype, act, t(qweight),
                t(w_scale), list(w_segments or []), w_qtype, t(bias), torch.float32,
            )  # fmt: skip
            return (y.numpy(),)

    return ReferenceEvaluator(str(path), new_ops=[QLinear])


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic", "w8a16", "w4a4"])
def test_segquant_format_is_complete(preset, tmp_path):
    """The QLinear nodes carry everything a kernel needs: evaluating them with our ops reproduces the model."""
    _, qmodel = toy(preset)
    path = segquant_fx.export_onnx(qmodel, tmp_path / "toy.onnx", format="segquant")
    proto = onnx.load(str(path))
    register_schemas()
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QLinear"] == 2
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    out = semantics_evaluator(path).run(None, {"x": x.numpy()})[0]
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic"])
def test_fake_quant_graphs_export(preset, tmp_path):
    """real_quant=False graphs (fake_quantize[_dual], quantize_dynamic + dequantize) export in both formats."""
    from segquant_fx.config import QuantizeConfig

    cfg = QuantizeConfig.coerce(preset).to_dict()
    cfg["default"]["real_quant"] = False
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = segquant_fx.quantize(Toy(D).eval(), toy_calib(3, seed=1, d=D), cfg, progress=False)
    assert "qlinear" not in segquant_counts(qmodel)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    qdq = segquant_fx.export_onnx(qmodel, tmp_path / "qdq.onnx", format="qdq")
    onnx.checker.check_model(onnx.load(str(qdq)), full_check=True)
    assert rel(run_ort(qdq, {"x": x.numpy()})[0], ref) < 1e-5
    seg = segquant_fx.export_onnx(qmodel, tmp_path / "seg.onnx", format="segquant")
    proto = onnx.load(str(seg))
    register_schemas()
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    want = {"FakeQuantize", "FakeQuantizeDual"} if preset == "w8a8" else {"QuantizeDynamic", "Dequantize"}
    assert want <= set(ops) and "QLinear" not in ops


def test_int4_activations_in_qdq_raise_naming_node(tmp_path):
    """int4 activations have no standard QDQ form: the error names the node and format='segquant'."""
    _, qmodel = toy("w4a4")
    with pytest.raises(
        OnnxExportError, match=r"node 'quantize_dynamic.*module 'fc1'.*int4 activations.*format='segquant'"
    ):
        segquant_fx.export_onnx(qmodel, tmp_path / "w4a4.onnx", format="qdq")


def test_fp8_needs_opset_19(tmp_path):
    """fp8 Q/DQ needs opset >= 19; the error names the node and the opset to use."""
    _, qmodel = toy("w8a8-fp8")
    with pytest.raises(OnnxExportError, match=r"node .*fp8_e4m3 needs ONNX opset >= 19"):
        segquant_fx.export_onnx(qmodel, tmp_path / "fp8.onnx", format="qdq", opset=18)


def test_bad_arguments_raise(tmp_path):
    """Unknown format, too-old opset, or a float model: clear OnnxExportErrors."""
    model, qmodel = toy("w8a8")
    with pytest.raises(OnnxExportError, match="unknown ONNX format 'tflite'"):
        segquant_fx.export_onnx(qmodel, tmp_path / "a.onnx", format="tflite")
    with pytest.raises(OnnxExportError, match="opset >= 18"):
        segquant_fx.export_onnx(qmodel, tmp_path / "a.onnx", opset=13)
    with pytest.raises(OnnxExportError, match="needs a QuantizedModel.*quantize it first"):
        segquant_fx.export_onnx(model, tmp_path / "a.onnx")


def test_external_data(tmp_path):
    """external_data=True (automatic above 2 GB) writes initializers next to the model; ORT loads it."""
    _, qmodel = toy("w8a8")
    path = segquant_fx.export_onnx(qmodel, tmp_path / "ext.onnx", format="qdq", external_data=True)
    assert [p.name for p in tmp_path.iterdir() if p.name != "ext.onnx"]
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        assert rel(run_ort(path, {"x": x.numpy()})[0], qmodel(x).numpy()) < 1e-5


def test_cli_export_onnx(tmp_path, capsys):
    """segquant-fx export-onnx quantizes a model and writes a checked ONNX file."""
    from segquant_fx.cli import main

    factory = tmp_path / "toy_factory.py"
    factory.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()\n"
        "    return m, (torch.randn(2, 32),)\n"
    )
    out = tmp_path / "cli.onnx"
    assert main(["export-onnx", "--model", f"{factory}:make", "--preset", "w8a8", "--format", "qdq", "--out", str(out),
                 "--calib-items", "2", "--quiet"]) == 0  # fmt: skip
    assert "exported as qdq" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
