#!/usr/bin/env python
"""Benchmark: calibration overhead and ``quantize()`` wall time on CPU.

(a) **Calibration overhead** (``--calib-models``, default tiny-sd3, tiny-flux, tiny-sdxl). The model is
    prepared once with the ``w8a8`` preset (``segquant_fx.api.prepare``: capture, matching, annotate).
    Then ``--warmup`` + ``--items`` calibration items (batch ``--batch-size``) go through **one**
    ``segquant_fx.passes.calibrate.calibrate(prepared.gm, items, ...)`` call, fed by a generator:

    * ``calibrate``: the time calibrate() spends on item i (binding the item, one run of the compiled
      instrumented graph with every observer, committing the item's statistics): from handing item i
      out to being asked for item i + 1. Building the interpreter and its observers happens once per
      call and is reported separately (``interpreter setup``; compiling the instrumented copy happens
      on the first, untimed warm-up item);
    * ``float``: before handing item i out, the generator runs the float model's own forward on it
      (``model(**item)``, ``torch.no_grad``), so machine load hits both sides alike.

    Reported: medians over the ``--items`` items after the warm-up, and
    ``ratio = median(calibrate) / median(float)`` (target <= 1.5); also the ratio of the medians of
    CPU time and the ratio of the minimum wall times (each side's least disturbed item), which
    are steadier on a shared machine. To show where the overhead is, each
    item also runs through the exported graph module called directly (``graph``: its generated Python
    code, no interpreter) and through a plain ``torch.fx.Interpreter`` without observers
    (``fx interp``), and the layer inputs of one item are replayed through a fresh
    ``ObserverSession`` over fresh observers (``observers``: their own cost per item: feeds and
    commit, median of 5). ``fallbacks``: items calibrate() had to re-run node by node (should be 0).

(b) **quantize() wall time** on ``--model`` (default ``flux-dev-narrow``) with ``--calib-items`` (4)
    items: ``quantize(model, items, "w8a8", progress=False)``, ``--repeats`` times in one process (the
    first run pays torch.export's one-off warm-up). The stages are timed by wrapping the functions
    ``segquant_fx.api`` calls (capture, find_patterns, annotate pass, calibrate, finish); nothing in
    the library is changed. Target: <= 60 s.

Wall clock is ``time.perf_counter``; process CPU time (``time.process_time``, all threads) is printed
next to it because the reference machine is shared with other jobs. Benchmarks never assert: exit code
0 whatever the verdict. ``--profile`` prints a cProfile of one calibrate() call over 4 items (its
one-off compile of the instrumented graph included) and of one quantize(). ``--breakdown`` splits
one calibration item into its parts (float forward, exported graph, compiled copy with and without
no-op elision and observer feeds, binding, commit; CPU ms, medians of 40 interleaved runs).

Usage::

    python benchmarks/quantize_cpu.py
    python benchmarks/quantize_cpu.py --calib-models tiny-flux --items 20 --repeats 1 --profile
    python benchmarks/quantize_cpu.py --items 20 --skip-quantize --threads 1 --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py shadows the
# ``kernels`` package that diffusers imports (when installed): drop it, this script imports nothing from it.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

TARGET_RATIO = 1.5
TARGET_QUANTIZE_S = 60.0
DEFAULT_CALIB_MODELS = ("tiny-sd3", "tiny-flux", "tiny-sdxl")

# --------------------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-models", nargs="*", default=list(DEFAULT_CALIB_MODELS), help="models for (a)")
    ap.add_argument(
        "--items", type=int, default=20, help="timed calibration items per model in (a) (default 20)"
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed items first, per model in (a) (default 2)")
    ap.add_argument("--batch-size", type=int, default=2, help="batch of every item (default 2)")
    ap.add_argument("--model", default="flux-dev-narrow", help="model for (b) (default %(default)s)")
    ap.add_argument("--calib-items", type=int, default=4, help="calibration items for (b) (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="quantize() runs in (b) (default 2)")
    ap.add_argument("--skip-quantize", action="store_true", help="run (a) only")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) first (default: torch's default); 1 is far more stable on a shared machine",
    )
    ap.add_argument(
        "--profile", action="store_true", help="print cProfile tables (calibration item, quantize)"
    )
    ap.add_argument("--profile-top", type=int, default=15, help="profile lines to print (default 15)")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also split one calibration item into its parts (CPU ms, medians of 40 interleaved runs)",
    )
    args = ap.parse_args(argv)
    if args.items < 10:
        ap.error("--items must be >= 10 (medians over at least 10 items)")
    return args


def machine_info() -> dict[str, Any]:
    import torch

    cpu_model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def item(name: str, batch: int, seed: int) -> dict[str, Any]:
    """The zoo example of ``name`` drawn with ``sample_seed=seed`` (as ``build_model(..., seed=seed)``)."""
    from segquant_fx.models import get_model_spec

    return get_model_spec(name).example(batch, sample_seed=seed)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """Yields a list that receives [wall s, cpu s] of the block."""
    out: list[float] = []
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        yield out
    finally:
        out += [time.perf_counter() - t0, time.process_time() - c0]


def profile_text(fn: Any, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).strip_dirs().sort_stats("cumulative").print_stats(top)
    return "\n".join(line for line in s.getvalue().splitlines() if line.strip())


# --------------------------------------------------------------------------------- (a) calibration


@dataclass
class CalibResult:
    name: str
    items: int = 0
    graph_nodes: int = 0
    observers: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)  # kind -> wall s per item
    cpu: dict[str, list[float]] = field(default_factory=dict)  # kind -> cpu s per item
    load: str = ""
    setup_s: float = 0.0  # building the CalibrationInterpreter and its observers (once per calibrate())
    error: str | None = None
    fallbacks: int = 0  # items calibrate() re-ran node by node after the compiled run failed
    breakdown: dict[str, float] = field(default_factory=dict)  # part -> CPU ms (--breakdown)

    def med(self, kind: str, cpu: bool = False) -> float:
        v = (self.cpu if cpu else self.times).get(kind) or []
        return statistics.median(v) if v else float("nan")

    @property
    def ratio(self) -> float:
        return self.med("calibrate") / self.med("float")

    @property
    def min_ratio(self) -> float:
        """min(calibrate) / min(float): the least disturbed item of each, robust to preemption."""
        return min(self.times["calibrate"]) / min(self.times["float"])

    @property
    def cpu_ratio(self) -> float:
        return self.med("calibrate", cpu=True) / self.med("float", cpu=True)


def bench_calibration(name: str, args: argparse.Namespace) -> tuple[CalibResult, Any]:
    """Time (a) for one model; see the module docstring."""
    import torch
    from torch import fx

    from segquant_fx import api
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.models import build_model
    from segquant_fx.passes.annotate import annotations
    from segquant_fx.passes.calibrate import CalibrationInterpreter, bind_inputs, calibrate, flatten_inputs

    res = CalibResult(name)
    model, _ = build_model(name, batch_size=args.batch_size)
    items = [item(name, args.batch_size, 1000 + i) for i in range(args.warmup + args.items)]
    p = api.prepare(model, items[0], QuantizeConfig.coerce("w8a8"))
    res.graph_nodes = len(p.gm.graph.nodes)
    res.observers = len(annotations(p.gm))
    plain = fx.Interpreter(p.gm, garbage_collect_values=True)
    input_names = list(p.gm._in_spec.child(1).context)  # the graph's keyword inputs, in order
    with timed() as t:
        CalibrationInterpreter(p.gm)
    res.setup_s = t[0]

    def others(i: int, it: dict[str, Any]) -> None:
        """The float forward and the two decomposition runs of item ``i``, in alternating order."""
        kwargs = bind_inputs(p.signature, it, p.constants)
        runs = {
            "float": lambda: model(**it),
            "graph": lambda: p.gm(**{k: kwargs[k] for k in input_names}),
            "fx interp": lambda: plain.run(*flatten_inputs(p.gm, kwargs)),
        }
        for kind in runs if i % 2 == 0 else list(runs)[::-1]:
            gc.collect()
            with timed() as t:
                runs[kind]()
            if i >= args.warmup:
                res.times.setdefault(kind, []).append(t[0])
                res.cpu.setdefault(kind, []).append(t[1])

    def feed() -> Iterator[dict[str, Any]]:
        """Calibration items for one calibrate() call; the time calibrate spends on item i is the time
        between handing it out and being asked for the next one."""
        for i, it in enumerate(items):
            others(i, it)
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            yield it
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                res.times.setdefault("calibrate", []).append(wall)
                res.cpu.setdefault("calibrate", []).append(cpu)

    orig_close = CalibrationInterpreter.close

    def close(self: Any) -> None:  # read the interpreter's fallback count, change nothing
        res.fallbacks += self.fallbacks
        orig_close(self)

    CalibrationInterpreter.close = close
    try:
        with torch.no_grad():
            _, n = calibrate(p.gm, feed(), p.signature, p.constants, progress=False)
    finally:
        CalibrationInterpreter.close = orig_close
    with torch.no_grad():
        assert n == len(items)
        res.times["observers"] = observer_times(p, items[-1], reps=5)
    res.items = len(res.times["calibrate"])
    if args.breakdown:
        res.breakdown = breakdown(model, p, items[-1])
    res.load = loadavg()
    profile = None
    if args.profile:
        with torch.no_grad():
            profile = profile_text(
                lambda: calibrate(p.gm, items[-4:], p.signature, p.constants, progress=False),
                args.profile_top,
            )
    return res, profile


def breakdown(model: Any, p: Any, it: dict[str, Any], reps: int = 40) -> dict[str, float]:
    """CPU ms of the parts of one calibration item (uses calibrate's private pieces; medians)."""
    import torch

    from segquant_fx.passes.calibrate import CalibrationInterpreter, _compile, _ItemBinder

    interp = CalibrationInterpreter(p.gm)
    bind = _ItemBinder(p.gm, p.signature, p.constants)
    bind(it)
    flat = bind(it)
    interp.fast_run(*flat)
    compiled = interp._compiled(flat)
    bare = _compile(p.gm, {}, elide=True)
    bare_noelide = _compile(p.gm, {}, elide=False)
    session = interp.session
    names = list(p.gm._in_spec.child(1).context)

    def feeds() -> None:
        session.begin()
        compiled(flat)
        session.retry()  # drop what was staged: this part is the graph + the feeds only

    def commit() -> None:
        session.begin()
        compiled(flat)
        c0 = time.process_time()
        session.commit()
        out["commit"].append(time.process_time() - c0)

    parts = {
        "float eager forward": lambda: model(**it),
        "exported graph, called directly": lambda: p.gm(**{k: it[k] for k in names}),
        "compiled copy, no observers, no elision": lambda: bare_noelide(flat),
        "compiled copy, no observers": lambda: bare(flat),
        "compiled copy + observer feeds": feeds,
        "binding the item": lambda: bind(it),
        "whole item (bind + fast_run incl. commit)": lambda: interp.fast_run(*bind(it)),
    }
    out: dict[str, list[float]] = {k: [] for k in [*parts, "commit"]}
    with torch.no_grad():
        for r in range(reps):
            for k in parts if r % 2 else list(parts)[::-1]:
                c0 = time.process_time()
                parts[k]()
                out[k].append(time.process_time() - c0)
            commit()
    interp.close()
    return {k: 1e3 * statistics.median(v) for k, v in out.items()}


def render_breakdown(results: list[CalibResult]) -> str:
    rs = [r for r in results if r.breakdown]
    if not rs:
        return ""
    parts = list(rs[0].breakdown)
    lines = ["| part (CPU ms/item, median) | " + " | ".join(r.name for r in rs) + " |"]
    lines.append("|---|" + "---:|" * len(rs))
    for k in parts:
        lines.append(f"| {k} | " + " | ".join(f"{r.breakdown[k]:.3f}" for r in rs) + " |")
    return "\n".join(lines)


def observer_times(p: Any, it: dict[str, Any], reps: int) -> list[float]:
    """Seconds the observers alone take on one item: its layer inputs replayed through a fresh session."""
    from segquant_fx.passes.calibrate import CalibrationInterpreter, bind_inputs, flatten_inputs
    from segquant_fx.passes.observers import ChannelMinMaxObserver, ObserverSession

    seen: list[tuple[int, Any]] = []

    class Recording(ChannelMinMaxObserver):
        def forward(self, x: Any) -> Any:
            seen.append((self.in_features, x))
            return super().forward(x)

    CalibrationInterpreter(p.gm, observer_factory=Recording).run(
        *flatten_inputs(p.gm, bind_inputs(p.signature, it, p.constants))
    )
    out = []
    for _ in range(reps):
        session = ObserverSession([ChannelMinMaxObserver(k) for k, _ in seen])
        t0 = time.perf_counter()
        session.begin()
        for feed, (_, x) in zip(session.feeds, seen, strict=True):
            feed(x)
        session.commit()
        out.append(time.perf_counter() - t0)
    return out


def render_calibration(results: list[CalibResult]) -> str:
    lines = [
        "| model | graph nodes | observers | items | float ms/item | calibrate ms/item | ratio | CPU ratio | ratio of minima | "
        "graph ms/item | fx interp ms/item | observers ms/item | interpreter setup ms (once) | fallbacks | ratio <= 1.5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | error: {r.error} |")
            continue
        lines.append(
            f"| {r.name} | {r.graph_nodes} | {r.observers} | {r.items} | {1e3 * r.med('float'):.2f} | "
            f"{1e3 * r.med('calibrate'):.2f} | {r.ratio:.2f} | {r.cpu_ratio:.2f} | {r.min_ratio:.2f} | {1e3 * r.med('graph'):.2f} | "
            f"{1e3 * r.med('fx interp'):.2f} | {1e3 * r.med('observers'):.2f} | {1e3 * r.setup_s:.1f} | {r.fallbacks} | {'PASS' if r.ratio <= TARGET_RATIO else 'FAIL'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ (b) quantize()


@dataclass
class QuantizeRun:
    wall_s: float
    cpu_s: float
    stages: dict[str, float]  # stage -> wall s


@contextlib.contextmanager
def stage_timers(stages: dict[str, float]) -> Iterator[None]:
    """Wrap the functions quantize() calls through ``segquant_fx.api`` with wall-clock timers."""
    from segquant_fx import api
    from segquant_fx.passes.annotate import AnnotatePass

    def wrap(label: str, fn: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages[label] = stages.get(label, 0.0) + time.perf_counter() - t0

        return inner

    originals = {n: getattr(api, n) for n in ("capture", "find_patterns", "calibrate", "finish")}
    orig_call = AnnotatePass.call
    try:
        api.capture = wrap("capture (torch.export)", originals["capture"])
        api.find_patterns = wrap("pattern matching", originals["find_patterns"])
        api.calibrate = wrap("calibration", originals["calibrate"])
        api.finish = wrap("rewrite + wrap (finish)", originals["finish"])
        AnnotatePass.call = wrap("annotate pass", orig_call)
        yield
    finally:
        for n, f in originals.items():
            setattr(api, n, f)
        AnnotatePass.call = orig_call


def bench_quantize(args: argparse.Namespace) -> tuple[list[QuantizeRun], int, str | None]:
    import torch

    from segquant_fx import quantize
    from segquant_fx.models import build_model

    model, _ = build_model(args.model, batch_size=args.batch_size)
    items = [item(args.model, args.batch_size, 1 + i) for i in range(args.calib_items)]
    runs = []
    n_layers = 0
    for _ in range(args.repeats):
        gc.collect()
        stages: dict[str, float] = {}
        with stage_timers(stages), timed() as t:
            q = quantize(model, items, "w8a8", progress=False)
        runs.append(QuantizeRun(t[0], t[1], stages))
        n_layers = len(q.plan)
        del q
    profile = None
    if args.profile:
        with torch.no_grad():
            profile = profile_text(lambda: quantize(model, items, "w8a8", progress=False), args.profile_top)
    return runs, n_layers, profile


def render_quantize(runs: list[QuantizeRun], n_layers: int, args: argparse.Namespace) -> str:
    names = list(dict.fromkeys(k for r in runs for k in r.stages))
    head = "| run | quantize() wall s | CPU s | " + " | ".join(names) + " | other | <= 60 s |"
    lines = [head, "|---|---:|---:|" + "---:|" * (len(names) + 1) + "---|"]
    for i, r in enumerate(runs):
        other = r.wall_s - sum(r.stages.values())
        label = f"{i + 1}{' (cold)' if i == 0 else ''}"
        lines.append(
            f"| {label} | {r.wall_s:.2f} | {r.cpu_s:.2f} | "
            + " | ".join(f"{r.stages.get(n, 0.0):.2f}" for n in names)
            + f" | {other:.2f} | {'PASS' if r.wall_s <= TARGET_QUANTIZE_S else 'FAIL'} |"
        )
    return (
        f'`quantize({args.model}, {args.calib_items} items of batch {args.batch_size}, "w8a8")`: '
        f"{n_layers} quantized linears; stage columns are wall s\n\n" + "\n".join(lines)
    )


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"machine: nproc {info['nproc']}, {info['cpu_model']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), python {info['python']}, {info['platform']}"
    )
    print(f"command: {' '.join(['python', *sys.argv])}")
    print(f"load average at start: {loadavg()}\n")

    calib: list[CalibResult] = []
    profiles: list[tuple[str, str]] = []
    for name in args.calib_models:
        try:
            res, prof = bench_calibration(name, args)
        except Exception as e:  # noqa: BLE001 - a benchmark reports, never crashes
            res, prof = CalibResult(name, error=f"{type(e).__name__}: {e}"), None
        calib.append(res)
        print(f"(a) {name}: done (load average {res.load})", file=sys.stderr)
        if prof:
            profiles.append((f"cProfile of one calibrate() item on {name}", prof))

    runs: list[QuantizeRun] = []
    n_layers = 0
    if not args.skip_quantize:
        runs, n_layers, prof = bench_quantize(args)
        if prof:
            profiles.append((f"cProfile of one quantize() on {args.model}", prof))

    print(f"## (a) calibration overhead: median over {args.items} items after {args.warmup} warm-up items\n")
    print(render_calibration(calib))
    if any(r.breakdown for r in calib):
        print("\n### Where one calibration item's time goes\n")
        print(render_breakdown(calib))
    if runs:
        print("\n## (b) quantize() wall time\n")
        print(render_quantize(runs, n_layers, args))

    print("\n## Verdict\n")
    for r in calib:
        if r.error:
            print(f"- (a) {r.name}: ERROR {r.error}")
        else:
            ok = r.ratio <= TARGET_RATIO
            print(
                f"- (a) {r.name}: calibrate/float = {r.ratio:.2f} (CPU-time ratio {r.cpu_ratio:.2f}, ratio of "
                f"minima {r.min_ratio:.2f}) "
                f"-> {'PASS' if ok else 'FAIL'} (target <= {TARGET_RATIO})"
            )
    if runs:
        cold = runs[0].wall_s
        later = ", ".join(f"{r.wall_s:.1f} s" for r in runs[1:])
        print(
            f"- (b) quantize({args.model}): {cold:.1f} s (first run in the process)"
            + (f"; later runs {later}" if later else "")
            + f" -> {'PASS' if cold <= TARGET_QUANTIZE_S else 'FAIL'} (target <= {TARGET_QUANTIZE_S:.0f} s, "
            "verdict on the first run)"
        )
    print(f"\nload average at end: {loadavg()}")
    for title, text in profiles:
        print(f"\n### {title} (top {args.profile_top}, cumulative)\n\n```\n{text}\n```")
    return 0  # benchmarks never assert


if __name__ == "__main__":
    sys.exit(main())
