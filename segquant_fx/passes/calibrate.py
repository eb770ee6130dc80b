"""Calibration: a ``torch.fx.Interpreter`` that runs the float graph and feeds observers.

``CalibrationInterpreter(gm)`` overrides ``run_node``: every node runs as usual; for annotated linears
the input activation is handed to that node's observer first. Statistics live in a side table keyed by
node name (``interp.observers``), never on tensors. Any failure is re-raised as
:class:`~segquant_fx.errors.CalibrationError` naming the node.

``calibrate(gm, items, in_spec)`` streams over any iterable of calibration items (kwargs dicts keyed by
forward parameter names, positional tuples, or ``(args, kwargs)``), validating the first one against
the forward signature, with a tqdm progress bar. Memory is bounded: observers keep per-channel vectors
only, and items are not retained.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from segquant_fx.capture import normalize_example
from segquant_fx.errors import CalibrationError, CaptureError, SegQuantError
from segquant_fx.passes.annotate import annotations
from segquant_fx.passes.observers import ChannelMinMaxObserver

__all__ = ["CalibrationInterpreter", "calibrate", "flatten_inputs", "bind_inputs"]


class CalibrationInterpreter(fx.Interpreter):
    """Runs the graph, passing each annotated linear's input to its observer.

    Args:
        gm: The annotated graph module (params reachable through ``get_attr``).
        observer_factory: Builds an observer from ``(in_features, name)``.
    """

    def __init__(self, gm: fx.GraphModule, observer_factory: Callable[..., Any] = ChannelMinMaxObserver):
        super().__init__(gm, garbage_collect_values=True)
        self.observers: dict[str, ChannelMinMaxObserver] = {
            name: observer_factory(ann.in_features, name=f"{name} ({ann.module})")
            for name, ann in annotations(gm).items()
        }

    def run_node(self, n: fx.Node) -> Any:
        """Run ``n``; observe its input first if it is an annotated linear."""
        try:
            obs = self.observers.get(n.name)
            if obs is not None:
                x = self.env[n.args[0]]
                obs(x)
            return super().run_node(n)
        except SegQuantError:
            raise
        except Exception as e:
            raise CalibrationError(f"calibration failed at node={n.format_node()}: {type(e).__name__}: {e}") from e


def bind_inputs(signature: inspect.Signature | None, item: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Turn a calibration item into kwargs keyed by forward's parameter names.

    Raises:
        CalibrationError: If the item does not fit the signature; names the offending argument.
    """
    try:
        args, kwargs = normalize_example(item)
    except CaptureError as e:
        raise CalibrationError(f"calibration item: {e}") from None
    if signature is None:
        if args:
            raise CalibrationError("calibration items must be kwargs dicts for this model")
        return {**defaults, **kwargs}
    params = signature.parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise CalibrationError(
            f"calibration item has argument(s) {', '.join(map(repr, unknown))} that forward"
            f"({', '.join(params)}) does not take; key items by forward's parameter names"
        )
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise CalibrationError(f"calibration item does not fit forward({', '.join(params)}): {e}") from None
    return {**defaults, **bound.arguments}


def flatten_inputs(gm: fx.GraphModule, kwargs: dict[str, Any]) -> list[Any]:
    """Flatten forward kwargs into the placeholder order of an unlifted exported module."""
    in_spec = gm._in_spec  # set by ExportedProgram.module()
    names = in_spec.children_specs[1].context if in_spec.num_children == 2 else None
    if names is not None:
        missing = [k for k in names if k not in kwargs]
        if missing:
            raise CalibrationError(f"calibration item lacks argument(s) {', '.join(map(repr, missing))}")
        ordered = {k: kwargs[k] for k in names}
    else:
        ordered = kwargs
    flat, spec = pytree.tree_flatten(((), ordered))
    if spec != in_spec:
        raise CalibrationError(
            f"calibration item's structure {spec} differs from the captured example's {in_spec}: pass the same "
            "arguments (same nesting, None where the example had None)"
        )
    return flat


@torch.no_grad()
def calibrate(
    gm: fx.GraphModule,
    items: Iterable[Any],
    signature: inspect.Signature | None,
    defaults: dict[str, Any],
    *,
    progress: bool = True,
    max_items: int | None = None,
) -> tuple[dict[str, ChannelMinMaxObserver], int]:
    """Run calibration; returns (node name -> observer, number of items seen).

    Raises:
        CalibrationError: On an empty iterable, a mismatched item, a failing node, or NaN/Inf.
    """
    interp = CalibrationInterpreter(gm)
    n = 0
    total = max_items if max_items is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = tqdm(total=total, desc="calibrating", unit="item", disable=not progress, leave=False)
    try:
        for item in items:
            if max_items is not None and n >= max_items:
                break
            kwargs = bind_inputs(signature, item, defaults)
            flat = flatten_inputs(gm, kwargs)
            interp.run(*flat)
            n += 1
            bar.update(1)
    finally:
        bar.close()
    if n == 0:
        raise CalibrationError("the calibration set is empty: pass at least one item (kwargs dict or args tuple)")
    return interp.observers, n
