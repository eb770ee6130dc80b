"""QuantizeRewritePass on the toy DiT block (structure, numerics, count).

* structure: per layer, the exact ordered list of ``call_function`` targets the pass inserts (rules
  1-5 of the pass docstring), the arguments of the segquant calls, and the buffers that replace the
  float weight;
* numerics: the rewritten block against the float block; real ops against fake quantization; the
  stored smoothing vector, activation scales and quantized weights against values computed here from
  forward-hook statistics of the float model;
* count: one replacement per annotated linear, none left, and a graph without annotations untouched.
"""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
from torch import fx

from segquant_fx import api, ops
from segquant_fx.config import W8A8, QuantizeConfig
from segquant_fx.errors import CalibrationError
from segquant_fx.passes.annotate import annotations
from segquant_fx.passes.base import run_passes
from segquant_fx.passes.calibrate import calibrate
from segquant_fx.passes.rewrite import QuantizeRewritePass
from segquant_fx.quantized import prepare_graph_module

from ._toys import LINEARS, calib_items, captured_toy, prepared_toy

SQ = torch.ops.segquant
LINEAR = torch.ops.aten.linear.default
GETITEM = operator.getitem
DUAL = ("ada", "ff2")

# Inserted call_function targets per layer kind (static non-dual, static dual), per rewrite rule.
STATIC_REAL = {
    False: [SQ.quantize.default, SQ.qlinear.default],
    True: [SQ.quantize_dual.default, SQ.qlinear.default],
}
STATIC_FAKE = {False: [SQ.fake_quantize.default, LINEAR], True: [SQ.fake_quantize_dual.default, LINEAR]}
DYNAMIC_REAL = [SQ.quantize_dynamic.default, GETITEM, GETITEM, SQ.qlinear.default]
DYNAMIC_FAKE = [SQ.quantize_dynamic.default, GETITEM, GETITEM, SQ.dequantize.default, LINEAR]
CASES: dict[str, tuple[Any, dict[str, list[Any]]]] = {
    "w8a8": ("w8a8", {m: STATIC_REAL[m in DUAL] for m in LINEARS}),
    "w8a8-fake": (
        W8A8.with_overrides({"default": {"real_quant": False}}),
        {m: STATIC_FAKE[m in DUAL] for m in LINEARS},
    ),
    "fp8": ("w8a8-fp8", {m: STATIC_REAL[m in DUAL] for m in LINEARS}),
    "dynamic": ("w8a8-dynamic", {m: DYNAMIC_REAL for m in LINEARS}),
    "dynamic-fake": (
        QuantizeConfig.coerce("w8a8-dynamic").with_overrides({"default": {"real_quant": False}}),
        {m: DYNAMIC_FAKE for m in LINEARS},
    ),
    "w8a16": ("w8a16", {m: [SQ.qlinear.default] for m in LINEARS}),
    "w8a16-fake": (
        QuantizeConfig.coerce("w8a16").with_overrides({"default": {"real_quant": False}}),
        {m: [LINEAR] for m in LINEARS},
    ),
}

ITEMS = calib_items(4)


class Rewritten:
    """A rewritten block: the pass, its result, the nodes it inserted, and the QuantizedModel."""

    def __init__(self, config: Any, items=ITEMS):
        self.prepared = prepared_toy(config)
        self.before = {n.name for n in self.prepared.gm.graph.nodes}
        self.observers, _ = calibrate(
            self.prepared.gm, items, self.prepared.signature, self.prepared.constants, progress=False
        )
        self.rewrite = QuantizeRewritePass(self.observers)
        self.model = api.finish(self.prepared, self.rewrite)
        self.gm = self.model.graph_module

    def inserted(self) -> list[fx.Node]:
        """call_function nodes the pass added, in graph order."""
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.name not in self.before]

    def layer_nodes(self) -> dict[str, list[fx.Node]]:
        """Module -> the inserted call_function nodes that compute it (walked back from its output)."""
        new = {n.name for n in self.inserted()}
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        out = {}
        for node in self.gm.graph.nodes:
            ann = node.meta.get("segquant_quantized")
            if ann is None:
                continue
            seen, stack = {node}, [node]
            while stack:
                for a in stack.pop().all_input_nodes:
                    if (
                        a.op == "call_function"
                        and a.name in new
                        and a not in seen
                        and "segquant_quantized" not in a.meta
                    ):
                        seen.add(a)
                        stack.append(a)
            out[ann.module] = sorted(seen, key=order.__getitem__)
        return out


