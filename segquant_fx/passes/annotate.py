"""AnnotatePass: pattern matches + per-layer config -> a frozen annotation on every quantized linear.

Annotation only writes ``node.meta[SEGQUANT_ANNOTATION_KEY]``; it never changes the graph. The
annotation holds everything later stages need (formats, segments, DualScale flags, smoothing), so
calibration and rewriting never search for patterns again.

Rules, per ``aten.linear`` node (module ``m``, layer config ``c = config.layer_config(m)``):

1. ``c.enable`` is False -> not annotated (stays float).
2. The plan is rebuilt from the matches of the patterns in ``c.search_patterns``; with
   ``c.seglinear`` False the segments are dropped, with ``c.dual_scale`` False DualScale is dropped.
3. Activation scales: one per input segment (static) or per token and input segment (``dynamic``);
   DualScale only for static activations (per-token scales already adapt to each sign's range).
4. Weight scales: per output channel, per group, or per tensor; per-tensor weights with output
   segments get one scale per output segment (SegLinear).
4b. Optimizers: ``smooth``/``svd`` set ``smooth_alpha`` (statically quantized or dynamic
   activations only); ``opt.per_segment_smoothing`` on an output-segmented layer sets
   ``smooth_groups`` (one smoothing vector per output segment); ``svd`` sets ``low_rank``; an enabled
   alpha search is carried in ``search`` and the calibrator in ``calib``.
5. Layers the kernels cannot take (int4 with an odd K, group size not dividing K) stay float and say
   why in ``notes``.

Example (before -> after, meta only)::

    linear = aten.linear(silu, w, b)    ->   linear.meta["segquant_annotation"] =
                                                 LinearAnnotation(act="int8", weight="int8",
                                                 out_segments=(32,)*6, dual=True, ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from segquant_fx.capture import node_module
from segquant_fx.config import CalibConfig, LayerConfig, QuantizeConfig, SearchAlphaConfig
from segquant_fx.errors import ConfigError, PreconditionError
from segquant_fx.passes.base import SEGQUANT_ANNOTATION_KEY, PassResult, SegQuantPass
from segquant_fx.patterns import Match
from segquant_fx.report import LayerPlan, plan_from_matches

__all__ = ["LinearAnnotation", "AnnotatePass", "annotations", "validate_annotations"]


@dataclass(frozen=True)
class LinearAnnotation:
    """What to do with one linear (frozen; hashable).

    Attributes:
        module: FQN of the ``nn.Linear``.
        act_qtype: Op qtype of the activation (``int8``/``int4``/``fp8_e4m3``) or None (weight-only).
        weight_qtype: Op qtype of the weight.
        act_dynamic: Per-token dynamic activation scales.
        in_segments: Input segment sizes for activation scales (``()`` = one segment).
        out_segments: Output segment sizes for per-tensor weight scales (``()`` = one segment).
        dual: DualScale on the activation.
        dual_segments: Per input segment DualScale flags (None = every segment).
        weight_granularity: ``per_tensor`` / ``per_channel`` / ``per_group``.
        weight_group_size: Group size for ``per_group``.
        smooth_alpha: SmoothQuant migration strength, or None for no smoothing (the starting point
            and tie-breaker of an alpha search).
        real_quant: Emit real quantized ops (True) or fake quantization (False).
        in_features: K.
        out_features: N.
        plan: The layer plan this came from.
        smooth_groups: Output segment sizes when every output segment gets its own smoothing vector
            (``opt.per_segment_smoothing``), else ``()``.
        low_rank: Rank of the SVDQuant low-rank branch (``opt.type == "svd"``), else None.
        svd_precision: dtype name of the SVD (``"float32"``/``"float64"``).
        search: The alpha search settings when alpha is searched, else None.
        calib: The calibrator settings.
    """

    module: str
    act_qtype: str | None
    weight_qtype: str
    act_dynamic: bool
    in_segments: tuple[int, ...]
    out_segments: tuple[int, ...]
    dual: bool
    dual_segments: tuple[bool, ...] | None
    weight_granularity: str
    weight_group_size: int | None
    smooth_alpha: float | None
    real_quant: bool
    in_features: int
    out_features: int
    plan: LayerPlan = field(compare=False)
    smooth_groups: tuple[int, ...] = ()
    low_rank: int | None = None
    svd_precision: str = "float64"
    search: SearchAlphaConfig | None = None
    calib: CalibConfig = CalibConfig()


def annotations(gm: fx.GraphModule) -> dict[str, LinearAnnotation]:
    """Node name -> annotation for every annotated node of ``gm``."""
    return {n.name: n.meta[SEGQUANT_ANNOTATION_KEY] for n in gm.graph.nodes if SEGQUANT_ANNOTATION_KEY in n.meta}


def _annotation(name: str, node: fx.Node, plan: LayerPlan, c: LayerConfig) -> tuple[LinearAnnotation | None, str]:
    k, n = plan.in_features, plan.out_features
    if k is None or n is None:
        return None, "weight shape is not static"
    wq = c.weight_quant.op_qtype
    aq = c.input_quant.op_qtype
    if wq is None:
        raise ConfigError(f"{name}: weight_quant.type={c.weight_quant.type!r} does not quantize the weight")
    dyn = bool(c.input_quant.dynamic) and aq is not None
    in_seg = tuple(plan.input_segments or ()) if c.seglinear else ()
    out_seg = tuple(plan.output_segments or ()) if c.seglinear else ()
    dual = bool(plan.dual_scale and c.dual_scale and aq is not None and not dyn)
    dual_seg = plan.dual_scale_segments if dual and in_seg else None
    if dual_seg is not None and len(dual_seg) != len(in_seg):
        dual_seg = None
    gran = c.weight_quant.granularity
    group = c.weight_quant.group_size if gran == "per_group" else None
    if c.calib.type == "gptq" and c.calib.groupsize != -1 and group is None:
        gran, group = "per_group", c.calib.groupsize  # GPTQ groups are stored as group-wise weight scales
    if "int4" in (wq, aq) and k % 2:
        return None, f"int4 needs an even in_features, got {k}"
    if group is not None and k % group:
        return None, f"group_size {group} does not divide in_features {k}"
    alpha = c.opt.alpha if c.opt.type in ("smooth", "svd") and aq is not None else None
    search = c.opt.search_alpha_config if alpha is not None and c.opt.search_alpha_config.enable else None
    groups = out_seg if alpha is not None and c.opt.per_segment_smoothing and len(out_seg) > 1 else ()
    ann = LinearAnnotation(
        module=name,
        act_qtype=aq,
        weight_qtype=wq,
        act_dynamic=dyn,
        in_segments=in_seg if len(in_seg) > 1 else (),
        out_segments=out_seg if len(out_seg) > 1 else (),
        dual=dual,
        dual_segments=dual_seg,
        weight_granularity=gran,
        weight_group_size=group,
        smooth_alpha=alpha,
        real_quant=c.real_quant,
        in_features=k,
        out_features=n,
        plan=plan,
        smooth_groups=groups,
        low_rank=c.opt.low_rank if c.opt.type == "svd" else None,
        svd_precision=c.opt.precision,
        search=search,
        calib=c.calib,
    )
    return ann, ""


class AnnotatePass(SegQuantPass):
    """Write a :class:`LinearAnnotation` on every enabled linear (graph unchanged otherwise).

    Args:
        config: The quantization config.
        matches: Node name -> the matches anchored there (``PatternReport.node_matches``).
    """

    def __init__(self, config: QuantizeConfig, matches: Mapping[str, Sequence[Match]]):
        super().__init__()
        self.config = config
        self.matches = matches
        self.skipped: dict[str, str] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Annotate; ``modified`` is True when at least one node was annotated."""
        modified = False
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                continue
            name = node_module(node) or node.name
            c = self.config.layer_config(name)
            if not c.enable:
                continue
            allowed = set(c.search_patterns)
            plan = plan_from_matches(name, node, [m for m in self.matches.get(node.name, ()) if m.pattern in allowed])
            ann, why = _annotation(name, node, plan, c)
            if ann is None:
                self.skipped[name] = why
                continue
            node.meta[SEGQUANT_ANNOTATION_KEY] = ann
            modified = True
        _unify_call_sites(graph_module)
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The annotated graph validates."""
        super().ensures(graph_module)
        validate_annotations(graph_module)


def _unify_call_sites(gm: fx.GraphModule) -> None:
    """One module called from several places gets one annotation (its weights are quantized once).

    If the call sites disagree on segments or DualScale, all of them fall back to one segment.
    """
    by_weight: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if SEGQUANT_ANNOTATION_KEY in node.meta and isinstance(node.args[1], fx.Node):
            by_weight.setdefault(node.args[1].target, []).append(node)
    for nodes in by_weight.values():
        anns = {n.meta[SEGQUANT_ANNOTATION_KEY] for n in nodes}
        if len(anns) > 1:
            first = nodes[0].meta[SEGQUANT_ANNOTATION_KEY]
            plain = dataclasses.replace(
                first, in_segments=(), out_segments=(), dual=False, dual_segments=None, smooth_groups=()
            )
            for n in nodes:
                n.meta[SEGQUANT_ANNOTATION_KEY] = plain


def validate_annotations(gm: fx.GraphModule) -> None:
    """Check the annotated graph before any statistics are collected.

    Raises:
        PreconditionError: If an annotation sits on a non-linear node, or its segments do not add up
            to the layer's widths.
    """
    for node in gm.graph.nodes:
        ann = node.meta.get(SEGQUANT_ANNOTATION_KEY)
        if ann is None:
            continue
        if node.target != torch.ops.aten.linear.default:
            raise PreconditionError(f"annotation on {node.format_node()}, which is not aten.linear")
        if ann.in_segments and sum(ann.in_segments) != ann.in_features:
            raise PreconditionError(f"{ann.module}: input segments {ann.in_segments} != in_features {ann.in_features}")
        if ann.out_segments and sum(ann.out_segments) != ann.out_features:
            raise PreconditionError(f"{ann.module}: output segments {ann.out_segments} != out_features {ann.out_features}")
        if ann.smooth_groups and sum(ann.smooth_groups) != ann.out_features:
            raise PreconditionError(f"{ann.module}: smoothing groups {ann.smooth_groups} != out_features {ann.out_features}")
