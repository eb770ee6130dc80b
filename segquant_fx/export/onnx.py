"""``export_onnx``: a quantized model to ONNX, as standard QDQ or as ``com.segquant`` custom ops.

::

    QuantizedModel.graph_module (export ATen + torch.ops.segquant.*)
      --drop export's _guards_fn check, copy--> GraphModule sharing the quantized tensors
      --[segquant format] fuse quantize*+qlinear into segquant_onnx::linear (one node per linear)-->
      --check every segquant node is expressible in the format (else OnnxExportError naming it)-->
      --torch.onnx.export(dynamo=True, custom_translation_table=onnx_translations.translation_table(...),
                          kwargs=example, dynamic_shapes=the dims the quantized graph keeps dynamic)-->
      --name dynamic axes (batch, <input>_dim<k>), record metadata--> .onnx (+ external data > 2 GB)

Graph inputs are named after the forward's arguments (a nested argument such as SDXL's
``added_cond_kwargs={"text_embeds", "time_ids"}`` gives ``added_cond_kwargs_text_embeds`` ...), outputs
after the output's fields (``sample``) or ``output_<i>``. The dims the quantized graph keeps dynamic
(batch, tokens, spatial) stay dynamic in ONNX: the first is called ``batch``, the others
``<input>_dim<k>`` (the same name wherever the size is the same symbol, e.g. FLUX's image tokens in
``hidden_states`` and ``img_ids``).

See :mod:`segquant_fx.export.onnx_translations` for what each format emits, and ``OnnxExportError``
for what a format cannot express.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch import fx
from torch.utils import _pytree as pytree

from segquant_fx import ops as _ops  # noqa: F401 - registers torch.ops.segquant
from segquant_fx.errors import SegQuantError

__all__ = ["export_onnx", "OnnxExportError", "FORMATS", "DEFAULT_OPSET", "TWO_GB"]

#: Export formats.
FORMATS = ("qdq", "segquant")
#: Default ONNX opset (per-axis/blocked Q/DQ, fp8 and int4 types are all available from 21).
DEFAULT_OPSET = 21
#: Protobuf's size limit: models with more initializer bytes are saved with external data.
TWO_GB = 2 * 1024**3


class OnnxExportError(SegQuantError):
    """A quantized graph cannot be exported in the requested ONNX format (the message names the node)."""


# --------------------------------------------------------------------------------------------------
# segquant_onnx::linear: quantize* + qlinear as one op, so the segquant format has one node per linear
# --------------------------------------------------------------------------------------------------

_LINEAR_SCHEMA = (
    "linear(Tensor x, Tensor? smooth, Tensor? x_scale, Tensor? x_scale_neg, SymInt[] x_segments, str x_qtype, "
    "str act, Tensor qw, Tensor w_scale, SymInt[] w_segments, str w_qtype, Tensor? bias, ScalarType out_dtype) -> Tensor"
)
_lib = torch.library.Library("segquant_onnx", "DEF")
_lib.define(_LINEAR_SCHEMA)


def _linear(
    x,
    smooth,
    x_scale,
    x_scale_neg,
    x_segments,
    x_qtype,
    act,
    qw,
    w_scale,
    w_segments,
    w_qtype,
    bias,
    out_dtype,
):
    seg = torch.ops.segquant
    if act == "none":
        return seg.qlinear(
            x,
            torch.ones(1, device=x.device),
            [],
            "none",
            qw,
            w_scale,
            w_segments,
            w_qtype,
            bias,
            False,
            out_dtype,
        )
    if act == "dynamic":
        q, s = seg.quantize_dynamic(x, x_segments, x_qtype, smooth)
        return seg.qlinear(
            q, s, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, False, out_dtype
        )
    if act == "dual":
        q = seg.quantize_dual(x, x_scale, x_scale_neg, x_segments, x_qtype, smooth)
        xs = torch.cat([x_scale.reshape(-1), x_scale_neg.reshape(-1)])
        return seg.qlinear(
            q, xs, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, True, out_dtype
        )
    q = seg.quantize(x, x_scale, x_segments, x_qtype, smooth)
    return seg.qlinear(
        q, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, False, out_dtype
    )


_lib.impl("linear", _linear, "CompositeExplicitAutograd")


# shapes and dtypes: the same composition, run on fake tensors through the segquant ops' fake kernels
torch.library.register_fake("segquant_onnx::linear", _linear, lib=_lib)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def fuse_linears(gm: fx.GraphModule) -> int:
    """Replace ``quantize*(x) -> qlinear`` (and weight-only ``qlinear``) by ``segquant_onnx::linear``.

    Returns:
        The number of fused linears. Pairs that do not fit (a quantized activation shared by several
        linears, a qlinear reading scales other than its quantize's) are left as separate ops.
    """
    seg = torch.ops.segquant
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != seg.qlinear.default:
            continue
        qx, x_scale, x_segs, x_qtype, qw, w_scale, w_segs, w_qtype, bias, dual, out_dtype = node.args
        new_args = None
        dead: list[fx.Node] = []
        src = qx if isinstance(qx, fx.Node) else None
        if x_qtype == "none":
            new_args = (qx, None, None, None, [], "none", "none")
        elif src is not None and src.target == seg.quantize.default and not dual and _only_user(src, node):
            x, s, segs, qt, *rest = src.args
            if s is x_scale:
                new_args, dead = (x, rest[0] if rest else None, s, None, segs, qt, "static"), [src]
        elif src is not None and src.target == seg.quantize_dual.default and dual and _only_user(src, node):
            x, sp, sn, segs, qt, *rest = src.args
            new_args, dead = (x, rest[0] if rest else None, sp, sn, segs, qt, "dual"), [src]
        elif src is not None and src.target.__name__ == "getitem" and not dual:
            dyn = src.args[0]
            scale_node = x_scale if isinstance(x_scale, fx.Node) else None
            if (
                isinstance(dyn, fx.Node)
                and dyn.target == seg.quantize_dynamic.default
                and scale_node is not None
                and scale_node.args[0] is dyn
                and _only_user(src, node)
                and _only_user(scale_node, node)
                and len(dyn.users) == 2
            ):
                x, segs, qt, *rest = dyn.args
                new_args, dead = (
                    (x, rest[0] if rest else None, None, None, segs, qt, "dynamic"),
                    [src, scale_node, dyn],
                )
        if new_args is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.segquant_onnx.linear.default,
                (*new_args, qw, w_scale, w_segs, w_qtype, bias, out_dtype),
            )
        new.meta.update(
            {
                k: v
                for k, v in node.meta.items()
                if k in ("val", "nn_module_stack", "stack_trace", "segquant_module")
            }
        )
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for d in dead:
            if not d.users:
                gm.graph.erase_node(d)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


# --------------------------------------------------------------------------------------------------
# what a format can express
# --------------------------------------------------------------------------------------------------


def _module(node: fx.Node) -> str:
    """The module a segquant node belongs to (quantize nodes: that of the linear they feed)."""
    from segquant_fx.capture import node_module

    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        name = node_module(n) if "segquant_module" in n.meta or "nn_module_stack" in n.meta else ""
        if name:
            return name
        todo.extend(n.users)
    return "?"


def check_expressible(gm: fx.GraphModule, format: str, opset: int) -> None:
    """Raise :class:`OnnxExportError` for the first segquant node ``format``/``opset`` cannot express."""
    seg = torch.ops.segquant
    act_ops = {
        seg.quantize.default: 3, seg.quantize_dual.default: 4, seg.quantize_dynamic.default: 2,
        seg.fake_quantize.default: 3, seg.fake_quantize_dual.default: 4, seg.dequantize.default: 3,
    }  # fmt: skip
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) not in (
            "segquant",
            "segquant_onnx",
        ):
            continue
        where = f"node {node.name!r} ({node.target}, module {_module(node)!r})"
        qtypes = []
        if node.target in act_ops:
            qtypes.append(("activation", node.args[act_ops[node.target]]))
        elif node.target == seg.qlinear.default:
            qtypes += [("activation", node.args[3]), ("weight", node.args[7])]
        if any(q == "fp8_e4m3" for _, q in qtypes) and opset < 19:
            raise OnnxExportError(
                f"{where}: fp8_e4m3 needs ONNX opset >= 19 (got opset={opset}); pass opset=21"
            )
        if format != "qdq":
            continue
        for role, q in qtypes:
            if role == "activation" and q == "int4":
                raise OnnxExportError(
                    f"{where}: int4 activations (packed two per byte) cannot be expressed with standard "
                    f"QuantizeLinear/DequantizeLinear in format='qdq'; use format='segquant'"
                )


# --------------------------------------------------------------------------------------------------
# inputs, dynamic shapes, names
# --------------------------------------------------------------------------------------------------


def _dynamic_shapes(
    gm: fx.GraphModule, call: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, int, Any]]]:
    """``dynamic_shapes`` for ``call`` (the dims the graph keeps dynamic) and (input, dim, symbol) triples."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = fx_pytree.tree_flatten_spec(((), call), gm._in_spec)
    dims: dict[int, dict[int, Any]] = {}
    symbols: list[tuple[str, int, Any]] = []
    for p, value in zip(placeholders, flat, strict=False):
        val = p.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        spec = {}
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                spec[d] = torch.export.Dim.AUTO
                symbols.append((p.name, d, size.node.expr))
        if spec and id(value) not in dims:
            dims[id(value)] = spec
    shapes = pytree.tree_map(lambda v: dims.get(id(v)) if isinstance(v, torch.Tensor) else None, call)
    return shapes, symbols


def _output_names(gm: fx.GraphModule) -> list[str] | None:
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return None
    names: list[str] = []

    def walk(s: Any, prefix: str) -> None:
        if s.is_leaf():
            names.append(prefix or "output")
            return
        keys = (
            s.context if isinstance(s.context, (list, tuple)) and len(s.context) == s.num_children else None
        )
        for i, child in enumerate(s.children()):
            key = str(keys[i]) if keys is not None else (f"output_{i}" if not prefix else str(i))
            walk(child, f"{prefix}_{key}" if prefix else key)

    walk(spec, "")
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    names = [f"{n}_out" if n in inputs else n for n in names]
    return names if len(set(names)) == len(names) else None


def _rename_dims(model: Any, symbols: list[tuple[str, int, Any]]) -> None:
    """Give the dynamic ONNX dims readable names: ``batch`` and ``<input>_dim<k>``."""
    from onnxscript import ir

    by_input = {(name, d): expr for name, d, expr in symbols}
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for d, dim in enumerate(value.shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value not in names:
                expr = by_input.get((value.name, d))
                names[dim.value] = (
                    "batch" if d == 0 and "batch" not in names.values() else f"{value.name}_dim{d}"
                )
                if expr is not None and str(expr) != dim.value:
                    names.setdefault(str(expr), names[dim.value])
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")

    def rename(value: str | None) -> str | None:
        if value is None:
            return None
        return names.get(value) or pattern.sub(lambda m: names[m.group(1)], value)

    def fix(v: Any) -> None:
        if v is None or v.shape is None:
            return
        dims = [ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) else d for d in v.shape]
        if any(
            isinstance(a, ir.SymbolicDim) and a.value != b.value for a, b in zip(v.shape, dims, strict=True)
        ):
            v.shape = ir.Shape(dims)

    for v in model.graph.inputs:
        fix(v)
    for v in model.graph.outputs:
        fix(v)
    for node in model.graph:
        for v in node.outputs:
            fix(v)


def _tensor_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _quantized(model: Any) -> Any:
    from segquant_fx.quantized import QuantizedModel

    inner = getattr(model, "quantized", None) if not isinstance(model, QuantizedModel) else model
    if not isinstance(inner, QuantizedModel):
        raise OnnxExportError(
            f"export_onnx needs a QuantizedModel (from segquant_fx.quantize / segquant_fx.compile), got "
            f"{type(model).__name__}; quantize it first"
        )
    return inner


def export_onnx(
    qmodel: Any,
    path: str | os.PathLike[str],
    example: Any = None,
    format: str = "qdq",
    opset: int = DEFAULT_OPSET,
    *,
    dynamic: bool = True,
    external_data: bool | None = None,
    optimize: bool = True,
) -> Path:
    """Export a quantized model to ONNX.

    Args:
        qmodel: A :class:`~segquant_fx.quantized.QuantizedModel` (or a ``segquant_fx.compile`` result).
        path: Output ``.onnx`` file.
        example: Inputs to trace with, in the float model's calling convention (kwargs dict, tuple, or
            ``(args, kwargs)``); default ``qmodel.meta["example_kwargs"]`` (the capture example).
        format: ``"qdq"`` (standard QuantizeLinear/DequantizeLinear + MatMul, runs in ONNX Runtime) or
            ``"segquant"`` (one ``com.segquant.QLinear`` node per quantized linear, for runtimes that
            load our kernels); see :mod:`segquant_fx.export.onnx_translations`.
        opset: Default-domain opset (>= 18; fp8 needs >= 19; group-wise weight scales use opset-21
            blocked DequantizeLinear when available).
        dynamic: Keep the dims the quantized graph keeps dynamic (batch, tokens, spatial) dynamic.
        external_data: Save initializers next to the model; default: only above 2 GB.
        optimize: Run the exporter's ONNX optimizer (constant folding keeps quantized initializers).

    Returns:
        The path of the written model.

    Raises:
        OnnxExportError: Not a quantized model, an unknown format/opset, or a node the format cannot
            express (the message names the node and the format that works).

    Example::

        qmodel = segquant_fx.quantize(model, calib, "w8a8")
        segquant_fx.export_onnx(qmodel, "model.onnx", format="qdq")
    """
    from segquant_fx.capture import normalize_example

    q = _quantized(qmodel)
    if format not in FORMATS:
        raise OnnxExportError(f"unknown ONNX format {format!r}; use one of {', '.join(map(repr, FORMATS))}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise OnnxExportError(
            f"opset={opset!r}: the torch.export-based exporter needs opset >= 18 (use {DEFAULT_OPSET})"
        )
    if example is None:
        example = q.meta.get("example_kwargs")
        if example is None:
            raise OnnxExportError("this quantized model has no recorded example inputs; pass example=...")
    args, kwargs = normalize_example(example)
    call, _ = q._bind(args, dict(kwargs))

    from segquant_fx.backend import without_export_guards

    gm = without_export_guards(q.graph_module, copy=True).eval()  # the exporter checks shapes itself
    if format == "segquant":
        fuse_linears(gm)
    check_expressible(gm, format, opset)

    from segquant_fx.export.onnx_translations import translation_table

    shapes, symbols = _dynamic_shapes(gm, call) if dynamic else (None, [])
    with torch.no_grad(), warnings.catch_warnings():
        # torch-internal deep copies of pytree specs during run_decompositions
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            gm,
            (),
            kwargs=call,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            custom_translation_table=translation_table(format, opset),
            output_names=_output_names(gm),
            optimize=optimize,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise OnnxExportError("torch.onnx.export returned no program")
    model = program.model
    if dynamic:
        _rename_dims(model, symbols)
    model.metadata_props.update(
        {
            "segquant_fx.format": format,
            "segquant_fx.version": str(q.meta.get("segquant_fx", "")),
            "segquant_fx.model_class": q.model_class,
            "segquant_fx.config": json.dumps(q.meta.get("config"), default=str),
        }
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _tensor_bytes(q) > TWO_GB
    program.save(str(out), external_data=bool(external_data))
    return out
