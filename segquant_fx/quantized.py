"""``QuantizedModel``: the rewritten graph behind the original model's calling convention.

A ``QuantizedModel`` is called exactly like the float model (same positional/keyword arguments, same
outputs, ``return_dict`` honoured), keeps what diffusers pipelines read (``config``, ``dtype``,
``device``, ``in_features`` of linears, plain attributes), supports ``.to(device/dtype)``, and exposes
``.plan`` (per layer: patterns, segments, formats, scales) and ``.report()``.

``.to(dtype)`` converts float parameters and buffers *except* quantized storage and scales, and
retargets the ``out_dtype`` of the segquant ops; ``.to(device)`` also retargets factory ops
(``arange``, ``zeros``...) that export recorded with a fixed device.

**Under torch.compile.** :meth:`QuantizedModel.run_graph` is the one calling convention (bind the float
model's arguments, run a graph, shape the output) shared by ``forward`` and
:class:`~segquant_fx.compile.CompiledQuantizedModel`. When ``torch.compile(qmodel, dynamic=True)``
starts at ``forward``, Dynamo runs ``forward``/``run_graph`` eagerly (only their own frames are
skipped) and compiles the graph module's frame, whose inputs carry the dims the export kept dynamic
(``maybe_mark_dynamic``) and every other dim marked static. Otherwise Dynamo's duck sizing gives
equal sizes one symbol (tiny SD3's 16-wide pooled projection and a 16-pixel latent), the static one
pins the other, and a new resolution recompiles. Inlined into a larger compiled function, both run
traced as before, without marks and without graph breaks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch import fx
from torch.utils import _pytree as pytree

from segquant_fx.errors import SegQuantError

__all__ = [
    "QuantizedModel",
    "PROTECTED_BUFFERS",
    "prepare_graph_module",
    "same_constant",
    "format_output",
    "export_dynamic_dims",
    "mark_export_dims",
]

#: Buffer names the rewrite owns: never dtype-converted by ``.to(dtype)``.
PROTECTED_BUFFERS = frozenset(
    {"qweight", "w_scale", "x_scale", "x_scale_pos", "x_scale_neg", "smooth", "weight_hat"}
)
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


def format_output(out: Any, return_dict: bool | None) -> Any:
    """The float model's output convention: ``return_dict=False`` turns a ``*Output``/dict into a tuple."""
    if return_dict is False and hasattr(out, "to_tuple"):
        return out.to_tuple()
    if return_dict is False and isinstance(out, dict):
        return tuple(out.values())
    return out