@pytest.fixture(scope="module")
def w8a8() -> Rewritten:
    return Rewritten("w8a8")


def hooked_absmax(items) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> (per-channel max, per-channel min) of its input over ``items`` (float model hooks)."""
    model, _ = captured_toy()
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in LINEARS}
    hs = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda mod, a, m=m: rows[m].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for m in LINEARS
    ]
    with torch.no_grad():
        for it in items:
            model(**it)
    for h in hs:
        h.remove()
    return {m: (torch.cat(r).amax(0), torch.cat(r).amin(0)) for m, r in rows.items()}


# ----------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("case", list(CASES))
def test_inserted_targets_per_layer(case):
    config, want = CASES[case]
    r = Rewritten(config)
    got = {m: [n.target for n in nodes] for m, nodes in r.layer_nodes().items()}
    assert got == want
    # and nothing else was inserted: the per-layer lists, in graph order, are all new call_functions
    assert [n.target for n in r.inserted()] == [t for m in LINEARS for t in want[m]]
    r.gm.graph.lint()


def test_segquant_call_arguments(w8a8):
    nodes = w8a8.layer_nodes()
    gm = w8a8.gm

    def attr(n: fx.Node) -> str:
        assert n.op == "get_attr"
        return n.target

    # rule 2 (DualScale, static): quantize_dual(x, pos, neg, segs, qtype, smooth) -> qlinear(..., dual=True)
    qd, ql = nodes["ada"]
    assert [attr(a) for a in (qd.args[1], qd.args[2], qd.args[5])] == [
        "ada.x_scale_pos",
        "ada.x_scale_neg",
        "ada.smooth",
    ]
    assert qd.args[0].target == torch.ops.aten.silu.default
    assert list(qd.args[3:5]) == [[], "int8"]
    assert ql.args[0] is qd
    assert [attr(a) for a in (ql.args[1], ql.args[4], ql.args[5], ql.args[8])] == [
        "ada.x_scale",
        "ada.qweight",
        "ada.w_scale",
        "ada.bias",
    ]
    assert list(ql.args[2:4]) + list(ql.args[6:8]) + list(ql.args[9:]) == [
        [],
        "int8",
        [],
        "int8",
        True,
        torch.float32,
    ]
    # rule 1 with input segments (head merge): the segments go to both the quantizer and qlinear
    q, ql = nodes["to_out"]
    assert q.args[0].target == torch.ops.aten.reshape.default
    assert list(q.args[2:4]) == [[4, 4, 4, 4], "int8"] and attr(q.args[4]) == "to_out.smooth"
    assert list(ql.args[2:4]) == [[4, 4, 4, 4], "int8"] and ql.args[9] is False
    # the consumers now read the qlinear: chunk for ada, the gate multiply for to_out
    assert [u.target for u in nodes["ada"][-1].users] == [torch.ops.aten.chunk.default]
    assert [u.target for u in nodes["to_out"][-1].users] == [torch.ops.aten.mul.Tensor]
    assert not any(n.target == LINEAR for n in gm.graph.nodes)


def test_buffers_replace_float_weights(w8a8):
    bufs = dict(w8a8.gm.named_buffers())
    for m, (k, n) in LINEARS.items():
        mod = w8a8.gm.get_submodule(m)
        assert "weight" not in mod._parameters and not hasattr(mod, "weight")
        assert mod.bias.dtype == torch.float32 and mod.bias.shape == (n,)
        assert bufs[f"{m}.qweight"].dtype == torch.int8 and bufs[f"{m}.qweight"].shape == (n, k)
        assert bufs[f"{m}.w_scale"].shape == (n, 1)
        assert bufs[f"{m}.smooth"].shape == (k,)
        nseg = 4 if m == "to_out" else 1
        if m in DUAL:
            assert bufs[f"{m}.x_scale_pos"].shape == bufs[f"{m}.x_scale_neg"].shape == (nseg,)
            assert torch.equal(
                bufs[f"{m}.x_scale"], torch.cat([bufs[f"{m}.x_scale_pos"], bufs[f"{m}.x_scale_neg"]])
            )
        else:
            assert bufs[f"{m}.x_scale"].shape == (nseg,)
            assert f"{m}.x_scale_pos" not in bufs
        assert all(bufs[f"{m}.{b}"].dtype == torch.float32 for b in ("w_scale", "x_scale", "smooth"))
    assert sorted(w8a8.rewrite.layer_tensors) == sorted(LINEARS)


# ------------------------------------------------------------------------------------------ numerics

# Relative error of the rewritten block on the calibration items themselves (no clipping: the static
# scales come from these items), about 1.5x the measured value.
BLOCK_ERROR_BOUNDS = {"w8a8": 0.0069, "fp8": 0.030, "dynamic": 0.0055, "w8a16": 0.0049}
# measured:            0.00461        0.0203        0.00364            0.00328


@pytest.mark.parametrize("case", list(BLOCK_ERROR_BOUNDS))
def test_rewritten_block_close_to_float(case, w8a8):
    r = w8a8 if case == "w8a8" else Rewritten(CASES[case][0])
    model, _ = captured_toy()
    worst = 0.0
    with torch.no_grad():
        for item in ITEMS:
            ref = model(**item)
            worst = max(worst, float((r.model(**item) - ref).norm() / ref.norm()))
    print(f"{case}: worst relative error over the calibration items {worst:.5f}")
    assert 0 < worst <= BLOCK_ERROR_BOUNDS[case]


@pytest.mark.parametrize("case", ["w8a8", "dynamic", "w8a16"])
def test_real_ops_agree_with_fake_quant(case):
    real, fake = Rewritten(CASES[case][0]), Rewritten(CASES[f"{case}-fake"][0])
    with torch.no_grad():
        for item in calib_items(2, seed=5):
            a, b = real.model(**item), fake.model(**item)
            assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


def test_stored_tensors_match_independent_statistics(w8a8):
    """Smoothing, activation scales and weights recomputed from hook statistics of the float model."""
    stats = hooked_absmax(ITEMS)
    model, _ = captured_toy()
    for m, (k, _) in LINEARS.items():
        mod = w8a8.gm.get_submodule(m)
        hi, lo = stats[m]
        absmax = torch.maximum(hi.clamp(min=0), -lo.clamp(max=0))
        w = model.get_submodule(m).weight.detach()
        s_want = (absmax.double().sqrt() / w.abs().amax(0).double().sqrt()).clamp(1e-4, 1e4).float()
        torch.testing.assert_close(mod.smooth, s_want, rtol=1e-6, atol=0)
        s = mod.smooth
        segs = [4] * 4 if m == "to_out" else [k]
        if m in DUAL:
            pos = torch.stack([t.max() for t in (hi.clamp(min=0) / s).split(segs)]) / 127
            neg = torch.stack([-t.min() for t in (lo.clamp(max=0) / s).split(segs)]) / 128
            torch.testing.assert_close(mod.x_scale_pos, pos, rtol=1e-6, atol=0)
            torch.testing.assert_close(mod.x_scale_neg, neg, rtol=1e-6, atol=0)
        else:
            amax = torch.stack([t.max() for t in (absmax / s).split(segs)])
            torch.testing.assert_close(mod.x_scale, amax / 127, rtol=1e-6, atol=0)
        # per output channel int8: |q * scale - W * s| <= scale / 2, and every row reaches +-127
        ws = w * s[None, :]
        torch.testing.assert_close(mod.w_scale, ws.abs().amax(1, keepdim=True) / 127, rtol=1e-6, atol=0)
        err = (mod.qweight.float() * mod.w_scale - ws).abs()
        assert (err <= mod.w_scale / 2 * (1 + 1e-5)).all(), m
        assert (mod.qweight.abs().amax(1) == 127).all(), m


def test_weight_dequantizes_like_the_op(w8a8):
    """The stored qweight/w_scale pair is what ``segquant.dequantize`` expects (per-channel)."""
    mod = w8a8.gm.get_submodule("ff1")
    deq = ops.dequantize(mod.qweight, mod.w_scale, qtype="int8", out_dtype=torch.float32)
    torch.testing.assert_close(deq, mod.qweight.float() * mod.w_scale, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- count


def test_counts(w8a8):
    targets = [n.target for n in w8a8.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(SQ.qlinear.default) == 5
    assert targets.count(SQ.quantize_dual.default) == 2
    assert targets.count(SQ.quantize.default) == 3
    assert targets.count(LINEAR) == 0
    assert len(w8a8.inserted()) == 10
    assert len(w8a8.model.plan) == 5


def test_graph_without_annotations_is_untouched():
    _, cm = captured_toy()
    gm = prepare_graph_module(cm.exported.module())
    code = gm.code
    rewrite = QuantizeRewritePass({})
    result = rewrite(gm)
    assert result.modified is False
    assert gm.code == code
    assert rewrite.layer_tensors == {}


def test_dynamic_without_smoothing_needs_no_statistics():
    """Per-token activations without SmoothQuant use no calibration statistics at all."""
    cfg = QuantizeConfig.coerce("w8a8-dynamic").with_overrides({"default": {"opt": {"type": "default"}}})
    p = prepared_toy(cfg)
    gm = run_passes(p.gm, [QuantizeRewritePass({})])
    assert sum(n.target == SQ.quantize_dynamic.default for n in gm.graph.nodes) == 5


# ---------------------------------------------------------------------------------- negative / errors


def test_missing_statistics_raise():
    """An annotated static layer without an observer: CalibrationError naming the module."""
    p = prepared_toy("w8a8")
    observers, _ = calibrate(p.gm, ITEMS[:1], p.signature, p.constants, progress=False)
    ada_node = next(n for n, a in annotations(p.gm).items() if a.module == "ada")
    del observers[ada_node]
    with pytest.raises(CalibrationError, match=r"ada: no calibration statistics were recorded"):
        run_passes(p.gm, [QuantizeRewritePass(observers)])


def test_observer_that_saw_nothing_raises():
    """An observer with count 0 (the layer never ran during calibration) is as good as none."""
    p = prepared_toy("w8a8")
    observers, _ = calibrate(p.gm, ITEMS[:1], p.signature, p.constants, progress=False)
    for o in observers.values():
        o.reset()
    with pytest.raises(
        CalibrationError, match=r"no calibration statistics were recorded \(is the layer ever run\?\)"
    ):
        run_passes(p.gm, [QuantizeRewritePass(observers)])


def test_precomputed_tensors_missing_a_layer_raise(w8a8):
    """Loading saved tensors that lack a quantized layer: CalibrationError naming it."""
    saved = {m: t for m, t in w8a8.rewrite.layer_tensors.items() if m != "ff2"}
    p = prepared_toy("w8a8")
    with pytest.raises(CalibrationError, match=r"ff2: no saved tensors for this quantized layer"):
        run_passes(p.gm, [QuantizeRewritePass(precomputed=saved)])


def test_precomputed_tensors_reproduce_the_model(w8a8):
    """The positive counterpart: the saved layer tensors rebuild an identical model without calibration."""
    p = prepared_toy("w8a8")
    rebuilt = api.finish(p, QuantizeRewritePass(precomputed=w8a8.rewrite.layer_tensors))
    with torch.no_grad():
        for item in ITEMS[:2]:
            torch.testing.assert_close(rebuilt(**item), w8a8.model(**item), rtol=0, atol=0)
