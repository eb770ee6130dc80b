"""Every optimizer preset end to end on tiny-sd3 and tiny-flux: runs, is bounded, plans what it says."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import quantize
from segquant_fx.api import SUPPORTED_CALIB, SUPPORTED_OPT
from segquant_fx.config import BASELINE_PRESETS, CALIB_TYPES, OPT_TYPES, QuantizeConfig
from segquant_fx.models import build_model, calibration_items

from ._helpers import cache_capture

# preset: relative output error bound on the tiny models (random weights, 2 calibration items)
BOUNDS = {
    "baseline-w8a8": 0.1,
    "ptq4dit-w8a8": 0.1,
    "smooth-plus-w8a8": 0.1,
    "segquant-a-w8a8": 0.1,
    "segquant-g-w8a8": 0.1,
    "svdquant-w4a8": 0.2,
    "svdquant-w4a4": 0.3,
    "w4a8": 0.2,
    "w4a4": 0.3,
}
MODELS = ("tiny-sd3", "tiny-flux")


def test_every_optimizer_and_calibrator_is_enabled():
    assert set(OPT_TYPES) <= SUPPORTED_OPT
    assert set(CALIB_TYPES) <= SUPPORTED_CALIB
    assert set(BASELINE_PRESETS) | {"w4a8", "w4a4"} == set(BOUNDS)


@pytest.fixture(scope="module")
def zoo():
    cases = {}
    for name in MODELS:
        model, example = build_model(name, batch_size=1)
        cache_capture(model)
        with torch.no_grad():
            ref = model(**example, return_dict=False)[0]
        cases[name] = (model, calibration_items(name, 2, batch_size=1), example, ref)
    return cases


def _fast(preset: str) -> QuantizeConfig:
    """The preset with a 3-point alpha grid, and a rank that is low for the 32-wide tiny models."""
    cfg = QuantizeConfig.coerce(preset)
    opt = cfg.default.opt
    over: dict = {}
    if opt.search_alpha_config.enable:
        over["search_alpha_config"] = {"min": 0.25, "max": 0.75, "step": 0.25}
    if opt.type == "svd":
        over["low_rank"] = 4
    return cfg.with_overrides({"default": {"opt": over}}) if over else cfg


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("preset", sorted(BOUNDS))
def test_preset_end_to_end(zoo, model_name, preset):
    model, items, example, ref = zoo[model_name]
    cfg = _fast(preset)
    q = quantize(model, items, cfg, progress=False)
    with torch.no_grad():
        out = q(**example, return_dict=False)[0]
    err = float((out - ref).norm() / ref.norm())
    layers = q.meta["optimizer"]["layers"]
    print(f"\n{model_name} {preset}: relative error {err:.4f}, timings {q.meta['timings']}")
    assert torch.isfinite(out).all()
    assert err < BOUNDS[preset]
    segquant = cfg.default.seglinear
    plans = q.plan.values()
    assert any(p["in_segments"] or p["out_segments"] for p in plans) == segquant
    assert any(p["dual"] for p in plans) == (segquant and not cfg.default.input_quant.dynamic)
    opt = cfg.default.opt
    if opt.type == "svd":
        assert all(
            list(q.graph_module.get_submodule(m).lr_down.shape)[1] == p["in_features"]
            for m, p in q.plan.items()
        )
    if opt.search_alpha_config.enable:
        assert q.meta["optimizer"]["search_evaluations"] > 0
        assert all(a in (0.25, 0.5, 0.75) for lay in layers.values() for grp in lay["alphas"] for a in grp)
    if opt.per_segment_smoothing:
        assert any(p["smooth_groups"] for p in plans)
    if cfg.default.calib.type == "gptq":
        assert all("gptq" in lay for lay in layers.values())
