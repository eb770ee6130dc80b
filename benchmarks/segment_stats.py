#!/usr/bin/env python
"""Why SegLinear / DualScale help (or not) on a built-in model: activation statistics per segmented layer.

For every linear the pattern report gives input segments, output segments or DualScale, this collects
the layer's real inputs while the float model samples images (forward hooks; a bounded random subsample
of rows per layer), then measures, with float weights so only the activation (or weight) quantizer
differs, the INT8 error of the layer output ``||(Q(x) - x) W^T|| / ||x W^T||``:

* input segments: per-tensor activation scale vs one scale per segment (``seg spread`` = max / min of
  the segments' absmax);
* DualScale: per-tensor symmetric scale vs separate positive / negative scales (``pos/neg`` = the
  positive absmax over the negative one; SiLU / GELU outputs have a short negative tail);
* output segments: per-tensor weight scale vs one weight scale per output segment (``seg spread`` of the
  segments' weight absmax), activations exact.

Each measurement is given raw and after SmoothQuant smoothing with alpha 0.5 (the per-channel factor
``s_j = amax_x_j^0.5 / amax_w_j^0.5`` folded into W), the setting of the fidelity ablation's ``paper``
base: smoothing equalises input channels and so shrinks what per-segment scales can add. The summary
table averages the error ratio (per-segment / per-tensor; below 1 = the segmented scheme helps) over the
layers of each kind.

Usage::

    python3 benchmarks/segment_stats.py --model mmdit --prompts 8 --out benchmarks/results/segment_stats
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# Run as a script, benchmarks/ comes first on sys.path, where kernels.py would shadow HF `kernels`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402 - after the sys.path fix above

QMAX = 127.0


def _fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 round-to-nearest with a broadcastable scale."""
    return (x / scale).round().clamp(-QMAX - 1, QMAX) * scale


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=1e-12) / QMAX


def _seg_split(n: int, sizes: tuple[int, ...] | None) -> list[slice]:
    sizes = sizes or (n,)
    out, o = [], 0
    for s in sizes:
        out.append(slice(o, o + s))
        o += s
    return out


