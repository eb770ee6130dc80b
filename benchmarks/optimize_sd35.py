#!/usr/bin/env python
"""Benchmark: SmoothQuant + per-segment alpha search + GPTQ on the SD3.5-medium transformer.

Builds the zoo model (random weights, deterministic), streams ``--items`` calibration items (the
zoo's example inputs, 1024px: ``[B, 16, 128, 128]`` latents, 333 text tokens) and quantizes it with
``--preset`` (default ``segquant-g-w8a8``: SegLinear + DualScale, SmoothQuant with a per-segment alpha
grid search 0..1 step 0.1 on layer-local input reservoirs, one smoothing vector per output segment,
GPTQ weights, AMax activations). Prints the wall time of every phase (build, capture + pattern
matching, calibration, alpha search, GPTQ, rewrite), the peak GPU memory, and the relative error of
the quantized output on a held-out input. The issue's target, on one H100 for ``sd35-medium`` with
32 items: quantization (capture to quantized model) <= 10 minutes.

Everything runs on ``--device``: the model and calibration, Hessian accumulation (or in CPU memory
with ``--hessian-cpu``), the alpha search (batched matmuls on the reservoirs) and GPTQ (batched over
layers of equal shape).

Usage::

    python benchmarks/optimize_sd35.py --model sd35-medium --items 32 --device cuda     # H100 run
    python benchmarks/optimize_sd35.py --model tiny-sd35 --items 4 --device cpu         # CPU smoke test

On a busy CPU, ``--threads 1`` avoids intra-op thread contention (tiny models: ~10x faster).

Benchmarks never assert: the exit code is 0 whatever the verdict.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

TARGET_S = 600.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: int) -> float:
    return n / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd35-medium", help="zoo model (sd35-medium, tiny-sd35, ...)")
    p.add_argument("--items", type=int, default=32, help="calibration items")
    p.add_argument("--batch-size", type=int, default=2, help="samples per item (2 = one CFG pair)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--preset", default="segquant-g-w8a8", help="quantization preset")
    p.add_argument("--rows", type=int, default=None, help="alpha-search reservoir rows per layer input")
    p.add_argument("--grid-step", type=float, default=None, help="alpha grid step (default: the preset's)")
    p.add_argument("--hessian-cpu", action="store_true", help="keep GPTQ Hessians in CPU memory")
    p.add_argument("--fake-quant", action="store_true", help="emit fake quantization (real_quant: false)")
    p.add_argument("--no-check", action="store_true", help="skip the quantized-vs-float forward")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from segquant_fx.api import calibrate_and_finish, prepare
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.models import build_model, get_model_spec

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    over: dict = {}
    sac: dict = {}
    if args.rows is not None:
        sac["rows"] = args.rows
    if args.grid_step is not None:
        sac["step"] = args.grid_step
    if sac:
        over.setdefault("opt", {})["search_alpha_config"] = sac
    if args.hessian_cpu:
        over["calib"] = {"cpu_storage": True}
    if args.fake_quant:
        over["real_quant"] = False
    cfg = QuantizeConfig.coerce(args.preset)
    if over:
        cfg = cfg.with_overrides({"default": over})
    spec = get_model_spec(args.model)

    times: dict[str, float] = {}
    t_all = time.perf_counter()
    t = time.perf_counter()
    model, _ = build_model(args.model, batch_size=args.batch_size, device=device, dtype=dtype)
    _sync(device)
    times["build model"] = time.perf_counter() - t
    n_params = sum(x.numel() for x in model.parameters())

    def items():
        for i in range(args.items):
            yield spec.example(args.batch_size, device=device, dtype=dtype, sample_seed=1000 + i)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_model = torch.cuda.memory_allocated(device)
    stream = items()
    first = next(stream)
    t_q = time.perf_counter()
    prepared = prepare(model, first, cfg)
    _sync(device)
    times["capture + patterns + annotate"] = time.perf_counter() - t_q
    qmodel = calibrate_and_finish(prepared, itertools.chain([first], stream), progress=not args.no_progress)
    _sync(device)
    quantize_s = time.perf_counter() - t_q
    meta_t = qmodel.meta["timings"]
    opt_t = qmodel.meta["optimizer"]["timings"]
    times["calibration pass"] = meta_t["calibrate"]
    times["optimize (total)"] = meta_t["optimize"]
    times["  alpha search"] = opt_t.get("search", 0.0)
    times["  GPTQ"] = opt_t.get("gptq", 0.0)
    times["  SVD"] = opt_t.get("svd", 0.0)
    times["  scales, rounding, other"] = max(
        0.0, meta_t["optimize"] - sum(opt_t.get(k, 0.0) for k in ("search", "gptq", "svd"))
    )
    times["rewrite"] = meta_t["rewrite"]
    times["quantize total (capture to model)"] = quantize_s
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    err = None
    if not args.no_check:
        t = time.perf_counter()
        ex = spec.example(args.batch_size, device=device, dtype=dtype, sample_seed=999)
        with torch.no_grad():
            ref = model(**ex, return_dict=False)[0].float()
            out = qmodel(**ex, return_dict=False)[0].float()
        err = float((out - ref).norm() / ref.norm())
        _sync(device)
        times["check forward (not in total)"] = time.perf_counter() - t
    times["wall clock (everything)"] = time.perf_counter() - t_all

    opt = qmodel.meta["optimizer"]
    layers = opt["layers"]
    alphas = [a for lay in layers.values() if lay.get("alphas") for g in lay["alphas"] for a in g]
    fallbacks = sum(bool(lay.get("gptq_fallback")) for lay in layers.values())
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"\n## optimize_sd35: {args.model}, {args.items} items x batch {args.batch_size}, {dtype}, {device_name}"
    )
    print(
        f"preset {args.preset}; {len(qmodel.plan)} quantized linears, {n_params / 1e9:.3f} B params; torch {torch.__version__}"
    )
    print("\n| phase | seconds |\n|---|---:|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} |")
    print(
        f"\nalpha search: {opt['search_evaluations']} candidate evaluations, {opt['search_skipped']} resumed; "
        f"chosen alphas mean {sum(alphas) / max(1, len(alphas)):.3f} over {len(alphas)} segments"
    )
    print(f"GPTQ fallbacks to round-to-nearest: {fallbacks}")
    if peak is not None:
        print(
            f"peak GPU memory during quantization: {_gib(peak):.2f} GiB (model alone {_gib(mem_model):.2f} GiB)"
        )
    if err is not None:
        print(f"relative output error vs float on a held-out input: {err:.4f}")
    verdict = None
    if args.model == "sd35-medium" and device.type == "cuda":
        verdict = "PASS" if quantize_s <= TARGET_S else "FAIL"
        print(f"target: quantize total <= {TARGET_S:.0f} s: {quantize_s:.1f} s -> {verdict}")
    result = {
        "model": args.model,
        "items": args.items,
        "batch_size": args.batch_size,
        "device": device_name,
        "dtype": str(dtype),
        "preset": args.preset,
        "quantized_linears": len(qmodel.plan),
        "times_s": {k.strip(): round(v, 3) for k, v in times.items()},
        "peak_gpu_gib": round(_gib(peak), 3) if peak is not None else None,
        "search_evaluations": opt["search_evaluations"],
        "gptq_fallbacks": fallbacks,
        "relative_error": err,
        "verdict": verdict,
    }
    print("\n" + json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
