"""Find pattern occurrences: networkx subgraph monomorphism plus explicit constraints.

``find_matches(view, pattern)`` never mutates the graph. Steps, per search function of the pattern:

1. The search function is traced with the model capture routine and viewed with the *same*
   transparency rules, then stripped of placeholders and the output: the pattern graph.
2. The host graph is restricted to nodes whose target occurs in the pattern (an induced subgraph;
   monomorphism only maps pattern nodes onto same-target host nodes, so nothing is lost), and
   ``MultiDiGraphMatcher.subgraph_monomorphisms_iter`` enumerates embeddings with node predicates
   (target, with ``cat``/``concat`` and in-place twins treated alike) and edge predicates
   (argument index; ignored for commutative ops).
3. Explicit constraints: one match per anchor, only-consumer, non-overlap, then the pattern's check.
   Rejected candidates carry a lazily formatted reason (collected when ``rejections`` is passed).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import networkx as nx
from networkx.algorithms.isomorphism import MultiDiGraphMatcher
from torch import fx

from segquant_fx.capture import capture_function
from segquant_fx.errors import PatternError
from segquant_fx.graph.nx_view import DEFAULT_TRANSPARENCY, GraphView, Transparency
from segquant_fx.patterns.base import Match, Pattern, PlanContribution, Rejection

__all__ = ["find_matches", "compile_pattern", "canonical_target", "DEBUG_ENV"]

logger = logging.getLogger(__name__)

#: Set this environment variable to 1 to log every rejected candidate at DEBUG level.
DEBUG_ENV = "SEGQUANT_DEBUG_PATTERNS"

_EQUIVALENT = {
    "aten.concat.default": "aten.cat.default",
    "aten.concatenate.default": "aten.cat.default",
    "aten.silu_.default": "aten.silu.default",
    "aten.gelu_.default": "aten.gelu.default",
    "aten.mul_.Tensor": "aten.mul.Tensor",
    "aten.add_.Tensor": "aten.add.Tensor",
    "aten.reshape.default": "aten.view.default",
    "aten._unsafe_view.default": "aten.view.default",
}
_COMMUTATIVE = frozenset({"aten.mul.Tensor", "aten.add.Tensor"})


def canonical_target(target: str) -> str:
    """Targets that mean the same thing for matching map to one name (``concat`` -> ``cat``)."""
    return _EQUIVALENT.get(target, target)


_CACHE: dict[tuple[int, int, Transparency], tuple[Any, nx.MultiDiGraph]] = {}


def _compile(pattern: Pattern, index: int, transparency: Transparency) -> nx.MultiDiGraph:
    """Compiled pattern graph of one search function, cached on the function object itself.

    (``Pattern`` equality ignores its functions, so the cache must not key on the pattern.)
    """
    fn = pattern.search[index]
    key = (id(fn), id(pattern.example_inputs), transparency)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is fn:
        return hit[1]
    g = _compile_uncached(pattern, index, transparency)
    _CACHE[key] = (fn, g)
    return g


def _clear_cache() -> None:
    _CACHE.clear()


_compile.cache_clear = _clear_cache  # type: ignore[attr-defined]


def _compile_uncached(pattern: Pattern, index: int, transparency: Transparency) -> nx.MultiDiGraph:
    fn = pattern.search[index]
    try:
        gm = capture_function(fn, pattern.inputs_for(index))
    except Exception as e:
        raise PatternError(
            f"pattern {pattern.name!r}: search function #{index} ({getattr(fn, '__name__', fn)}) could not "
            f"be traced: {e}. Make it a plain PyTorch function of its example inputs."
        ) from e
    view = GraphView(gm, transparency)
    g = view.graph.copy()
    g.remove_nodes_from([n for n, d in view.graph.nodes(data=True) if d["op"] != "call_function"])
    # leaf getitems only pick outputs apart; they would widen the host subgraph for nothing
    g.remove_nodes_from([n for n, d in list(g.nodes(data=True)) if d["target"] == "getitem" and g.out_degree(n) == 0])
    for _, d in g.nodes(data=True):
        d["ctarget"] = canonical_target(d["target"])
    for _, dst, d in g.edges(data=True):
        d["commutative"] = g.nodes[dst]["ctarget"] in _COMMUTATIVE
    anchors = [n for n, d in g.nodes(data=True) if d["ctarget"] == canonical_target(pattern.anchor)]
    if len(anchors) != 1:
        raise PatternError(
            f"pattern {pattern.name!r}: search function #{index} must contain exactly one {pattern.anchor} "
            f"node (the anchor), found {len(anchors)}"
        )
    if not nx.is_weakly_connected(g):
        raise PatternError(f"pattern {pattern.name!r}: search function #{index} is not one connected graph")
    g.graph["anchor"] = anchors[0]
    return g


def compile_pattern(pattern: Pattern, transparency: Transparency = DEFAULT_TRANSPARENCY) -> list[nx.MultiDiGraph]:
    """The pattern graphs of every search function (cached)."""
    return [_compile(pattern, i, transparency) for i in range(len(pattern.search))]


def _node_match(host: dict[str, Any], pat: dict[str, Any]) -> bool:
    return canonical_target(host["target"]) == pat["ctarget"]


def _edge_match(host_edges: dict[Any, dict[str, Any]], pat_edges: dict[Any, dict[str, Any]]) -> bool:
    for pe in pat_edges.values():
        if pe["commutative"]:
            continue
        if not any(he["arg_index"] == pe["arg_index"] for he in host_edges.values()):
            return False
    return True


def _host_subgraph(view: GraphView, pg: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Induced host subgraph on the pattern's targets, copied, without isolated candidates.

    A copy, not a view: VF2 looks edges up millions of times and networkx's filtered views are slow.
    Dropping candidates with no edge to another candidate is exact for connected patterns of two or
    more nodes (every pattern node has a pattern edge, so its image has a host edge in the subgraph)
    and turns VF2's quadratic scan over unconnected candidates into a scan over real neighbourhoods.
    """
    wanted = {d["ctarget"] for _, d in pg.nodes(data=True)}
    targets = [t for t in view.by_target if canonical_target(t) in wanted]
    sub = view.graph.subgraph(view.nodes_with_targets(targets)).copy()
    if pg.number_of_nodes() > 1:
        sub.remove_nodes_from([n for n in list(sub.nodes) if sub.degree(n) == 0])
    return sub


