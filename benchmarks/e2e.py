#!/usr/bin/env python
"""End-to-end per-step speed of quantized diffusion backbones vs bf16, torch.compile and torchao (issue 10).

One process builds the zoo backbone (published full-size config, random bf16 weights) once and measures
every requested variant on it, batch by batch, so the compiled bf16 baseline is measured in the same run
as the variants it is compared with:

==========================  ================================================================================
variant                     what runs
==========================  ================================================================================
``bf16_eager``              the diffusers model as built
``bf16_compile``            ``torch.compile(model)`` (whole model, static shapes)
``bf16_rcompile``           regional compile: only the repeated blocks (diffusers ``compile_repeated_blocks``)
``torchao_int8_compile``    copy + ``quantize_(Int8DynamicActivationInt8WeightConfig())`` + ``torch.compile``
``torchao_fp8_compile``     copy + ``quantize_(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))``
                            + ``torch.compile`` (``*_rcompile``: regional compile, ``*_eager``: no compile)
``segquant_<P>_eager``      ``segquant_fx.quantize(model, 32 items, P)``: the ``QuantizedModel`` called as is
``segquant_<P>_compile``    the same quantized model through ``segquant_fx.compile`` (Inductor)
==========================  ================================================================================

``<P>`` is any preset (``w8a8``, ``w8a8-fp8``, ``w4a8``, ...). A preset is quantized once (timed: capture,
calibration on ``--calib-items`` items, optimizers, rewrite) and the quantized model is shared by its eager
and compiled variants and by every batch. Groups: ``baselines``, ``torchao``, ``segquant`` (the three presets
of the issue, eager and compiled), ``all``.

Figures per variant and batch: per-step latency (median of CUDA-event timings of back-to-back steps after
warm-up; one backbone forward = one denoising step), speedup vs ``bf16_compile`` (and vs ``bf16_eager``),
peak GPU memory, backbone weight bytes (what the module holds, quantized storage counted as stored: packed
int4, scales, smoothing vectors, low-rank branches, float leftovers), relative output error vs bf16 eager
on a held-out input, time to quantize, compile time (wall time of the first call) and, for the segquant
variants, a profiler breakdown of GPU time per step into GEMM / quantize / attention / conv / other.

Every variant is isolated (its objects freed, ``torch._dynamo.reset()``, the CUDA cache emptied), a failing
variant is recorded with its error and the run goes on, and after ``--time-budget-s`` (counted from the
start of the process) the remaining variants are skipped with a note; a running variant is interrupted
at the budget (SIGALRM), so a command ends near its budget. Results: ``DIR/e2e_<model>_b<batch>[_<tag>].json``
per batch and a markdown table appended to ``DIR/e2e.md``; ``benchmarks/e2e_report.py`` merges JSONs into the
``RESULTS.md`` table and a speedup plot.

CPU smoke test (tiny model, seconds)::

    python benchmarks/e2e.py --model tiny-sd3 --device cpu --batch 1 --calib-items 2 \\
        --variants bf16_eager,segquant_w8a8_eager --out /tmp/e2e

H100 runs: one device ``run`` each, ``timeout_s=600``, ``carry: [".whl", "kernels_cuda/build"]`` (wheels from
``bash benchmarks/fetch_wheels.sh``, 9.2 MB; kernels from ``segquant-fx build-kernels --arch 90a``). Each
command is ``PRE`` followed by its arguments, where ``PRE`` is::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/e2e.py --out $OUT --time-budget-s 540

``--time-budget-s 540`` (counted from the script's start, after the wheels are installed) ends every
command at about 9.2 minutes whatever happens. Estimates in brackets; measured inputs: bf16 FLUX compile
142 s, segquant SD3.5 compile 135 s, SD3.5 build 16-18 s, quantize capture 20 s (SD3.5); the other compile
and quantize times are scaled from those and are the least certain part. In priority order::

    # FLUX.1-dev, batch 1: the headline targets
    F1 PRE --model flux-dev --batch 1 --tag fp8 --variants bf16_eager,bf16_compile,segquant_w8a8-fp8_eager,segquant_w8a8-fp8_compile   [~7.5 min]
    F2 PRE --model flux-dev --batch 1 --tag int8 --variants bf16_eager,bf16_compile,segquant_w8a8_eager,segquant_w8a8_compile         [~7.5 min]
    F3 PRE --model flux-dev --batch 1 --tag ao --variants bf16_eager,bf16_compile,bf16_rcompile,torchao_fp8_rcompile,torchao_int8_rcompile  [~6 min]
    # SD3.5-medium and SDXL (the UNet runs on 2 x batch: CFG), batch 1
    S1 PRE --model sd35-medium --batch 1 --tag 8bit --variants baselines,segquant_w8a8_eager,segquant_w8a8_compile,segquant_w8a8-fp8_eager,segquant_w8a8-fp8_compile  [~7.5 min]
    S2 PRE --model sd35-medium --batch 1 --tag ao --variants baselines,torchao                                                      [~6-9 min]
    X1 PRE --model sdxl --batch 1 --tag 8bit --variants baselines,segquant_w8a8_eager,segquant_w8a8_compile,segquant_w8a8-fp8_eager,segquant_w8a8-fp8_compile  [~8 min]
    X2 PRE --model sdxl --batch 1 --tag ao --variants baselines,torchao                                                             [~7 min]
    # W4A8 (int4 weights: the qlinear runs the reference fallback on CUDA, so the figures that count are
    # weight bytes, error and quantize time; the quantized model is made first, the compiled pair after)
    S3 PRE --model sd35-medium --batch 1 --tag w4 --order given --variants bf16_eager,segquant_w4a8_eager,bf16_compile,segquant_w4a8_compile  [~7.5 min]
    X3 PRE --model sdxl --batch 1 --tag w4 --order given --variants bf16_eager,segquant_w4a8_eager,bf16_compile,segquant_w4a8_compile          [~7.5 min]
    F4 PRE --model flux-dev --batch 1 --tag w4 --order given --svd-precision float32 --variants bf16_eager,segquant_w4a8_eager,bf16_compile,segquant_w4a8_compile  [9 min, budget-bound]
    # batch 4: F1-F3, S1-S3, X1-X3 again with --batch 4 (same compile times; steps 4x longer)
    # optional: torchao FP8 with whole-model compile on FLUX (did not finish in 500 s before)
    F5 PRE --model flux-dev --batch 1 --tag aofull --variants bf16_eager,torchao_fp8_compile                                       [<= 9 min]

F4: FLUX GPTQ Hessians (~70 GiB upper bound) go to pinned CPU memory (``--hessian-cpu auto``) and 504 SVDs
run in float32 instead of float64 (recorded in the JSON); if quantizing does not fit the budget the variants
are recorded as ``timeout``. A command whose JSON lists ``skipped`` or ``timeout`` variants is rerun with
only those (plus ``bf16_compile``, the baseline of the run).
Benchmarks never assert: the exit code is 0 whatever the figures (2 only for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_T_START = time.perf_counter()  # --time-budget-s counts from here, before torch and diffusers are imported

# benchmarks/kernels.py would shadow the Hugging Face ``kernels`` package that diffusers imports when it is
# installed: drop this script's folder from the path, add the checkout (runs without installing)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from segquant_fx.errors import ConfigError  # noqa: E402

__all__ = [
    "MODEL_ALIASES",
    "VARIANT_GROUPS",
    "BASELINE",
    "Variant",
    "parse_variants",
    "classify_kernel",
    "breakdown_from_items",
    "weight_bytes",
    "tensor_bytes",
    "markdown_rows",
    "MARKDOWN_HEADER",
    "main",
]

#: Short names accepted by ``--model`` besides the zoo names.
MODEL_ALIASES = {"sdxl": "sdxl-unet", "sd35": "sd35-medium", "flux": "flux-dev"}
#: Backbone samples per image in one denoising step (classifier-free guidance runs cond + uncond).
#: The issue specifies CFG batch 2 for SDXL only; FLUX.1-dev is guidance-distilled.
CFG_FACTOR = {"sdxl": 2}
#: The variant every speedup is measured against.
BASELINE = "bf16_compile"
ISSUE_PRESETS = ("w8a8", "w8a8-fp8", "w4a8")
VARIANT_GROUPS = {
    "baselines": ("bf16_eager", "bf16_compile"),
    "torchao": ("torchao_int8_compile", "torchao_fp8_compile"),
    "segquant": tuple(f"segquant_{p}_{m}" for p in ISSUE_PRESETS for m in ("eager", "compile")),
}
VARIANT_GROUPS["all"] = VARIANT_GROUPS["baselines"] + VARIANT_GROUPS["torchao"] + VARIANT_GROUPS["segquant"]
#: SD3 transformers define no ``_repeated_blocks`` in diffusers 0.42; regional compile uses these classes.
_REPEATED_FALLBACK = {"SD3Transformer2DModel": ("JointTransformerBlock",)}
SCHEMA = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One measured configuration.

    Attributes:
        name: As given on the command line, e.g. ``segquant_w8a8-fp8_compile``.
        kind: ``"bf16"``, ``"torchao"`` or ``"segquant"``.
        mode: ``"eager"``, ``"compile"`` (whole model) or ``"rcompile"`` (repeated blocks only).
        scheme: torchao ``"int8"``/``"fp8"``, or the segquant preset; None for bf16.
    """

    name: str
    kind: str
    mode: str
    scheme: str | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Execution rank: bf16 first (the reference), then torchao, then segquant."""
        return (
            {"bf16": 0, "torchao": 1, "segquant": 2}[self.kind],
            {"eager": 0, "compile": 1, "rcompile": 2}[self.mode],
        )


_VARIANT_RES = (
    (re.compile(r"^bf16_(eager|compile|rcompile)$"), "bf16"),
    (re.compile(r"^torchao_(int8|fp8)_(eager|compile|rcompile)$"), "torchao"),
    (re.compile(r"^segquant_(.+)_(eager|compile)$"), "segquant"),
)


def parse_variants(spec: str | Iterable[str], order: str = "canonical") -> list[Variant]:
    """Parse ``--variants`` (comma-separated names or groups) into variants in execution order.

    ``order="canonical"``: bf16 variants first, then torchao, then segquant grouped by preset (eager before
    compile, presets in the order first named). ``order="given"``: as named (groups expanded in place).
    Either way a preset is quantized once, at its first variant, and freed after its last.

    Raises:
        ConfigError: An unknown variant, group or preset; the message lists what is accepted.
    """
    from segquant_fx.config import QuantizeConfig

    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ConfigError("--variants is empty: name variants or groups (" + ", ".join(VARIANT_GROUPS) + ")")
    expanded: list[str] = []
    for n in names:
        expanded.extend(VARIANT_GROUPS.get(n, (n,)))
    out: dict[str, Variant] = {}
    for n in expanded:
        for rx, kind in _VARIANT_RES:
            m = rx.match(n)
            if m is None:
                continue
            if kind == "bf16":
                v = Variant(n, kind, m.group(1))
            elif kind == "torchao":
                v = Variant(n, kind, m.group(2), m.group(1))
            else:
                try:
                    QuantizeConfig.coerce(m.group(1))
                except ConfigError as e:
                    raise ConfigError(f"variant {n!r}: {e}") from None
                v = Variant(n, kind, m.group(2), m.group(1))
            out.setdefault(n, v)
            break
        else:
            raise ConfigError(
                f"unknown variant {n!r}; expected bf16_{{eager,compile,rcompile}}, "
                f"torchao_{{int8,fp8}}_{{eager,compile,rcompile}}, segquant_<preset>_{{eager,compile}} "
                f"or a group ({', '.join(VARIANT_GROUPS)})"
            )
    if order == "given":
        return list(out.values())
    if order != "canonical":
        raise ConfigError(f"order must be 'canonical' or 'given', got {order!r}")
    presets: list[str] = []
    for v in out.values():
        if v.kind == "segquant" and v.scheme not in presets:
            presets.append(v.scheme)
    return sorted(
        out.values(),
        key=lambda v: (
            v.order[0],
            presets.index(v.scheme) if v.kind == "segquant" else 0,
            v.scheme or "",
            v.order[1],
        ),
    )


# --------------------------------------------------------------------------------------------------
# weight bytes
# --------------------------------------------------------------------------------------------------

_BUFFER_CATEGORY = {
    "qweight": "qweight",
    "w_scale": "scales",
    "x_scale": "scales",
    "x_scale_pos": "scales",
    "x_scale_neg": "scales",
    "smooth": "scales",
    "lr_down": "low_rank",
    "lr_up": "low_rank",
    "weight_hat": "dequantized_copy",
}


WEIGHT_CATEGORIES = ("qweight", "scales", "low_rank", "dequantized_copy", "float", "float_buffers")


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def _leaf_tensors(t: torch.Tensor, category: str) -> Iterator[tuple[torch.Tensor, str]]:
    """Plain tensors behind ``t``: tensor subclasses (torchao) are flattened into their stored parts."""
    if _is_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for a in attrs:
            inner = getattr(t, a)
            if isinstance(inner, torch.Tensor):
                if "scale" in a or "zero_point" in a:
                    sub = "scales"
                else:  # quantized data, possibly wrapped again (torchao nests its tensors)
                    sub = "qweight" if category.startswith("float") else category
                yield from _leaf_tensors(inner, sub)
        return
    yield t, category


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's elements occupy (subclasses: the sum of their stored parts)."""
    return sum(x.numel() * x.element_size() for x, _ in _leaf_tensors(t, "float"))


def weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer ``module`` holds, by category, each storage counted once.

    Categories: ``qweight`` (quantized weights as stored: int8 / fp8 / int4 packed two per byte; torchao's
    quantized data), ``scales`` (weight and activation scales, SmoothQuant vectors, zero points),
    ``low_rank`` (SVDQuant branches), ``dequantized_copy`` (float copies of quantized weights, if any),
    ``float`` (every other parameter: unquantized layers, biases, norms, embeddings), ``float_buffers`` (every
    other buffer, e.g. SD3's 384x384 positional table, 0.42 GiB in bf16, which no 8-bit format shrinks).
    ``total`` is their sum. A tensor shared by several modules (or a view) is counted once, by storage.

    The library has no such count; this is the benchmark's own (issue 10).
    """
    out = Counter({k: 0 for k in (*WEIGHT_CATEGORIES,)})
    seen: set[tuple[str, int, int]] = set()
    named = itertools.chain(
        ((n, t, "float") for n, t in module.named_parameters(remove_duplicate=False)),
        ((n, t, "float_buffers") for n, t in module.named_buffers(remove_duplicate=False)),
    )
    for name, t, default in named:
        if t is None:
            continue
        category = _BUFFER_CATEGORY.get(name.rsplit(".", 1)[-1], default)
        for leaf, cat in _leaf_tensors(t, category):
            nbytes = leaf.numel() * leaf.element_size()
            try:
                key = (str(leaf.device), leaf.untyped_storage().data_ptr(), leaf.storage_offset())
            except (RuntimeError, NotImplementedError):  # meta / fake tensors have no storage pointer
                key = (str(leaf.device), id(leaf), 0)
            if key[1] != 0 and key in seen:
                continue
            seen.add(key)
            out[cat] += nbytes
    result = dict(out)
    result["total"] = sum(out.values())
    return result


# --------------------------------------------------------------------------------------------------
# profile breakdown
# --------------------------------------------------------------------------------------------------

CATEGORIES = ("gemm", "quantize", "attention", "conv", "other")
_ATTN_NAME = re.compile(r"flash|fmha|attention|sdpa|cudnn.*mha|mha_fwd", re.I)
_ATTN_OP = re.compile(r"^aten::(_?scaled_dot_product|_flash_attention|_efficient_attention|_cudnn_attention)")
_CONV_OP = re.compile(r"^aten::(convolution|_convolution|cudnn_convolution|conv\d?d|mkldnn_convolution)")
# not "conv" alone: CUTLASS GEMM names hold "NumericConverter"
_CONV_NAME = re.compile(r"fprop|dgrad|wgrad|implicit_?gemm|conv(?:olution|_|\d|::)", re.I)
_GEMM_NAME = re.compile(
    r"gemm|cutlass|cublas|nvjet|xmma|wgmma|gemv|splitk|"
    r"(?:^|[^a-z])(?:mm|addmm|bmm|baddbmm|matmul|linear|_int_mm|_scaled_mm|qlinear)(?:[^a-z]|$)",
    re.I,
)
_QUANT_NAME = re.compile(r"quantiz|quant_rows|(?:^|_)round(?:_|$)", re.I)


def classify_kernel(name: str, ancestors: Iterable[str] = ()) -> str:
    """Category of one GPU kernel (or CPU op), from its name and the names of the ops that launched it.

    ``ancestors`` are the profiler ops around the launch, innermost first. Rules, in order:
    attention (flash / SDPA kernels or an SDPA op around them) -> ``attention``; a convolution op or a
    conv kernel -> ``conv``; the innermost ``segquant::`` op decides for the ops it runs (``qlinear`` ->
    ``gemm``, ``quantize*`` / ``dequantize`` / ``fake_quantize*`` -> ``quantize``), which also covers the
    reference fallbacks' elementwise kernels; GEMM kernel names (CUTLASS, cuBLAS, ``mm`` ops, Inductor mm
    templates ``triton_tem_*``) -> ``gemm``; quantize kernel names (``quantize_rows_kernel``; Inductor kernels
    that fused a ``round``, i.e. a decomposed quantize, into a neighbour) -> ``quantize``; else ``other``.

    Examples:
        >>> classify_kernel("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>(...)")
        'gemm'
        >>> classify_kernel("void at::native::vectorized_elementwise_kernel<...>", ["aten::mul", "segquant::qlinear"])
        'gemm'
        >>> classify_kernel("triton_poi_fused__to_copy_clamp_div_round_3")
        'quantize'
        >>> classify_kernel("flash_fwd_kernel<...>")
        'attention'
        >>> classify_kernel("triton_poi_fused_add_addmm_gelu_1")
        'other'
    """
    anc = list(ancestors)
    if _ATTN_NAME.search(name) or any(_ATTN_OP.match(a) for a in anc) or _ATTN_OP.match(name):
        return "attention"
    if any(_CONV_OP.match(a) for a in anc) or _CONV_OP.match(name):
        return "conv"
    for a in [name, *anc]:
        if a.startswith("segquant::"):
            op = a.split("::", 1)[1].split(".", 1)[0]
            if op.startswith("qlinear"):
                return "gemm"
            if "quantize" in op:
                return "quantize"
    if name.startswith("triton_"):
        # Inductor names kernels after the aten ops they fused: "addmm" in a pointwise kernel is the bias
        # epilogue, not the GEMM; only its mm templates are GEMMs
        if name.startswith("triton_tem_"):
            return "gemm"
        return "quantize" if _QUANT_NAME.search(name) else "other"
    if _CONV_NAME.search(name):
        return "conv"
    if _GEMM_NAME.search(name):
        return "gemm"
    if _QUANT_NAME.search(name):
        return "quantize"
    return "other"


def breakdown_from_items(items: Iterable[tuple[str, float, tuple[str, ...]]], steps: int) -> dict[str, Any]:
    """Per-step milliseconds by category from ``(name, microseconds, ancestors)`` items."""
    per_cat: Counter[str] = Counter({c: 0.0 for c in CATEGORIES})
    per_name: Counter[tuple[str, str]] = Counter()
    for name, us, anc in items:
        cat = classify_kernel(name, anc)
        per_cat[cat] += us
        per_name[(cat, name)] += us
    total = sum(per_cat.values())
    steps = max(1, steps)
    return {
        "ms_per_step": {c: round(per_cat[c] / steps / 1e3, 4) for c in CATEGORIES},
        "total_ms_per_step": round(total / steps / 1e3, 4),
        "fraction": {c: round(per_cat[c] / total, 4) if total else 0.0 for c in CATEGORIES},
        "top": [
            {"name": n[:160], "category": c, "ms_per_step": round(us / steps / 1e3, 4)}
            for (c, n), us in per_name.most_common(12)
        ],
    }


def _ancestors(evt: Any) -> tuple[str, ...]:
    out = []
    p = evt
    while p is not None:
        out.append(p.name)
        p = p.cpu_parent
    return tuple(out)


def _profile_items(events: Any, device_type: str) -> list[tuple[str, float, tuple[str, ...]]]:
    """``(kernel, us, ancestors)`` for CUDA (kernels, by launching op) or ``(op, self us, ancestors)`` on CPU."""
    from torch.autograd import DeviceType

    items: list[tuple[str, float, tuple[str, ...]]] = []
    if device_type != "cuda":
        for e in events:
            if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False):
                items.append((e.name, float(e.self_cpu_time_total), _ancestors(e.cpu_parent)))
        return items
    attributed: Counter[str] = Counter()
    for e in events:
        if e.device_type != DeviceType.CPU or not e.kernels:
            continue
        anc = _ancestors(e)
        for k in e.kernels:
            items.append((k.name, float(k.duration), anc))
            attributed[k.name] += float(k.duration)
    # kernels launched outside any recorded op (some compiled-graph launches) are classified by name only
    device_total: Counter[str] = Counter()
    for e in events:
        if e.device_type == DeviceType.CUDA:
            device_total[e.name] += float(e.time_range.elapsed_us())
    for name, us in device_total.items():
        rest = us - attributed.get(name, 0.0)
        if rest > 0.5:
            items.append((name, rest, ()))
    return items


def profile_breakdown(fn: Callable[[], Any], steps: int, device: torch.device) -> dict[str, Any]:
    """Run ``fn`` ``steps`` times under ``torch.profiler`` and break the time down by category."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    items = _profile_items(prof.events(), device.type)
    out = breakdown_from_items(items, steps)
    out["steps"] = steps
    out["source"] = "GPU kernel time" if device.type == "cuda" else "CPU self time of ops (smoke run)"
    return out


