"""QuantizeRewritePass: annotated linears -> ``torch.ops.segquant.*`` calls, weights and scales as buffers.

Reads annotations and calibration statistics; never searches for patterns. Quantized weights and
scales are registered as buffers on the linear's own module (``<fqn>.qweight``, ``<fqn>.w_scale``,
``<fqn>.x_scale`` ...) and the float weight is removed, so the state dict reads like the model.

Rewrite rules (``x`` the activation, ``W``/``b`` the linear's weight and bias, ``s`` the SmoothQuant
divisor when smoothing is on, ``segs`` the input segments):

1. Static activations, real quant::

       linear(x, W, b)  ->  qx = segquant.quantize(x, x_scale, segs, "int8", s)
                            y  = segquant.qlinear(qx, x_scale, segs, "int8", qweight, w_scale, wsegs,
                                                  "int8", b, False, x.dtype)

2. DualScale (static)::

       qx = segquant.quantize_dual(x, x_scale_pos, x_scale_neg, segs, "int8", s)
       y  = segquant.qlinear(qx, x_scale_dual, segs, "int8", qweight, w_scale, wsegs, "int8", b, True, dtype)

3. Dynamic (per-token) activations: ``qx, xs = segquant.quantize_dynamic(x, segs, qtype, s)``, then
   ``qlinear(qx, xs, ...)``.
4. Weight-only (W8A16 / W4A16): ``y = segquant.qlinear(x, empty, [], "none", qweight, w_scale, ...)``.
5. Fake quant (``real_quant=False``): ``x_hat = segquant.fake_quantize[_dual](x, ...)`` and
   ``aten.linear(x_hat, W_hat, b)`` with ``W_hat`` the dequantized (smoothed) weight; it agrees with
   rules 1-4 to float rounding.

Weight scales: ``per_channel`` -> ``[N, 1]``; ``per_group`` -> ``[N, K/g]``; ``per_tensor`` -> ``[1]``, or
one scale per output segment (SegLinear) expanded to ``[N, 1]``. A layer whose alpha was searched
per input segment has one weight scale per input segment as well (``[N, nseg]``/``[1, nseg]``, with
the input segments as weight segments).

Optimizer tensors (computed by :func:`segquant_fx.optim.optimize`, see there):

6. Per-output-segment smoothing (``smooth`` is ``[G, K]``; activation scales ``[G, ...]``)::

       for each group g (rows a:b of the weight):
           q_g = segquant.quantize(x, select(x_scale, 0, g), segs, "int8", select(smooth, 0, g))
           y_g = segquant.qlinear(q_g, ..., slice(qweight, 0, a, b), slice(w_scale, 0, a, b), ...,
                                  slice(b, 0, a, b), ...)
       y = cat([y_0, ..., y_G-1], -1)

7. SVD low-rank branch (``lr_down`` ``[R, K]`` with the smoothing folded in, ``lr_up`` ``[N, R]``, in
   the activation dtype)::

       y = y + aten.linear(aten.linear(x, lr_down), lr_up)
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from segquant_fx import ops
from segquant_fx.errors import CalibrationError
from segquant_fx.ops.formats import num_segments
from segquant_fx.passes.annotate import LinearAnnotation
from segquant_fx.passes.base import SEGQUANT_ANNOTATION_KEY, PassResult, SegQuantPass
from segquant_fx.passes.observers import ChannelMinMaxObserver, merge_observers

__all__ = ["QuantizeRewritePass", "smoothing_vector", "quantize_weight", "LayerTensors"]

_SMOOTH_MIN, _SMOOTH_MAX = 1e-4, 1e4


def smoothing_vector(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant divisor ``s_k = max|x_k|^a / max|W_:,k|^(1-a)``, guarded and clamped to [1e-4, 1e4].

    Channels never active (or with a zero weight column) get ``s = 1``.
    """
    a = act_absmax.double().clamp(min=0)
    w = weight.detach().abs().amax(dim=0).double().to(a.device)
    s = a.pow(alpha) / w.pow(1 - alpha).clamp(min=1e-12)
    s = torch.where((a <= 2**-31) | (w <= 2**-31) | ~torch.isfinite(s), torch.ones_like(s), s)
    return s.clamp(_SMOOTH_MIN, _SMOOTH_MAX).float()


