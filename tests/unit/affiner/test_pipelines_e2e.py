"""The affiner on the tiny adapter pipelines (SD3, FLUX, SDXL) end to end.

Backbones are "quantized" two ways: a 4-bit weight-rounded copy (cheap, a large systematic error,
used for the per-family checks) and, for the seed's full workflow on SD3, ``segquant_fx.quantize`` on a
calibration set recorded from the pipeline. Held-out figures are printed (run with ``-s``) and recorded
in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import segquant_fx
from segquant_fx.affiner import evaluate_affiner, process_affiner

CALIB = ["a red fox in the snow", "a blue car on a bridge", "two cats on a sofa"]
HELD_OUT = ["a green apple on a table", "a lighthouse at night", "a bowl of soup"]
SIZE = {"height": 32, "width": 32}


@functools.cache
def _pipe(name):
    from segquant_fx.models.pipeline_zoo import build_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_pipeline(name)


def _backbone(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _rounded(module: nn.Module, bits: int = 4) -> nn.Module:
    """A copy with Linear/Conv weights rounded to ``bits`` per output channel (weight-only fake quant)."""
    q = copy.deepcopy(module)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                w = m.weight
                s = w.abs().flatten(1).amax(1).clamp_min(1e-8).view(-1, *([1] * (w.dim() - 1))) / qmax
                w.copy_((w / s).round().clamp(-qmax, qmax) * s)
    return q


@functools.cache
def _rounded_backbone(name):
    return _rounded(_backbone(_pipe(name))).eval()


CASES = [
    # (pipeline, noise_target, extra pipeline arguments, measure final latents too)
    ("tiny-sd3", "all", {"guidance_scale": 3.0}, True),
    ("tiny-flux", "all", {}, False),
    ("tiny-flux", "all", {"true_cfg_scale": 2.0, "negative_prompt": "blurry"}, False),  # two calls per step
    ("tiny-sdxl", "text", {"guidance_scale": 3.0}, False),  # a CFG half, through the backbone hook
]


def _mserel(target, extra, steps=2):
    return {
        "type": "blockwise",
        "max_timestep": steps,
        "sample_size": len(CALIB),
        "batch_size": len(CALIB),  # recurrent: each step is fitted on all prompts before it is applied
        "noise_target": target,
        "extra_args": {**SIZE, **extra},
        "solver_config": {"blocksize": 4, "sample_mode": "block", "alpha": 1.0, "verbose": False},
    }


def _calibration_figures(aff):
    """Per-step MSE on the calibration run: quantized vs corrected (the correction that was applied).

    With one pipeline call for all prompts the recurrent run applied each step's final solution, so
    these are exactly what evaluate_affiner reports on the calibration prompts (checked on the toy
    pipeline in test_process.py) without running them again.
    """
    steps = sorted(aff.meta["calib_mse_quant"], key=int)
    return [aff.meta["calib_mse_quant"][s] for s in steps], [
        aff.meta["calib_mse_corrected_online"][s] for s in steps
    ]


@pytest.mark.parametrize(
    ("name", "target", "extra", "trajectory"), CASES, ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in CASES]
)
def test_affiner_reduces_noise_mse_on_tiny_pipelines(name, target, extra, trajectory):
    """Calibration prompts: lower per-step MSE vs float at every step; held-out figure printed."""
    pipe, quant = _pipe(name), _rounded_backbone(name)
    aff = process_affiner(_mserel(target, extra), CALIB, pipe, quant, shuffle=False, progress=False)
    assert aff.meta["latent_layout"] == ("packed" if name == "tiny-flux" else "bchw")
    assert aff.meta["latent_hw"] == [16, 16] and aff.meta["channels"] == 4
    before, after = _calibration_figures(aff)
    assert len(before) == 2 and all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    held = evaluate_affiner(aff, HELD_OUT, pipe, quant, progress=False, trajectory=trajectory)
    print(
        f"\n[affiner {name} {target} {extra}] calibration MSE {before} -> {after}\n  held-out: {held.summary()}"
    )


def test_seed_workflow_sd3(tmp_path):
    """generate_calibrate_set -> quantize -> process_affiner -> save/load -> pipe(..., stepper=affiner)."""
    from segquant_fx.calibset import UniformSampler

    pipe = _pipe("tiny-sd3")
    run = {**SIZE, "guidance_scale": 3.0}
    calib = segquant_fx.generate_calibrate_set(
        pipe, UniformSampler(), CALIB[:1], "transformer", num_inference_steps=2, progress=False, **run
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = segquant_fx.quantize(pipe.transformer, calib, config="w8a8", verbose=False)
    aff = segquant_fx.process_affiner(
        _mserel("all", {"guidance_scale": 3.0}),
        CALIB,
        pipe,
        qmodel,
        shuffle=False,
        progress=False,
        dump_path=tmp_path / "a",
    )
    before, after = _calibration_figures(aff)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    held = evaluate_affiner(aff, HELD_OUT, pipe, qmodel, progress=False)
    print(
        f"\n[affiner seed workflow tiny-sd3 w8a8] calibration MSE {before} -> {after}\n  held-out: {held.summary()}"
    )
    loaded = segquant_fx.load_affiner(tmp_path / "a")
    real = pipe.transformer
    pipe.transformer = qmodel
    try:
        g = torch.Generator().manual_seed(0)
        out = pipe(HELD_OUT[0], num_inference_steps=2, stepper=loaded, generator=g, output_type="np", **run)
    finally:
        pipe.transformer = real
    image = out.images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()
