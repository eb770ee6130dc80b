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

Speed. ``calibrate`` runs items through a compiled copy of the graph (``CalibrationInterpreter.fast_run``)
rather than node by node, so that calibrating costs about one forward pass per item: observers are
plain function calls in the generated code; parameters are bound once as leading inputs; nodes that
return their input unchanged are dropped while the inputs have their captured dtypes; per-channel
extremes are batched per item (:class:`~segquant_fx.passes.observers.ObserverSession`); dict items
shaped like the previous one skip ``Signature.bind``. Statistics are bit-identical to a node-by-node
run. If the compiled run fails, the item is re-run node by node to name the failing node, and the
session makes sure nothing the failed run observed is counted twice.
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
from segquant_fx.passes.observers import (
    ChannelMinMaxObserver,
    LinearInputObserver,
    ObserverNeeds,
    ObserverSession,
)
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

    Observers are fed through an :class:`~segquant_fx.passes.observers.ObserverSession`: an item's
    statistics count once, when the item completes (:meth:`run`, :meth:`fast_run`). Call
    :meth:`close` after the last item (``calibrate`` does) so the observers own their buffers again.

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
        # One session over the observation points in the order the graph runs them (so a NaN is
        # reported at the first node that produced one, as a node-by-node run would).
        pos = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        points = sorted(
            [(pos[k], "at", k, o) for k, o in self._at_node.items()]
            + [(pos[k], "pre", k, o) for k, o in self._per_linear.items()]
        )
        self.session = ObserverSession([o for *_, o in points])
        self._feed_at = {
            k: f for (_, w, k, _), f in zip(points, self.session.feeds, strict=True) if w == "at"
        }
        self._feed_pre = {
            k: f for (_, w, k, _), f in zip(points, self.session.feeds, strict=True) if w == "pre"
        }
        self._fast: dict[bool, _Compiled | None] = {}
        #: Items :meth:`fast_run` re-ran node by node after the compiled run failed (0 normally).
        self.fallbacks = 0
        #: Items completed; the index of the next item unless :meth:`fast_run` is given one (row
        #: reservoirs key an item's rows by its index, see ``RowReservoir.begin_item``).
        self.items_done = 0
        self._input_meta: list[tuple[torch.dtype, torch.device] | None] | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run one item node by node (``fx.Interpreter.run``); its statistics count when it completes."""
        self.session.begin(self.items_done)
        with torch.no_grad():
            out = super().run(*args, **kwargs)
            self.session.commit()
        self.items_done += 1
        return out

    def fast_run(self, *flat: Any, item: int | None = None) -> Any:
        """Run one item (flat graph inputs) through a compiled copy of the graph with observer calls.

        Same observers, same statistics as :meth:`run`, without the interpreter's per-node Python cost
        (about 16 us a node). On a failure the item is re-run node by node so the error names the
        failing node; the session makes sure the failed run's observations are not counted twice.
        ``item``: the item's index in the calibration set (default: items completed so far).
        """
        compiled = self._compiled(flat)
        self.session.begin(self.items_done if item is None else item)
        with torch.no_grad():
            if compiled is None:
                out = super().run(*flat)
            else:
                try:
                    out = compiled(flat)
                except SegQuantError:
                    raise
                except Exception:  # noqa: BLE001 - re-run slowly to attribute the failure to a node
                    self.fallbacks += 1
                    self.session.retry()
                    out = super().run(*flat)
            self.session.commit()
        self.items_done += 1
        return out

    def close(self) -> None:
        """After the last item: the observers get buffers of their own (see ``ObserverSession``)."""
        self.session.close()

    def _compiled(self, flat: tuple[Any, ...]) -> _Compiled | None:
        """The compiled copy for this item.

        No-op nodes are elided when the inputs' dtypes and devices are the captured ones (then every
        intermediate's are too); otherwise a copy that keeps them runs.
        """
        if self._per_linear:
            return None  # observation at a linear whose input is not a node: interpreter only
        if self._input_meta is None:
            self._input_meta = [
                (v.dtype, v.device) if isinstance(v := n.meta.get("val"), torch.Tensor) else None
                for n in self.module.graph.nodes
                if n.op == "placeholder"
            ]
        meta = self._input_meta
        same = len(flat) == len(meta) and all(
            m is None or (isinstance(t, torch.Tensor) and t.dtype == m[0] and t.device == m[1])
            for t, m in zip(flat, meta, strict=False)
        )
        if same not in self._fast:
            try:
                self._fast[same] = _compile(self.module, self._feed_at, elide=same)
            except Exception:  # noqa: BLE001 - a graph the copy cannot handle: the interpreter can
                self._fast[same] = None
        return self._fast[same]

    def run_node(self, n: fx.Node) -> Any:
        """Run ``n``; hand its value to the observer of the linears that read it."""
        try:
            pre = self._feed_pre.get(n.name)
            if pre is not None:
                pre(self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0])
            out = super().run_node(n)
            feed = self._feed_at.get(n.name)
            if feed is not None:
                feed(out)
            return out
        except SegQuantError:
            raise
        except Exception as e:
            raise CalibrationError(
                f"calibration failed at node={n.format_node()}: {type(e).__name__}: {e}"
            ) from e


class _Compiled:
    """A compiled instrumented copy of a graph: ``self(flat)`` runs one item."""

    def __init__(self, gm: fx.GraphModule, consts: list[Any]):
        self.gm = gm
        self.forward = gm.forward  # skip nn.Module.__call__: no hooks on a private module
        self.consts = tuple(consts)

    def __call__(self, flat: tuple[Any, ...]) -> Any:
        return self.forward(*self.consts, *flat)


_INT64_MAX = 9223372036854775807


def _fetch(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_noop(n: fx.Node) -> bool:
    """Whether ``n`` returns its first input (or an identical view) while values have their captured dtypes.

    That is: a cast to the dtype and device it already has, eval dropout, a full slice. Never a copy
    (``contiguous``, ``clone``): strides could differ and change numerics downstream.
    """
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    t, a, kw = n.target, n.args, n.kwargs
    if t is torch.ops.aten.slice.Tensor:
        full = len(a) == 4 or (len(a) == 5 and a[4] == 1)
        return not kw and full and a[2] in (0, None) and a[3] in (None, _INT64_MAX)
    if t is torch.ops.aten.dropout.default:
        return not kw and len(a) == 3 and (a[2] is False or a[1] == 0)
    if t in (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout):
        if any(kw.get(k) for k in ("copy", "pin_memory", "non_blocking")) or len(a) > 2:
            return False
        if kw.get("memory_format") not in (None, torch.preserve_format):
            return False
        if kw.get("layout") not in (None, torch.strided):
            return False
        src, out = a[0].meta.get("val"), n.meta.get("val")
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
            return False
        return src.dtype == out.dtype and src.device == out.device and src.layout == torch.strided
    return False


def _compile(gm: fx.GraphModule, feeds: dict[str, Callable[..., Any]], *, elide: bool) -> _Compiled:
    """Copy ``gm``'s graph with a plain call ``feed(value)`` after every observed node.

    Per-item Python cost is what makes calibration of small models slower than their forward, so the
    copy also: takes the constants (``get_attr``: parameters, buffers) as leading inputs, bound once,
    instead of walking module attribute chains on every call; and, with ``elide``, drops nodes that
    return their input unchanged (:func:`_is_noop`). Values, and so statistics, are the same.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    by_name = {o.name: c for o, c in env.items()}
    placeholders = [c for c in graph.nodes if c.op == "placeholder"]
    for name, feed in feeds.items():
        node = by_name[name]
        where = placeholders[-1] if node.op == "placeholder" else node
        with graph.inserting_after(where):
            graph.call_function(feed, (node,))
    consts: list[Any] = []
    first = next((c for c in graph.nodes if c.op != "get_attr"), None)  # the get_attrs are erased below
    for c in list(graph.nodes):
        if c.op == "get_attr":
            with graph.inserting_before(first):
                ph = graph.placeholder(f"_segquant_const_{len(consts)}")
            consts.append(_fetch(gm, c.target))
            c.replace_all_uses_with(ph)
            graph.erase_node(c)
    if elide:
        for c in list(graph.nodes):
            if _is_noop(c):
                c.replace_all_uses_with(c.args[0])
                graph.erase_node(c)
    root = {c.target: _fetch(gm, c.target) for c in graph.nodes if c.op == "call_module"}
    return _Compiled(fx.GraphModule(root, graph), consts)


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
    names = in_spec.child(1).context if in_spec.num_children == 2 else None
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