# --------------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _first_tensor(out: Any) -> torch.Tensor:
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise TypeError(f"the model returned no tensor ({type(out).__name__})")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().float(), ref.detach().float()
    if o.shape != r.shape:
        raise ValueError(f"output shape {tuple(o.shape)} differs from the reference {tuple(r.shape)}")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def time_steps(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Milliseconds of ``n`` back-to-back calls: CUDA events around each call on the GPU, else wall time.

    Calls are issued back to back (no host sync in between), as in a denoising loop: each interval is the
    GPU's time for the step, idle gaps included when the host cannot keep it busy.
    """
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in ev]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


class _Timeout(BaseException):
    """Raised by the SIGALRM handler: a BaseException, so library code catching Exception lets it through."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM, main thread only; no-op elsewhere)."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and sys.platform != "win32"
        and threading_is_main()
    )
    if not usable:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Timeout(f"interrupted after {seconds:.0f} s (--time-budget-s / --variant-timeout-s)")

    # The timer repeats every 0.2 s until the block exits: Python swallows an exception raised while a gc
    # callback runs (hypothesis installs one), so a single alarm could be lost and the block run on.
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, float(seconds)), 0.2)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def threading_is_main() -> bool:
    """Whether this is the main thread (signals can only be handled there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _free(device: torch.device) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short_tb(e: BaseException, lines: int = 12) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    text = "".join(tb).strip().splitlines()
    return "\n".join(text[-lines:])


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What a variant runs, built once and shared by its batches."""

    module: torch.nn.Module  # what weight bytes are counted on
    quantize_s: float | None = None
    quantize_info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    regional: list[torch.nn.Module] = field(default_factory=list)


