"""A networkx view of a captured graph, with transparent nodes looked through.

``GraphView(gm)`` builds a ``networkx.MultiDiGraph`` whose nodes are the *data* nodes of ``gm``
(placeholders, parameters, tensor-valued calls, the output) and whose edges are data dependencies.
Nodes carry ``op``, ``target`` (a string such as ``aten.linear.default``), ``shape``, ``dtype`` and
``module`` (the FQN of the module the node came from); edges carry ``arg_index`` (position, or the
keyword name) and ``list_index`` (position inside a list argument such as ``cat``'s, else None).

**Transparency.** Nodes that do not change what the *last* dim means are contracted away: dtype casts,
eval-mode dropout, ``contiguous``, ``clone``, identity views, and ops that only slice, split, index,
reshape or permute dims other than the last. An edge ``a -> cast -> b`` becomes ``a -> b`` with
``via=("cast",)``. Nodes that carry no data (``sym_size``, ``_assert_tensor_metadata``) are dropped, so
they never count as consumers. The rules are data (:class:`Transparency`), so users can extend them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from segquant_fx.capture import node_module
from segquant_fx.graph.fx_utils import (
    get_arg,
    is_tensor_node,
    normalize_dim,
    shape_of,
    static_int,
    target_name,
)

__all__ = ["Transparency", "DEFAULT_TRANSPARENCY", "GraphView"]

_ALWAYS = frozenset(
    {
        "aten.to.dtype",
        "aten.to.dtype_layout",
        "aten.to.device",
        "aten.to.other",
        "aten._to_copy.default",
        "aten.type_as.default",
        "aten.contiguous.default",
        "aten.clone.default",
        "aten.alias.default",
        "aten.detach.default",
        "aten.lift_fresh_copy.default",
        "aten.view_as.default",
    }
)
# ops whose output keeps the input's last dim (size and meaning) when sizes agree
_LAST_DIM_PRESERVING = frozenset(
    {
        "aten.view.default",
        "aten.reshape.default",
        "aten._unsafe_view.default",
        "aten.flatten.using_ints",
        "aten.unflatten.int",
        "aten.unsqueeze.default",
        "aten.squeeze.dim",
        "aten.squeeze.dims",
        "aten.squeeze.default",
        "aten.expand.default",
        "aten.expand_as.default",
    }
)
_DROPOUT = frozenset({"aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default"})
# (target -> index of its dim argument, keyword name); transparent when dim is not the last
_DIM_OPS = {
    "aten.slice.Tensor": (1, "dim"),
    "aten.narrow.default": (1, "dim"),
    "aten.select.int": (1, "dim"),
    "aten.split.Tensor": (2, "dim"),
    "aten.split_with_sizes.default": (2, "dim"),
    "aten.chunk.default": (2, "dim"),
    "aten.unbind.int": (1, "dim"),
    "aten.tensor_split.sections": (2, "dim"),
    "aten.tensor_split.indices": (2, "dim"),
}
_DIM_DEFAULTS = {"aten.slice.Tensor": 0, "aten.narrow.default": None, "aten.select.int": None}
_NOT_DATA = frozenset(
    {
        "aten._assert_tensor_metadata.default",
        "aten.sym_size.int",
        "aten.sym_numel.default",
        "aten.sym_stride.int",
        "aten._assert_scalar.default",
        "aten.sym_constrain_range_for_size.default",
    }
)


@dataclass(frozen=True)
class Transparency:
    """Which nodes the graph view looks through.

    Attributes:
        always: Targets that are always transparent (casts, copies, aliases).
        last_dim_preserving: Reshaping targets that are transparent when the last dim keeps its size.
        dim_ops: Slicing/splitting targets that are transparent when their dim is not the last.
        enabled: Turn transparency off entirely (for debugging patterns).
        extra: Additional targets a user declares transparent, always.
    """

    always: frozenset[str] = _ALWAYS
    last_dim_preserving: frozenset[str] = _LAST_DIM_PRESERVING
    dim_ops: frozenset[str] = frozenset(_DIM_OPS)
    enabled: bool = True
    extra: frozenset[str] = field(default_factory=frozenset)

    def with_extra(self, *targets: str) -> Transparency:
        """A copy that also treats ``targets`` as transparent."""
        return Transparency(
            always=self.always,
            last_dim_preserving=self.last_dim_preserving,
            dim_ops=self.dim_ops,
            enabled=self.enabled,
            extra=self.extra | frozenset(targets),
        )

    def is_transparent(self, node: fx.Node) -> bool:
        """True when ``node`` only moves data along dims other than the last (or only casts)."""
        if not self.enabled or node.op != "call_function":
            return False
        t = target_name(node)
        if t in self.always or t in self.extra:
            return True
        if t in _DROPOUT:
            return get_arg(node, 2, "train", True) is False
        if t == "getitem":
            src = node.args[0]
            return isinstance(src, fx.Node) and src.op == "call_function" and self._splits_non_last(src)
        if t in self.last_dim_preserving:
            return _same_last_dim(node)
        if t in self.dim_ops:
            return self._splits_non_last(node)
        if t == "aten.transpose.int":
            shape = shape_of(node.args[0])
            if shape is None:
                return False
            d0, d1 = normalize_dim(node.args[1], len(shape)), normalize_dim(node.args[2], len(shape))
            return d0 is not None and d1 is not None and len(shape) - 1 not in (d0, d1)
        if t == "aten.permute.default":
            shape = shape_of(node.args[0])
            dims = node.args[1]
            return shape is not None and normalize_dim(dims[-1], len(shape)) == len(shape) - 1
        if t == "aten.index.Tensor":
            shape = shape_of(node.args[0])
            return shape is not None and len(node.args[1]) < len(shape)
        return False

    def _splits_non_last(self, node: fx.Node) -> bool:
        t = target_name(node)
        if t not in self.dim_ops:
            return False
        idx, name = _DIM_OPS[t]
        shape = shape_of(node.args[0])
        if shape is None:
            return False
        dim = get_arg(node, idx, name, _DIM_DEFAULTS.get(t, 0))
        d = normalize_dim(dim, len(shape))
        return d is not None and d != len(shape) - 1


DEFAULT_TRANSPARENCY = Transparency()


def _same_last_dim(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    ins, outs = shape_of(src), shape_of(node)
    if not ins or not outs:
        return False
    a, b = static_int(ins[-1]), static_int(outs[-1])
    if a is None or b is None:
        return ins[-1] is outs[-1] or str(ins[-1]) == str(outs[-1])
    return a == b


def _node_inputs(node: fx.Node) -> Iterator[tuple[Any, int | None, fx.Node]]:
    """(arg_index, list_index, input node) for every fx.Node argument, positional then keyword."""
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            yield i, None, a
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node):
                    yield i, j, b
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            yield k, None, a
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node):
                    yield k, j, b


class GraphView:
    """A contracted ``networkx.MultiDiGraph`` over an fx graph, plus maps back to fx nodes.

    Attributes:
        gm: The graph module viewed (never mutated by the view).
        graph: The contracted ``MultiDiGraph``; node keys are fx node names.
        nodes: fx node name -> ``fx.Node`` for every node of ``gm``.
        by_target: target string -> names of contracted nodes with that target.
        transparency: The rules used.
    """

    def __init__(self, gm: fx.GraphModule | fx.Graph, transparency: Transparency = DEFAULT_TRANSPARENCY):
        graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
        self.gm = gm
        self.transparency = transparency
        self.nodes: dict[str, fx.Node] = {n.name: n for n in graph.nodes}
        self.graph = nx.MultiDiGraph()
        self.by_target: dict[str, list[str]] = defaultdict(list)
        self._source: dict[str, tuple[str, tuple[str, ...]] | None] = {}
        self._transparent: set[str] = set()

        kept: list[fx.Node] = []
        for n in graph.nodes:
            if self._is_data(n):
                if transparency.is_transparent(n):
                    self._transparent.add(n.name)
                else:
                    kept.append(n)
        for n in kept:
            t = target_name(n)
            val = n.meta.get("val")
            self.graph.add_node(
                n.name,
                op=n.op,
                target=t,
                module=node_module(n) if n.op == "call_function" else "",
                shape=tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None,
                dtype=str(val.dtype) if isinstance(val, torch.Tensor) else None,
            )
            self.by_target[t].append(n.name)
        for n in kept:
            for arg_index, list_index, src in _node_inputs(n):
                resolved = self._resolve(src)
                if resolved is None:
                    continue
                s, via = resolved
                self.graph.add_edge(s, n.name, arg_index=arg_index, list_index=list_index, via=via)

    def _is_data(self, n: fx.Node) -> bool:
        if n.op == "output":
            return True
        if n.op in ("placeholder", "get_attr"):
            return True
        if n.op != "call_function" or target_name(n) in _NOT_DATA:
            return False
        return is_tensor_node(n)

    def _resolve(self, node: fx.Node) -> tuple[str, tuple[str, ...]] | None:
        """The contracted node that ``node``'s data comes from, and the transparent nodes between."""
        if node.name in self._source:
            return self._source[node.name]
        via: list[str] = []
        cur = node
        result: tuple[str, tuple[str, ...]] | None
        while True:
            if cur.name in self._transparent:
                via.append(cur.name)
                src = cur.args[0] if cur.args else None
                if not isinstance(src, fx.Node):
                    result = None
                    break
                cur = src
                continue
            result = (cur.name, tuple(reversed(via))) if self.graph.has_node(cur.name) else None
            break
        self._source[node.name] = result
        return result

    # ---- queries -------------------------------------------------------------------------------
    def fx(self, name: str) -> fx.Node:
        """The fx node called ``name``."""
        return self.nodes[name]

    def target(self, name: str) -> str:
        """Target string of contracted node ``name``."""
        return self.graph.nodes[name]["target"]

    def producer(self, name: str, arg_index: Any = 0, list_index: int | None = None) -> str | None:
        """The contracted node feeding argument ``arg_index`` (``list_index``) of node ``name``."""
        for src, _, data in self.graph.in_edges(name, data=True):
            if data["arg_index"] == arg_index and data["list_index"] == list_index:
                return src
        return None

    def producers(self, name: str, arg_index: Any = 0) -> list[str]:
        """The contracted nodes feeding a list argument (e.g. ``cat``'s tensors), in list order."""
        found = [
            (data["list_index"] or 0, src)
            for src, _, data in self.graph.in_edges(name, data=True)
            if data["arg_index"] == arg_index
        ]
        return [s for _, s in sorted(found)]

    def consumers(self, name: str) -> list[str]:
        """Distinct contracted nodes that consume ``name``'s data (the output node included)."""
        return list(dict.fromkeys(self.graph.successors(name)))

    def edges_between(self, src: str, dst: str) -> list[dict[str, Any]]:
        """Attribute dicts of every edge ``src -> dst``."""
        data = self.graph.get_edge_data(src, dst)
        return list(data.values()) if data else []

    def nodes_with_targets(self, targets: Iterable[str]) -> set[str]:
        """Names of contracted nodes whose target is one of ``targets``."""
        out: set[str] = set()
        for t in targets:
            out.update(self.by_target.get(t, ()))
        return out

    def is_transparent(self, name: str) -> bool:
        """Whether fx node ``name`` was contracted away."""
        return name in self._transparent

    def __len__(self) -> int:
        return self.graph.number_of_nodes()