def export_dynamic_dims(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Per placeholder of an exported graph, the dims ``torch.export`` kept dynamic."""
    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        shape = getattr(n.meta.get("val"), "shape", ())
        out.append(tuple(i for i, d in enumerate(shape) if isinstance(d, torch.SymInt)))
    return out


def mark_export_dims(flat_inputs: Sequence[Any], dims: Sequence[tuple[int, ...]]) -> list[Any]:
    """Aliases of the input tensors marked for Dynamo: the export's dynamic dims dynamic, the rest static.

    ``torch.compile(dynamic=True)`` makes every dim of every input symbolic, feature dims included,
    and Dynamo gives equal sizes one symbol ("duck sizing"): tiny SD3's 16-wide pooled projection
    then shares a symbol with the 16-pixel latent height, the linear pins it to 16, and the next
    resolution recompiles. ``maybe_mark_dynamic`` on batch/token/spatial dims (a hint: a model that
    does need a size static is not an error) and ``mark_static`` on the others avoid that. The marks
    go on ``detach()`` aliases (no ``_base`` for Dynamo to see), so the caller's tensors stay unmarked.
    """
    import torch._dynamo

    dynamic: dict[int, set[int]] = {}  # a tensor fed to two placeholders: dynamic where either is
    for value, ds in zip(flat_inputs, dims, strict=False):
        if isinstance(value, torch.Tensor):
            dynamic.setdefault(id(value), set()).update(ds)
    out = list(flat_inputs)
    aliases: dict[int, torch.Tensor] = {}
    for i, value in enumerate(flat_inputs):
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) not in aliases:
            alias = aliases[id(value)] = value.detach()
            ds = dynamic.get(id(value), set())
            for d in range(value.dim()):
                if d not in ds:
                    torch._dynamo.mark_static(alias, d)
            if ds:
                torch._dynamo.maybe_mark_dynamic(alias, sorted(ds))
        out[i] = aliases[id(value)]
    return out


class _DtypeShortcuts:
    """``half``/``bfloat16``/``float`` through ``.to(dtype)``, which keeps quantized storage untouched."""

    def half(self):
        """Convert float tensors to float16 (quantized storage untouched)."""
        return self.to(torch.float16)

    def bfloat16(self):
        """Convert float tensors to bfloat16 (quantized storage untouched)."""
        return self.to(torch.bfloat16)

    def float(self):
        """Convert float tensors to float32 (quantized storage untouched)."""
        return self.to(torch.float32)


def spec_child(spec: Any, i: int) -> Any:
    """Child ``i`` of a pytree ``TreeSpec`` (``child()`` on torch 2.13+, ``children_specs`` before)."""
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]


class QuantizedModel(_DtypeShortcuts, torch.nn.Module):
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
            tuple(spec_child(in_spec, 1).context) if in_spec is not None and in_spec.num_children == 2 else ()
        )
        vals = _placeholder_values(graph_module)
        self._batch_vectors = _batch_vector_inputs(vals, self._input_names)
        self._scalar_inputs = _scalar_tensor_inputs(vals, self._input_names)
        for k, v in (attributes or {}).items():
            if k not in ("training",) and not k.startswith("_"):
                object.__setattr__(self, k, v)
        _eager_helpers()  # before any torch.compile(self) reaches forward (see the module docstring)

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
        if self._batch_vectors:
            _broadcast_batch_vectors(call, self._batch_vectors)
        if self._scalar_inputs:
            _fit_scalar_inputs(call, self._scalar_inputs)
        for name, value in given.items():
            default = self._signature.parameters[name].default
            captured = self._constants.get(name, default)
            if _none_or_empty(value) and (_none_or_empty(captured) or _none_or_empty(default)):
                continue  # joint_attention_kwargs={} and =None mean the same to diffusers models
            if not same_constant(value, captured) and not same_constant(value, default):
                raise SegQuantError(
                    f"argument {name!r}={_short(value)} differs from the value the model was captured with "
                    f"({_short(captured)}); quantize again with an example that passes it"
                )
        return call, return_dict

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the quantized graph with the float model's arguments."""
        return self.run_graph(self.graph_module, args, kwargs)

    def run_graph(
        self, graph: Callable[..., Any], args: tuple, kwargs: dict, *, dynamic: bool | None = None
    ) -> Any:
        """Bind the float model's arguments, run ``graph`` (this graph, or a compiled copy), shape the output.

        Args:
            graph: Called with the exported graph's keyword inputs.
            args: Positional arguments of the float model's ``forward``.
            kwargs: Keyword arguments (``return_dict`` honoured).
            dynamic: Mark the graph inputs for Dynamo (:func:`mark_export_dims`). None: when a
                ``torch.compile(..., dynamic=True)`` call is running.
        """
        if torch.compiler.is_compiling():
            # traced: inlined into a compiled caller (Dynamo skips this frame when it is the first)
            call, return_dict = self._bind(args, kwargs)
            return format_output(graph(**call), return_dict)
        bind, finish = _eager_helpers()
        call, return_dict = bind(self, args, kwargs, dynamic)
        return finish(graph(**call), return_dict)

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
                if (
                    t is not None
                    and name not in PROTECTED_BUFFERS
                    and t.is_floating_point()
                    and t.element_size() > 1
                ):
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

    def _convert_dtype(self, dtype: torch.dtype) -> None:
        if not dtype.is_floating_point:
            raise SegQuantError(f".to({dtype}): a quantized model's activations must stay a float dtype")
        for mod in self.graph_module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if (
                        t is None
                        or name in PROTECTED_BUFFERS
                        or not t.is_floating_point()
                        or t.element_size() == 1
                    ):
                        continue
                    new = t.detach().to(dtype)
                    store[name] = (
                        torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
                    )
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
        lines = [
            "| layer | patterns | act | weight | input segs | output segs | DualScale | smooth |",
            "|---|---|---|---|---|---|---|---|",
        ]
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


def _bind_marked(
    model: QuantizedModel, args: tuple, kwargs: dict, dynamic: bool | None
) -> tuple[dict[str, Any], bool | None]:
    call, return_dict = model._bind(args, kwargs)
    if dynamic is None:
        import torch._dynamo.config

        # torch.compile(dynamic=True) sets this while its call runs (this frame included)
        dynamic = not torch._dynamo.config.assume_static_by_default
    in_spec = getattr(model.graph_module, "_in_spec", None)
    if not dynamic or in_spec is None:
        return call, return_dict
    flat = fx_pytree.tree_flatten_spec(((), call), in_spec)
    _, call = pytree.tree_unflatten(mark_export_dims(flat, export_dynamic_dims(model.graph_module)), in_spec)
    return call, return_dict


@functools.cache
def _eager_helpers() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(bind, finish) for ``run_graph`` outside a trace, and Dynamo told to skip the top frames.

    ``forward``/``run_graph`` frames are skipped only where Dynamo would *start* a trace, so that the
    graph module's frame is the one compiled; when they are inlined they are traced. ``bind`` and
    ``finish`` run eagerly from there (``torch._dynamo.disable``): argument binding, marks and
    ``*Output.to_tuple`` are Python that must not become frames of their own.
    """
    import torch._dynamo

    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # pragma: no cover - other torch versions: traced from forward, as before
        pass
    else:
        for fn in (QuantizedModel.forward, QuantizedModel.run_graph):
            skip_code(fn.__code__)
    return torch._dynamo.disable(_bind_marked), torch._dynamo.disable(format_output)


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


def _placeholder_values(gm: fx.GraphModule) -> dict[str, Any]:
    """The captured example value (``meta["val"]``) of each graph input, by placeholder name."""
    return {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}


def _batch_vector_inputs(vals: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.dtype]:
    """Inputs captured as a 1-D tensor along the batch (a per-sample ``timestep``): name -> dtype.

    The batch is the dynamic leading dim of the graph's first >= 2-D input; a 1-D input whose only dim is
    that same symbol is a per-sample vector, which diffusers models also accept as a 0-d tensor or a number.
    """
    # the first >= 2-D input's leading dim is the batch (as _broadcast_batch_vectors reads it); other 2-D
    # inputs may lead with tokens (FLUX's img_ids)
    first = next((v for v in vals.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    batch_syms = (
        {first.shape[0].node.expr}
        if first is not None and isinstance(first.shape[0], torch.SymInt)
        else set()
    )
    out: dict[str, torch.dtype] = {}
    for name in names:
        v = vals.get(name)
        if (
            isinstance(v, torch.Tensor)
            and v.dim() == 1
            and isinstance(v.shape[0], torch.SymInt)
            and v.shape[0].node.expr in batch_syms
        ):
            out[name] = v.dtype
    return out


def _broadcast_batch_vectors(call: dict[str, Any], vectors: Mapping[str, torch.dtype]) -> None:
    """A 0-d tensor or a Python number given for a per-sample vector input -> that value for every sample.

    diffusers pipelines pass the UNet's timestep as a 0-d tensor (``unet(latents, t, ...)``) and the models
    broadcast it with ``timesteps.expand(sample.shape[0])``; the captured graph needs the 1-D form.
    """
    lead: torch.Tensor | None = None
    for name, dtype in vectors.items():
        v = call.get(name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number or (isinstance(v, torch.Tensor) and v.dim() == 0)):
            continue  # the usual 1-D call: nothing to look up (every forward passes here)
        if lead is None:
            lead = next(
                (t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor) and t.dim() >= 2), None
            )
            if lead is None:
                return
        if number:
            call[name] = torch.full((lead.shape[0],), v, dtype=dtype, device=lead.device)
        else:
            call[name] = v.expand(lead.shape[0])


def _scalar_tensor_inputs(vals: Mapping[str, Any], names: Sequence[str]) -> frozenset[str]:
    """Inputs captured as 0-d tensors (a pipeline's scalar ``timestep``)."""
    return frozenset(n for n in names if isinstance(vals.get(n), torch.Tensor) and vals[n].dim() == 0)


def _fit_scalar_inputs(call: dict[str, Any], scalars: frozenset[str]) -> None:
    """A 1-D value for an input captured 0-d: its common value when all entries agree, else a clear error.

    A model calibrated inside an SDXL pipeline saw ``timestep`` as a 0-d tensor; a caller that expands it
    per sample (``t.expand(batch)``) means the same thing. Different per-sample values cannot be run by
    that graph.
    """
    for name in scalars:
        v = call.get(name)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        if v.dim() == 1 and v.numel() >= 1 and not torch.compiler.is_compiling() and bool((v == v[0]).all()):
            call[name] = v[0]
            continue
        raise SegQuantError(
            f"argument {name!r} has shape {tuple(v.shape)}, but the model was captured with a 0-d {name!r} "
            f"(the same value for every sample); pass one value, or quantize again with calibration items "
            f"whose {name!r} is 1-D to run per-sample values"
        )


def _none_or_empty(v: Any) -> bool:
    return v is None or (isinstance(v, Mapping) and len(v) == 0)


def same_constant(a: Any, b: Any) -> bool:
    """Whether two non-tensor argument values are equal (tensors never count as equal constants)."""
    try:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return bool(a == b) or (a is None and b is None)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _short(v: Any) -> str:
    r = (
        repr(v)
        if not pytree.tree_leaves(v) or not isinstance(pytree.tree_leaves(v)[0], torch.Tensor)
        else type(v).__name__
    )
    return r if len(r) < 60 else r[:57] + "..."
