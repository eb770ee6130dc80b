#!/usr/bin/env python
"""Train the built-in tiny text-to-image models (``segquant_fx.t2i``): mmdit, flux, unet.

    python3 benchmarks/train_t2i.py --model all --device cuda --time-budget-s 400 --out $OUT/t2i --pack tar

Each model trains on procedural colored-shape images generated on the fly on the device (bf16 autocast on
GPU, AdamW + EMA, text dropout for CFG), stops at ``--steps`` or ``--time-budget-s`` seconds of training,
saves float16 EMA weights + model card, measures prompt adherence of the saved weights on a fixed held-out
prompt set (and the chance level), and writes a PNG sample grid. See ``segquant_fx/t2i/train.py``.

``--model all`` trains the three models concurrently, as three processes on the same device (their
output lines are prefixed with the model name), and writes ``summary.json`` with each card's headline
numbers. With ``--pack tar`` the output directory is flat:

    OUT/t2i-mmdit.tar  OUT/t2i-flux.tar  OUT/t2i-unet.tar        (weights, card, samples, log; ~7-8 MB each)
    OUT/mmdit-samples.png  OUT/flux-samples.png  OUT/unet-samples.png
    OUT/summary.json                                              (--model all)

Install trained weights into the package with ``python3 -m segquant_fx.t2i install OUT/t2i-*.tar``.

Dependencies: torch, diffusers (+ its own: safetensors, numpy, huggingface_hub, ...). Nothing else.
Wall time per model is about budget + 30-60 s (start-up, evaluation at 4 guidance scales, saving).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python3 benchmarks/train_t2i.py` puts benchmarks/ first on sys.path, where kernels.py would shadow the
# `kernels` package that transformers (imported by diffusers when installed) looks for; use the repository
# root instead, which also makes segquant_fx importable from a plain checkout without `pip install -e .`
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if (os.path.abspath(p) if p else os.getcwd()) != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("mmdit", "flux", "unet")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, choices=(*MODELS, "all"))
    p.add_argument("--steps", type=int, default=100_000, help="maximum optimizer steps (default 100000)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per model)")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts for adherence (0: skip)")
    p.add_argument(
        "--eval-steps", type=int, default=None, help="sampling steps for evaluation (default: per model)"
    )
    p.add_argument("--eval-guidances", default="1,2,3.5,5", help="comma-separated guidance scales to measure")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--grid-prompts", type=int, default=32)
    p.add_argument(
        "--pack", choices=("dir", "tar"), default="dir", help="tar: one flat tar per model (for remote runs)"
    )
    p.add_argument("--sequential", action="store_true", help="with --model all: one model after the other")
    p.add_argument(
        "--arch", choices=("full", "small"), default="full", help="small: reduced test variant (smoke runs)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _config(args: argparse.Namespace, model: str):
    from segquant_fx.t2i.train import config_for

    return config_for(
        model,
        steps=args.steps,
        time_budget_s=args.time_budget_s,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        amp=args.amp,
        log_every=args.log_every,
        eval_prompts=args.eval_prompts,
        eval_steps=args.eval_steps,
        eval_guidances=tuple(float(g) for g in args.eval_guidances.split(",") if g.strip()),
        eval_batch_size=args.eval_batch_size,
        grid_prompts=args.grid_prompts,
        device=args.device,
        arch=args.arch,
    )


def _headline(card: dict) -> dict:
    ev = card.get("evaluation", {})
    tr = card.get("training", {})
    return {
        "steps": tr.get("steps_done"),
        "steps_per_second": tr.get("steps_per_second"),
        "final_loss": tr.get("final_loss"),
        "best_guidance": ev.get("best_guidance"),
        "adherence": ev.get("adherence"),
        "chance": ev.get("chance"),
        "evaluation_error": card.get("evaluation_error"),
    }


def _read_card(out: Path, model: str) -> dict | None:
    d = out / model / "model_card.json"
    if d.is_file():
        return json.loads(d.read_text())
    tar = out / f"t2i-{model}.tar"
    if tar.is_file():
        with tarfile.open(tar) as tf:
            f = tf.extractfile(f"{model}/model_card.json")
            return json.loads(f.read()) if f is not None else None
    return None


def _run_all(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the children get the same arguments with one --model each
    base = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--model":
            skip = True
            continue
        if a.startswith("--model=") or a == "--sequential":
            continue
        base.append(a)
    grace = 600.0
    deadline = None if args.time_budget_s is None else args.time_budget_s + grace
    t0 = time.perf_counter()
    rcs: dict[str, int] = {}

    def pump(name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            print(f"{name:>5} | {line}", end="", flush=True)

    def start(name: str) -> tuple[subprocess.Popen, threading.Thread]:
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--model", name, *base]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        th = threading.Thread(target=pump, args=(name, proc), daemon=True)
        th.start()
        return proc, th

    def wait(name: str, proc: subprocess.Popen, th: threading.Thread) -> None:
        try:
            left = None if deadline is None else max(1.0, deadline - (time.perf_counter() - t0))
            rcs[name] = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            print(f"{name:>5} | still running {grace:.0f} s after the time budget: terminating", flush=True)
            proc.terminate()
            rcs[name] = proc.wait()
        th.join(timeout=5)

    if args.sequential:
        for name in MODELS:
            wait(name, *start(name))
    else:
        procs = {name: start(name) for name in MODELS}
        for name, (proc, th) in procs.items():
            wait(name, proc, th)
    summary = {"wall_seconds": round(time.perf_counter() - t0, 1), "exit_codes": rcs, "models": {}}
    for name in MODELS:
        card = _read_card(out, name)
        summary["models"][name] = _headline(card) if card else None
    tmp = out / ".tmp-summary.json"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.model == "all":
        return _run_all(args, argv)
    import torch

    from segquant_fx.errors import SegQuantError
    from segquant_fx.t2i.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        card = train(_config(args, args.model), args.out, pack=args.pack)
    except SegQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({args.model: _headline(card)}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