class _Run:
    def __init__(self, args: argparse.Namespace, variants: list[Variant]):
        self.args = args
        self.variants = variants
        self.t0 = _T_START
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.zoo_name = MODEL_ALIASES.get(args.model, args.model)
        from segquant_fx.models import get_model_spec

        self.spec = get_model_spec(self.zoo_name)
        self.cfg_factor = args.cfg if args.cfg else CFG_FACTOR.get(self.spec.family, 1)
        self.batches = args.batch
        self.records: dict[int, list[dict[str, Any]]] = {b: [] for b in self.batches}
        self.inputs: dict[int, dict[str, Any]] = {}
        self.refs: dict[int, torch.Tensor] = {}
        self.quantized: dict[str, _Prepared] = {}
        self.failed: dict[str, str] = {}
        self.info: dict[str, Any] = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float | None:
        b = self.args.time_budget_s
        return None if b is None else b - self.elapsed()

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[e2e +{self.elapsed():7.1f}s] {msg}", flush=True)

    def _timeout_for_step(self) -> float | None:
        limits = [x for x in (self.remaining(), self.args.variant_timeout_s) if x is not None]
        return min(limits) if limits else None

    # ---- model and inputs --------------------------------------------------------------------------
    def build(self) -> None:
        self.log(f"building {self.zoo_name} ({self.spec.description}) on {self.device} in {self.dtype}")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = self.spec.build(device=self.device, dtype=self.dtype)
        _sync(self.device)
        self.info["build_s"] = round(time.perf_counter() - t, 2)
        self.info["num_params"] = sum(p.numel() for p in self.model.parameters())
        self.float_bytes = weight_bytes(self.model)
        self.log(
            f"built in {self.info['build_s']} s: {self.info['num_params'] / 1e9:.3f} B params, "
            f"{self.float_bytes['total'] / 2**30:.2f} GiB of weights and buffers"
        )
        for b in self.batches:
            bb = b * self.cfg_factor
            # the evaluation input: the zoo's default seed (calibration items use seeds 1000 + i)
            self.inputs[b] = self.spec.example(bb, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self.refs[b] = _first_tensor(self.model(**self.inputs[b], return_dict=False)).detach().clone()
            _sync(self.device)
        self.log(f"reference outputs for batch {', '.join(map(str, self.batches))} (x{self.cfg_factor} CFG)")

    def calib_items(self) -> Iterator[dict[str, Any]]:
        """The calibration items: the zoo's example inputs with seeds 1000.. (as ``calibration_items``)."""
        for i in range(self.args.calib_items):
            yield self.spec.example(
                self.args.calib_batch, device=self.device, dtype=self.dtype, sample_seed=1000 + i
            )

    # ---- variant setup -----------------------------------------------------------------------------
    def prepare(self, v: Variant) -> _Prepared:
        if v.kind == "bf16":
            regional = self._regional_blocks(self.model) if v.mode == "rcompile" else []
            return _Prepared(module=self.model, regional=regional)
        if v.kind == "torchao":
            return self._prepare_torchao(v)
        if v.scheme in self.failed:  # the other variant of this preset already failed to quantize
            raise _Skip(f"quantizing {v.scheme} failed earlier in this run: {self.failed[v.scheme]}")
        if v.scheme not in self.quantized:
            try:
                self.quantized[v.scheme] = self._quantize_segquant(v.scheme)
            except BaseException as e:
                self.failed[v.scheme] = f"{type(e).__name__}: {str(e)[:200]}"
                raise
        return self.quantized[v.scheme]

    def _regional_blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        names = getattr(model, "_repeated_blocks", None) or _REPEATED_FALLBACK.get(type(model).__name__)
        if not names:
            raise ConfigError(f"{type(model).__name__} has no repeated blocks to compile regionally")
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise ConfigError(f"no module of classes {list(names)} in {type(model).__name__}")
        return blocks

    def _prepare_torchao(self, v: Variant) -> _Prepared:
        try:
            import torchao
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                Int8DynamicActivationInt8WeightConfig,
                PerRow,
                quantize_,
            )
        except Exception as e:  # noqa: BLE001 - any import failure means: skip torchao cleanly
            raise _Skip(f"torchao is not importable ({type(e).__name__}: {e}); carry its wheel") from None
        cfg = (
            Int8DynamicActivationInt8WeightConfig()
            if v.scheme == "int8"
            else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        )
        self.log(f"{v.name}: copying the model and running torchao quantize_({type(cfg).__name__})")
        _sync(self.device)
        t = time.perf_counter()
        m = copy.deepcopy(self.model)
        _sync(self.device)
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            quantize_(m, cfg)
        _sync(self.device)
        q_s = time.perf_counter() - t
        info = {
            "torchao": getattr(torchao, "__version__", None),
            "config": repr(cfg)[:300],
            "copy_s": round(copy_s, 2),
        }
        regional = self._regional_blocks(m) if v.mode == "rcompile" else []
        return _Prepared(module=m, quantize_s=round(q_s, 2), quantize_info=info, regional=regional)

    def _segquant_config(self, preset: str) -> tuple[Any, dict[str, Any]]:
        from segquant_fx.config import QuantizeConfig

        cfg = QuantizeConfig.coerce(preset)
        over: dict[str, Any] = {}
        notes: dict[str, Any] = {}
        d = cfg.default
        if d.calib.type == "gptq":
            hessian_cpu = self.args.hessian_cpu
            if hessian_cpu == "auto":
                hessian_cpu = "on" if self._hessians_too_big() else "off"
            if hessian_cpu == "on":
                over["calib"] = {"cpu_storage": True}
            notes["hessian_cpu"] = hessian_cpu == "on"
        if d.opt.type == "svd" and self.args.svd_precision:
            over["opt"] = {"precision": self.args.svd_precision}
            notes["svd_precision"] = self.args.svd_precision
        if over:
            cfg = cfg.with_overrides({"default": over})
        return cfg, notes

    def _hessians_too_big(self) -> bool:
        """GPTQ keeps one fp32 Hessian per linear input: K^2 * 4 bytes (an upper bound: inputs are shared)."""
        if self.device.type != "cuda":
            return False
        need = sum(m.in_features**2 * 4 for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        free, _ = torch.cuda.mem_get_info(self.device)
        return need > 0.6 * free

    def _quantize_segquant(self, preset: str) -> _Prepared:
        import segquant_fx

        cfg, notes = self._segquant_config(preset)
        self.log(
            f"segquant {preset}: quantize with {self.args.calib_items} items of batch {self.args.calib_batch}"
        )
        _free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sync(self.device)
            t = time.perf_counter()
            qmodel = segquant_fx.quantize(self.model, self.calib_items(), cfg, progress=self.args.progress)
            _sync(self.device)
            q_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(self.device) - before if self.device.type == "cuda" else None
        info = {
            "items": self.args.calib_items,
            "item_batch": self.args.calib_batch,
            "phases_s": dict(qmodel.meta.get("timings", {})),
            "quantized_linears": len(qmodel.plan),
            "peak_extra_gib": _gib(peak),
            **notes,
        }
        self.log(f"segquant {preset}: quantized {len(qmodel.plan)} linears in {q_s:.1f} s {info['phases_s']}")
        return _Prepared(
            module=qmodel, quantize_s=round(q_s, 2), quantize_info=info, warnings=_unique(caught)
        )

    # ---- one (variant, batch) --------------------------------------------------------------------
    def callable_for(self, v: Variant, prep: _Prepared, batch: int) -> Callable[[], Any]:
        inputs = self.inputs[batch]
        mode = self.args.compile_mode
        if v.mode == "eager" or v.mode == "rcompile":
            for blk in prep.regional:
                blk.compile(mode=mode)
            target = prep.module
        elif v.kind == "segquant":
            import segquant_fx

            target = segquant_fx.compile(prep.module, None, dynamic=False, mode=mode)
        else:
            target = torch.compile(prep.module, mode=mode, dynamic=False)

        def step() -> Any:
            with torch.no_grad():
                return target(**inputs, return_dict=False)

        return step

    def measure(self, v: Variant, prep: _Prepared, batch: int) -> dict[str, Any]:
        a = self.args
        dev = self.device
        rec: dict[str, Any] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch._dynamo.utils

            torch._dynamo.utils.counters.clear()
            if (
                dev.type == "cuda"
            ):  # each variant lists the reference fallbacks it hit (warned once per process)
                from segquant_fx.ops import cuda_kernels

                cuda_kernels.reset_fallback_warnings()
            fn = self.callable_for(v, prep, batch)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            _sync(dev)
            t = time.perf_counter()
            out = fn()
            _sync(dev)
            first = time.perf_counter() - t
            rec["first_call_s"] = round(first, 3)
            if v.mode != "eager":
                rec["compile_s"] = round(first, 2)
                rec["graphs"] = int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))
            self.log(f"{v.name} b{batch}: first call {first:.2f} s")
            rec["rel_err"] = _rel_err(_first_tensor(out), self.refs[batch])
            rec["finite"] = bool(torch.isfinite(_first_tensor(out)).all())
            del out
            # warm-up, then choose how many steps fit the timing allowance
            warm = time_steps(fn, max(1, a.warmup), dev)
            est = max(1e-3, statistics.median(warm))
            n = int(min(a.steps_timed, max(3, a.max_timing_s * 1e3 // est)))
            ms = time_steps(fn, n, dev)
            rec["ms_per_step"] = round(statistics.median(ms), 4)
            rec["ms_min"] = round(min(ms), 4)
            rec["ms_max"] = round(max(ms), 4)
            rec["steps_timed"] = n
            rec["steps_warmup"] = len(warm)
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev)
                rec["peak_process_gib"] = _gib(peak)
                # what this variant alone would hold: its weights plus the peak of its activations and
                # workspaces (the float model and other variants' data stay resident in this process)
                rec["peak_gib"] = _gib(peak - resident + self._variant_bytes(v, prep))
            if self._profile_wanted(v):
                rec["profile"] = profile_breakdown(fn, a.profile_steps, dev)
            del fn
        rec["warnings"] = _unique(caught)[:10]
        return rec

    def _variant_bytes(self, v: Variant, prep: _Prepared) -> int:
        return self.float_bytes["total"] if v.kind == "bf16" else weight_bytes(prep.module)["total"]

    def _profile_wanted(self, v: Variant) -> bool:
        p = self.args.profile
        return p == "all" or (p == "segquant" and v.kind == "segquant")

    # ---- driver ------------------------------------------------------------------------------------
    def run(self) -> None:
        self.build()
        last_use = {v.scheme: i for i, v in enumerate(self.variants) if v.kind == "segquant"}
        for i, v in enumerate(self.variants):
            self._run_variant(v)
            if v.kind == "segquant" and last_use.get(v.scheme) == i and v.scheme in self.quantized:
                del self.quantized[v.scheme]
            _free(self.device)

    def _base_record(self, v: Variant, batch: int) -> dict[str, Any]:
        return {"name": v.name, "kind": v.kind, "mode": v.mode, "scheme": v.scheme, "batch": batch}

    def _skip_all(
        self, v: Variant, batches: Iterable[int], status: str, note: str, tb: str | None = None
    ) -> None:
        for b in batches:
            rec = {**self._base_record(v, b), "status": status, "note": note}
            if tb:
                rec["traceback"] = tb
            self.records[b].append(rec)

    def _run_variant(self, v: Variant) -> None:
        rem = self.remaining()
        if rem is not None and rem <= 0:
            self.log(f"{v.name}: skipped (time budget of {self.args.time_budget_s:.0f} s used)")
            self._skip_all(
                v, self.batches, "skipped", f"time budget of {self.args.time_budget_s:.0f} s used up"
            )
            return
        self.log(f"== {v.name}")
        prep = None
        try:
            with _deadline(self._timeout_for_step()):
                prep = self.prepare(v)
        except _Skip as e:
            self.log(f"{v.name}: skipped: {e}")
            self._skip_all(v, self.batches, "skipped", str(e))
            return
        except (_Timeout, Exception) as e:  # noqa: BLE001 - a failing variant never stops the run
            status = "timeout" if isinstance(e, _Timeout) else "error"
            msg = f"setup failed: {type(e).__name__}: {str(e)[:400]}"
            if v.kind == "segquant":  # the alarm can fire before prepare() records the failure itself
                self.failed.setdefault(v.scheme, f"{type(e).__name__}: {str(e)[:200]}")
            self.log(f"{v.name}: {msg}")
            self._skip_all(v, self.batches, status, msg, _short_tb(e))
            traceback.clear_frames(e.__traceback__)
            return
        wb = weight_bytes(prep.module) if v.kind != "bf16" else self.float_bytes
        try:
            for b in self.batches:
                rec = self._base_record(v, b)
                rem = self.remaining()
                if rem is not None and rem <= 0:
                    rec.update(
                        status="skipped", note=f"time budget of {self.args.time_budget_s:.0f} s used up"
                    )
                    self.records[b].append(rec)
                    continue
                rec["weight_bytes"] = wb
                rec["weight_gib"] = _gib(wb["total"])
                rec["weight_ratio_vs_bf16"] = round(wb["total"] / self.float_bytes["total"], 4)
                fb = self.float_bytes
                rec["weight_ratio_vs_bf16_excl_float_buffers"] = round(
                    (wb["total"] - wb["float_buffers"]) / max(1, fb["total"] - fb["float_buffers"]), 4
                )
                if prep.quantize_s is not None:
                    rec["quantize_s"] = prep.quantize_s
                    rec["quantize"] = prep.quantize_info
                    if v.kind == "segquant":
                        rec["quantize_shared"] = (
                            "quantized once; shared by this preset's variants and batches"
                        )
                if prep.warnings:
                    rec["quantize_warnings"] = prep.warnings[:10]
                try:
                    with _deadline(self._timeout_for_step()):
                        rec.update(self.measure(v, prep, b))
                    rec["status"] = "ok"
                    self.log(
                        f"{v.name} b{b}: {rec['ms_per_step']:.2f} ms/step, rel err {rec['rel_err']:.4g}, "
                        f"weights {rec['weight_gib']} GiB ({rec['weight_ratio_vs_bf16']:.3f}x)"
                    )
                except (_Timeout, Exception) as e:  # noqa: BLE001
                    rec["status"] = "timeout" if isinstance(e, _Timeout) else "error"
                    rec["note"] = f"{type(e).__name__}: {str(e)[:400]}"
                    rec["traceback"] = _short_tb(e)
                    traceback.clear_frames(e.__traceback__)
                    self.log(f"{v.name} b{b}: {rec['status']}: {rec['note']}")
                finally:
                    self.records[b].append(rec)
                    for blk in prep.regional:  # undo regional compile: the float model is shared
                        blk._compiled_call_impl = None
                    _free(self.device)
        finally:
            for blk in prep.regional:
                blk._compiled_call_impl = None
            del prep

    # ---- results -----------------------------------------------------------------------------------
    def finalize(self) -> list[Path]:
        a = self.args
        out_dir = Path(a.out)
        paths = []
        env = self._environment()
        for b in self.batches:
            recs = self.records[b]
            _add_speedups(recs)
            result = {
                "schema": SCHEMA,
                "benchmark": "e2e",
                "model": self.zoo_name,
                "family": self.spec.family,
                "batch": b,
                "cfg_factor": self.cfg_factor,
                "backbone_batch": b * self.cfg_factor,
                "input_shapes": {
                    k: list(t.shape) for k, t in self.inputs[b].items() if isinstance(t, torch.Tensor)
                },
                "tag": a.tag,
                "baseline": BASELINE,
                "float_weight_bytes": self.float_bytes,
                **self.info,
                **env,
                "wall_s": round(self.elapsed(), 1),
                "variants": recs,
            }
            name = f"e2e_{self.zoo_name}_b{b}{'_' + a.tag if a.tag else ''}.json"
            path = out_dir / name
            _atomic_write(path, json.dumps(result, indent=1, default=str) + "\n")
            paths.append(path)
            md = "\n".join(
                [
                    f"\n### e2e {self.zoo_name}, batch {b} (x{self.cfg_factor} CFG), {env['device']}, {env['date']}\n"
                ]
                + [MARKDOWN_HEADER]
                + markdown_rows(result)
            )
            md_path = out_dir / "e2e.md"
            prev = md_path.read_text() if md_path.exists() else ""
            _atomic_write(md_path, prev + md + "\n")
            if not a.quiet:
                print(md, flush=True)
        return paths

    def _environment(self) -> dict[str, Any]:
        dev = self.device
        env: dict[str, Any] = {
            "date": _now(),
            "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else (platform.processor() or "cpu"),
            "device_type": dev.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "diffusers": _version("diffusers"),
            "torchao": _version("torchao"),
            "commit": _git_commit(),
            "settings": {
                "dtype": self.args.dtype,
                "warmup": self.args.warmup,
                "steps_timed": self.args.steps_timed,
                "max_timing_s": self.args.max_timing_s,
                "calib_items": self.args.calib_items,
                "calib_batch": self.args.calib_batch,
                "compile_mode": self.args.compile_mode,
                "time_budget_s": self.args.time_budget_s,
                "profile": self.args.profile,
                "command": "benchmarks/e2e.py " + " ".join(self.args.argv),
            },
        }
        if dev.type == "cuda":
            from segquant_fx.ops import cuda_kernels

            env["kernels"] = {
                "library": str(cuda_kernels.library_path()),
                "registered": list(cuda_kernels.registered_ops()),
                "segmented_gemm": cuda_kernels.has_segmented_gemm(),
                "unavailable_reason": cuda_kernels.unavailable_reason(),
            }
        return env


class _Skip(Exception):
    """A variant that cannot run here (e.g. torchao missing): recorded as skipped, not as an error."""


def _unique(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    seen: dict[str, None] = {}
    for w in caught:
        if issubclass(w.category, (FutureWarning, DeprecationWarning)):  # library churn, not about the run
            continue
        seen.setdefault(f"{w.category.__name__}: {str(w.message)[:300]}", None)
    return list(seen)


def _add_speedups(recs: list[dict[str, Any]]) -> None:
    base = {r["name"]: r.get("ms_per_step") for r in recs if r.get("status") == "ok"}
    for r in recs:
        ms = r.get("ms_per_step")
        if r.get("status") != "ok" or not ms:
            continue
        for ref_name, key in ((BASELINE, "speedup_vs_bf16_compile"), ("bf16_eager", "speedup_vs_bf16_eager")):
            ref = base.get(ref_name)
            r[key] = round(ref / ms, 4) if ref else None


MARKDOWN_HEADER = (
    "| variant | status | ms/step | x bf16 compiled | x bf16 eager | peak GiB | weights GiB (x bf16) | rel. err | "
    "quantize s | compile s | GEMM / quant / attn / conv / other ms |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return ""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return format(x, spec)


def markdown_rows(result: dict[str, Any]) -> list[str]:
    """Table rows (see :data:`MARKDOWN_HEADER`) for one result file's variants."""
    rows = []
    for r in result["variants"]:
        prof = r.get("profile")
        pb = ""
        if prof:
            m = prof["ms_per_step"]
            pb = " / ".join(_fmt(m[c]) for c in CATEGORIES)
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {str(r.get('note', ''))[:80]}".replace("|", "/")
        wb = (r.get("weight_bytes") or {}).get("total")
        w = f"{wb / 2**30:.3g} ({_fmt(r.get('weight_ratio_vs_bf16'), '.3f')})" if wb is not None else ""
        rows.append(
            f"| {r['name']} | {status} | {_fmt(r.get('ms_per_step'))} | {_fmt(r.get('speedup_vs_bf16_compile'))} | "
            f"{_fmt(r.get('speedup_vs_bf16_eager'))} | {_fmt(r.get('peak_gib'))} | {w} | "
            f"{_fmt(r.get('rel_err'), '.4f')} | {_fmt(r.get('quantize_s'), '.1f')} | "
            f"{_fmt(r.get('compile_s'), '.1f')} | {pb} |"
        )
    return rows


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch must be comma-separated positive ints, got {text!r}"
        ) from None
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"--batch must be comma-separated positive ints, got {text!r}")
    return sorted(set(out))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, help="zoo model or alias: sd35-medium, flux-dev, sdxl, tiny-sd3, ..."
    )
    p.add_argument("--batch", type=_batches, default=[1], help="images per step, e.g. 1,4 (default 1)")
    p.add_argument("--variants", default="all", help="comma-separated variants and groups (default: all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--order",
        choices=("canonical", "given"),
        default="canonical",
        help="run bf16, torchao, then segquant (canonical) or as listed (given)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--tag", default="", help="suffix of the JSON name (several commands per model/batch)")
    p.add_argument("--calib-items", type=int, default=32, help="segquant calibration items (default 32)")
    p.add_argument("--calib-batch", type=int, default=2, help="samples per calibration item (default 2)")
    p.add_argument(
        "--cfg", type=int, default=0, help="backbone samples per image (default: 2 for SDXL, else 1)"
    )
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps after the first call (default 3)")
    p.add_argument("--steps-timed", type=int, default=10, help="timed steps, at most (default 10)")
    p.add_argument(
        "--max-timing-s",
        type=float,
        default=30.0,
        help="fewer timed steps (>= 3) when they would take longer",
    )
    p.add_argument("--time-budget-s", type=float, default=None, help="skip/interrupt variants after this")
    p.add_argument(
        "--variant-timeout-s", type=float, default=None, help="interrupt one variant/batch after this"
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for every compiled variant")
    p.add_argument("--profile", choices=("segquant", "all", "none"), default="segquant")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument(
        "--hessian-cpu",
        choices=("auto", "on", "off"),
        default="auto",
        help="GPTQ Hessians in CPU memory (auto: when K^2 fp32 per linear would exceed 60%% of free GPU memory)",
    )
    p.add_argument(
        "--svd-precision", choices=("float32", "float64"), default=None, help="override the SVD dtype"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--progress", action="store_true", help="show the quantizer's progress bars")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 whatever the figures (2 for bad arguments)."""
    p = _parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("calib_items", "calib_batch", "steps_timed", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu for the smoke test")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        p.error(f"--tag {args.tag!r}: use letters, digits, '.', '_' or '-' only")
    try:
        variants = parse_variants(args.variants, args.order)
        from segquant_fx.models import get_model_spec

        get_model_spec(MODEL_ALIASES.get(args.model, args.model))
    except ConfigError as e:
        p.error(str(e))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    run = _Run(args, variants)
    run.log(
        f"variants: {', '.join(v.name for v in variants)}; batches {args.batch}; torch {torch.__version__}"
    )
    if BASELINE not in {v.name for v in variants}:
        run.log(f"note: {BASELINE} is not requested; speedups vs compiled bf16 will be empty")
    try:
        run.run()
    except (_Timeout, Exception) as e:  # noqa: BLE001 - e.g. the build itself failed: still write what we have
        run.log(f"run stopped: {type(e).__name__}: {e}")
        run.info["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        run.info["traceback"] = _short_tb(e)
        if not run.inputs:
            _atomic_write(
                Path(args.out) / f"e2e_{run.zoo_name}_error.json", json.dumps(run.info, indent=1) + "\n"
            )
            return 0
    for path in run.finalize():
        run.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
