#!/usr/bin/env python
"""Benchmark: segquant CUDA kernels (sq_gemm through segquant::qlinear, quantize + qlinear) vs PyTorch.

For each shape (M, K, N) = x[M, K] @ W[N, K]^T it times, with ``triton.testing.do_bench`` (median,
CUDA events; input buffers rotated so repeated calls do not hit L2 for small shapes):

=================== ================================================================================
bf16_linear         ``F.linear(x_bf16, w_bf16, bias)``: the unquantized baseline
int_mm              ``torch._int_mm(a_int8, w_int8.t())`` -> int32, no scales / bias / cast (a lower
                    bound for an int8 GEMM in PyTorch; needs M > 16, so n/a for small M)
scaled_mm_fp8       ``torch._scaled_mm`` e4m3 row-wise (scale_a [M,1], scale_b [1,N]) -> bf16, no bias
sq_gemm_int8        ``segquant::qlinear`` int8 x int8, per-token x per-channel scales, bias, bf16 out
                    (inputs pre-quantized; includes the Python binding's overhead)
sq_gemm_fp8         the same with fp8 e4m3
sq_linear_int8      static per-tensor ``segquant::quantize`` (bf16 -> int8) + ``qlinear``: the whole
                    quantized linear
sq_linear_fp8       the same with fp8 e4m3
seg24_linear_int8   input-segmented (24 heads): per-segment quantize + qlinear with 24 x_segments
                    (``sq_gemm_segmented``; the reference GEMM, labelled ``fallback``, where it cannot run)
seg24_linear_fp8    the same with fp8 e4m3
dual_linear_int8    DualScale: ``quantize_dual`` + ``qlinear(dual=True)`` (``sq_gemm_segmented``, 2 halves)
dual_linear_fp8     the same with fp8 e4m3
w4a8_linear_int8    W4A8: static per-tensor int8 quantize + qlinear with a packed int4 weight (unpacked to
                    int8 scratch each call, then sq_gemm: Hopper has no int4 tensor cores)
sm80_<variant>      opt-in (``--variants``): a segquant variant above on the CUTLASS 2 kernels (the sm_80 /
                    sm_89 path, forced on Hopper with ``cuda_kernels.gemm_path("sm80")``), e.g.
                    sm80_sq_gemm_int8, sm80_sq_gemm_fp8, sm80_dual_linear_int8
=================== ================================================================================

The summary also gives the segment and DualScale costs: ``seg24 / q+sq`` and ``dual / q+sq`` are the
times of the segmented and DualScale linears over the plain static quantized linear of the same type
(targets: <= 1.1 for segments; DualScale <= 2.0 at large M and <= 1.15 at M <= 16).

Columns: median time (us), TFLOP/s (2 M N K / t), % of 1979 TFLOP/s (H100 SXM dense 8-bit peak;
bf16 dense peak is 989), speedup vs bf16_linear, and vs the PyTorch 8-bit baseline of the same
type (int_mm for int8, scaled_mm for fp8). With ``--check`` (default), the relative error of each
segquant variant's output against the reference op (KernelPreference.REFERENCE) is reported too.
Benchmarks never assert: the exit code is 0 whatever happens (failures are listed).

Usage (on the GPU machine, after ``segquant-fx build-kernels``)::

    python benchmarks/kernels.py --quick --out $OUT/kernels.json
    python benchmarks/kernels.py --out results.json          # the full grid (several minutes)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Run from a checkout without installing: the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_8BIT_TFLOPS = 1979.0
PEAK_BF16_TFLOPS = 989.0
FULL_M = (1, 2, 256, 1024, 4096, 4608)
FULL_KN = (
    (3072, 3072),
    (3072, 9216),
    (3072, 12288),
    (12288, 3072),
    (15360, 3072),
    (3072, 18432),
    (1536, 1536),
    (1536, 6144),
    (6144, 1536),
)
QUICK_M = (1, 16, 4096)
QUICK_KN = ((3072, 3072), (3072, 12288), (12288, 3072), (1536, 1536))
L2_BYTES = 50 * 2**20
DEVICE = "cuda"  # --device cpu: a smoke test of this script on a machine without a GPU
VARIANTS = (
    "bf16_linear",
    "int_mm",
    "scaled_mm_fp8",
    "sq_gemm_int8",
    "sq_gemm_fp8",
    "sq_linear_int8",
    "sq_linear_fp8",
    "seg24_linear_int8",
    "seg24_linear_fp8",
    "dual_linear_int8",
    "dual_linear_fp8",
    "w4a8_linear_int8",
)
#: Opt-in variants: the named segquant variant on the CUTLASS 2 GEMM path.
SM80_PREFIX = "sm80_"
SM80_VARIANTS = tuple(SM80_PREFIX + v for v in VARIANTS if v.startswith(("sq_", "seg24", "dual", "w4a8")))
BASELINE_8BIT = {
    "sq_gemm_int8": "int_mm",
    "sq_linear_int8": "int_mm",
    "seg24_linear_int8": "int_mm",
    "dual_linear_int8": "int_mm",
    "seg24_linear_fp8": "scaled_mm_fp8",
    "dual_linear_fp8": "scaled_mm_fp8",
    "w4a8_linear_int8": "int_mm",
    "sq_gemm_fp8": "scaled_mm_fp8",
    "sq_linear_fp8": "scaled_mm_fp8",
}


@dataclass
class Result:
    m: int
    k: int
    n: int
    variant: str
    us: float | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    vs_bf16: float | None = None
    vs_8bit: float | None = None
    rel_err: float | None = None
    path: str = ""
    note: str = ""
    error: str | None = None
    eager_us: float | None = None  # per call, eager (includes Python / launch overhead)
    timing: str = ""  # "graph" (CUDA-graph replays: GPU time) or "eager"
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def _graph_bench(
    one: Callable[[dict], Any], sets: list[dict], warmup_ms: float, rep_ms: float
) -> float | None:
    """Median milliseconds per call of ``one`` over ``sets``, from replays of one CUDA graph.

    The graph holds one call per rotated input set, so a replay measures GPU time of back-to-back
    calls without Python or launch overhead (METHOD.md: time many small launches as graph replays).
    None when the variant cannot be captured (e.g. a reference fallback that syncs).
    """
    if DEVICE != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for s in sets:
                one(s)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [one(s) for s in sets]
        del outs
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - not capturable: the caller keeps the eager timing
        torch.cuda.synchronize()
        return None
    return _do_bench(graph.replay, warmup_ms, rep_ms) / len(sets)


def _do_bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, else CUDA events)."""
    if DEVICE != "cuda":
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return sorted(times)[1]
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:
        pass
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 1000):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Rotation:
    """Cycle through ``n`` input sets so that consecutive calls read different buffers."""

    def __init__(self, sets: list[tuple[Any, ...]]):
        self.sets = sets
        self.i = 0

    def next(self) -> tuple[Any, ...]:
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def _n_sets(bytes_per_set: int, max_sets: int = 32) -> int:
    return max(1, min(max_sets, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------


def _make_weights(k: int, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    from segquant_fx.ops import reference as R
    from segquant_fx.ops.formats import scale_from_amax

    w = torch.randn(n, k, generator=g, device=DEVICE) * 0.02
    ws8 = scale_from_amax(w.abs().amax(-1, keepdim=True), "int8")
    wsf8 = scale_from_amax(w.abs().amax(-1, keepdim=True), "fp8_e4m3")
    qw8 = R.reference_quantize(w, ws8, [], "int8")
    qwf8 = R.reference_quantize(w, wsf8, [], "fp8_e4m3")
    ws4 = scale_from_amax(w.abs().amax(-1, keepdim=True), "int4")
    return {
        "w_bf16": w.to(torch.bfloat16),
        "qw8": qw8,
        "ws8": ws8,
        "qw8_t": qw8.t(),
        "qwf8": qwf8,
        "wsf8": wsf8,
        "qwf8_t": qwf8.t(),
        "wsf8_row": wsf8.reshape(1, n).contiguous(),
        "qw4": R.reference_quantize(w, ws4, [], "int4"),
        "ws4": ws4,
        "bias": torch.randn(n, generator=g, device=DEVICE).to(torch.bfloat16),
    }


def _make_sets(m: int, k: int, n: int, n_sets: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n_sets`` independent input sets (activations, weights and scales) of one shape."""
    from segquant_fx.ops import reference as R
    from segquant_fx.ops.formats import scale_from_amax

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    heads = [k // 24] * 24
    sets = []
    for _ in range(n_sets):
        x = torch.randn(m, k, generator=g, device=DEVICE)
        x = x * torch.exp(0.5 * torch.randn(k, generator=g, device=DEVICE))  # outlier channels; never zeros
        xb = x.to(torch.bfloat16)
        xf = xb.float()
        qx8, xs8 = R.reference_quantize_dynamic(xf, [], "int8")
        qxf8, xsf8 = R.reference_quantize_dynamic(xf, [], "fp8_e4m3")
        amax = xf.abs().amax()
        seg_amax = torch.stack([c.abs().amax() for c in xf.split(heads, dim=-1)])
        pos, neg = xf.clamp(min=0).amax(), xf.clamp(max=0).amin().abs()
        sets.append(
            {
                **_make_weights(k, n, g),
                "x": xb,
                "qx8": qx8,
                "xs8": xs8,
                "qxf8": qxf8,
                "xsf8": xsf8,
                "xs8_t": scale_from_amax(amax, "int8").reshape(1),
                "xsf8_t": scale_from_amax(amax, "fp8_e4m3").reshape(1),
                "xs8_seg": scale_from_amax(seg_amax, "int8"),
                "xsf8_seg": scale_from_amax(seg_amax, "fp8_e4m3"),
                "xs_pos": (pos.clamp(min=2.0**-24) / 127).reshape(1),
                "xs_neg": (neg.clamp(min=2.0**-24) / 128).reshape(1),
                "xsf8_pos": (pos.clamp(min=2.0**-24) / 448).reshape(1),
                "xsf8_neg": (neg.clamp(min=2.0**-24) / 448).reshape(1),
            }
        )
    return sets


def _variant_fn(name: str, rot: Rotation, k: int) -> tuple[Callable[[], Any], Callable[[dict], Any] | None]:
    """(timed closure, a function computing the output of one set for checking) of a variant."""
    ops = torch.ops.segquant
    heads = [k // 24] * 24
    name = _base(name)

    def one(s: dict) -> Any:
        if name == "bf16_linear":
            return F.linear(s["x"], s["w_bf16"], s["bias"])
        if name == "int_mm":
            return torch._int_mm(s["qx8"], s["qw8_t"])
        if name == "scaled_mm_fp8":
            return torch._scaled_mm(
                s["qxf8"], s["qwf8_t"], scale_a=s["xsf8"], scale_b=s["wsf8_row"], out_dtype=torch.bfloat16
            )
        if name == "sq_gemm_int8":
            return ops.qlinear(
                s["qx8"],
                s["xs8"],
                [],
                "int8",
                s["qw8"],
                s["ws8"],
                [],
                "int8",
                s["bias"],
                False,
                torch.bfloat16,
            )
        if name == "sq_gemm_fp8":
            return ops.qlinear(
                s["qxf8"],
                s["xsf8"],
                [],
                "fp8_e4m3",
                s["qwf8"],
                s["wsf8"],
                [],
                "fp8_e4m3",
                s["bias"],
                False,
                torch.bfloat16,
            )
        if name == "sq_linear_int8":
            q = ops.quantize(s["x"], s["xs8_t"], [], "int8", None)
            return ops.qlinear(
                q, s["xs8_t"], [], "int8", s["qw8"], s["ws8"], [], "int8", s["bias"], False, torch.bfloat16
            )
        if name == "sq_linear_fp8":
            q = ops.quantize(s["x"], s["xsf8_t"], [], "fp8_e4m3", None)
            return ops.qlinear(
                q,
                s["xsf8_t"],
                [],
                "fp8_e4m3",
                s["qwf8"],
                s["wsf8"],
                [],
                "fp8_e4m3",
                s["bias"],
                False,
                torch.bfloat16,
            )
        if name.startswith("seg24_linear"):
            qt, f = ("int8", "8") if name.endswith("int8") else ("fp8_e4m3", "f8")
            xs = s[f"xs{f}_seg"]
            q = ops.quantize(s["x"], xs, heads, qt, None)
            return ops.qlinear(
                q, xs, heads, qt, s[f"qw{f}"], s[f"ws{f}"], [], qt, s["bias"], False, torch.bfloat16
            )
        if name.startswith("dual_linear"):
            qt, f, p = ("int8", "8", "xs") if name.endswith("int8") else ("fp8_e4m3", "f8", "xsf8")
            q = ops.quantize_dual(s["x"], s[f"{p}_pos"], s[f"{p}_neg"], [], qt, None)
            xs = torch.cat([s[f"{p}_pos"], s[f"{p}_neg"]])
            return ops.qlinear(
                q, xs, [], qt, s[f"qw{f}"], s[f"ws{f}"], [], qt, s["bias"], True, torch.bfloat16
            )
        if name == "w4a8_linear_int8":
            q = ops.quantize(s["x"], s["xs8_t"], [], "int8", None)
            return ops.qlinear(
                q, s["xs8_t"], [], "int8", s["qw4"], s["ws4"], [], "int4", s["bias"], False, torch.bfloat16
            )
        raise ValueError(name)

    def timed() -> Any:
        return one(rot.next())

    return timed, (one if name.startswith(("sq_", "seg24", "dual", "w4a8")) else None)


def _base(name: str) -> str:
    """The variant an ``sm80_`` variant runs (itself for the others)."""
    return name[len(SM80_PREFIX) :] if name.startswith(SM80_PREFIX) else name


def _gemm_path_for(name: str) -> Any:
    """The CUTLASS 2 GEMM path for ``sm80_`` variants, else nothing."""
    import contextlib

    from segquant_fx.ops import cuda_kernels as ck

    if not name.startswith(SM80_PREFIX) or not (ck.is_available() and ck.has_sm80_gemm()):
        return contextlib.nullcontext()  # no path switch: _path_of labels the variant a fallback
    return ck.gemm_path("sm80")


def _path_of(name: str, m: int, k: int, n: int) -> tuple[str, str]:
    """('cuda' | 'fallback' | 'torch', note) for a variant."""
    if name.startswith(SM80_PREFIX):
        from segquant_fx.ops import cuda_kernels as ck

        if not ck.is_available() or DEVICE != "cuda":
            return "fallback", f"library unavailable: {ck.unavailable_reason()}"
        if not ck.has_sm80_gemm():
            return "fallback", "no CUTLASS 2 GEMM path in the loaded library (API version 1)"
        with ck.gemm_path("sm80"):
            path, note = _path_of(_base(name), m, k, n)
        return path, ("CUTLASS 2 path; " + note).rstrip("; ")
    if not name.startswith(("sq_", "seg24", "dual", "w4a8")):
        note = {
            "int_mm": "int32 out, no scale/bias",
            "scaled_mm_fp8": "row-wise scales, no bias",
        }.get(name, "")
        return "torch", note
    from segquant_fx.ops import cuda_kernels as ck
    from segquant_fx.ops import reference as R

    if not ck.is_available() or DEVICE != "cuda":
        return "fallback", f"library unavailable: {ck.unavailable_reason()}"
    qtype = "fp8_e4m3" if name.endswith("fp8") else "int8"
    segs = [k // 24] * 24 if name.startswith("seg24") else []
    dual = name.startswith("dual")
    dev = "meta"
    qx = torch.empty(
        m, (2 if dual else 1) * k, dtype=torch.int8 if qtype == "int8" else torch.float8_e4m3fn, device=dev
    )
    qw = (
        torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
        if name.startswith("w4a8")
        else torch.empty(n, k, dtype=qx.dtype, device=dev)
    )
    xs = torch.empty(2 if dual else (len(segs) or 1), device=dev)
    w_qtype = "int4" if name.startswith("w4a8") else qtype
    spec = R.infer_qlinear(
        qx, xs, segs, qtype, qw, torch.empty(n, 1, device=dev), [], w_qtype, None, dual, torch.bfloat16
    )
    reason = ck.qlinear_unsupported_reason(spec, torch.empty(1, device="cuda"), torch.bfloat16, xs)
    if reason is not None:
        return "fallback", f"qlinear falls back: {reason}"
    return "cuda", ""


def run_case(m: int, k: int, n: int, args: argparse.Namespace, seed: int) -> list[Result]:
    # Activations and weights in bf16, int8 and fp8: rotate whole sets so that no call finds its
    # operands in L2 (triton's do_bench also clears L2 between calls; the event timer does not).
    bytes_per_set = (m + n) * k * (2 + 1 + 1) + 16 * (m + n)
    sets = _make_sets(m, k, n, _n_sets(bytes_per_set, args.max_sets), seed)
    rot = Rotation(sets)
    results: dict[str, Result] = {}
    for name in args.variants:
        r = Result(m, k, n, name)
        r.path, r.note = _path_of(name, m, k, n)
        results[name] = r
        if name == "int_mm" and m <= 16:
            r.error = "n/a: torch._int_mm needs M > 16"
            continue
        timed, one = _variant_fn(name, rot, k)
        with _gemm_path_for(name):
            _time_variant(r, timed, one, sets, args)
    base = results.get("bf16_linear")
    for r in results.values():
        if r.us is None:
            continue
        if base is not None and base.us:
            r.vs_bf16 = base.us / r.us
        b8 = results.get(BASELINE_8BIT.get(_base(r.variant), ""))
        if b8 is not None and b8.us:
            r.vs_8bit = b8.us / r.us
    return list(results.values())


def _time_variant(
    r: Result,
    timed: Callable[[], Any],
    one: Callable[[dict], Any] | None,
    sets: list[dict],
    args: argparse.Namespace,
) -> None:
    """Time one variant into ``r`` (eager, then CUDA graph when capturable) and check its output."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            one_out = timed()  # compile / load / first-call costs outside the timing
            _sync()
            del one_out
            ms = _do_bench(timed, args.warmup_ms, args.rep_ms if r.path != "fallback" else args.rep_ms / 4)
    except Exception as e:  # noqa: BLE001 - a benchmark reports failures, it never stops on them
        r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if args.verbose:
            traceback.print_exc()
        return
    r.eager_us = ms * 1000
    r.timing = "eager"
    if one is not None and r.path != "fallback" and not args.eager:
        gms = _graph_bench(one, sets, args.warmup_ms, args.rep_ms)
        if gms is not None:
            ms = gms
            r.timing = "graph"
    r.us = ms * 1000
    r.tflops = 2.0 * r.m * r.n * r.k / (ms * 1e-3) / 1e12
    r.pct_peak = 100 * r.tflops / PEAK_8BIT_TFLOPS
    if args.check and one is not None:
        r.rel_err = _check(one, sets[0])


def _check(one: Callable[[dict], Any], s: dict) -> float | None:
    from segquant_fx.ops.kernel_preference import KernelPreference, use_kernel_preference

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = one(s)
            with use_kernel_preference(KernelPreference.REFERENCE):
                ref = one(s)
        g, r = got.double(), ref.double()
        return float((g - r).norm() / r.norm().clamp(min=1e-300))
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(results: list[Result]) -> str:
    lines = [
        "| M | K | N | variant | path | us | TFLOP/s | % of 1979 | x bf16 | x 8-bit base | rel err | note |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        note = r.error or r.note
        lines.append(
            f"| {r.m} | {r.k} | {r.n} | {r.variant} | {r.path} | {_f(r.us, '.1f')} | {_f(r.tflops, '.1f')} | "
            f"{_f(r.pct_peak, '.1f')} | {_f(r.vs_bf16, '.2f')} | {_f(r.vs_8bit, '.2f')} | {_f(r.rel_err, '.1e')} | "
            f"{note[:80]} |"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """One row per shape: the time of each variant (us) and the sq int8/fp8 speedups."""
    by_shape: dict[tuple[int, int, int], dict[str, Result]] = {}
    for r in results:
        by_shape.setdefault((r.m, r.k, r.n), {})[r.variant] = r
    cols = [v for v in VARIANTS if any(v in d for d in by_shape.values())]
    short = {
        "bf16_linear": "bf16",
        "int_mm": "int_mm",
        "scaled_mm_fp8": "scaled_mm",
        "sq_gemm_int8": "sq i8",
        "sq_gemm_fp8": "sq f8",
        "sq_linear_int8": "q+sq i8",
        "sq_linear_fp8": "q+sq f8",
        "seg24_linear_int8": "seg24 i8",
        "seg24_linear_fp8": "seg24 f8",
        "dual_linear_int8": "dual i8",
        "dual_linear_fp8": "dual f8",
        "w4a8_linear_int8": "w4a8",
    }
    head = (
        "| M | K | N | "
        + " | ".join(short[c] + " us" for c in cols)
        + " | sq i8 x bf16 | sq f8 x bf16 | q+sq i8 x bf16 | seg24/q+sq i8 | dual/q+sq i8 | seg24/q+sq f8 "
        "| dual/q+sq f8 | sq i8 eager us |"
    )
    lines = [head, "|" + "---:|" * (3 + len(cols) + 8)]

    def ratio(d: dict[str, Result], a: str, b: str) -> float | None:
        ra, rb = d.get(a), d.get(b)
        if ra is None or rb is None or not ra.us or not rb.us or ra.path == "fallback":
            return None
        return ra.us / rb.us

    for (m, k, n), d in by_shape.items():
        cells = [_f(d[c].us, ".1f") if c in d else "" for c in cols]
        i8 = d.get("sq_gemm_int8")
        f8 = d.get("sq_gemm_fp8")
        q8 = d.get("sq_linear_int8")
        lines.append(
            f"| {m} | {k} | {n} | " + " | ".join(cells) + f" | {_f(i8.vs_bf16 if i8 else None, '.2f')} | "
            f"{_f(f8.vs_bf16 if f8 else None, '.2f')} | {_f(q8.vs_bf16 if q8 else None, '.2f')} | "
            f"{_f(ratio(d, 'seg24_linear_int8', 'sq_linear_int8'), '.2f')} | "
            f"{_f(ratio(d, 'dual_linear_int8', 'sq_linear_int8'), '.2f')} | "
            f"{_f(ratio(d, 'seg24_linear_fp8', 'sq_linear_fp8'), '.2f')} | "
            f"{_f(ratio(d, 'dual_linear_fp8', 'sq_linear_fp8'), '.2f')} | "
            f"{_f(i8.eager_us if i8 else None, '.1f')} |"
        )
    lines.append(
        "(us = median microseconds per call from CUDA-graph replays over rotated inputs (GPU time), for every "
        "variant that captures; reference fallbacks are timed eagerly and have no ratio; 'eager us' = per-call "
        "time of eager calls, "
        "Python and launch overhead included)"
    )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from segquant_fx.ops import cuda_kernels as ck

        env["library"] = str(ck.library_path())
        env["library_reason"] = ck.unavailable_reason()
        env["has_gemm"] = ck.has_gemm()
    except Exception as e:  # noqa: BLE001
        env["library_reason"] = f"{type(e).__name__}: {e}"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}, shapes {QUICK_KN}")
    p.add_argument("--m", type=lambda s: tuple(int(v) for v in s.split(",")), default=None, help="M list")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--max-sets", type=int, default=16, help="most rotated input sets per shape")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the error check vs reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="time eager calls only (no CUDA-graph replays)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test of the script
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS + SM80_VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; use {', '.join(VARIANTS + SM80_VARIANTS)}", file=sys.stderr)
        return 0
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device; nothing to measure", file=sys.stderr)
        return 0
    import segquant_fx.ops  # noqa: F401 - registers torch.ops.segquant

    ms = args.m or (QUICK_M if args.quick else FULL_M)
    kns = QUICK_KN if args.quick else FULL_KN
    env = environment()
    print(json.dumps(env), flush=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    for i, ((k, n), m) in enumerate(itertools.product(kns, ms)):
        t = time.perf_counter()
        try:
            rs = run_case(m, k, n, args, args.seed + i)
        except Exception as e:  # noqa: BLE001
            rs = [Result(m, k, n, "all", error=f"{type(e).__name__}: {e}")]
            if args.verbose:
                traceback.print_exc()
        results.extend(rs)
        print(f"M={m} K={k} N={n}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": [asdict(r) for r in results]}, f, indent=1)
    errors = [r for r in results if r.error and not r.error.startswith("n/a")]
    print(f"\n{len(results)} measurements in {time.perf_counter() - t0:.0f} s; {len(errors)} failed")
    for r in errors:
        print(f"  FAILED M={r.m} K={r.k} N={r.n} {r.variant}: {r.error}")
    print()
    print(markdown(results))
    print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
