"""The shipped trained models (skipped until weights are installed in segquant_fx/t2i/weights/)."""

from __future__ import annotations

import pytest

from segquant_fx.t2i import models
from segquant_fx.t2i.data import SceneConfig, heldout_scenes, scene_prompts
from segquant_fx.t2i.diffusion import generate
from segquant_fx.t2i.readout import judge

N_CHECK = 12


def _installed(name: str) -> bool:
    d = models.builtin_weights_dir(name)
    return (d / models.CARD_FILE).is_file() and (d / models.BACKBONE_FILE).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_shipped_model_matches_its_card(name):
    """Weights load offline, fit 8 MB, beat chance in the card, and re-generate the card's per-prompt verdicts."""
    if not _installed(name):
        pytest.skip(f"no trained weights for {name!r} in {models.builtin_weights_dir(name)}")
    d = models.builtin_weights_dir(name)
    assert (d / models.BACKBONE_FILE).stat().st_size + (
        d / models.TEXT_ENCODER_FILE
    ).stat().st_size <= 8_000_000
    bundle = models.load_builtin(name)
    card = bundle.card
    ev = card["evaluation"]
    assert ev["adherence"]["overall"] > 5 * ev["chance"]["overall"] + 0.05  # clearly above chance
    g = ev["best_guidance"]
    record = ev["by_guidance"][f"{g:g}"]["first_overall"]
    seed = ev["heldout"]["seed"]
    scene_cfg = SceneConfig(**card["data"]["scene"])
    scenes = heldout_scenes(ev["heldout"]["n_prompts"], seed=seed, config=scene_cfg)[:N_CHECK]
    images = generate(
        bundle,
        scene_prompts(scenes),
        [seed * 100_000 + i for i in range(N_CHECK)],
        steps=ev["steps"],
        guidance=g,
    )
    verdicts = judge(images, scenes)["overall"].tolist()
    agree = sum(v == (c == "1") for v, c in zip(verdicts, record[:N_CHECK], strict=True))
    assert agree >= N_CHECK - 2, (verdicts, record[:N_CHECK])
