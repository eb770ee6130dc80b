"""``QuantizedModel``: the rewritten graph behind the original model's calling convention.

A ``QuantizedModel`` is called exactly like the float model (same positional/keyword arguments, same
outputs, ``return_dict`` honoured), keeps what diffusers pipelines read (``config``, ``dtype``,
``device``, ``in_features`` of linears, plain attributes), supports ``.to(device/dtype)``, and exposes
``.plan`` (per layer: patterns, segments, formats, scales) and ``.report()``.

``.to(dtype)`` converts float parameters and buffers *except* quantized storage and scales, and
retargets the ``out_dtype`` of the segquant ops; ``.to(device)`` also retargets factory ops
(``arange``, ``zeros``...) that export recorded with a fixed device.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from segquant_fx.errors import SegQuantError

__all__ = ["QuantizedModel", "PROTECTED_BUFFERS", "prepare_graph_module", "same_constant"]

#: Buffer names the rewrite owns: never dtype-converted by ``.to(dtype)``.
PROTECTED_BUFFERS = frozenset({"qweight", "w_scale", "x_scale", "x_scale_pos", "x_scale_neg", "smooth", "weight_hat"})
_OUT_DTYPE_ARG = {"qlinear": 10, "dequantize": 4}


def prepare_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Make an unlifted exported module portable: drop dtype/device asserts, constants become buffers."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            *path, attr = node.target.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            val = getattr(owner, attr)
            if isinstance(val, torch.Tensor) and attr not in owner._parameters and attr not in owner._buffers:
                delattr(owner, attr)
                owner.register_buffer(attr, val)
    gm.recompile()
    return gm


class QuantizedModel(torch.nn.Module):
    """A quantized model: the rewritten graph plus the original calling convention.

    Args:
        graph_module: The rewritten, unlifted exported module.
        signature: The float model's ``forward`` signature.
        constants: Non-tensor arguments captured as constants (name -> value).
        plan: Module FQN -> plan dict (patterns, segments, formats, scale shapes).
        attributes: Plain attributes of the float model to keep (``config`` ...).
        model_class: Import path of the float model's class, for reports and reloading.
        meta: Free-form facts (config dict, versions, example spec) used by ``save``.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        signature: inspect.Signature | None,
        constants: Mapping[str, Any],
        plan: Mapping[str, dict[str, Any]],
        attributes: Mapping[str, Any] | None = None,
        model_class: str = "",
        meta: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self._signature = signature
        self._constants = dict(constants)
        self.plan = dict(plan)
        #: The float dtype activations had at capture (casts baked at it follow ``.to(dtype)``).
        self.dtype_captured = self.dtype
        self.model_class = model_class
        self.meta = dict(meta or {})
        in_spec = getattr(graph_module, "_in_spec", None)
        self._input_names: tuple[str, ...] = (
            tuple(in_spec.children_specs[1].context) if in_spec is not None and in_spec.num_children == 2 else ()
        )
        for k, v in (attributes or {}).items():
            if k not in ("training",) and not k.startswith("_"):
                object.__setattr__(self, k, v)

    # ---- calling convention ------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool | None]:
        if self._signature is None:
            if args:
                raise SegQuantError("this quantized model takes keyword arguments only")
            return dict(kwargs), kwargs.pop("return_dict", None)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise SegQuantError(f"{self.model_class or 'model'}.forward{self._signature}: {e}") from None
        given = dict(bound.arguments)
        return_dict = given.pop("return_dict", None)
        call: dict[str, Any] = {}
        for name in self._input_names:
            if name in given:
                call[name] = given.pop(name)
            elif name in self._constants:
                call[name] = self._constants[name]
            else:
                p = self._signature.parameters.get(name)
                call[name] = p.default if p is not None and p.default is not inspect.Parameter.empty else None
        for name, value in given.items():
            default = self._signature.parameters[name].default
            captured = self._constants.get(name, default)
            if not same_constant(value, captured) and not same_constant(value, default):
                raise SegQuantError(
                    f"argument {name!r}={_short(value)} differs from the value the model was captured with "
                    f"({_short(captured)}); quantize again with an example that passes it"
                )
        return call, return_dict

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the quantized graph with the float model's arguments."""
        call, return_dict = self._bind(args, kwargs)
        out = self.graph_module(**call)
        if return_dict is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        if return_dict is False and isinstance(out, dict):
            return tuple(out.values())
        return out

    def train(self, mode: bool = True) -> QuantizedModel:  # type: ignore[override]
        """Set the flag only: the captured graph is an inference graph (eval-mode dropout, no grads)."""
        self.training = mode
        return self

    # ---- device / dtype ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the model's tensors."""
        for t in self.graph_module.buffers():
            return t.device
        for t in self.graph_module.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype the graph computes in (that of its float parameters)."""
        for mod in self.graph_module.modules():
            for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is not None and name not in PROTECTED_BUFFERS and t.is_floating_point() and t.element_size() > 1:
                    return t.dtype
        return torch.float32

    def to(self, *args: Any, **kwargs: Any) -> QuantizedModel:  # type: ignore[override]
        """Move to a device and/or convert float tensors, keeping quantized storage and scales."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
            self._retarget_device(device)
        if dtype is not None:
            self._convert_dtype(dtype)
        return self

    def half(self) -> QuantizedModel:  # type: ignore[override]
        """Convert float tensors to float16 (quantized storage untouched)."""
        return self.to(torch.float16)

    def bfloat16(self) -> QuantizedModel:  # type: ignore[override]
        """Convert float tensors to bfloat16 (quantized storage untouched)."""
        return self.to(torch.bfloat16)

    def float(self) -> QuantizedModel:  # type: ignore[override]
        """Convert float tensors to float32 (quantized storage untouched)."""
        return self.to(torch.float32)

    def _convert_dtype(self, dtype: torch.dtype) -> None:
        if not dtype.is_floating_point:
            raise SegQuantError(f".to({dtype}): a quantized model's activations must stay a float dtype")
        for mod in self.graph_module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None or name in PROTECTED_BUFFERS or not t.is_floating_point() or t.element_size() == 1:
                        continue
                    new = t.detach().to(dtype)
                    store[name] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        g = self.graph_module.graph
        old = self.dtype_captured
        for node in g.nodes:
            if node.op != "call_function":
                continue
            if _follows_model_dtype(node, old):
                node.args = (node.args[0], dtype, *node.args[2:])
                continue
            name = getattr(node.target, "__name__", "").split(".")[0]
            if getattr(node.target, "namespace", None) == "segquant" and name in _OUT_DTYPE_ARG:
                i = _OUT_DTYPE_ARG[name]
                if len(node.args) > i and isinstance(node.args[i], torch.dtype):
                    node.args = (*node.args[:i], dtype, *node.args[i + 1 :])
        self.graph_module.recompile()
        self.dtype_captured = dtype

    def _retarget_device(self, device: torch.device) -> None:
        changed = False
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
                if node.kwargs["device"] != device:
                    node.kwargs = {**node.kwargs, "device": device}
                    changed = True
        if changed:
            self.graph_module.recompile()

    # ---- saving -------------------------------------------------------------------------------
    def save(self, path: str) -> Any:
        """Save to directory ``path`` (safetensors + JSON); reload with ``segquant_fx.load(path)``."""
        from segquant_fx.serialization import save_quantized

        return save_quantized(self, path)

    # ---- attribute access through the graph's module tree -----------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            gm = super().__getattr__("graph_module")
            if name in gm._modules:
                return gm._modules[name]
            raise

    # ---- reports ------------------------------------------------------------------------------
    def report(self) -> str:
        """Markdown table of every quantized layer: patterns, segments, formats."""
        lines = ["| layer | patterns | act | weight | input segs | output segs | DualScale | smooth |", "|---|---|---|---|---|---|---|---|"]
        for name, p in self.plan.items():
            lines.append(
                f"| {name} | {', '.join(p['patterns']) or '-'} | {p['act']}{' dyn' if p['act_dynamic'] else ''} | "
                f"{p['weight']} {p['weight_granularity']} | {_segs(p['in_segments'])} | {_segs(p['out_segments'])} | "
                f"{'yes' if p['dual'] else '-'} | {p['smooth_alpha'] if p['smooth_alpha'] is not None else '-'} |"
            )
        n = len(self.plan)
        return f"{n} quantized linear layers\n\n" + "\n".join(lines) + "\n"

    def extra_repr(self) -> str:
        """Class and size, for ``print(model)``."""
        return f"model_class={self.model_class!r}, quantized_layers={len(self.plan)}"


