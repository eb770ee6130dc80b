"""``find_patterns``: the per-linear SegQuant plan of a model, as a report.

Every ``aten.linear`` call in the captured graph gets a :class:`LayerPlan`, keyed by the fully qualified
name of its module. Several patterns on one linear combine into one plan:

* **Output segments** come from ``linear_to_chunk`` / ``linear_to_split`` (or user patterns that set
  them); **input segments** from ``concat_to_linear`` / ``stack_to_linear`` / ``reshape_to_linear``;
  **DualScale** from ``activation_to_linear``. These are independent axes: a plan with output segments
  *and* DualScale (an adaLN modulation linear) is normal, and so is one with input segments and
  per-segment DualScale flags (FLUX single-block ``proj_out``).
* **Conflicts** (two patterns giving the same axis different segments) are settled by pattern
  priority (lower wins: chunk 10 < split 11 < concat 20 < stack 21 < reshape 30 < activation 40;
  user patterns default to 100). The loser is named in ``LayerPlan.notes``.
* Per-segment DualScale flags are kept only when they line up with the input segments chosen;
  otherwise the layer gets DualScale for its whole input (noted).
* A module called from several places must get the same plan at every call site; if not, its
  segmentation is dropped (noted) and it is quantized as one segment.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from segquant_fx.capture import CapturedModel, capture, node_module
from segquant_fx.errors import PatternError
from segquant_fx.graph.nx_view import DEFAULT_TRANSPARENCY, GraphView, Transparency
from segquant_fx.patterns import PATTERNS, Match, Rejection, find_matches, get_pattern
from segquant_fx.patterns._util import linear_features

__all__ = ["LayerPlan", "ConvReport", "PatternReport", "find_patterns", "plan_from_matches"]

_LINEAR = "aten.linear.default"


@dataclass(frozen=True)
class LayerPlan:
    """How one ``nn.Linear`` is segmented.

    Attributes:
        name: Fully qualified module name.
        patterns: Names of the patterns that contributed, in priority order.
        output_segments: Output segment sizes (sum = out_features), or None for one segment.
        input_segments: Input segment sizes (sum = in_features), or None for one segment.
        dual_scale: Whether the input gets DualScale (positive and negative scales).
        dual_scale_segments: Per input segment DualScale flags when only some segments are
            activation-derived, else None.
        in_features: Input width, when static.
        out_features: Output width, when static.
        nodes: Names of the ``aten.linear`` graph nodes of this module (several if called repeatedly).
        notes: Conflicts and decisions worth knowing.
    """

    name: str
    patterns: tuple[str, ...] = ()
    output_segments: tuple[int, ...] | None = None
    input_segments: tuple[int, ...] | None = None
    dual_scale: bool = False
    dual_scale_segments: tuple[bool, ...] | None = None
    in_features: int | None = None
    out_features: int | None = None
    nodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    def same_segmentation(self, other: LayerPlan) -> bool:
        """Whether two plans segment the layer identically (patterns and notes aside)."""
        return (
            self.output_segments == other.output_segments
            and self.input_segments == other.input_segments
            and self.dual_scale == other.dual_scale
            and self.dual_scale_segments == other.dual_scale_segments
        )


@dataclass(frozen=True)
class ConvReport:
    """A convolution whose input is a channel concatenation (reported, not yet quantized)."""

    name: str
    input_segments: tuple[int, ...]
    node: str


@dataclass
class PatternReport:
    """Result of :func:`find_patterns`.

    Attributes:
        model_name: Class name of the model.
        layers: Module FQN -> :class:`LayerPlan`, for every linear in the graph.
        convs: Module FQN -> :class:`ConvReport` for convs fed by a channel concat.
        counts: Pattern name -> number of accepted matches.
        node_plans: Graph node name -> plan.
        node_matches: Graph node name -> the matches anchored there (what the annotate pass consumes,
            so per-layer configs can select patterns without matching again).
        rejections: Rejected candidates with reasons (only with ``debug=True``).
        timings: Seconds spent in ``capture`` and ``matching``.
    """

    model_name: str
    layers: dict[str, LayerPlan]
    convs: dict[str, ConvReport] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    node_plans: dict[str, LayerPlan] = field(default_factory=dict)
    node_matches: dict[str, list[Match]] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def layers_with(self, pattern: str) -> list[str]:
        """FQNs of the layers a pattern contributed to."""
        return [n for n, p in self.layers.items() if pattern in p.patterns]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (rejections as strings)."""
        return {
            "model": self.model_name,
            "counts": dict(self.counts),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "convs": {k: asdict(v) for k, v in self.convs.items()},
            "rejections": [str(r) for r in self.rejections],
            "timings": dict(self.timings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A human-readable table of every linear and its plan, plus counts."""

        def seg(s: tuple[int, ...] | None) -> str:
            if s is None:
                return "-"
            if len(set(s)) == 1 and len(s) > 2:
                return f"{len(s)}x{s[0]}"
            return "+".join(map(str, s))

        lines = [f"# SegQuant pattern report: {self.model_name}", ""]
        lines.append("| pattern | matches |")
        lines.append("|---|---|")
        for k, v in self.counts.items():
            lines.append(f"| {k} | {v} |")
        n_seg = sum(1 for p in self.layers.values() if p.output_segments or p.input_segments)
        n_dual = sum(1 for p in self.layers.values() if p.dual_scale)
        lines += ["", f"{len(self.layers)} linears: {n_seg} segmented, {n_dual} DualScale.", ""]
        lines.append("| layer | in x out | patterns | output segments | input segments | DualScale |")
        lines.append("|---|---|---|---|---|---|")
        for name, p in self.layers.items():
            dual = "-"
            if p.dual_scale:
                dual = "yes" if p.dual_scale_segments is None else "".join("Y" if f else "n" for f in p.dual_scale_segments)
            lines.append(
                f"| {name} | {p.in_features}x{p.out_features} | {', '.join(p.patterns) or '-'} | "
                f"{seg(p.output_segments)} | {seg(p.input_segments)} | {dual} |"
            )
        if self.convs:
            lines += ["", "Channel concatenations feeding convolutions (reported only):", ""]
            for c in self.convs.values():
                lines.append(f"- {c.name}: {seg(c.input_segments)}")
        return "\n".join(lines) + "\n"


def plan_from_matches(name: str, node: fx.Node, matches: Iterable[Match]) -> LayerPlan:
    """Combine the matches anchored at one linear node into its :class:`LayerPlan`."""
    ordered = sorted(matches, key=lambda m: (get_pattern(m.pattern).priority, m.pattern))
    out_seg = in_seg = dual_seg = None
    dual = False
    notes: list[str] = []
    out_from = in_from = None
    for m in ordered:
        c = m.contribution
        if c.output_segments is not None:
            if out_seg is None:
                out_seg, out_from = tuple(c.output_segments), m.pattern
            elif tuple(c.output_segments) != out_seg:
                notes.append(f"{m.pattern} output segments {c.output_segments} lost to {out_from}")
        if c.input_segments is not None:
            if in_seg is None:
                in_seg, in_from = tuple(c.input_segments), m.pattern
            elif tuple(c.input_segments) != in_seg:
                notes.append(f"{m.pattern} input segments {c.input_segments} lost to {in_from}")
        if c.dual_scale:
            dual = True
            if c.dual_scale_segments is not None:
                dual_seg = tuple(c.dual_scale_segments)
    if dual_seg is not None and (in_seg is None or len(in_seg) != len(dual_seg)):
        notes.append(f"per-segment DualScale flags {dual_seg} do not line up with input segments {in_seg}; "
                     "DualScale applies to the whole input")
        dual_seg = None
    in_f, out_f = linear_features(node)
    for segs, width, what in ((out_seg, out_f, "output"), (in_seg, in_f, "input")):
        if segs is not None and width is not None and sum(segs) != width:
            raise PatternError(f"{name}: {what} segments {segs} do not add up to {width}")
    return LayerPlan(
        name=name,
        patterns=tuple(dict.fromkeys(m.pattern for m in ordered)),
        output_segments=out_seg,
        input_segments=in_seg,
        dual_scale=dual,
        dual_scale_segments=dual_seg,
        in_features=in_f,
        out_features=out_f,
        nodes=(node.name,),
        notes=tuple(notes),
    )


def _merge_call_sites(name: str, plans: list[LayerPlan]) -> LayerPlan:
    first = plans[0]
    nodes = tuple(n for p in plans for n in p.nodes)
    if all(first.same_segmentation(p) for p in plans[1:]):
        pats = tuple(dict.fromkeys(x for p in plans for x in p.patterns))
        notes = tuple(dict.fromkeys(x for p in plans for x in p.notes))
        return LayerPlan(**{**first.to_dict(), "patterns": pats, "nodes": nodes, "notes": notes})
    return LayerPlan(
        name=name,
        in_features=first.in_features,
        out_features=first.out_features,
        nodes=nodes,
        notes=(f"called from {len(plans)} places with different plans; quantized as one segment",),
    )


def find_patterns(
    model: torch.nn.Module | CapturedModel | fx.GraphModule,
    example: Any = None,
    *,
    patterns: Iterable[str] | None = None,
    dynamic: bool = True,
    debug: bool = False,
    transparency: Transparency = DEFAULT_TRANSPARENCY,
) -> PatternReport:
    """Capture ``model`` (unless already captured) and report the SegQuant plan of every linear.

    Args:
        model: An ``nn.Module`` (needs ``example``), a :class:`CapturedModel`, or a captured graph.
        example: Example inputs (kwargs dict, positional tuple, or ``(args, kwargs)``).
        patterns: Names of the patterns to search (default: every registered pattern).
        dynamic: Capture with dynamic batch/token dims.
        debug: Keep rejected candidates and their reasons in ``report.rejections``.
        transparency: Which nodes the matcher looks through.

    Returns:
        A :class:`PatternReport`.

    Raises:
        PatternError: If a pattern name is unknown.
        CaptureError: If the model cannot be captured.

    Example:
        >>> import torch
        >>> class Mod(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 12)
        ...     def forward(self, x):
        ...         a, b, c = self.lin(torch.nn.functional.silu(x)).chunk(3, dim=-1)
        ...         return a * b + c
        >>> p = find_patterns(Mod(), (torch.randn(2, 8),)).layers["lin"]
        >>> p.output_segments, p.dual_scale
        ((4, 4, 4), True)
    """
    t0 = time.perf_counter()
    if isinstance(model, CapturedModel):
        gm, name = model.graph_module, model.model_name
    elif isinstance(model, fx.GraphModule):
        gm, name = model, type(model).__name__
    else:
        if example is None:
            raise PatternError(
                f"find_patterns({type(model).__name__}) needs example inputs to capture the model: "
                "pass example=<kwargs dict or args tuple>"
            )
        cm = capture(model, example, dynamic=dynamic)
        gm, name = cm.graph_module, cm.model_name
    t1 = time.perf_counter()
    names = list(PATTERNS) if patterns is None else list(patterns)
    selected = [get_pattern(n) for n in names]

    view = GraphView(gm, transparency)
    rejections: list[Rejection] | None = [] if debug else None
    by_anchor: dict[str, list[Match]] = defaultdict(list)
    counts: Counter[str] = Counter({p.name: 0 for p in selected})
    convs: dict[str, ConvReport] = {}
    for p in selected:
        for m in find_matches(view, p, rejections=rejections):
            counts[p.name] += 1
            if p.kind == "conv":
                fqn = node_module(view.fx(m.anchor))
                convs[fqn] = ConvReport(fqn, tuple(m.contribution.input_segments or ()), m.anchor)
            else:
                by_anchor[m.anchor].append(m)

    per_module: dict[str, list[LayerPlan]] = defaultdict(list)
    node_plans: dict[str, LayerPlan] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            fqn = node_module(node) or node.name
            plan = plan_from_matches(fqn, node, by_anchor.get(node.name, ()))
            per_module[fqn].append(plan)
            node_plans[node.name] = plan
    layers = {fqn: plans[0] if len(plans) == 1 else _merge_call_sites(fqn, plans) for fqn, plans in per_module.items()}
    for plan in layers.values():
        for n in plan.nodes:
            node_plans[n] = plan
    t2 = time.perf_counter()
    return PatternReport(
        model_name=name,
        layers=layers,
        convs=convs,
        counts=dict(counts),
        node_plans=node_plans,
        node_matches=dict(by_anchor),
        rejections=list(rejections or ()),
        timings={"capture": t1 - t0, "matching": t2 - t1},
    )