def _out_err(dx: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    return float((dx @ w.T).norm() / (x @ w.T).norm().clamp(min=1e-30))


def _smooth(x: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    ax = x.abs().amax(0).clamp(min=1e-5)
    aw = w.abs().amax(0).clamp(min=1e-5)
    s = (ax.pow(alpha) / aw.pow(1 - alpha)).clamp(min=1e-5)
    return x / s, w * s


def input_segment_stats(x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> dict[str, float]:
    """Per-tensor vs per-input-segment activation scales (weights exact)."""
    segs = _seg_split(x.shape[1], sizes)
    amax = torch.stack([x[:, s].abs().amax() for s in segs])
    per_tensor = _fake_quant(x, _scale(x.abs().amax())) - x
    per_seg = torch.cat([_fake_quant(x[:, s], _scale(a)) for s, a in zip(segs, amax, strict=True)], 1) - x
    return {
        "spread": float(amax.max() / amax.min().clamp(min=1e-12)),
        "err_tensor": _out_err(per_tensor, x, w),
        "err_seg": _out_err(per_seg, x, w),
    }


def dual_stats(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Per-tensor symmetric vs DualScale (positive and negative parts with their own scales)."""
    pos, neg = x.clamp(min=0), x.clamp(max=0)
    ap, an = pos.amax(), (-neg).amax()
    per_tensor = _fake_quant(x, _scale(x.abs().amax())) - x
    dual = _fake_quant(pos, _scale(ap)) + _fake_quant(neg, _scale(an)) - x
    return {
        "pos_over_neg": float(ap / an.clamp(min=1e-12)),
        "err_tensor": _out_err(per_tensor, x, w),
        "err_seg": _out_err(dual, x, w),
    }


def output_segment_stats(x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> dict[str, float]:
    """Per-tensor vs per-output-segment weight scales (activations exact)."""
    segs = _seg_split(w.shape[0], sizes)
    amax = torch.stack([w[s].abs().amax() for s in segs])
    per_tensor = _fake_quant(w, _scale(w.abs().amax())) - w
    per_seg = torch.cat([_fake_quant(w[s], _scale(a)) for s, a in zip(segs, amax, strict=True)], 0) - w
    ref = (x @ w.T).norm().clamp(min=1e-30)
    return {
        "spread": float(amax.max() / amax.min().clamp(min=1e-12)),
        "err_tensor": float((x @ per_tensor.T).norm() / ref),
        "err_seg": float((x @ per_seg.T).norm() / ref),
    }


class _Reservoir:
    """A bounded uniform random subsample of the rows a layer saw (reservoir sampling, fixed seed)."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seen, self.rows = cap, 0, None
        self.g = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if self.rows is None:
            take = x[: self.cap]
            self.rows, self.seen = take.clone(), take.shape[0]
            x = x[take.shape[0] :]
        if x.shape[0] == 0:
            return
        if self.rows.shape[0] < self.cap:
            room = self.cap - self.rows.shape[0]
            self.rows = torch.cat([self.rows, x[:room]])
            self.seen += min(room, x.shape[0])
            x = x[room:]
        for row in x:  # rare: only once the reservoir is full
            self.seen += 1
            j = int(torch.randint(self.seen, (1,), generator=self.g))
            if j < self.cap:
                self.rows[j] = row


def analyze(model: str, prompts: int, rows: int, seed: int, log: Any = print) -> dict[str, Any]:
    from segquant_fx.report import find_patterns
    from segquant_fx.t2i import demo
    from segquant_fx.t2i.models import load_builtin

    bundle = load_builtin(model)
    backbone = bundle.backbone.eval()
    steps, guidance = bundle.default_steps, bundle.default_guidance
    t0 = time.perf_counter()
    items = demo.calibration_set(bundle, 1, steps=2, guidance=guidance)
    report = find_patterns(backbone, items[0])
    plans = {n: p for n, p in report.layers.items() if p.input_segments or p.output_segments or p.dual_scale}
    log(f"{model}: {len(plans)} of {len(report.layers)} linears segmented or DualScale")
    modules = dict(backbone.named_modules())
    res = {n: _Reservoir(rows, seed + i) for i, n in enumerate(report.layers)}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, r=res[n]: r.add(a[0])) for n in report.layers]
    try:
        with torch.no_grad():
            demo.calibration_set(bundle, prompts, steps=steps, guidance=guidance, scene_seed=seed)
    finally:
        for h in hooks:
            h.remove()
    log(f"{model}: collected inputs of {prompts} prompts x {steps} steps in {time.perf_counter() - t0:.1f} s")
    layers: dict[str, Any] = {}
    for name, plan in report.layers.items():
        x = res[name].rows
        w = modules[name].weight.detach().float().cpu()
        entry: dict[str, Any] = {"patterns": list(plan.patterns), "rows": int(x.shape[0])}
        for tag, (xx, ww) in (("raw", (x, w)), ("smoothed", _smooth(x, w))):
            if name not in plans:  # the layers SegLinear / DualScale leave alone: their per-tensor error
                entry[f"unsegmented/{tag}"] = input_segment_stats(xx, ww, (xx.shape[1],))
                continue
            if plan.input_segments:
                entry[f"input_segments/{tag}"] = input_segment_stats(xx, ww, tuple(plan.input_segments))
            if plan.dual_scale:
                entry[f"dual/{tag}"] = dual_stats(xx, ww)
            if plan.output_segments:
                entry[f"output_segments/{tag}"] = output_segment_stats(xx, ww, tuple(plan.output_segments))
        entry["n_input_segments"] = len(plan.input_segments or ())
        entry["n_output_segments"] = len(plan.output_segments or ())
        layers[name] = entry
    return {
        "model": model,
        "prompts": prompts,
        "steps": steps,
        "guidance": guidance,
        "rows_per_layer": rows,
        "seed": seed,
        "torch": torch.__version__,
        "layers": layers,
    }


def _geo(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values)) if values else float("nan")


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scheme, smoothing): layer count, spreads, errors and the error ratio (geometric means)."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in result["layers"].values():
        for key, st in entry.items():
            if "/" not in key:
                continue
            kind, tag = key.split("/")
            a = acc[(kind, tag)]
            a["spread"].append(st.get("spread", st.get("pos_over_neg", float("nan"))))
            a["err_tensor"].append(st["err_tensor"])
            a["err_seg"].append(st["err_seg"])
            a["ratio"].append(st["err_seg"] / max(st["err_tensor"], 1e-30))
    rows = []
    for (kind, tag), a in sorted(acc.items()):
        rows.append(
            {
                "scheme": kind,
                "smoothing": tag,
                "layers": len(a["ratio"]),
                "spread_geo": _geo(a["spread"]),
                "spread_max": max(a["spread"]),
                "err_tensor_geo": _geo(a["err_tensor"]),
                "err_seg_geo": _geo(a["err_seg"]),
                "ratio_geo": _geo(a["ratio"]),
                "ratio_min": min(a["ratio"]),
                "ratio_max": max(a["ratio"]),
            }
        )
    return rows


