#!/usr/bin/env python
"""Fidelity benchmark: how close each quantization method keeps the built-in text-to-image models to float.

    python3 benchmarks/fidelity.py --device cuda --md benchmarks/RESULTS.md --out benchmarks/results/fidelity
    python3 benchmarks/fidelity.py --models mmdit --prompts 16 --steps 10 \\
        --methods baseline-w8a8,abl-none,abl-seglinear,abl-dualscale,abl-both     # CPU, a few minutes

For each built-in model (``segquant_fx.t2i``: mmdit, flux, unet) and each method below, on a fixed held-out
prompt set (the training's held-out scenes, seed 1234, noise seeds ``1234 * 100000 + i``, as in the model
card) the script generates images with the quantized backbone from the same noise as the float model and
measures:

* PSNR and SSIM (Gaussian window, per channel; ``segquant_fx.t2i.metrics``) against the float images;
* prompt adherence: fraction of images whose every prompted attribute the exact read-out finds
  (``segquant_fx.t2i.readout.score_adherence``);
* Frechet distance on the read-out's 64-dim image features (``image_features``) against the float images
  and against real (rendered) generator images of the same prompts.

Every method calibrates on the same items: the float backbone's inputs at every sampling step of
``--calib-prompts`` other prompts (scene seed 4321, noise seeds 1000000 + i; ``segquant_fx.t2i.demo``).

Methods (``--methods``, comma-separated ids; default all):

==================  ==========================================================================================
``float``           the float model (reference; always run)
``baseline-w8a8``   per-tensor INT8 W8A8, AMax, no smoothing, no SegLinear/DualScale (the reference's
                    ``baseline`` preset)
``abl-none``        Table 4 ablation, base: per-tensor INT8 W8A8, SmoothQuant alpha 0.5, AMax, neither
                    SegLinear nor DualScale (= ``ptq4dit-w8a8``, computed once)
``abl-seglinear``   ... + SegLinear
``abl-dualscale``   ... + DualScale
``abl-both``        ... + SegLinear + DualScale (SegQuant)
``ptq4dit-w8a8``    SmoothQuant alpha 0.5, per-tensor W8A8 (PTQ4DiT as the reference runs it)
``smooth-plus-w8a8``  Smooth+: SmoothQuant with per-layer alpha search
``segquant-a-w8a8`` SegQuant-A: SegLinear + DualScale, per-segment alpha search, AMax
``segquant-g-w8a8`` SegQuant-G: as SegQuant-A with GPTQ weights
``w8a8``            our default preset (per-channel INT8 weights, SmoothQuant 0.5, SegLinear + DualScale)
``svdquant-w4a8``   SVDQuant W4A8 (rank-64 low-rank branch, alpha search, GPTQ INT4 weights)
``segquant-w4a8``   ``svdquant-w4a8`` + SegLinear + DualScale (the reference's SegQuant-G W4A8 preset)
``w4a8``            our W4A8 preset (rank 32, GPTQ, SegLinear + DualScale)
``w8a8-fp8``        FP8 E4M3 W8A8 with SegLinear + DualScale
``torchao-int8``    torchao ``Int8DynamicActivationInt8WeightConfig`` (skipped with a note where torchao does
                    not import)
==================  ==========================================================================================

``--ablation-base paper`` (default) runs the ablation on the paper's Table 4 setting (per-tensor INT8 W8A8,
SmoothQuant alpha 0.5, AMax); ``--ablation-base w8a8`` on our ``w8a8`` preset (per-channel weights) instead.
Methods with identical configs are quantized once. The script states whether the paper's ablation order
(baseline < +SegLinear, +DualScale < both, on PSNR and on SSIM) is reproduced, and where not, whether the
violated step is within the per-image noise (paired mean difference within two standard errors).

Outputs: a markdown table per model in the results (stdout; ``--md FILE`` replaces the file's ``## Fidelity``
section or appends one), ``fidelity.json`` (every number, per-image values, settings; written after each method,
so ``--resume`` continues an interrupted run with the same settings) and ``fidelity.png`` (bar charts;
needs matplotlib) in ``--out``.

``--random-weights`` (with ``--small`` for the reduced architectures) runs on untrained weights: a smoke
test of the script, not a measurement.

GPU sessions with a per-command time limit: run one model per command (each writes its own ``--out``; rerun
the same command with ``--resume`` if it was cut off), then merge the JSON files where RESULTS.md lives::

    python3 benchmarks/fidelity.py --device cuda --models mmdit --prompts 256 --calib-prompts 32 --out $OUT/fid-mmdit
    python3 benchmarks/fidelity.py --device cuda --models unet --prompts 256 --calib-prompts 32 --out $OUT/fid-unet
    python3 benchmarks/fidelity.py --models mmdit,unet --report-only --out fid \
        --merge fid-mmdit/fidelity.json fid-unet/fidelity.json --md benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python3 benchmarks/fidelity.py` puts benchmarks/ first on sys.path, where kernels.py would shadow the
# `kernels` package that transformers (imported by diffusers) looks for; use the repository root instead,
# which also makes segquant_fx importable from a plain checkout
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if (os.path.abspath(p) if p else os.getcwd()) != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = ("mmdit", "flux", "unet")
#: Scene seed of the held-out prompts (the training's evaluation set) and the noise seeds derived from it.
HELDOUT_SEED = 1234
SECTION_TITLE = "## Fidelity (quantized vs float, built-in text-to-image models)"
ABLATION_IDS = ("abl-none", "abl-seglinear", "abl-dualscale", "abl-both")
RESULTS_FORMAT = 1


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        id: Command-line id.
        label: Table label.
        bits: ``W/A`` column.
        kind: ``"float"``, ``"segquant"`` or ``"torchao"``.
        config: Builds the :class:`~segquant_fx.config.QuantizeConfig` (segquant methods).
    """

    id: str
    label: str
    bits: str
    kind: str
    config: Callable[[str], Any] | None = None


