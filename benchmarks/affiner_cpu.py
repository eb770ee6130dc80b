"""Affiner quality on the tiny adapter pipelines: per-step noise MSE vs the float model, held out.

For each pipeline: record a calibration set, quantize the backbone with segquant_fx (``--preset``),
then learn affiners with several solver settings on ``--calib`` prompts and measure them on
``--held-out`` other prompts (per-step MSE on the corrected quantized trajectory, and the MSE of the
final latents of whole runs). Writes a JSON file and one PNG per pipeline (per-step MSE curves).

    python benchmarks/affiner_cpu.py --pipelines tiny-sd3 tiny-flux tiny-sdxl --steps 8 --calib 16 \
        --held-out 8 --preset w4a8-plain --out benchmarks/affiner_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

# benchmarks/kernels.py would shadow the optional `kernels` package transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import segquant_fx  # noqa: E402
from segquant_fx.affiner import evaluate_affiner, process_affiner  # noqa: E402
from segquant_fx.calibset import UniformSampler  # noqa: E402
from segquant_fx.models.pipeline_zoo import build_pipeline  # noqa: E402

WORDS = (
    "red blue green small large old new wooden glass metal cat dog house car tree river city flower".split()
)

SETTINGS = {
    "mserel a=0.5 interp (reference)": {"type": "blockwise", "solver_config": {"alpha": 0.5, "blocksize": 4}},
    "mserel a=1 interp": {"type": "blockwise", "solver_config": {"alpha": 1.0, "blocksize": 4}},
    "mserel a=1 block": {
        "type": "blockwise",
        "solver_config": {"alpha": 1.0, "blocksize": 4, "sample_mode": "block"},
    },
    "ptqd none (reference)": {"type": "ptqd", "solver_config": {"variance_mode": "none"}},
    "ptqd shrink": {"type": "ptqd", "solver_config": {"variance_mode": "shrink"}},
    "tac default": {"type": "tac"},
    "tac l1=0 t=1": {"type": "tac", "solver_config": {"lambda1": 0.0, "threshold": 1.0}},
}


#: Presets of the tiny models that keep an error: the library's w4a8/w4a4 presets add an SVD low-rank
#: branch whose rank covers a tiny layer entirely (error ~1e-14), so they are useless here.
QUANT_CONFIGS = {
    "w4a8-plain": {"default": {"weight_quant": {"type": "int4", "axis": 0}, "input_quant": {"type": "int8"}}},
}


def prompts(n: int, offset: int) -> list[str]:
    g = torch.Generator().manual_seed(offset)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (4,), generator=g).tolist()) for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", nargs="+", default=["tiny-sd3", "tiny-flux", "tiny-sdxl"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--preset", default="w4a8-plain", help="a quantize preset name or 'w4a8-plain'")
    ap.add_argument("--recurrent", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--out", default="benchmarks/affiner_cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib, held = prompts(args.calib, 1), prompts(args.held_out, 2)
    modes = {"yes": [True], "no": [False], "both": [True, False]}[args.recurrent]
    results: dict = {"args": vars(args), "pipelines": {}}
    for name in args.pipelines:
        t0 = time.perf_counter()
        pipe = build_pipeline(name)
        layer = "unet" if name == "tiny-sdxl" else "transformer"
        run = {"height": 32, "width": 32}
        if name != "tiny-flux":
            run["guidance_scale"] = 4.0
        items = segquant_fx.generate_calibrate_set(
            pipe, UniformSampler(), calib[:4], layer, num_inference_steps=args.steps, progress=False, **run
        )
        qconfig = QUANT_CONFIGS.get(args.preset, args.preset)
        qmodel = segquant_fx.quantize(getattr(pipe, layer), items, config=qconfig, verbose=False)
        rows = {}
        curves = {}
        for label, setting in SETTINGS.items():
            for recurrent in modes:
                cfg = {
                    **setting,
                    "max_timestep": args.steps,
                    "sample_size": args.calib,
                    "batch_size": args.calib,
                    "recurrent": recurrent,
                    "noise_target": "all",
                    "extra_args": run,
                }
                cfg["solver_config"] = {**cfg.get("solver_config", {}), "verbose": False}
                t = time.perf_counter()
                aff = process_affiner(cfg, calib, pipe, qmodel, shuffle=False, progress=False)
                fit_s = time.perf_counter() - t
                ev = evaluate_affiner(aff, held, pipe, qmodel, trajectory=True, progress=False)
                key = f"{label} ({'recurrent' if recurrent else 'teacher'})"
                rows[key] = {**ev.to_dict(), "reduction": ev.reduction, "fit_s": fit_s}
                curves[key] = ev
                print(f"{name:10s} {key:42s} {ev.summary()}", flush=True)
        results["pipelines"][name] = {"rows": rows, "wall_s": time.perf_counter() - t0}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        first = next(iter(curves.values()))
        ax.plot(first.steps, first.mse_quant, "k--", lw=2, label=f"{args.preset} (no affiner)")
        colors = plt.cm.tab20.colors
        for i, (key, ev) in enumerate(curves.items()):
            ax.plot(ev.steps, ev.mse_corrected, marker=".", color=colors[i % len(colors)], label=key)
        ax.set_yscale("log")
        ax.set_xlabel("denoising step (0 = noisiest)")
        ax.set_ylabel("held-out noise-prediction MSE vs float")
        ax.set_title(
            f"{name}: affiner on {args.preset}, {args.calib} calibration / {args.held_out} held-out prompts"
        )
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