class _ItemBinder:
    """``flatten_inputs(gm, bind_inputs(...))`` with a shortcut for the usual stream of kwargs dicts.

    Once a dict item went through the full path, a later dict with the same keys whose graph inputs
    are all tensors (leaves of the captured input structure) and whose other values equal the captured
    constants flattens to ``[item[name] for name in graph inputs]``: exactly what the full path gives,
    without ``Signature.bind`` and a pytree flatten per item. Anything else takes the full path.
    """

    def __init__(self, gm: fx.GraphModule, signature: inspect.Signature | None, defaults: dict[str, Any]):
        self.gm, self.signature, self.defaults = gm, signature, defaults
        spec = gm._in_spec
        self.names: list[str] | None = None
        if spec.num_children == 2 and spec.child(0).num_children == 0:
            kw = spec.child(1)
            if kw.context is not None and all(c.is_leaf() for c in kw.children()):
                self.names = list(kw.context)
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.params = (
            None if signature is None else {k for k, p in signature.parameters.items() if p.kind in plain}
        )
        self.keys: Any = None  # keys of the last dict item that took the full path
        self.consts: list[str] = []

    def __call__(self, item: Any) -> list[Any]:
        names = self.names
        if names is not None and type(item) is dict and item.keys() == self.keys:
            flat = [item[k] for k in names]
            if all(isinstance(t, torch.Tensor) for t in flat) and all(
                same_constant(item[k], self.defaults[k]) for k in self.consts
            ):
                return flat
        flat = flatten_inputs(self.gm, bind_inputs(self.signature, item, self.defaults))
        if names is not None and type(item) is dict:
            keys = item.keys()
            ok = set(names) <= keys and (self.params is None or keys <= self.params)
            self.keys = set(keys) if ok else None
            self.consts = [k for k in keys if k not in names and k in self.defaults]
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
    indexed: bool = False,
    allow_empty: bool = False,
) -> tuple[dict[str, ChannelMinMaxObserver], int]:
    """Run calibration; returns (linear node name -> observer, number of items seen).

    Linears reading the same tensor share their observer (the same object in the dict).

    Args:
        gm: The annotated graph module.
        items: Calibration items; with ``indexed``, ``(index, item)`` pairs where ``index`` is the
            item's position in the whole calibration set (a process of a distributed run sees only
            its share; row reservoirs key rows by that index, so its sample is the one a single
            process would keep, see :mod:`segquant_fx.distributed`).
        signature: ``forward``'s signature (None: items are kwargs dicts).
        defaults: The captured non-tensor arguments.
        progress: Show a progress bar.
        max_items: Run at most this many items.
        observer_factory: Builds the observers (default: what the annotations need).
        indexed: ``items`` yields ``(index, item)``.
        allow_empty: Return the (empty) observers when there is no item instead of raising.

    Raises:
        CalibrationError: On an empty iterable, a mismatched item, a failing node, or NaN/Inf.
    """
    interp = CalibrationInterpreter(gm, observer_factory)
    bind = _ItemBinder(gm, signature, defaults)
    n = 0
    total = max_items if max_items is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = tqdm(total=total, desc="calibrating", unit="item", disable=not progress, leave=False)
    try:
        for entry in items:
            if max_items is not None and n >= max_items:
                break
            index, item = entry if indexed else (None, entry)
            interp.fast_run(*bind(item), item=index)
            n += 1
            bar.update(1)
    finally:
        bar.close()
        interp.close()
    if n == 0 and not allow_empty:
        raise CalibrationError(
            "the calibration set is empty: pass at least one item (kwargs dict or args tuple)"
        )
    return interp.observers, n