def _follows_model_dtype(node: fx.Node, model_dtype: torch.dtype) -> bool:
    """An ``aten.to.dtype(x, model_dtype)`` that was a no-op at capture is a ``.to(x.dtype)``-style cast.

    Models cast back to "the activation dtype" (``out.to(x.dtype)`` after a float32 rotary embedding, say);
    export bakes the dtype it saw. Such casts must follow ``.to(dtype)``; casts that changed the dtype at
    capture (``.float()`` of a half tensor, int -> float) keep their target.
    """
    if node.target is not torch.ops.aten.to.dtype or len(node.args) < 2 or node.args[1] != model_dtype:
        return False
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return isinstance(src, torch.Tensor) and src.dtype == model_dtype


def _segs(s: Any) -> str:
    if not s:
        return "-"
    return f"{len(s)}x{s[0]}" if len(set(s)) == 1 else "+".join(map(str, s))


def same_constant(a: Any, b: Any) -> bool:
    """Whether two non-tensor argument values are equal (tensors never count as equal constants)."""
    try:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return bool(a == b) or (a is None and b is None)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _short(v: Any) -> str:
    r = repr(v) if not pytree.tree_leaves(v) or not isinstance(pytree.tree_leaves(v)[0], torch.Tensor) else type(v).__name__
    return r if len(r) < 60 else r[:57] + "..."
