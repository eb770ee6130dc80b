#!/usr/bin/env python
"""Benchmark: distributed calibration-set generation + quantization on 1, 2, 4 processes.

For every process count ``N`` of ``--nprocs`` (default ``1,2,4``) the launcher starts

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/distributed_calib.py --worker ...

and each run (``--worker``; torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) does, timed between
barriers on process 0:

1. ``build``: the pipeline ``--model`` on this process's device (``cuda:LOCAL_RANK`` with NCCL, or the
   CPU with gloo); random weights from the published configs, nothing is downloaded (not counted);
2. ``generate``: ``generate_calibrate_set`` over ``--prompts`` synthetic prompts (process ``r`` runs
   prompts ``r, r + N, ...``), written to ``--out/calib-N`` (each process its chunks, process 0 the
   manifest);
3. ``quantize``: ``segquant_fx.quantize(backbone, calib_set, --preset)``: capture, each process
   calibrates its block of items, statistics reduced, optimizers, rewrite (its own phase timings are
   reported too).

Scaling efficiency of a phase: ``E(N) = T(1) / (N * T(N))`` (1.0 = perfect). The launcher prints one
table (seconds per phase, efficiency of generate, quantize and their sum) and whether every ``N``
produced the same calibration set and the same quantized model (sha256 of every item / stored tensor:
the distributed result is meant to be bit-identical). Results: ``--out/results.json``.

Commands::

    # CPU smoke test (gloo; tiny pipeline; about a minute)
    python benchmarks/distributed_calib.py --model tiny-sd3 --device cpu --nprocs 1,2 --prompts 8 \\
        --steps 4 --timestep-per-sample 2 --out /tmp/dcalib

    # FLUX.1-dev, full size (random weights), on a host with 4 GPUs (H100 80 GB: ~35 GB per process)
    python benchmarks/distributed_calib.py --model flux-dev --device cuda --nprocs 1,2,4 --prompts 64 \\
        --steps 20 --timestep-per-sample 4 --height 1024 --width 1024 --preset w8a8 --out /tmp/dcalib-flux

    # one run by hand (what the launcher starts)
    torchrun --standalone --nproc-per-node 4 benchmarks/distributed_calib.py --worker --model flux-dev \\
        --device cuda --prompts 64 --steps 20 --timestep-per-sample 4 --out /tmp/dcalib-flux

The generation phase is embarrassingly parallel (efficiency ~1 when ``--prompts`` is a multiple of
``N``); in ``quantize`` the capture, the optimizers and the rewrite run in every process (only the
calibration pass is shared), so its efficiency grows with the number of calibration items.
Benchmarks never assert: exit code 0 whatever the numbers (unless a run fails).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py shadows the
# ``kernels`` package that diffusers imports (when installed): drop it.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

#: Defaults per model family: image size, text length.
_SIZES = {"flux-dev": (1024, 1024, 512), "sd35-medium": (1024, 1024, 256), "sdxl-base": (1024, 1024, None)}
_SUBJECTS = ["fox", "car", "tree", "lighthouse", "teapot", "robot", "castle", "violin", "bicycle", "owl"]
_STYLES = ["oil painting", "photo", "watercolor", "pencil sketch", "3d render", "pixel art", "ink drawing"]


def prompts(n: int) -> list[str]:
    """``n`` distinct synthetic prompts (deterministic)."""
    return [
        f"a {_STYLES[i % len(_STYLES)]} of a {_SUBJECTS[(i // len(_STYLES)) % len(_SUBJECTS)]}, variant {i}"
        for i in range(n)
    ]


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="tiny-sd3",
        help="built-in pipeline (segquant_fx.models.pipeline_zoo), e.g. flux-dev",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--nprocs", default="1,2,4", help="process counts to run (launcher)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="num_inference_steps")
    ap.add_argument("--timestep-per-sample", type=int, default=2)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--max-sequence-length", type=int, default=None)
    ap.add_argument(
        "--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)"
    )
    ap.add_argument("--preset", default="w8a8")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per process (CPU; default: cores // max N)",
    )
    ap.add_argument("--out", default="dcalib-out")
    ap.add_argument("--no-digest", action="store_true", help="skip the sha256 of the set and of the model")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout-s", type=float, default=7200.0, help="per run (launcher)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# one run (a torchrun process)
# --------------------------------------------------------------------------------------------------


def _digest_tensors(tensors: Any) -> str:
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _set_digest(calib: Any) -> str:
    import torch
    from torch.utils import _pytree as pytree

    def leaves() -> Any:
        for i in range(len(calib)):
            yield from (x for x in pytree.tree_leaves(calib[i]) if isinstance(x, torch.Tensor))

    return _digest_tensors(leaves())


def worker(args: argparse.Namespace) -> None:
    """One process of a run: build, generate, quantize; process 0 writes ``results_N.json``."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    # a process waits for the slowest one at every phase's end: allow long phases (full-size models)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        _run(args, rank, world, local, cuda)
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, local: int, cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    import segquant_fx
    from segquant_fx.calibset import UniformSampler, generate_calibrate_set, load_calibrate_set
    from segquant_fx.models.pipeline_zoo import PIPELINES, build_pipeline
    from segquant_fx.models.pipelines import backbone_of

    def barrier() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    spec = PIPELINES[args.model]
    h, w, seq = _SIZES.get(args.model, (32, 32, 16))
    height, width = args.height or h, args.width or w
    seq = args.max_sequence_length or seq
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    times: dict[str, float] = {}

    t = time.perf_counter()
    pipe = build_pipeline(args.model, device=device, dtype=dtype)
    barrier()
    times["build"] = time.perf_counter() - t

    kw: dict[str, Any] = {"height": height, "width": width}
    if seq is not None and spec.family != "sdxl":
        kw["max_sequence_length"] = seq
    out = Path(args.out)
    dump = out / f"calib-{world}"
    barrier()
    t = time.perf_counter()
    calib = generate_calibrate_set(
        pipe,
        UniformSampler(),
        prompts(args.prompts),
        "unet" if spec.family == "sdxl" else "transformer",
        dump_path=dump,
        num_inference_steps=args.steps,
        timestep_per_sample=args.timestep_per_sample,
        progress=rank == 0,
        **kw,
    )
    barrier()
    times["generate"] = time.perf_counter() - t

    backbone = backbone_of(pipe, "unet" if spec.family == "sdxl" else "transformer")
    barrier()
    t = time.perf_counter()
    items = load_calibrate_set(dump, device=device)  # each process reads only its block of items
    qmodel = segquant_fx.quantize(backbone, items, args.preset, progress=rank == 0)
    barrier()
    times["quantize"] = time.perf_counter() - t
    if rank != 0:
        return
    result = {
        "world_size": world,
        "model": args.model,
        "preset": args.preset,
        "device": torch.cuda.get_device_name(local) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "items": len(calib),
        "image": [height, width],
        "steps": args.steps,
        "timestep_per_sample": args.timestep_per_sample,
        "times_s": {k: round(v, 3) for k, v in times.items()},
        "quantize_phases_s": qmodel.meta.get("timings", {}),
        "items_per_process": qmodel.meta.get("distributed", {}).get("items_per_process", [len(calib)]),
    }
    if not args.no_digest:
        result["set_sha256"] = _set_digest(calib)
        result["model_sha256"] = _digest_tensors(qmodel.state_dict().values())
    (out / f"results_{world}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# the launcher
# --------------------------------------------------------------------------------------------------


def _efficiency(t1: float | None, tn: float, n: int) -> str:
    return "" if t1 is None or tn <= 0 else f"{t1 / (n * tn):.2f}"


def report(results: list[dict[str, Any]]) -> str:
    """A markdown table: seconds per phase and scaling efficiency vs the smallest process count."""
    results = sorted(results, key=lambda r: r["world_size"])
    base = results[0]
    n0 = base["world_size"]

    def total(r: dict[str, Any]) -> float:
        return r["times_s"]["generate"] + r["times_s"]["quantize"]

    lines = [
        "| processes | items per process | generate s | quantize s (calibrate s) | total s | eff. generate | "
        "eff. quantize | eff. total | same set | same model |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        n = r["world_size"] // n0  # efficiency relative to the first row
        t, b = r["times_s"], base["times_s"]
        cal = r["quantize_phases_s"].get("calibrate", float("nan"))
        lines.append(
            f"| {r['world_size']} | {r['items_per_process']} | {t['generate']:.2f} | {t['quantize']:.2f} ({cal:.2f}) | "
            f"{total(r):.2f} | {_efficiency(b['generate'], t['generate'], n)} | "
            f"{_efficiency(b['quantize'], t['quantize'], n)} | {_efficiency(total(base), total(r), n)} | "
            f"{'yes' if r.get('set_sha256') == base.get('set_sha256') else 'NO'} | "
            f"{'yes' if r.get('model_sha256') == base.get('model_sha256') else 'NO'} |"
        )
    return "\n".join(lines)


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the worker under torchrun for every N of ``--nprocs``; print and save the table."""
    import shutil

    counts = [int(x) for x in args.nprocs.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    forwarded = [a for a in argv if not a.startswith("--nprocs")]
    if "--nprocs" in argv:  # "--nprocs 1,2" form: drop the value too
        i = argv.index("--nprocs")
        forwarded = argv[:i] + argv[i + 2 :]
    if args.device == "cpu" and args.threads is None:
        forwarded += ["--threads", str(max(1, (os.cpu_count() or 1) // max(counts)))]
    results = []
    for n in counts:
        shutil.rmtree(out / f"calib-{n}", ignore_errors=True)  # a fresh set: generation is timed
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
        ]
        cmd += ["--worker", *forwarded]
        print("$", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, timeout=args.timeout_s)
        if proc.returncode != 0:
            print(f"run with {n} processes failed (exit {proc.returncode})", flush=True)
            return proc.returncode
        results.append(json.loads((out / f"results_{n}.json").read_text()))
    table = report(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the launcher, or one torchrun process with ``--worker``."""
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        worker(args)
        return 0
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