_LABEL = {
    "input_segments": "SegLinear, input segments (activation scale per segment)",
    "output_segments": "SegLinear, output segments (weight scale per segment)",
    "dual": "DualScale (positive / negative activation scales)",
    "unsegmented": "the other linears (no segments, no DualScale: per-tensor only)",
}


def markdown(result: dict[str, Any], command: str) -> str:
    rows = summary_rows(result)
    lines = [
        f"### Segment statistics: {result['model']}",
        "",
        f"Command: `{command}` (torch {result['torch']}; {result['prompts']} calibration-style prompts x "
        f"{result['steps']} steps, guidance {result['guidance']}, up to {result['rows_per_layer']} input rows "
        "per layer). INT8 output error of each segmented layer with float weights, per-tensor scale vs the "
        "segmented scheme; geometric means over the layers; ratio < 1: the scheme helps.",
        "",
        "| scheme | smoothing | layers | spread (geo / max) | err per-tensor | err segmented | ratio (geo) | "
        "ratio (min..max) |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_LABEL.get(r['scheme'], r['scheme'])} | {r['smoothing']} | {r['layers']} | "
            f"{r['spread_geo']:.2f} / {r['spread_max']:.2f} | {r['err_tensor_geo']:.4f} | "
            f"{r['err_seg_geo']:.4f} | {r['ratio_geo']:.3f} | {r['ratio_min']:.3f}..{r['ratio_max']:.3f} |"
        )
    lines.append("")
    lines.append(
        "spread: input segments, the max / min of the segments' activation absmax; output segments, of the "
        "segments' weight absmax; DualScale, the positive absmax over the negative one."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mmdit", help="built-in model: mmdit, unet or flux")
    p.add_argument("--prompts", type=int, default=8, help="prompts sampled to collect activations")
    p.add_argument("--rows", type=int, default=2048, help="input rows kept per layer (random subsample)")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for segment_stats_<model>.json / .md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python3 benchmarks/segment_stats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = analyze(args.model, args.prompts, args.rows, args.seed)
    result["command"] = command
    md = markdown(result, command)
    print(md)
    if args.out:
        from segquant_fx.fileio import atomic_write_text

        out = Path(args.out)
        atomic_write_text(
            out / f"segment_stats_{args.model}.json", json.dumps(result, indent=1), make_parents=True
        )
        atomic_write_text(out / f"segment_stats_{args.model}.md", md, make_parents=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