def _preset(name: str) -> Callable[[str], Any]:
    def build(_base: str) -> Any:
        from segquant_fx.config import QuantizeConfig

        return QuantizeConfig.coerce(name)

    return build


def ablation_base(base: str) -> Any:
    """The config the ablation switches components off from (SegLinear and DualScale on).

    ``"paper"``: the paper's Table 4 setting, per-tensor INT8 W8A8 + SmoothQuant alpha 0.5 + AMax (the
    ``ptq4dit-w8a8`` preset with SegQuant's patterns on); otherwise a preset name (e.g. ``"w8a8"``).
    """
    from segquant_fx.config import BUILTIN_PATTERNS, QuantizeConfig

    if base == "paper":
        return QuantizeConfig.coerce("ptq4dit-w8a8").with_overrides(
            {"default": {"seglinear": True, "dual_scale": True, "search_patterns": list(BUILTIN_PATTERNS)}}
        )
    return QuantizeConfig.coerce(base)


def _ablation(seglinear: bool, dual_scale: bool) -> Callable[[str], Any]:
    def build(base: str) -> Any:
        from segquant_fx.config import QuantizeConfig

        return QuantizeConfig.ablation(ablation_base(base), seglinear=seglinear, dual_scale=dual_scale)

    return build


def _segquant_w4a8(_base: str) -> Any:
    from segquant_fx.config import BUILTIN_PATTERNS, QuantizeConfig

    return QuantizeConfig.coerce("svdquant-w4a8").with_overrides(
        {"default": {"seglinear": True, "dual_scale": True, "search_patterns": list(BUILTIN_PATTERNS)}}
    )


