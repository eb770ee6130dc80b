"""Pattern and match records.

A :class:`Pattern` is data: a name, one or more *search functions* written as ordinary PyTorch
(traced with the same capture routine as models), a check for what structure alone cannot say (which
dim a chunk splits, who else consumes a node), and a ``plan`` that turns a match into a contribution to
the layer's quantization plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Pattern", "Match", "Rejection", "PlanContribution", "CheckResult"]

#: What a check returns: None when the candidate is accepted, else the reason (a string, or a
#: zero-argument callable producing one, so reasons are only formatted when someone reads them).
CheckResult = Any


@dataclass(frozen=True)
class PlanContribution:
    """What one match says about one layer.

    Attributes:
        output_segments: Sizes of output segments (sum = out_features), or None.
        input_segments: Sizes of input segments (sum = in_features), or None.
        dual_scale: The layer's input is activation-derived (DualScale).
        dual_scale_segments: Per input segment, whether that segment is activation-derived (only set
            when the input is a concatenation and the flags differ by segment).
        detail: Free-form facts for reports (e.g. ``{"activation": "silu"}``).
    """

    output_segments: tuple[int, ...] | None = None
    input_segments: tuple[int, ...] | None = None
    dual_scale: bool = False
    dual_scale_segments: tuple[bool, ...] | None = None
    detail: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Match:
    """One accepted occurrence of a pattern in a host graph.

    Attributes:
        pattern: The pattern's name.
        anchor: Host fx node name of the node the plan is about (the linear, or the conv).
        nodes_map: Pattern node name -> host fx node name.
        targets: Pattern node name -> canonical target string (``aten.concat`` reads ``aten.cat``,
            ``aten.reshape`` reads ``aten.view``; see ``matcher.canonical_target``).
        alternative: Index of the search function that matched.
        contribution: What the match contributes to the layer plan.
    """

    pattern: str
    anchor: str
    nodes_map: Mapping[str, str]
    targets: Mapping[str, str]
    alternative: int = 0
    contribution: PlanContribution = field(default_factory=PlanContribution)

    def node(self, target: str) -> str:
        """Host node name mapped from the first pattern node whose target is ``target``.

        Raises:
            KeyError: If no pattern node has that target.
        """
        for p, t in self.targets.items():
            if t == target or t.startswith(target + "."):
                return self.nodes_map[p]
        raise KeyError(f"pattern {self.pattern!r} has no node with target {target!r}")

    def has(self, target: str) -> bool:
        """Whether the matched alternative contains a node with ``target`` (prefix match)."""
        return any(t == target or t.startswith(target + ".") for t in self.targets.values())


@dataclass(frozen=True)
class Rejection:
    """A candidate that matched structurally but failed a constraint (debug mode only)."""

    pattern: str
    anchor: str
    anchor_module: str
    reason: Any

    @property
    def message(self) -> str:
        """The reason, formatted now."""
        return self.reason() if callable(self.reason) else str(self.reason)

    def __str__(self) -> str:
        where = f" ({self.anchor_module})" if self.anchor_module else ""
        return f"{self.pattern}: rejected {self.anchor}{where}: {self.message}"


@dataclass(frozen=True)
class Pattern:
    """A semantic pattern, registered by name.

    Attributes:
        name: Registry key; configs refer to patterns by this name.
        search: PyTorch functions whose traced graphs are the structural alternatives. Each is traced
            with :func:`segquant_fx.capture.capture_function`; placeholders and the output are dropped,
            so only the ops themselves must be present in the host graph (monomorphism: the host may
            have more nodes and edges).
        example_inputs: Zero-argument callable returning the example inputs for tracing (one tuple for
            all search functions, or a list with one tuple per search function).
        anchor: Target of the pattern node the plan is about (``aten.linear.default`` for linears).
        check: ``check(match, view) -> None | reason`` for what structure cannot say.
        plan: ``plan(match, view) -> PlanContribution``.
        only_consumer: Targets of pattern nodes whose data may flow *only* into other nodes of the match
            (checked on the contracted graph, so transparent casts do not count).
        shareable: Targets of pattern nodes that several matches may share (e.g. one ``cat`` feeding
            two linears); every other node belongs to at most one match (non-overlap).
        kind: ``"linear"`` (feeds the layer plan) or ``"conv"`` (reported only).
        priority: Lower wins when two patterns give the same layer conflicting segments.
        description: One line for reports and docs.
    """

    name: str
    search: tuple[Callable[..., Any], ...] = field(compare=False)
    example_inputs: Callable[[], Any] = field(compare=False)
    check: Callable[[Match, Any], CheckResult] = field(compare=False)
    plan: Callable[[Match, Any], PlanContribution] = field(compare=False)
    anchor: str = "aten.linear.default"
    only_consumer: frozenset[str] = frozenset()
    shareable: frozenset[str] = frozenset()
    kind: Literal["linear", "conv"] = "linear"
    priority: int = 100
    description: str = ""

    def inputs_for(self, index: int) -> tuple[Any, ...]:
        """Example inputs for search function ``index``."""
        ex = self.example_inputs()
        if isinstance(ex, list):
            return tuple(ex[index])
        return tuple(ex)
