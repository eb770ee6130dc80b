"""Helpers shared by the built-in patterns (shapes, dims, consumers on the raw fx graph)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from segquant_fx.graph.fx_utils import get_arg, normalize_dim, shape_of, static_int, target_name

__all__ = ["static_shape_tail", "dim_of", "split_sizes", "fx_data_users", "linear_features"]


def static_shape_tail(node: Any, n: int) -> tuple[int, ...] | None:
    """The last ``n`` dims of ``node``'s shape as ints, or None if unknown or symbolic."""
    shape = shape_of(node)
    if shape is None or len(shape) < n:
        return None
    tail = tuple(static_int(s) for s in shape[len(shape) - n :])
    return None if any(t is None for t in tail) else tail  # type: ignore[return-value]


def dim_of(node: fx.Node, index: int, name: str, default: Any, ndim: int) -> int | None:
    """Normalized dim argument (positional ``index`` or keyword ``name``) of ``node``."""
    return normalize_dim(get_arg(node, index, name, default), ndim)


def split_sizes(node: fx.Node) -> tuple[int, ...] | None:
    """Last-dim sizes of every output of a multi-output split-like node, from its recorded value."""
    val = node.meta.get("val")
    if not isinstance(val, (list, tuple)) or not val:
        return None
    if target_name(node) == "aten.unbind.int":  # each piece drops the unbound dim: one column each
        return (1,) * len(val)
    sizes = []
    for v in val:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        s = static_int(v.shape[-1])
        if s is None:
            return None
        sizes.append(s)
    return tuple(sizes)


_IGNORED_USERS = frozenset({"aten._assert_tensor_metadata.default", "aten.sym_size.int"})


def fx_data_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` on the raw fx graph that consume its data (shape queries excluded)."""
    return [u for u in node.users if target_name(u) not in _IGNORED_USERS]


def linear_features(node: fx.Node) -> tuple[int | None, int | None]:
    """(in_features, out_features) of an ``aten.linear`` node, from the weight's shape."""
    w = shape_of(node.args[1])
    if w is None or len(w) != 2:
        return None, None
    return static_int(w[1]), static_int(w[0])
