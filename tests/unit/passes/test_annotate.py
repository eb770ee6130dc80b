"""AnnotatePass on the toy DiT block: which nodes get which annotation (structure, numerics, count).

The pass only writes ``node.meta["segquant_annotation"]``; these tests check the exact annotation of
every linear under the presets and switches that change it, that nothing else in the graph changes,
and the cases where a layer stays float or the pass refuses the graph.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from segquant_fx.config import W8A8, QuantizeConfig
from segquant_fx.errors import ConfigError, PreconditionError
from segquant_fx.passes.annotate import AnnotatePass, LinearAnnotation, annotations, validate_annotations
from segquant_fx.passes.base import SEGQUANT_ANNOTATION_KEY, run_passes
from segquant_fx.quantized import prepare_graph_module
from segquant_fx.report import find_patterns

from ._toys import LINEARS, captured_toy, example_item, prepared_toy

LINEAR = torch.ops.aten.linear.default
NODES = {"ada": "linear", "to_v": "linear_1", "to_out": "linear_2", "ff1": "linear_3", "ff2": "linear_4"}
PATTERNS = {
    "ada": ("linear_to_chunk", "activation_to_linear"),
    "to_v": (),
    "to_out": ("reshape_to_linear",),
    "ff1": (),
    "ff2": ("activation_to_linear",),
}


def expected(module: str, **changes) -> LinearAnnotation:
    """The w8a8 annotation of ``module`` (the plan is not compared: ``compare=False``), with changes."""
    k, n = LINEARS[module]
    ann = dict(
        module=module,
        act_qtype="int8",
        weight_qtype="int8",
        act_dynamic=False,
        in_segments=(4, 4, 4, 4) if module == "to_out" else (),
        out_segments=(16, 16, 16) if module == "ada" else (),
        dual=module in ("ada", "ff2"),
        dual_segments=None,
        weight_granularity="per_channel",
        weight_group_size=None,
        smooth_alpha=0.5,
        real_quant=True,
        in_features=k,
        out_features=n,
        plan=None,
    )
    ann.update(changes)
    return LinearAnnotation(**ann)


def by_module(gm) -> dict[str, LinearAnnotation]:
    return {a.module: a for a in annotations(gm).values()}


def fresh_graph():
    """The captured block's graph, unlifted and ready to annotate (not annotated yet)."""
    _, cm = captured_toy()
    return prepare_graph_module(cm.exported.module())


# ----------------------------------------------------------------------------------------- structure


def test_w8a8_annotates_exactly_the_linears():
    p = prepared_toy("w8a8")
    anns = annotations(p.gm)
    assert anns.keys() == set(NODES.values())
    for node in p.gm.graph.nodes:
        assert (SEGQUANT_ANNOTATION_KEY in node.meta) == (node.target == LINEAR)
    assert by_module(p.gm) == {m: expected(m) for m in LINEARS}
    for name, ann in anns.items():
        assert NODES[ann.module] == name
        assert ann.plan.patterns == PATTERNS[ann.module]
        assert ann.plan.nodes == (name,)


def test_annotation_values():
    """The three structures of the block: adaLN output segments, head segments, DualScale."""
    anns = by_module(prepared_toy("w8a8").gm)
    assert anns["ada"].out_segments == (16, 16, 16) and anns["ada"].dual
    assert anns["to_out"].in_segments == (4,) * 4 and not anns["to_out"].dual
    assert anns["ff2"].dual and anns["ff2"].in_segments == ()
    assert not any(anns[m].dual or anns[m].in_segments or anns[m].out_segments for m in ("to_v", "ff1"))


def test_annotate_pass_changes_meta_only():
    gm = fresh_graph()
    report = find_patterns(gm)
    before_code = gm.code
    before_nodes = [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes]
    ann_pass = AnnotatePass(QuantizeConfig.coerce("w8a8"), report.node_matches)
    result = ann_pass(gm)
    assert result.modified is True
    assert result.graph_module is gm
    assert gm.code == before_code
    assert [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes] == before_nodes
    assert by_module(gm) == {m: expected(m) for m in LINEARS}
    assert ann_pass.skipped == {}