def _weight_scale(w: torch.Tensor, ann: LinearAnnotation) -> tuple[torch.Tensor, list[int]]:
    """(dequant scale, weight segments) for ``w`` ``[N, K]`` in float32."""
    info = ops.qtype_info(ann.weight_qtype)
    wa = w.abs().float()
    if ann.weight_granularity == "per_channel":
        amax = wa.amax(dim=1, keepdim=True)
        segs: list[int] = []
    elif ann.weight_granularity == "per_group":
        g = int(ann.weight_group_size)
        amax = wa.reshape(w.shape[0], -1, g).amax(dim=2)
        segs = [g] * (w.shape[1] // g)
    elif ann.out_segments:
        parts = [t.amax().reshape(1, 1).expand(t.shape[0], 1) for t in wa.split(list(ann.out_segments), dim=0)]
        amax = torch.cat(parts, dim=0)
        segs = []
    else:
        amax = wa.amax().reshape(1)
        segs = []
    return ops.scale_from_amax(amax, ann.weight_qtype) if info else amax, segs


def quantize_weight(w: torch.Tensor, ann: LinearAnnotation, smooth: torch.Tensor | None) -> dict[str, Any]:
    """Quantize a (smoothed) float weight; returns ``qweight``, ``w_scale``, ``w_segments``."""
    wf = w.detach().float()
    if smooth is not None:
        wf = wf * smooth.to(wf.device)[None, :]
    scale, segs = _weight_scale(wf, ann)
    q = ops.quantize(wf, scale, qtype=ann.weight_qtype, segments=segs)
    return {"qweight": q, "w_scale": scale, "w_segments": segs}


class LayerTensors(dict):
    """Tensors computed for one layer (names -> tensors, plus ``w_segments``)."""


def _act_scales(obs: ChannelMinMaxObserver, ann: LinearAnnotation, smooth: torch.Tensor | None) -> dict[str, torch.Tensor]:
    st = obs.segment_stats(ann.in_segments, smooth)
    if not ann.dual:
        return {"x_scale": ops.scale_from_amax(st["amax"], ann.act_qtype)}
    pos, neg = ops.dual_scales_from_minmax(st["pos_max"], st["neg_min"], ann.act_qtype)
    if ann.dual_segments is not None:
        # segments that are not activation-derived use one symmetric scale on both sides
        sym = ops.scale_from_amax(st["amax"], ann.act_qtype)
        flags = torch.tensor(ann.dual_segments, device=pos.device)
        pos, neg = torch.where(flags, pos, sym), torch.where(flags, neg, sym)
    return {"x_scale_pos": pos, "x_scale_neg": neg, "x_scale": torch.cat([pos, neg])}


def compute_layer_tensors(
    weight: torch.Tensor, ann: LinearAnnotation, obs: ChannelMinMaxObserver | None
) -> LayerTensors:
    """Everything the rewritten layer stores: smoothing, activation scales, quantized weight."""
    out = LayerTensors()
    needs_stats = ann.act_qtype is not None and (not ann.act_dynamic or ann.smooth_alpha is not None)
    if needs_stats and (obs is None or obs.count == 0):
        raise CalibrationError(f"{ann.module}: no calibration statistics were recorded (is the layer ever run?)")
    smooth = None
    if ann.smooth_alpha is not None and obs is not None:
        smooth = smoothing_vector(obs.absmax, weight, ann.smooth_alpha)
        out["smooth"] = smooth
    if ann.act_qtype is not None and not ann.act_dynamic:
        out.update(_act_scales(obs, ann, smooth))
    out.update(quantize_weight(weight, ann, smooth))
    return out


def _merged(observers: list[ChannelMinMaxObserver]) -> ChannelMinMaxObserver | None:
    """One observer holding the statistics of several (the call sites of one module)."""
    return merge_observers(observers)


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, attr = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


class QuantizeRewritePass(SegQuantPass):
    """Replace every annotated ``aten.linear`` with segquant ops (see module docstring).

    Args:
        observers: Node name -> observer with the node's calibration statistics.
        precomputed: Module FQN -> layer tensors (``qweight``, ``w_scale``, ``x_scale``..., and
            ``w_segments``) to use instead of computing them (loading a saved model).
        progress: Show a progress bar over layers.
    """

    def __init__(
        self,
        observers: Mapping[str, ChannelMinMaxObserver] | None = None,
        precomputed: Mapping[str, Mapping[str, Any]] | None = None,
        progress: bool = False,
    ):
        super().__init__()
        self.observers = observers or {}
        self.precomputed = precomputed
        self.progress = progress
        self.layer_tensors: dict[str, LayerTensors] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Rewrite; ``modified`` is True when a linear was replaced."""
        from tqdm.auto import tqdm

        gm = graph_module
        nodes = [n for n in gm.graph.nodes if SEGQUANT_ANNOTATION_KEY in n.meta and n.target == torch.ops.aten.linear.default]
        used_weights: list[str] = []
        # a module called from several places: statistics of all call sites, tensors computed once
        sites: dict[str, list[str]] = {}
        for n in nodes:
            if isinstance(n.args[1], fx.Node):
                sites.setdefault(n.args[1].target, []).append(n.name)
        done: dict[str, LayerTensors] = {}
        for node in tqdm(nodes, desc="quantizing", unit="layer", disable=not self.progress, leave=False):
            ann: LinearAnnotation = node.meta[SEGQUANT_ANNOTATION_KEY]
            x, w_node = node.args[0], node.args[1]
            b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if w_node.op != "get_attr":
                continue  # weights computed in the graph are left alone
            owner, wattr = _owner(gm, w_node.target)
            if w_node.target in done:  # second call site of an already quantized module
                tensors = done[w_node.target]
                prefix = w_node.target.rsplit(".", 1)[0] if "." in w_node.target else ""
                new = self._emit(gm, node, ann, x, b_node, owner, prefix, tensors, self._weights[w_node.target])
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                continue
            weight = getattr(owner, wattr)
            if self.precomputed is not None:
                if ann.module not in self.precomputed:
                    raise CalibrationError(f"{ann.module}: no saved tensors for this quantized layer")
                tensors = LayerTensors(self.precomputed[ann.module])
            else:
                obs = _merged([self.observers[s] for s in sites.get(w_node.target, [node.name]) if s in self.observers])
                tensors = compute_layer_tensors(weight, ann, obs)
            self.layer_tensors[ann.module] = tensors
            done[w_node.target] = tensors
            self._weights[w_node.target] = weight
            prefix = w_node.target.rsplit(".", 1)[0] if "." in w_node.target else ""
            new = self._emit(gm, node, ann, x, b_node, owner, prefix, tensors, weight)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            used_weights.append(w_node.target)
        gm.graph.eliminate_dead_code()
        live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in used_weights:
            if target not in live:
                owner, attr = _owner(gm, target)
                delattr(owner, attr)
        return PassResult(gm, bool(nodes))

    def _emit(self, gm, node, ann, x, b_node, owner, prefix, tensors, weight) -> fx.Node:
        g = gm.graph
        val = node.meta.get("val")
        out_dtype = val.dtype if isinstance(val, torch.Tensor) else weight.dtype

        def buf(name: str, t: torch.Tensor) -> fx.Node:
            if name in owner._buffers or hasattr(owner, name):
                delattr(owner, name)
            owner.register_buffer(name, t.detach().contiguous())
            return g.get_attr(f"{prefix}.{name}" if prefix else name)

        aten = torch.ops.aten
        smooth_t = tensors.get("smooth")
        grouped = smooth_t is not None and smooth_t.dim() == 2
        wsegs = list(tensors["w_segments"])
        ws_t = tensors["w_scale"]
        ncol = ws_t.shape[-1] if ws_t.dim() == 2 else 1
        if ncol > 1 and num_segments(wsegs) != ncol and len(ann.in_segments) == ncol:
            wsegs = list(ann.in_segments)  # per-input-segment weight scales (a fake-quant save keeps no segments)
        with g.inserting_before(node):
            smooth = buf("smooth", smooth_t) if smooth_t is not None else None
            # buffers are registered (get_attr nodes created) on first use, in the order of rules 1-5
            made: dict[str, fx.Node] = {}

            def tensor(name: str) -> fx.Node:
                if name not in made:
                    if name == "weight_hat":
                        t = ops.dequantize(
                            tensors["qweight"], ws_t, qtype=ann.weight_qtype, segments=wsegs, out_dtype=weight.dtype
                        )
                    elif name == "x_scale" and ann.act_qtype is None:
                        t = torch.ones(1)  # weight-only: an unused placeholder
                    else:
                        t = ws_t if name == "w_scale" else tensors[name]
                    made[name] = buf(name, t)
                return made[name]

            if not grouped:
                new = self._emit_one(g, ann, x, smooth, tensor, wsegs, b_node, out_dtype)
            else:
                sizes = list(ann.smooth_groups)
                if len(sizes) != smooth_t.shape[0] or sum(sizes) != ann.out_features:
                    raise CalibrationError(
                        f"{ann.module}: {smooth_t.shape[0]} smoothing vectors do not match the smoothing groups {sizes}"
                    )
                outs, a = [], 0
                for gi, n_g in enumerate(sizes):

                    def part(name: str, gi: int = gi, a: int = a, n_g: int = n_g) -> fx.Node:
                        if name.startswith("x_scale"):  # [G, ...]: this group's row
                            return g.call_function(aten.select.int, (tensor(name), 0, gi))
                        return g.call_function(aten.slice.Tensor, (tensor(name), 0, a, a + n_g))  # weight rows

                    sm = g.call_function(aten.select.int, (smooth, 0, gi))
                    bg = g.call_function(aten.slice.Tensor, (b_node, 0, a, a + n_g)) if b_node is not None else None
                    outs.append(self._emit_one(g, ann, x, sm, part, wsegs, bg, out_dtype))
                    a += n_g
                new = g.call_function(aten.cat.default, (outs, -1))
            for name in ("x_scale", "x_scale_pos", "x_scale_neg"):
                if name in tensors and name not in made:  # unused by this path (fake DualScale): kept for saving
                    if name in owner._buffers or hasattr(owner, name):
                        delattr(owner, name)
                    owner.register_buffer(name, tensors[name].detach().contiguous())
            if "lr_down" in tensors:
                h = g.call_function(aten.linear.default, (x, buf("lr_down", tensors["lr_down"])))
                lr = g.call_function(aten.linear.default, (h, buf("lr_up", tensors["lr_up"])))
                new = g.call_function(aten.add.Tensor, (new, lr))
        for k in ("nn_module_stack", "stack_trace", "segquant_module", "source_fn_stack"):
            if k in node.meta:
                new.meta[k] = node.meta[k]
        new.meta["val"] = val
        new.meta["segquant_quantized"] = ann
        return new

    @staticmethod
    def _emit_one(g, ann, x, smooth, tensor, wsegs, b_node, out_dtype) -> fx.Node:
        """The quantized GEMM of one smoothing group (rules 1-5); ``tensor(name)`` gives a buffer's node."""
        segs = list(ann.in_segments)
        aq = ann.act_qtype
        seg_ops = torch.ops.segquant
        if not ann.real_quant:
            if aq is None:
                x_hat = x  # weight-only: the activation stays float
            elif ann.act_dynamic:
                qd = g.call_function(seg_ops.quantize_dynamic.default, (x, segs, aq, smooth))
                q = g.call_function(operator.getitem, (qd, 0))
                s = g.call_function(operator.getitem, (qd, 1))
                x_hat = g.call_function(seg_ops.dequantize.default, (q, s, segs, aq, out_dtype))
            elif ann.dual:
                pos, neg = tensor("x_scale_pos"), tensor("x_scale_neg")
                x_hat = g.call_function(seg_ops.fake_quantize_dual.default, (x, pos, neg, segs, aq, smooth))
            else:
                x_hat = g.call_function(seg_ops.fake_quantize.default, (x, tensor("x_scale"), segs, aq, smooth))
            # x_hat lives in the smoothed domain (x / s); w_hat = deq(Q(W * s)) undoes it
            return g.call_function(torch.ops.aten.linear.default, (x_hat, tensor("weight_hat"), b_node))
        qw, ws = tensor("qweight"), tensor("w_scale")
        if aq is None:
            args = (x, tensor("x_scale"), [], "none", qw, ws, wsegs, ann.weight_qtype, b_node, False, out_dtype)
        elif ann.act_dynamic:
            qd = g.call_function(seg_ops.quantize_dynamic.default, (x, segs, aq, smooth))
            q = g.call_function(operator.getitem, (qd, 0))
            s = g.call_function(operator.getitem, (qd, 1))
            args = (q, s, segs, aq, qw, ws, wsegs, ann.weight_qtype, b_node, False, out_dtype)
        elif ann.dual:
            pos, neg = tensor("x_scale_pos"), tensor("x_scale_neg")
            q = g.call_function(seg_ops.quantize_dual.default, (x, pos, neg, segs, aq, smooth))
            args = (q, tensor("x_scale"), segs, aq, qw, ws, wsegs, ann.weight_qtype, b_node, True, out_dtype)
        else:
            xs = tensor("x_scale")
            q = g.call_function(seg_ops.quantize.default, (x, xs, segs, aq, smooth))
            args = (q, xs, segs, aq, qw, ws, wsegs, ann.weight_qtype, b_node, False, out_dtype)
        new = g.call_function(seg_ops.qlinear.default, args)
        new.meta["segquant_quantized"] = ann
        return new
