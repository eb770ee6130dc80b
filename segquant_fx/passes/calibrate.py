"""Calibration: a ``torch.fx.Interpreter`` that runs the float graph and feeds observers.

``CalibrationInterpreter(gm)`` overrides ``run_node``: every node runs as usual; the value of a node
that feeds annotated linears is handed to their observer once, right after it is computed. Linears
reading the same tensor (``to_q``/``to_k``/``to_v``) share one observer, so per-input statistics (a
GPTQ Hessian, a row reservoir) are collected once per tensor, not once per linear. Statistics live
in a side table keyed by linear node name (``interp.observers``), never on tensors. Any failure is
re-raised as :class:`~segquant_fx.errors.CalibrationError` naming the node.

What an observer collects follows the annotations (:func:`observer_needs`): per-channel extremes
always; a row reservoir for an alpha search, or for percentile/MSE calibration of a smoothed layer;
streaming histograms for percentile/MSE calibration of an unsmoothed layer; a Hessian for GPTQ.

``calibrate(gm, items, in_spec)`` streams over any iterable of calibration items (kwargs dicts keyed by
forward parameter names, positional tuples, or ``(args, kwargs)``), validating the first one against
the forward signature, with a tqdm progress bar. Memory is bounded: observers keep per-channel vectors,
fixed-size reservoirs, histograms and ``K x K`` Hessians only, and items are not retained.
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
from segquant_fx.passes.annotate import LinearAnnotation, annotations
from segquant_fx.passes.observers import ChannelMinMaxObserver, LinearInputObserver, ObserverNeeds
from segquant_fx.quantized import same_constant

__all__ = ["CalibrationInterpreter", "calibrate", "flatten_inputs", "bind_inputs", "observer_needs"]

_HIST_CALIBRATORS = ("percentile", "mse")


def observer_needs(ann: LinearAnnotation) -> ObserverNeeds:
    """What the observer of ``ann``'s input must collect for the layer's optimizer and calibrator."""
    smoothing = ann.smooth_alpha is not None
    static_act = ann.act_qtype is not None and not ann.act_dynamic
    rows, cpu = 0, False
    if smoothing and ann.search is not None:
        rows, cpu = ann.search.rows, ann.search.cpu_storage
    hists: tuple[tuple[int, ...], ...] = ()
    calib = ann.calib
    if static_act and calib.type in _HIST_CALIBRATORS:
        if smoothing:  # x / s is only known after calibration: keep rows, bin x / s later
            rows, cpu = max(rows, calib.rows), cpu or calib.cpu_storage
        else:
            hists = (tuple(ann.in_segments),)
    gptq = calib.type == "gptq"
    return ObserverNeeds(
        reservoir_rows=rows,
        reservoir_cpu=cpu,
        hessian=gptq,
        hessian_dtype=torch.float64 if gptq and calib.hessian_dtype == "float64" else torch.float32,
        hessian_cpu=gptq and calib.cpu_storage,
        histograms=hists,
        bins=calib.bins if calib.type in _HIST_CALIBRATORS else 2048,
    )


class CalibrationInterpreter(fx.Interpreter):
    """Runs the graph, passing each annotated linear's input to its observer.

    Args:
        gm: The annotated graph module (params reachable through ``get_attr``).
        observer_factory: Builds an observer from ``(in_features, name=...)``; default: a
            :class:`~segquant_fx.passes.observers.LinearInputObserver` collecting what the
            annotations of the linears reading that tensor need.
    """

    def __init__(self, gm: fx.GraphModule, observer_factory: Callable[..., Any] | None = None):
        super().__init__(gm, garbage_collect_values=True)
        anns = annotations(gm)
        nodes = {n.name: n for n in gm.graph.nodes if n.name in anns}
        readers: dict[str, list[str]] = {}
        for name in anns:
            x = nodes[name].args[0]
            readers.setdefault(x.name if isinstance(x, fx.Node) else f"<{name}>", []).append(name)
        self.observers: dict[str, ChannelMinMaxObserver] = {}
        self._at_node: dict[str, ChannelMinMaxObserver] = {}
        self._per_linear: dict[str, ChannelMinMaxObserver] = {}
        for key, names in readers.items():
            first = anns[names[0]]
            modules = ", ".join(dict.fromkeys(anns[n].module for n in names))
            label = f"{names[0]} ({modules})"
            if observer_factory is not None:
                obs = observer_factory(first.in_features, name=label)
            else:
                needs = ObserverNeeds()
                for n in names:
                    needs = needs.union(observer_needs(anns[n]))
                obs = LinearInputObserver(first.in_features, name=label, needs=needs)
            for n in names:
                self.observers[n] = obs
            if key.startswith("<"):
                self._per_linear[names[0]] = obs  # input is not a node: observe at the linear
            else:
                self._at_node[key] = obs
        self._fast: fx.GraphModule | bool | None = None

    def fast_run(self, *flat: Any) -> Any:
        """Run one item through a compiled copy of the graph with observer calls inserted.

        Same observers, same order of observation as :meth:`run`, without the interpreter's per-node
        Python cost (about 16 us a node). On a failure the item is re-run node by node through
        :meth:`run` so the error names the failing node.
        """
        if self._fast is None:
            self._fast = self._instrumented()
        if self._fast is False:
            return self.run(*flat)
        try:
            return self._fast(*flat)
        except SegQuantError:
            raise
        except Exception:  # noqa: BLE001 - re-run slowly to attribute the failure to a node
            return self.run(*flat)

    def _instrumented(self) -> fx.GraphModule | bool:
        if self._per_linear:
            return False  # observation at a linear whose input is not a node: interpreter only
        gm = self.module
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, env)
        graph.output(out)
        root: dict[str, Any] = {}
        for i, (name, obs) in enumerate(self._at_node.items()):
            node = next(n for o, n in env.items() if o.name == name)
            key = f"_segquant_observer_{i}"
            root[key] = obs
            with graph.inserting_after(node):
                graph.call_module(key, (node,))
        for n in graph.nodes:
            if n.op in ("get_attr", "call_module") and n.target not in root:
                root[n.target] = _fetch(gm, n.target)
        try:
            return fx.GraphModule(root, graph)
        except Exception:  # noqa: BLE001 - an exotic graph: keep the interpreter
            return False

    def run_node(self, n: fx.Node) -> Any:
        """Run ``n``; hand its value to the observer of the linears that read it."""
        try:
            pre = self._per_linear.get(n.name)
            if pre is not None:
                pre(self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0])
            out = super().run_node(n)
            obs = self._at_node.get(n.name)
            if obs is not None:
                obs(out)
            return out
        except SegQuantError:
            raise
        except Exception as e:
            raise CalibrationError(f"calibration failed at node={n.format_node()}: {type(e).__name__}: {e}") from e


def _fetch(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    for k, v in bound.arguments.items():
        if k in defaults and not same_constant(v, defaults[k]):
            raise CalibrationError(
                f"calibration item sets {k}={v!r}, but the model was captured with {k}={defaults[k]!r}: non-tensor "
                "arguments are constants of the captured graph; calibrate with the value you will run with"
            )
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
    observer_factory: Callable[..., Any] | None = None,
) -> tuple[dict[str, ChannelMinMaxObserver], int]:
    """Run calibration; returns (linear node name -> observer, number of items seen).

    Linears reading the same tensor share their observer (the same object in the dict).

    Raises:
        CalibrationError: On an empty iterable, a mismatched item, a failing node, or NaN/Inf.
    """
    interp = CalibrationInterpreter(gm, observer_factory)
    n = 0
    total = max_items if max_items is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = tqdm(total=total, desc="calibrating", unit="item", disable=not progress, leave=False)
    try:
        for item in items:
            if max_items is not None and n >= max_items:
                break
            kwargs = bind_inputs(signature, item, defaults)
            flat = flatten_inputs(gm, kwargs)
            interp.fast_run(*flat)
            n += 1
            bar.update(1)
    finally:
        bar.close()
    if n == 0:
        raise CalibrationError("the calibration set is empty: pass at least one item (kwargs dict or args tuple)")
    return interp.observers, n
