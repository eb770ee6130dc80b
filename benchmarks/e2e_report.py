#!/usr/bin/env python
"""Merge ``benchmarks/e2e.py`` result files into the ``RESULTS.md`` section and a speedup bar chart.

Usage (on any machine, after fetching the JSONs the GPU runs wrote)::

    python benchmarks/e2e_report.py /work/.device/files/ ... --md /tmp/e2e.md --png benchmarks/results/e2e_speedup.png

Arguments are JSON files or folders (searched recursively for ``e2e_*.json``). The markdown has a table of
the runs (card, date, versions, command), one row per measured variant (every run's rows, so a baseline
measured in several runs shows its run-to-run spread), the profile breakdown of the profiled variants, and
the issue's targets with a verdict per variant. The plot shows, per model and batch, each variant's speedup
over the compiled bf16 model of its own run (the latest run where a variant was measured more than once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segquant_fx.errors import ConfigError  # noqa: E402

__all__ = ["load_results", "rows", "markdown_report", "target_checks", "plot_speedups", "main"]

CATEGORIES = ("gemm", "quantize", "attention", "conv", "other")
#: Per-step speedup targets over compiled bf16 (issue 10), by model and activation format of the preset.
SPEED_TARGETS = {
    "flux-dev": {"fp8": 1.5, "int8": 1.4},
    "sd35-medium": {"fp8": 1.45, "int8": 1.45},
    "sdxl-unet": {"fp8": 1.15, "int8": 1.15},
}
#: Backbone weight bytes over bf16, by weight bits of the preset.
WEIGHT_TARGETS = {8: 0.53, 4: 0.30}
#: Seconds to quantize with 32 calibration items.
QUANTIZE_TARGETS = {"sd35-medium": 300.0, "flux-dev": 900.0}
_MODEL_ORDER = ("flux-dev", "sd35-medium", "sdxl-unet")


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def load_results(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read every e2e result file under ``paths`` (files or folders), oldest run first.

    Raises:
        ConfigError: A path does not exist, a file is not JSON or not an e2e result (the message names it).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("e2e_*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder; pass e2e_*.json files or folders holding them")
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{f}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: expected a JSON object written by benchmarks/e2e.py")
        if "variants" not in data:
            if "error" in data:  # the run stopped before any variant (e.g. the build failed)
                continue
            raise ConfigError(f"{f}: no 'variants' list: not written by benchmarks/e2e.py")
        if data.get("benchmark") != "e2e" or not isinstance(data["variants"], list):
            raise ConfigError(f"{f}: not an e2e result (benchmark={data.get('benchmark')!r})")
        data["_file"] = str(f)
        out.append(data)
    if not out:
        raise ConfigError("no e2e result found in " + ", ".join(map(str, paths)))
    return sorted(out, key=lambda d: (str(d.get("date", "")), d["_file"]))


def _model_rank(model: str) -> int:
    return _MODEL_ORDER.index(model) if model in _MODEL_ORDER else len(_MODEL_ORDER)


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, variant), sorted by model, batch, variant kind, run date."""
    out = []
    for i, res in enumerate(results):
        for v in res["variants"]:
            out.append(
                {**v, "model": res["model"], "batch": res["batch"], "run": i + 1, "tag": res.get("tag", "")}
            )
    kind = {"bf16": 0, "torchao": 1, "segquant": 2}
    return sorted(
        out,
        key=lambda r: (
            _model_rank(r["model"]),
            r["model"],
            r["batch"],
            kind.get(r.get("kind"), 3),
            r["name"],
            r["run"],
        ),
    )