METHODS: tuple[Method, ...] = (
    Method("float", "float", "FP32", "float"),
    Method(
        "baseline-w8a8",
        "per-tensor W8A8, no smoothing (baseline-w8a8)",
        "W8A8",
        "segquant",
        _preset("baseline-w8a8"),
    ),
    Method("abl-none", "ablation: no SegLinear, no DualScale", "W8A8", "segquant", _ablation(False, False)),
    Method("abl-seglinear", "ablation: + SegLinear", "W8A8", "segquant", _ablation(True, False)),
    Method("abl-dualscale", "ablation: + DualScale", "W8A8", "segquant", _ablation(False, True)),
    Method(
        "abl-both", "ablation: + SegLinear + DualScale (SegQuant)", "W8A8", "segquant", _ablation(True, True)
    ),
    Method("ptq4dit-w8a8", "SmoothQuant a=0.5 (PTQ4DiT-style)", "W8A8", "segquant", _preset("ptq4dit-w8a8")),
    Method("smooth-plus-w8a8", "Smooth+ (alpha search)", "W8A8", "segquant", _preset("smooth-plus-w8a8")),
    Method("segquant-a-w8a8", "SegQuant-A", "W8A8", "segquant", _preset("segquant-a-w8a8")),
    Method("segquant-g-w8a8", "SegQuant-G", "W8A8", "segquant", _preset("segquant-g-w8a8")),
    Method("w8a8", "SegQuant preset w8a8 (per-channel weights)", "W8A8", "segquant", _preset("w8a8")),
    Method("svdquant-w4a8", "SVDQuant", "W4A8", "segquant", _preset("svdquant-w4a8")),
    Method(
        "segquant-w4a8", "SegQuant-G (SVDQuant + SegLinear + DualScale)", "W4A8", "segquant", _segquant_w4a8
    ),
    Method("w4a8", "SegQuant preset w4a8 (rank 32, GPTQ)", "W4A8", "segquant", _preset("w4a8")),
    Method("w8a8-fp8", "FP8 E4M3 (SegLinear + DualScale)", "W8A8 fp8", "segquant", _preset("w8a8-fp8")),
    Method("torchao-int8", "torchao int8 dynamic", "W8A8 dyn", "torchao"),
)
METHOD_IDS = tuple(m.id for m in METHODS)


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A method cannot run here (e.g. torchao does not import); the message goes into the table."""


def torchao_int8(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``backbone`` with torchao's int8 dynamic-activation, int8-weight quantization.

    Raises:
        Skip: torchao does not import or cannot quantize the model here.
    """
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means: skip torchao cleanly
        raise Skip(f"torchao not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    model = copy.deepcopy(backbone)
    try:
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    except Exception as e:  # noqa: BLE001 - record why, keep benchmarking the other methods
        raise Skip(f"torchao quantize_ failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    return model


def _plan_counts(qmodel: Any) -> dict[str, int]:
    plan = getattr(qmodel, "plan", {}) or {}
    return {
        "layers": len(plan),
        "segmented": sum(1 for p in plan.values() if p.get("in_segments") or p.get("out_segments")),
        "dual_scale": sum(1 for p in plan.values() if p.get("dual")),
    }


def _arg_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings a stored result must share to be reused by ``--resume``."""
    keys = ("prompts", "calib_prompts", "steps", "guidance", "ablation_base", "random_weights", "small")
    return {k: getattr(args, k) for k in keys}


def _settings(
    args: argparse.Namespace, model: str, bundle: Any, steps: int, guidance: float
) -> dict[str, Any]:
    return {
        "args": _arg_settings(args),
        "model": model,
        "model_class": bundle.spec.model_class,
        "prompts": args.prompts,
        "steps": steps,
        "guidance": float(guidance),
        "calib_prompts": args.calib_prompts,
        "heldout_seed": int(bundle.card.get("evaluation", {}).get("heldout", {}).get("seed", HELDOUT_SEED)),
        "ablation_base": args.ablation_base,
        "random_weights": bool(args.random_weights),
        "small": bool(args.small),
        # which weights: a fingerprint of the model card (trained weights change it)
        "weights": hashlib.sha1(json.dumps(bundle.card, sort_keys=True).encode()).hexdigest()[:12],
    }


def _finite(v: float) -> float | str:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("nan" if math.isnan(v) else "-inf")
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return _finite(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _num(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "inf", "nan"
    return float("nan") if v is None else float(v)


def run_model(
    args: argparse.Namespace,
    model: str,
    methods: Sequence[Method],
    results: dict[str, Any],
    save: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Benchmark ``methods`` on ``model``; fills and returns ``results["models"][model]``."""
    import segquant_fx
    from segquant_fx.t2i.data import SceneConfig, heldout_scenes, render, scene_prompts
    from segquant_fx.t2i.demo import calibration_set, load_demo_model
    from segquant_fx.t2i.diffusion import generate
    from segquant_fx.t2i.metrics import summarize
    from segquant_fx.t2i.readout import frechet_distance, image_features, score_adherence

    entry = results["models"].get(model)
    if (
        entry is not None
        and entry["settings"].get("args") == _arg_settings(args)
        and all(entry["methods"].get(m.id, {}).get("status") in ("ok", "skipped") for m in methods)
    ):
        log(f"{model}: every method done before (--resume)")
        return entry
    bundle = load_demo_model(model, random_weights=args.random_weights, small=args.small, device=args.device)
    steps = bundle.default_steps if args.steps is None else args.steps
    guidance = bundle.default_guidance if args.guidance is None else args.guidance
    settings = _settings(args, model, bundle, steps, guidance)
    if entry is None or entry.get("settings") != settings:
        if entry is not None:
            log(f"{model}: settings changed since the saved results; starting this model again")
        entry = {"settings": settings, "methods": {}}
        results["models"][model] = entry
    scene_cfg = SceneConfig(**bundle.card["data"]["scene"]) if "data" in bundle.card else None
    seed = settings["heldout_seed"]
    scenes = heldout_scenes(args.prompts, seed=seed, config=scene_cfg)
    prompts = scene_prompts(scenes)
    seeds = [seed * 100_000 + i for i in range(len(prompts))]  # as the model card's evaluation

    def gen(backbone: Any = None) -> torch.Tensor:
        return generate(
            bundle,
            prompts,
            seeds,
            steps,
            guidance,
            backbone=backbone,
            batch_size=args.batch_size,
            progress=args.progress,
        )

    t = time.perf_counter()
    float_images = gen()
    float_s = time.perf_counter() - t
    real_feats = image_features(render(scenes))
    float_feats = image_features(float_images)
    log(
        f"{model}: float images in {float_s:.1f} s ({len(prompts)} prompts, {steps} steps, guidance {guidance:g})"
    )
    items: list[dict[str, Any]] | None = None
    done_configs: dict[str, str] = {}  # config JSON -> method id that ran it

    for method in methods:
        if method.id in entry["methods"] and entry["methods"][method.id].get("status") in ("ok", "skipped"):
            log(f"{model}/{method.id}: done before (--resume), skipping")
            if method.config is not None:
                done_configs.setdefault(method.config(args.ablation_base).to_json(), method.id)
            continue
        row: dict[str, Any] = {"label": method.label, "bits": method.bits}
        t0 = time.perf_counter()
        try:
            if method.kind == "float":
                images, counts, quant_s = float_images, None, 0.0
                gen_s = float_s
            else:
                if method.kind == "torchao":
                    t = time.perf_counter()
                    qmodel = torchao_int8(bundle.backbone)
                    counts = None
                else:
                    cfg = method.config(args.ablation_base)
                    key = cfg.to_json()
                    same = done_configs.get(key)
                    if same is not None and entry["methods"].get(same, {}).get("status") == "ok":
                        row = {
                            **entry["methods"][same],
                            "label": method.label,
                            "bits": method.bits,
                            "same_as": same,
                        }
                        entry["methods"][method.id] = row
                        log(f"{model}/{method.id}: same config as {same}, reusing its results")
                        save()
                        continue
                    if items is None:
                        t = time.perf_counter()
                        items = calibration_set(bundle, args.calib_prompts, steps=steps, guidance=guidance)
                        log(f"{model}: {len(items)} calibration items in {time.perf_counter() - t:.1f} s")
                    t = time.perf_counter()
                    qmodel = segquant_fx.quantize(bundle.backbone, items, cfg, progress=args.progress)
                    counts = _plan_counts(qmodel)
                    done_configs[key] = method.id
                quant_s = time.perf_counter() - t
                t = time.perf_counter()
                images = gen(qmodel)
                gen_s = time.perf_counter() - t
                del qmodel
            fid = summarize(float_images, images)
            feats = image_features(images)
            row.update(
                status="ok",
                psnr=fid["psnr"],
                ssim=fid["ssim"],
                psnr_per_image=fid["psnr_per_image"],
                ssim_per_image=fid["ssim_per_image"],
                adherence=score_adherence(images, scenes),
                fd_float=frechet_distance(float_feats, feats) if method.kind != "float" else 0.0,
                fd_real=frechet_distance(real_feats, feats),
                quantize_s=round(quant_s, 2),
                generate_s=round(gen_s, 2),
                plan=counts,
            )
            log(
                f"{model}/{method.id}: PSNR {fid['psnr']:.2f} dB, SSIM {fid['ssim']:.4f}, adherence "
                f"{row['adherence']['overall']:.3f}, FD float {row['fd_float']:.3f} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        except Skip as e:
            row.update(status="skipped", note=str(e))
            log(f"{model}/{method.id}: skipped: {e}")
        except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' results
            row.update(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            log(f"{model}/{method.id}: FAILED: {row['note']}")
            if args.strict:
                raise
        entry["methods"][method.id] = row
        entry["run"] = args.run_info  # where the latest results of this model were computed
        save()
    return entry


# --------------------------------------------------------------------------------------------------
# analysis and reporting
# --------------------------------------------------------------------------------------------------


def _paired(a: Sequence[Any], b: Sequence[Any]) -> tuple[float, float]:
    """Mean and standard error of ``b - a`` over images (infinite PSNRs capped at 100 dB)."""
    x = torch.tensor([min(_num(v), 100.0) for v in a], dtype=torch.float64)
    y = torch.tensor([min(_num(v), 100.0) for v in b], dtype=torch.float64)
    d = y - x
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def ablation_verdict(rows: dict[str, Any]) -> dict[str, Any]:
    """Whether ``baseline < +SegLinear, +DualScale < both`` holds on PSNR and on SSIM.

    Args:
        rows: Method id -> result row (needs the four ``abl-*`` rows with ``status == "ok"``).

    Returns:
        ``{"complete": bool, "psnr": {...}, "ssim": {...}, "reproduced": bool | None, "text": str}``; per
        metric ``reproduced`` and the violated steps with their paired mean difference and standard error.
    """
    missing = [m for m in ABLATION_IDS if rows.get(m, {}).get("status") != "ok"]
    if missing:
        return {
            "complete": False,
            "reproduced": None,
            "text": f"Ablation order not checked: {', '.join(missing)} did not run (pass them in --methods).",
        }
    names = {
        "abl-none": "baseline",
        "abl-seglinear": "+SegLinear",
        "abl-dualscale": "+DualScale",
        "abl-both": "both",
    }
    steps = (
        ("abl-none", "abl-seglinear"),
        ("abl-none", "abl-dualscale"),
        ("abl-seglinear", "abl-both"),
        ("abl-dualscale", "abl-both"),
    )
    out: dict[str, Any] = {"complete": True}
    parts = []
    for metric, unit, digits in (("psnr", " dB", 2), ("ssim", "", 4)):
        violations = []
        for lo, hi in steps:
            a, b = _num(rows[lo][metric]), _num(rows[hi][metric])
            if not b > a:
                mean, se = _paired(rows[lo][f"{metric}_per_image"], rows[hi][f"{metric}_per_image"])
                within = math.isfinite(se) and abs(mean) <= 2 * se
                violations.append(
                    {
                        "lower": lo,
                        "higher": hi,
                        "values": [a, b],
                        "paired_mean": mean,
                        "paired_se": se,
                        "within_noise": within,
                    }
                )
        ok = not violations
        out[metric] = {"reproduced": ok, "violations": violations}
        vals = ", ".join(f"{names[m]} {_num(rows[m][metric]):.{digits}f}" for m in ABLATION_IDS)
        if ok:
            parts.append(f"{metric.upper()}: reproduced ({vals}).")
        else:
            why = "; ".join(
                f"{names[v['higher']]} is not above {names[v['lower']]} (paired difference "
                f"{v['paired_mean']:+.{digits}f}{unit} +- {v['paired_se']:.{digits}f}, "
                f"{'within' if v['within_noise'] else 'beyond'} 2 standard errors)"
                for v in violations
            )
            parts.append(f"{metric.upper()}: not reproduced: {why} ({vals}).")
    out["reproduced"] = out["psnr"]["reproduced"] and out["ssim"]["reproduced"]
    head = "Paper's ablation order (baseline < +SegLinear, +DualScale < both) "
    head += "reproduced on PSNR and SSIM. " if out["reproduced"] else "NOT fully reproduced. "
    base = rows["abl-none"]
    gains = ", ".join(
        f"{names[m]} {_num(rows[m]['psnr']) - _num(base['psnr']):+.2f} dB / "
        f"{_num(rows[m]['ssim']) - _num(base['ssim']):+.4f}"
        for m in ABLATION_IDS[1:]
    )
    tail = f" Gains over the baseline (PSNR / SSIM): {gains}."
    violations = out["psnr"]["violations"] + out["ssim"]["violations"]
    if violations and all(v["within_noise"] for v in violations):
        tail += (
            " Every violated step is within 2 standard errors of the per-image differences: this prompt set "
            "cannot separate those rows (more prompts would)."
        )
    elif violations:
        tail += " At least one violated step is beyond 2 standard errors: a real difference on this model."
    out["text"] = head + " ".join(parts) + tail
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    x = _num(v)
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}"


def _explain(entry: dict[str, Any]) -> str:
    """What the SegQuant components change on this model (from the plans), to read the ablation by."""
    rows = entry["methods"]
    plan = (rows.get("abl-both") or {}).get("plan")
    if not plan:
        return ""
    return (
        f"SegLinear gives {plan['segmented']} of {plan['layers']} quantized linears per-segment scales, "
        f"DualScale {plan['dual_scale']}; the other layers are quantized identically in all four ablation rows."
    )


def markdown(results: dict[str, Any], methods: Sequence[Method], note: str | None = None) -> str:
    """The ``## Fidelity`` section: one table and one ablation verdict per model (``note``: a paragraph after the intro)."""
    lines = [
        SECTION_TITLE,
        "",
        "Script: `benchmarks/fidelity.py` (where and how each model ran is given per model).",
    ]
    if any(e["settings"]["random_weights"] for e in results["models"].values()):
        lines += [
            "",
            "**SMOKE TEST: random (untrained) weights; the numbers say nothing about quantization quality.**",
        ]
    lines += [
        "",
        "PSNR/SSIM and FD vs float compare each method's images with the float model's images from the same "
        "noise; adherence = fraction of images whose every prompted attribute the exact read-out finds; FD = "
        "Frechet distance on the read-out's 64-dim features (vs float images / vs real generator images of the "
        "same prompts). Ablation rows (`abl-*`): `--ablation-base paper` is the paper's Table 4 setting "
        "(per-tensor INT8 W8A8, SmoothQuant alpha 0.5, AMax); the same config is quantized once.",
    ]
    if note:
        lines += ["", note]
    for model, entry in results["models"].items():
        s = entry["settings"]
        run = entry.get("run", {})
        lines += [
            "",
            f"### {model} ({s['model_class']}{', small test architecture' if s['small'] else ''})",
            "",
            f"Run {run.get('date', '?')} on {run.get('device_name', '?')} (torch {run.get('torch', '?')}): "
            f"`{run.get('command', '?')}`.",
            "",
            f"{s['prompts']} held-out prompts (seed {s['heldout_seed']}), {s['steps']} steps, guidance {s['guidance']:g}; "
            f"calibration: {s['calib_prompts']} other prompts x {s['steps']} steps; ablation base "
            f"`{s['ablation_base']}`.",
            "",
            "| method | W/A | PSNR (dB) | SSIM | adherence | FD vs float | FD vs real | quantize (s) | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            r = entry["methods"].get(m.id)
            if r is None:
                continue
            if r.get("status") != "ok":
                lines.append(
                    f"| {m.label} | {m.bits} | - | - | - | - | - | - | {r.get('status')}: {r.get('note', '')} |"
                )
                continue
            note = f"same config as `{r['same_as']}`" if r.get("same_as") else ""
            lines.append(
                f"| {m.label} | {m.bits} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | "
                f"{_fmt(r['adherence']['overall'], 3)} | {_fmt(r['fd_float'], 3)} | {_fmt(r['fd_real'], 3)} | "
                f"{_fmt(r.get('quantize_s'), 1)} | {note} |"
            )
        verdict = ablation_verdict(entry["methods"])
        entry["ablation"] = verdict
        lines += ["", f"**Ablation ({model}).** {verdict['text']}"]
        expl = _explain(entry)
        if expl and verdict.get("complete"):
            lines.append(expl)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the ``## Fidelity`` section of ``path`` (up to the next ``## `` heading) or append it."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith(SECTION_TITLE.split(" (")[0])), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    from segquant_fx.fileio import atomic_write_text

    atomic_write_text(path, new, make_parents=True)


def bar_chart(results: dict[str, Any], methods: Sequence[Method], path: Path) -> str | None:
    """Bar charts (PSNR, SSIM, adherence, FD vs float) per method and model; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: matplotlib not importable ({e})"
    panels = (
        ("psnr", "PSNR vs float (dB), higher is better"),
        ("ssim", "SSIM vs float, higher is better"),
        ("adherence", "prompt adherence, higher is better"),
        ("fd_float", "Frechet distance vs float, lower is better"),
    )
    models = list(results["models"])
    ids = [m.id for m in methods if any(m.id in results["models"][k]["methods"] for k in models)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.7 * len(ids) * max(1, len(models))), 13))
    width = 0.8 / max(1, len(models))
    fmt = {"psnr": "%.2f", "ssim": "%.4f", "adherence": "%.3f", "fd_float": "%.3g"}
    for ax, (key, title) in zip(axes, panels, strict=True):
        shown: list[float] = []
        for j, model in enumerate(models):
            rows = results["models"][model]["methods"]
            vals = []
            for mid in ids:
                r = rows.get(mid, {})
                v = (
                    float("nan")
                    if r.get("status") != "ok"
                    else _num(r["adherence"]["overall"] if key == "adherence" else r[key])
                )
                if key in ("psnr", "ssim", "fd_float") and mid == "float":
                    v = float("nan")  # the reference itself: inf / 1 / 0
                vals.append(v if math.isfinite(v) else float("nan"))
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(ids))]
            bars = ax.bar(xs, vals, width=width, label=model)
            ax.bar_label(bars, fmt=fmt[key], fontsize=6, rotation=90, padding=2)
            shown += [v for v in vals if math.isfinite(v)]
        if key in ("psnr", "ssim") and shown:
            # the differences between methods are small next to the values: zoom in on them
            lo, hi = min(shown), max(shown)
            span = max(hi - lo, 1e-3 * max(abs(hi), 1e-6))
            ax.set_ylim(lo - 0.6 * span, hi + 0.6 * span)
        elif shown:
            ax.set_ylim(0, max(shown) * 1.25 if max(shown) > 0 else 1.0)
        ax.set_xlim(-0.5, len(ids) - 0.5)
        ax.set_title(title + (" (y axis zoomed)" if key in ("psnr", "ssim") else ""), fontsize=10)
        ax.set_xticks(range(len(ids)))
        ax.set_xticklabels(ids, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    smoke = any(e["settings"]["random_weights"] for e in results["models"].values())
    fig.suptitle("segquant_fx fidelity benchmark" + (" (SMOKE TEST: random weights)" if smoke else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the benchmark."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in models (default all)")
    p.add_argument(
        "--methods", default="all", help=f"comma-separated method ids or 'all': {', '.join(METHOD_IDS)}"
    )
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts (default 128)")
    p.add_argument("--calib-prompts", type=int, default=16, help="calibration prompts (default 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model card's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model card's)")
    p.add_argument(
        "--ablation-base", default="paper", help="'paper' (Table 4 setting, default) or a preset name"
    )
    p.add_argument("--batch-size", type=int, default=64, help="prompts per backbone batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="fidelity-out", help="directory for fidelity.json and fidelity.png")
    p.add_argument(
        "--md",
        default=None,
        help="also write the markdown section into this file (e.g. benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep finished methods of OUT/fidelity.json (same settings)"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="add the models of these fidelity.json files (e.g. one GPU run per model) to the results",
    )
    p.add_argument(
        "--note", default=None, help="a paragraph to add to the markdown section (e.g. run context)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: write the table, JSON and chart of the stored/merged results",
    )
    p.add_argument(
        "--weights-root",
        default=None,
        help="load the models from DIR/<name>/ (save_bundle directories, e.g. freshly trained, not installed)",
    )
    p.add_argument("--random-weights", action="store_true", help="SMOKE TEST: untrained weights")
    p.add_argument("--small", action="store_true", help="with --random-weights: the reduced architectures")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first failing method (default: record it)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _read_results(path: Path, flag: str) -> dict[str, Any]:
    from segquant_fx.errors import ConfigError

    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: {path} is not a readable fidelity.json ({e})") from e
    if not isinstance(loaded, dict) or loaded.get("format") != RESULTS_FORMAT or "models" not in loaded:
        raise ConfigError(f"{flag}: {path} is not a format-{RESULTS_FORMAT} fidelity.json")
    return loaded


def use_weights_root(path: str | os.PathLike[str]) -> None:
    """Load the built-in models from ``path/<name>/`` instead of the package's weights (this process).

    Raises:
        ConfigError: ``path`` is not a directory.
    """
    from segquant_fx.errors import ConfigError
    from segquant_fx.t2i import models as t2i_models

    if not Path(path).is_dir():
        raise ConfigError(f"--weights-root {str(path)!r} is not a directory")
    t2i_models.WEIGHTS_ROOT = Path(path)


def _select_methods(spec: str) -> list[Method]:
    from segquant_fx.errors import ConfigError

    if spec == "all":
        return list(METHODS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in METHOD_IDS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_IDS)} or 'all'")
    return [m for m in METHODS if m.id == "float" or m.id in wanted]  # table order; float is the reference


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    from segquant_fx.errors import ConfigError, SegQuantError

    args = build_parser().parse_args(argv)
    args.progress = not args.quiet
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in MODELS]
        if bad or not models:
            raise ConfigError(f"--models {args.models!r}: choose from {', '.join(MODELS)}")
        methods = _select_methods(args.methods)
        if args.prompts < 2:
            raise ConfigError(f"--prompts {args.prompts}: the Frechet distance needs at least 2 prompts")
        if args.weights_root is not None:
            use_weights_root(args.weights_root)
        if args.ablation_base != "paper":
            ablation_base(args.ablation_base)  # unknown preset -> ConfigError now, not mid-run
        out = Path(args.out)
        json_path = out / "fidelity.json"
        results: dict[str, Any] = {"format": RESULTS_FORMAT, "models": {}}
        if (args.resume or args.report_only) and json_path.is_file():
            results = _read_results(json_path, "--resume")
        for extra in args.merge or ():
            results["models"].update(_read_results(Path(extra), "--merge")["models"])
        args.run_info = {
            "date": time.strftime("%Y-%m-%d"),
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "command": "python3 benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }

        from segquant_fx.fileio import atomic_write_text

        def save() -> None:
            atomic_write_text(json_path, json.dumps(_jsonable(results), indent=1) + "\n", make_parents=True)

        t0 = time.perf_counter()
        for model in models:
            if args.report_only:
                if model not in results["models"]:
                    raise ConfigError(
                        f"--report-only: no results for {model!r} in {json_path} or the --merge files"
                    )
                continue
            run_model(args, model, methods, results, save, log)
        md = markdown(results, methods, args.note)
        seconds = time.perf_counter() - t0
        why = bar_chart(results, methods, out / "fidelity.png")
        if why:
            log(why)
            md += f"\n({why})\n"
        save()
        print(md)
        if args.md:
            write_section(Path(args.md), md)
            log(f"wrote the fidelity section of {args.md}")
        log(f"results in {json_path} ({seconds:.0f} s)")
    except SegQuantError as e:
        print(f"fidelity: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
