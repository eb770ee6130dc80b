"""Training: in-process smoke run (files, card, reload), time budget, LR schedule, and the CLI's --model all."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.models import load_bundle
from segquant_fx.t2i.train import TrainConfig, _lr_factor, config_for, train

ROOT = Path(__file__).resolve().parents[3]
TINY_EVAL = {"eval_prompts": 4, "eval_steps": 2, "eval_guidances": (1.0, 2.0), "grid_prompts": 4}


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast of RMSNorm
def test_train_smoke_writes_weights_card_and_samples(tmp_path):
    """3 steps of the small FLUX with bf16 autocast on CPU: finite loss, every file, a card that reloads."""
    cfg = config_for("flux", steps=3, batch_size=4, arch="small", log_every=1, amp=True, **TINY_EVAL)
    lines: list[str] = []
    card = train(cfg, tmp_path, log=lines.append)
    d = tmp_path / "flux"
    assert sorted(p.name for p in d.iterdir()) == [
        "backbone.safetensors",
        "model_card.json",
        "samples.png",
        "text_encoder.safetensors",
        "train_log.txt",
    ]
    assert (d / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tr = card["training"]
    assert tr["steps_done"] == 3 and tr["samples_seen"] == 12 and tr["stop_reason"] == "steps"
    assert math.isfinite(tr["final_loss"]) and [s for s, _ in tr["loss_curve"]] == [1, 2, 3]
    assert tr["amp"] is True and tr["arch"] == "small" and tr["weights"] == "EMA"
    ev = card["evaluation"]
    assert set(ev["by_guidance"]) == {"1", "2"} and ev["best_guidance"] in (1.0, 2.0)
    assert len(ev["by_guidance"]["1"]["first_overall"]) == 4
    assert 0 <= ev["chance"]["overall"] <= 1 and ev["adherence"]["n"] == 4
    assert card["sampling"] == {"steps": 2, "guidance": ev["best_guidance"]}
    assert card["data"]["scene"]["p_two"] == 0.4
    on_disk = json.loads((d / "model_card.json").read_text())
    assert on_disk["evaluation"]["best_guidance"] == ev["best_guidance"]
    assert load_bundle(d).default_guidance == ev["best_guidance"]
    assert any("step 3 loss" in line for line in lines)
    assert (d / "train_log.txt").read_text().count("\n") == len(lines)


def test_time_budget_stops_training_and_still_saves(tmp_path):
    cfg = config_for(
        "mmdit", steps=10_000, time_budget_s=1e-3, batch_size=2, arch="small", eval_prompts=0, log_every=1
    )
    card = train(cfg, tmp_path, log=lambda _: None)
    assert card["training"]["steps_done"] == 1 and card["training"]["stop_reason"] == "time budget"
    assert "evaluation" not in card
    assert (tmp_path / "mmdit" / "backbone.safetensors").is_file()


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(model="flux", steps=1000, warmup_steps=100, decay_start=0.5)
    assert _lr_factor(cfg, 0, 0.0) == pytest.approx(0.01)
    assert _lr_factor(cfg, 99, 0.0) == 1.0 and _lr_factor(cfg, 500, 0.0) == 1.0
    assert _lr_factor(cfg, 750, 0.0) == pytest.approx(0.5)
    assert _lr_factor(cfg, 1000, 0.0) == pytest.approx(0.05)
    timed = TrainConfig(model="flux", steps=10**6, time_budget_s=100.0, warmup_steps=0, decay_start=0.5)
    assert _lr_factor(timed, 10, 75.0) == pytest.approx(0.5)  # by time when the budget is what ends the run


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "sd9"}, "unknown text-to-image model"),
        ({"model": "unet", "arch": "huge"}, "arch='huge'"),
        ({"model": "unet", "eval_prompts": 1}, "eval_prompts must be 0"),
        ({"model": "unet", "batch_size": 0}, "batch_size=0"),
        ({"model": "unet", "time_budget_s": 0}, "time_budget_s=0"),
        ({"model": "unet", "p_uncond": 1.0}, "p_uncond=1.0"),
        ({"model": "unet", "eval_guidances": ()}, "eval_guidances"),
    ],
)
def test_bad_train_config(kwargs, match):
    """Invalid settings raise ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_train_rejects_bad_pack_and_missing_cuda(tmp_path):
    """pack must be dir|tar; asking for CUDA where there is none is a ConfigError, not a CUDA traceback."""
    with pytest.raises(ConfigError, match="pack='zip'"):
        train(config_for("unet"), tmp_path, pack="zip")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(config_for("unet", device="cuda"), tmp_path)
    with pytest.raises(ConfigError, match="unknown training settings"):
        config_for("unet", stepz=3)


@pytest.mark.slow
def test_cli_all_trains_three_models_concurrently_into_flat_tars(tmp_path):
    """The GPU command's exact path (--model all --pack tar) on CPU with the small variants, 2 steps each."""
    out = tmp_path / "t2i"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_t2i.py"), "--model", "all", "--arch", "small",
        "--steps", "2", "--batch-size", "2", "--out", str(out), "--pack", "tar", "--device", "cpu",
        "--eval-prompts", "2", "--eval-steps", "1", "--eval-guidances", "2", "--grid-prompts", "2",
        "--threads", "1", "--time-budget-s", "300",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "flux-samples.png", "mmdit-samples.png", "summary.json",
        "t2i-flux.tar", "t2i-mmdit.tar", "t2i-unet.tar", "unet-samples.png",
    ]  # fmt: skip
    assert all(p.is_file() for p in out.iterdir())  # flat: nothing nested comes back from the GPU machine
    for name in ("mmdit", "flux", "unet"):
        with tarfile.open(out / f"t2i-{name}.tar") as tf:
            assert sorted(tf.getnames()) == [
                f"{name}/{f}"
                for f in (
                    "backbone.safetensors",
                    "model_card.json",
                    "samples.png",
                    "text_encoder.safetensors",
                    "train_log.txt",
                )
            ]
        assert f"{name:>5} | [{name}] step 2 loss" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_codes"] == {"mmdit": 0, "flux": 0, "unet": 0}
    assert {m: s["steps"] for m, s in summary["models"].items()} == {"mmdit": 2, "flux": 2, "unet": 2}

    from segquant_fx.t2i.install import install_weights

    target = install_weights(out / "t2i-flux.tar", tmp_path / "weights")
    assert load_bundle(target).spec.config["num_single_layers"] == 1