def find_matches(
    graph: GraphView | fx.GraphModule | fx.Graph,
    pattern: Pattern,
    *,
    rejections: list[Rejection] | None = None,
) -> list[Match]:
    """All accepted matches of ``pattern`` in ``graph``, one per anchor, in graph order.

    Args:
        graph: A :class:`GraphView`, or an fx graph (viewed with default transparency).
        pattern: The pattern.
        rejections: If given, candidates that matched structurally but failed a constraint are
            appended here with their reason (debug mode). Setting ``SEGQUANT_DEBUG_PATTERNS=1`` logs
            them instead.

    Returns:
        Matches ordered by the anchor's position in the graph.
    """
    view = graph if isinstance(graph, GraphView) else GraphView(graph)
    debug_log = os.environ.get(DEBUG_ENV) == "1"
    accepted: dict[str, Match] = {}
    owned: dict[str, str] = {}  # host node -> anchor of the match that owns it
    rejected: dict[tuple[str, str], Rejection] = {}

    def reject(anchor: str, reason: Any) -> None:
        key = (anchor, reason if isinstance(reason, str) else getattr(reason, "__qualname__", "reason"))
        if key in rejected:
            return
        rej = Rejection(pattern.name, anchor, view.graph.nodes[anchor]["module"], reason)
        rejected[key] = rej
        if debug_log:
            logger.debug("%s", rej)

    for alt, pg in enumerate(compile_pattern(pattern, view.transparency)):
        host = _host_subgraph(view, pg)
        if host.number_of_nodes() < pg.number_of_nodes():
            continue
        anchor_p = pg.graph["anchor"]
        matcher = MultiDiGraphMatcher(host, pg, node_match=_node_match, edge_match=_edge_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            inv = {p: h for h, p in mapping.items()}
            anchor = inv[anchor_p]
            if anchor in accepted:
                continue
            targets = {p: pg.nodes[p]["ctarget"] for p in pg.nodes}
            m = Match(pattern.name, anchor, inv, targets, alt)
            reason = _constraints(view, pattern, m, owned)
            if reason is None:
                reason = pattern.check(m, view)
            if reason is not None:
                reject(anchor, reason)
                continue
            contribution = pattern.plan(m, view)
            if not isinstance(contribution, PlanContribution):
                raise PatternError(
                    f"pattern {pattern.name!r}: plan() returned {type(contribution).__name__}, "
                    "expected PlanContribution"
                )
            m = Match(pattern.name, anchor, inv, targets, alt, contribution)
            accepted[anchor] = m
            for p, h in inv.items():
                if canonical_target(targets[p]) not in pattern.shareable:
                    owned[h] = anchor

    if rejections is not None:
        rejections.extend(r for r in rejected.values() if r.anchor not in accepted)
    order = {name: i for i, name in enumerate(view.nodes)}
    return sorted(accepted.values(), key=lambda m: order[m.anchor])


def _constraints(view: GraphView, pattern: Pattern, m: Match, owned: dict[str, str]) -> Any:
    inside = set(m.nodes_map.values())
    for p, h in m.nodes_map.items():
        t = canonical_target(m.targets[p])
        if t not in pattern.shareable and h in owned and owned[h] != m.anchor:
            return f"{h} already belongs to the match at {owned[h]} (matches may not overlap)"
        if t in {canonical_target(x) for x in pattern.only_consumer}:
            outside = [c for c in view.consumers(h) if c not in inside]
            if outside:
                return functools.partial(
                    _outside_msg, h, tuple(outside), tuple(view.target(c) for c in outside)
                )
    return None


def _outside_msg(node: str, outside: tuple[str, ...], targets: tuple[str, ...]) -> str:
    uses = ", ".join(f"{o} ({t})" for o, t in zip(outside, targets, strict=True))
    return f"{node} is also used outside the pattern by {uses}"