def _latest(results: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """(model, batch, variant) -> the row of the latest run where it succeeded."""
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in rows(results):
        if r.get("status") == "ok":
            key = (r["model"], r["batch"], r["name"])
            if key not in best or r["run"] > best[key]["run"]:
                best[key] = r
    return best


def _act_format(preset: str | None) -> str | None:
    if not preset:
        return None
    if "fp8" in preset:
        return "fp8"
    if preset.startswith(("w8a8", "w4a8")) or preset.endswith("w8a8"):
        return "int8"
    return None


def _weight_bits(preset: str | None) -> int | None:
    if not preset:
        return None
    if preset.startswith("w4") or "-w4" in preset:
        return 4
    if preset.startswith("w8") or "-w8" in preset:
        return 8
    return None


def target_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, one check per (model, batch, segquant variant), with PASS / FAIL."""
    checks = []
    latest = _latest(results)
    for (model, batch, _name), r in sorted(latest.items(), key=lambda kv: (_model_rank(kv[0][0]), kv[0])):
        if r.get("kind") != "segquant" or model not in SPEED_TARGETS:  # targets are for the issue's models
            continue
        preset = r.get("scheme")
        fmt = _act_format(preset)
        bits = _weight_bits(preset)

        def add(target: str, measured: str, ok: bool | None, r: dict[str, Any] = r) -> None:
            verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            checks.append(
                {
                    "model": r["model"],
                    "batch": r["batch"],
                    "variant": r["name"],
                    "target": target,
                    "measured": measured,
                    "verdict": verdict,
                    "run": r["run"],
                }
            )

        sp = r.get("speedup_vs_bf16_compile")
        goal = SPEED_TARGETS.get(model, {}).get(fmt) if bits == 8 else None
        if r.get("mode") == "compile" and goal is not None:
            add(f"speed >= {goal}x compiled bf16", f"{_fmt(sp)}x", None if sp is None else sp >= goal)
            ao = latest.get((model, batch, f"torchao_{fmt}_compile")) or latest.get(
                (model, batch, f"torchao_{fmt}_rcompile")
            )
            if ao is not None and ao.get("speedup_vs_bf16_compile") and sp is not None:
                a = ao["speedup_vs_bf16_compile"]
                add(f"faster than {ao['name']}", f"{_fmt(sp)}x vs {_fmt(a)}x", sp > a)
        wr = r.get("weight_ratio_vs_bf16")
        if bits in WEIGHT_TARGETS and wr is not None and r.get("mode") == "eager":
            ex = r.get("weight_ratio_vs_bf16_excl_float_buffers")
            extra = f" ({ex:.3f}x without float buffers)" if ex is not None and abs(ex - wr) > 5e-4 else ""
            add(f"weights <= {WEIGHT_TARGETS[bits]}x bf16", f"{wr:.3f}x{extra}", wr <= WEIGHT_TARGETS[bits])
        qs = r.get("quantize_s")
        items = (r.get("quantize") or {}).get("items")
        if model in QUANTIZE_TARGETS and qs is not None and r.get("mode") == "eager":
            ok = qs <= QUANTIZE_TARGETS[model] if items == 32 else None
            note = "" if items == 32 else f" ({items} items, target is for 32)"
            add(f"quantize <= {QUANTIZE_TARGETS[model]:.0f} s", f"{qs:.1f} s{note}", ok)
        if model == "flux-dev" and r.get("mode") == "compile" and r.get("compile_s") is not None:
            base = [
                x
                for x in rows(results)
                if x["model"] == model
                and x["batch"] == batch
                and x["run"] == r["run"]
                and x["name"] == "bf16_compile"
            ]
            if base and base[0].get("compile_s") is not None:
                b = base[0]["compile_s"]
                add(
                    "compile time <= bf16 compile",
                    f"{r['compile_s']:.0f} s vs {b:.0f} s",
                    r["compile_s"] <= b,
                )
    return checks


def markdown_report(
    results: list[dict[str, Any]], title: str = "End-to-end per-step speed (issue 10)"
) -> str:
    """The ``RESULTS.md`` section: runs, measurements, profile breakdown, targets."""
    lines = [f"## {title}", ""]
    lines.append(
        "Script: `benchmarks/e2e.py` (per-step latency = median of CUDA-event timings of back-to-back "
        "backbone forwards after warm-up; speedups are over the compiled bf16 model measured in the same run; "
        "weights = parameters and buffers as stored; rel. err = relative L2 error vs bf16 eager on a held-out "
        "input). Merged with `benchmarks/e2e_report.py`."
    )
    lines += [
        "",
        "| run | model | batch (backbone) | tag | card | date | torch | torchao | commit | build s | wall s |",
    ]
    lines.append("|---:|---|---:|---|---|---|---|---|---|---:|---:|")
    for i, r in enumerate(results):
        lines.append(
            f"| {i + 1} | {r['model']} | {r['batch']} ({r.get('backbone_batch', r['batch'])}) | {r.get('tag', '')} | "
            f"{r.get('device', '')} | {str(r.get('date', ''))[:16]} | {r.get('torch', '')} | {r.get('torchao') or '-'} | "
            f"{r.get('commit') or '-'} | {_fmt(r.get('build_s'), '.1f')} | {_fmt(r.get('wall_s'), '.0f')} |"
        )
    lines.append("")
    lines.append("Commands:")
    lines.append("")
    for i, r in enumerate(results):
        cmd = (r.get("settings") or {}).get("command", "")
        lines.append(f"{i + 1}. `python3 {cmd}`" if cmd else f"{i + 1}. (command not recorded)")
    lines += [
        "",
        "| model | batch | variant | run | status | ms/step | x bf16 compiled | x bf16 eager | peak GiB | "
        "weights GiB (x bf16) | rel. err | quantize s | compile s |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows(results):
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {str(r.get('note', ''))[:90]}".replace("|", "/")
        wb = (r.get("weight_bytes") or {}).get("total")
        w = f"{wb / 2**30:.3g} ({_fmt(r.get('weight_ratio_vs_bf16'), '.3f')})" if wb is not None else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['name']} | {r['run']} | {status} | {_fmt(r.get('ms_per_step'))} | "
            f"{_fmt(r.get('speedup_vs_bf16_compile'))} | {_fmt(r.get('speedup_vs_bf16_eager'))} | "
            f"{_fmt(r.get('peak_gib'))} | {w} | {_fmt(r.get('rel_err'), '.4f')} | {_fmt(r.get('quantize_s'), '.1f')} | "
            f"{_fmt(r.get('compile_s'), '.1f')} |"
        )
    prof = [r for r in rows(results) if r.get("profile")]
    if prof:
        lines += [
            "",
            "Profile per step, ms (share): GPU kernel time on CUDA runs, CPU self time of ops on CPU runs; "
            "`quantize` includes Inductor kernels that fused a decomposed quantize into a neighbour:",
            "",
            "| model | batch | variant | run | GEMM | quantize | attention | conv | other | top kernel |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in prof:
            p = r["profile"]
            cells = [f"{p['ms_per_step'][c]:.2f} ({p['fraction'][c] * 100:.0f}%)" for c in CATEGORIES]
            top = p.get("top") or [{}]
            t = top[0]
            tk = (
                f"{t.get('category', '')}: `{str(t.get('name', ''))[:60]}` {t.get('ms_per_step', 0):.2f} ms"
                if t
                else ""
            )
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['name']} | {r['run']} | {' | '.join(cells)} | {tk} |"
            )
    checks = target_checks(results)
    if checks:
        lines += ["", "Targets (issue 10):", "", "| model | batch | variant | target | measured | verdict |"]
        lines.append("|---|---:|---|---|---|---|")
        for c in checks:
            lines.append(
                f"| {c['model']} | {c['batch']} | {c['variant']} | {c['target']} | {c['measured']} | {c['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def plot_speedups(results: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars: speedup over compiled bf16 per variant, one group per (model, batch); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = _latest(results)
    groups = sorted({(m, b) for (m, b, _) in latest}, key=lambda g: (_model_rank(g[0]), g))
    # speedups over compiled bf16; over bf16 eager only when no run measured the compiled baseline
    key, base = "speedup_vs_bf16_compile", "bf16_compile"
    if not any(r.get(key) for r in latest.values()):
        key, base = "speedup_vs_bf16_eager", "bf16_eager"
    names = sorted(
        {n for (_, _, n), r in latest.items() if n != base and r.get(key)},
        key=lambda n: ({"bf16": 0, "torchao": 1, "segquant": 2}.get(n.split("_", 1)[0], 3), n),
    )
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.2 + 0.3 * len(names) * max(1, len(groups)))), 4.5))
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for j, n in enumerate(names):
        xs, ys = [], []
        for i, (m, b) in enumerate(groups):
            r = latest.get((m, b, n))
            if r and r.get(key):
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r[key])
        hatch = "//" if n.endswith("_eager") else None  # eager variants hatched, compiled ones solid
        bars = ax.bar(
            xs, ys, width, label=n, color=cmap(j % cmap.N), hatch=hatch, edgecolor="white", linewidth=0
        )
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(
                f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6
            )
    for i, (m, _) in enumerate(groups):
        for fmt, goal in (SPEED_TARGETS.get(m, {}) if base == "bf16_compile" else {}).items():
            ax.hlines(
                goal,
                i - 0.45,
                i + 0.45,
                colors="k" if fmt == "int8" else "r",
                linestyles="dashed",
                linewidth=0.8,
            )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    if base == "bf16_compile":
        ax.text(
            0.0,
            1.01,
            "dashed: issue targets (red FP8, black INT8); hatched: eager",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in groups])
    ax.set_ylabel(f"speedup over {base.replace('_', ' ')} (same run)")
    if not names:
        ax.text(0.5, 0.5, "no speedups in these results", ha="center", va="center", transform=ax.transAxes)
    dev = {r.get("device") for r in results}
    dates = sorted(str(r.get("date", ""))[:10] for r in results)
    ax.set_title(
        f"Per-step speedup, {', '.join(sorted(d for d in dev if d))} ({dates[0]}..{dates[-1]})", fontsize=9
    )
    if names:
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=150)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return out


def _write_text(path: Path, text: str) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the merged markdown and optionally the PNG; 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="e2e_*.json files or folders")
    p.add_argument("--md", default=None, help="write the markdown here (default: print it)")
    p.add_argument("--png", default=None, help="write the speedup bar chart here")
    p.add_argument("--title", default="End-to-end per-step speed (issue 10)")
    args = p.parse_args(argv)
    try:
        results = load_results(args.paths)
    except ConfigError as e:
        print(f"e2e_report: {e}", file=sys.stderr)
        return 2
    text = markdown_report(results, args.title)
    if args.md:
        _write_text(Path(args.md), text)
        print(f"wrote {args.md}")
    else:
        print(text)
    if args.png:
        print(f"wrote {plot_speedups(results, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