@pytest.mark.parametrize(
    ("config", "changes"),
    [
        ("w8a8-dynamic", {"act_dynamic": True, "dual": False}),
        ("w8a8-fp8", {"act_qtype": "fp8_e4m3", "weight_qtype": "fp8_e4m3", "smooth_alpha": None}),
        ("w8a16", {"act_qtype": None, "dual": False, "smooth_alpha": None}),
        (W8A8.with_overrides({"default": {"real_quant": False}}), {"real_quant": False}),
        (QuantizeConfig.ablation("w8a8", seglinear=False), {"in_segments": (), "out_segments": ()}),
        (QuantizeConfig.ablation("w8a8", dual_scale=False), {"dual": False}),
        (W8A8.with_overrides({"default": {"opt": {"type": "smooth", "alpha": 0.8}}}), {"smooth_alpha": 0.8}),
        (
            W8A8.with_overrides({"default": {"weight_quant": {"type": "int8", "axis": None}}}),
            {"weight_granularity": "per_tensor"},
        ),
    ],
    ids=["dynamic", "fp8", "w8a16", "fake", "no-seglinear", "no-dualscale", "alpha", "per-tensor-w"],
)
def test_config_changes_exactly_its_fields(config, changes):
    """Per preset/switch: the expected fields change on every layer they apply to, nothing else."""
    anns = by_module(prepared_toy(config).gm)
    want = {}
    for m in LINEARS:
        c = dict(changes)
        if "dual" in c and not expected(m).dual:
            c.pop("dual")
        want[m] = expected(m, **c)
    assert anns == want


def test_glob_overrides_one_layer():
    cfg = W8A8.with_overrides({"ff*": {"enable": False}, "to_out": {"seglinear": False}})
    gm = prepared_toy(cfg).gm
    anns = by_module(gm)
    assert anns.keys() == {"ada", "to_v", "to_out"}
    assert anns["to_out"] == expected("to_out", in_segments=())
    assert anns["ada"] == expected("ada")
    # disabled linears stay plain aten.linear nodes without meta
    plain = [n for n in gm.graph.nodes if n.target == LINEAR and SEGQUANT_ANNOTATION_KEY not in n.meta]
    assert sorted(n.meta["segquant_module"] for n in plain) == ["ff1", "ff2"]


# ------------------------------------------------------------------------------------------ numerics


def test_annotated_graph_computes_the_float_model():
    model, _ = captured_toy()
    p = prepared_toy("w8a8")
    item = example_item()
    with torch.no_grad():
        torch.testing.assert_close(p.gm(**item), model(**item), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- count


def test_counts():
    p = prepared_toy("w8a8")
    anns = list(annotations(p.gm).values())
    assert len(anns) == 5
    assert sum(a.dual for a in anns) == 2
    assert sum(bool(a.out_segments) for a in anns) == 1
    assert sum(bool(a.in_segments) for a in anns) == 1
    assert p.report.counts["linear_to_chunk"] == 1
    assert p.report.counts["reshape_to_linear"] == 1
    assert p.report.counts["activation_to_linear"] == 2


# ---------------------------------------------------------------------------------- negative / errors


def test_group_size_not_dividing_k_stays_float():
    """w4a16 uses groups of 64, which divide none of the block's widths: every layer is skipped, with
    the reason, and ``prepare`` refuses the config because it quantizes nothing."""
    gm = fresh_graph()
    ann_pass = AnnotatePass(QuantizeConfig.coerce("w4a16"), find_patterns(gm).node_matches)
    result = run_passes(gm, [ann_pass])
    assert annotations(result) == {}
    assert ann_pass.skipped == {
        m: f"group_size 64 does not divide in_features {k}" for m, (k, _) in LINEARS.items()
    }
    with pytest.raises(ConfigError, match="no linear layer is enabled by the config"):
        prepared_toy("w4a16")


def test_int4_with_odd_in_features_stays_float():
    """int4 packs two values per byte: a linear with an odd in_features is left float, with a note."""
    from segquant_fx.capture import capture

    model = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.SiLU(), torch.nn.Linear(6, 4)).eval()
    gm = prepare_graph_module(capture(model, (torch.randn(2, 7),)).exported.module())
    cfg = QuantizeConfig.from_dict({"default": {"weight_quant": {"type": "int4", "axis": 0}}})
    ann_pass = AnnotatePass(cfg, find_patterns(gm).node_matches)
    gm = run_passes(gm, [ann_pass])
    assert ann_pass.skipped == {"0": "int4 needs an even in_features, got 7"}
    assert [a.module for a in annotations(gm).values()] == ["2"]


def test_annotation_on_a_non_linear_node_is_rejected():
    """validate_annotations (the pass's postcondition) refuses an annotation on another op."""
    gm = prepared_toy("w8a8").gm
    gelu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.gelu.default)
    gelu.meta[SEGQUANT_ANNOTATION_KEY] = expected("ff2")
    with pytest.raises(PreconditionError, match=r"annotation on %gelu .* which is not aten.linear"):
        validate_annotations(gm)


def test_segments_that_do_not_add_up_are_rejected():
    """An annotation whose segments do not sum to the layer width fails validation."""
    gm = prepared_toy("w8a8").gm
    node = next(n for n in gm.graph.nodes if n.name == NODES["to_out"])
    node.meta[SEGQUANT_ANNOTATION_KEY] = dataclasses.replace(
        node.meta[SEGQUANT_ANNOTATION_KEY], in_segments=(4, 4, 4)
    )
    with pytest.raises(PreconditionError, match=r"to_out: input segments \(4, 4, 4\) != in_features 16"):
        validate_annotations(gm)
