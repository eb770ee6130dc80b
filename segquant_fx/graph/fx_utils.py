"""Small helpers over ``torch.fx`` nodes: targets, argument access, shapes, dims."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = [
    "target_name",
    "get_arg",
    "val_of",
    "shape_of",
    "static_int",
    "normalize_dim",
    "is_tensor_node",
]


def target_name(node: fx.Node) -> str:
    """A stable string for a node's target: ``aten.linear.default``, ``getitem``, ``placeholder``."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def get_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, read positionally or by keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val_of(node: Any) -> Any:
    """The example value export recorded for ``node`` (a FakeTensor, a list of them, a SymInt…)."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return None


def shape_of(node: Any) -> tuple[Any, ...] | None:
    """Shape of a tensor-valued node, with dims as ints or SymInts; None when not a tensor."""
    val = val_of(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def static_int(x: Any) -> int | None:
    """``x`` as a Python int when it is static, else None (a symbolic size)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            v = x.node.maybe_as_int()
            if v is not None:
                return int(v)
            # e.g. (48*s0)//s0 from reshape(B, -1): simplifies to a constant
            import sympy

            expr = sympy.simplify(x.node.expr)
            return int(expr) if expr.is_Integer else None
        except Exception:  # noqa: BLE001 - any failure means "not static"
            return None
    return None


def normalize_dim(dim: Any, ndim: int) -> int | None:
    """``dim`` as a non-negative index into a rank-``ndim`` tensor; None if not a valid static int."""
    d = static_int(dim)
    if d is None or ndim <= 0:
        return None
    if d < 0:
        d += ndim
    return d if 0 <= d < ndim else None


def is_tensor_node(node: fx.Node) -> bool:
    """True when the node's value is a tensor or a list/tuple of tensors (data, not shapes)."""
    val = val_of(node)
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return True
    return False
