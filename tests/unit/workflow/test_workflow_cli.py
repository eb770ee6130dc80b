"""segquant-fx calibrate / quantize (pipeline mode) / generate, through segquant_fx.cli.main."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import segquant_fx
from segquant_fx.calibset import load_calibrate_set
from segquant_fx.cli import main

SMALL = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--quiet"]


def _control_dataset(root):
    """A unified dataset directory with control maps (what `segquant-fx dataset prepare` writes)."""
    (root / "control").mkdir(parents=True)
    entries = []
    for i, (prompt, color) in enumerate(
        [("a fox", (200, 40, 40)), ("red car", (40, 200, 40)), ("blue sky", (0, 0, 255))]
    ):
        Image.new("RGB", (32, 32), color).save(root / "control" / f"{i}.png")
        entries.append({"id": str(i), "prompt": prompt, "image": None, "control": f"control/{i}.png"})
    (root / "metadata.json").write_text(json.dumps(entries))
    return root


def test_calibrate_quantize_generate_controlnet(tmp_path, capsys):
    """The CLI chain on a ControlNet pipeline: the quantized ControlNet drops in (dataset dir prompts)."""
    data = _control_dataset(tmp_path / "data")
    calib = tmp_path / "calib"
    pipe = ["--pipeline", "tiny-flux-controlnet"]
    assert (
        main(
            [
                "calibrate",
                *pipe,
                "--prompts",
                str(data),
                "--out",
                str(calib),
                "--calib-layer",
                "controlnet",
                "--steps",
                "3",
                "--timesteps-per-sample",
                "2",
                "--num-prompts",
                "2",
                "--chunk-size",
                "3",
                *SMALL,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "4 calibration items of 'controlnet' from 2 prompts (3 steps, 2 sampled per prompt, uniform)" in out
    )
    cs = load_calibrate_set(calib)
    assert len(cs) == 4 and len(cs.chunks) == 2 and cs.settings["pipeline"]["kwargs"]["height"] == 32
    assert cs[0]["controlnet_cond"].shape == (1, 64, 16)

    config = tmp_path / "w8a8.json"
    config.write_text(json.dumps(segquant_fx.QuantizeConfig.coerce("w8a8").to_dict()))
    qdir = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                *pipe,
                "--calib-layer",
                "controlnet",
                "--calib-set",
                str(calib),
                "--config",
                str(config),
                "--static-shapes",
                "--out",
                str(qdir),
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tiny-flux-controlnet controlnet: 31 layers quantized with" in out and "on 4 items" in out
    assert f"saved to {qdir}" in out and segquant_fx.load(str(qdir)).meta["calibration_items"] == 4

    run = [*pipe, "--prompts", str(data), "--steps", "2", "--num-prompts", "2", *SMALL]
    quant = [*run, "--quantized", str(qdir), "--calib-layer", "controlnet"]
    assert main(["generate", *run, "--out", str(tmp_path / "float")]) == 0
    assert main(["generate", *quant, "--out", str(tmp_path / "quant")]) == 0
    assert main(["generate", *quant, "--stepper", "identity:text", "--out", str(tmp_path / "id")]) == 0
    out = capsys.readouterr().out
    assert (
        "tiny-flux-controlnet, quantized backbone from" in out
        and "2 images with IdentityStepper written to" in out
    )
    index = [json.loads(line) for line in (tmp_path / "quant" / "images.jsonl").read_text().splitlines()]
    assert index == [
        {"file": "00000.png", "prompt": "a fox", "seed": 0},
        {"file": "00001.png", "prompt": "red car", "seed": 1},
    ]

    def png(d, f="00000.png"):
        return np.asarray(Image.open(tmp_path / d / f)).astype(int)

    assert png("quant").shape == (32, 32, 3)
    assert Image.open(tmp_path / "quant" / "grid.png").size == (64, 32)
    assert np.array_equal(png("quant"), png("id"))  # identity stepper: same image
    assert 0 < np.abs(png("quant") - png("float")).mean() < 25  # quantized: a slightly different image


def test_quantize_without_new_options_keeps_original(monkeypatch):
    import segquant_fx.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_quantize", lambda args: seen.append(args.model) or 7)
    assert main(["quantize"]) == 7 and seen == ["tiny-sd35"]
    assert main(["quantize", "--model", "tiny-flux", "--preset", "w8a16"]) == 7 and seen[-1] == "tiny-flux"


def test_calibrate_resume_and_mismatch_via_cli(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n{"prompt": "red car"}\n')
    args = [
        "calibrate",
        "--pipeline",
        "tiny-sd3",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "c"),
        "--steps",
        "2",
        "--sampler",
        "base",
        "--timesteps-per-sample",
        "1",
        *SMALL,
    ]
    assert main(args) == 0
    assert main(args) == 0  # complete: reused
    assert main([*args, "--guidance-scale", "3"]) == 1
    err = capsys.readouterr().err
    assert "segquant-fx calibrate: error: dump_path" in err and "pipeline.kwargs.guidance_scale=3.0" in err
    # generate from a .jsonl prompt file with the float pipeline
    assert (
        main(
            [
                "generate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "g"),
                "--steps",
                "1",
                "--no-grid",
                *SMALL,
            ]
        )
        == 0
    )
    assert sorted(f.name for f in (tmp_path / "g").iterdir()) == ["00000.png", "00001.png", "images.jsonl"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["calibrate", "--pipeline", "tiny-sd9", "--prompts", "{p}", "--out", "{t}/c"],
            "neither a built-in pipeline",
        ),
        (
            ["calibrate", "--pipeline", "tiny-sd3", "--prompts", "{t}/none.txt", "--out", "{t}/c"],
            "does not exist",
        ),
        (
            ["calibrate", "--pipeline", "tiny-sd3", "--prompts", "{p}", "--out", "{t}/c", "--mean", "3"],
            "--mean is a setting of --sampler normal",
        ),
        (
            [
                "calibrate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                "{p}",
                "--out",
                "{t}/c",
                "--calib-layer",
                "unet",
            ],
            "has no 'unet' component",
        ),
        (
            ["calibrate", "--pipeline", "tiny-sd3-controlnet", "--prompts", "{p}", "--out", "{t}/c"],
            "needs control images",
        ),
        (
            [
                "calibrate",
                "--pipeline",
                "tiny-sdxl",
                "--prompts",
                "{p}",
                "--out",
                "{t}/c",
                "--max-sequence-length",
                "8",
            ],
            "not SDXL",
        ),
        (
            [
                "calibrate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                "{p}",
                "--out",
                "{t}/c",
                "--controlnet-scale",
                "1",
            ],
            "needs a ControlNet pipeline",
        ),
        (
            [
                "generate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                "{p}",
                "--out",
                "{t}/g",
                "--stepper",
                "{t}/none",
            ],
            "no such file",
        ),
        (
            [
                "generate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                "{p}",
                "--out",
                "{t}/g",
                "--quantized",
                "{t}/none",
            ],
            "none",
        ),
        (
            [
                "generate",
                "--pipeline",
                "tiny-sd3",
                "--prompts",
                "{p}",
                "--out",
                "{t}/g",
                "--controlnet",
                "{t}",
            ],
            "--controlnet is for local pipelines",
        ),
        (["generate", "--pipeline", "{t}", "--prompts", "{p}", "--out", "{t}/g"], "has no model_index.json"),
        (["quantize", "--pipeline", "tiny-sd3"], "needs --prompts (with --pipeline) or --calib-set"),
        (
            ["quantize", "--model", "tiny-sd3", "--prompts", "{p}"],
            "records calibration items by running a pipeline",
        ),
        (
            ["quantize", "--pipeline", "tiny-sd3", "--prompts", "{p}", "--calib-set", "{t}"],
            "either --prompts (calibrate now) or --calib-set",
        ),
        (["quantize", "--model", "tiny-sd3", "--config", "{t}/cfg.txt"], "no such file"),
        (["quantize", "--model", "tiny-sd3", "--config", "{p}"], "unknown extension '.txt'"),
        (["quantize", "--model", "{t}"], "needs config.json"),
    ],
)
def test_errors(tmp_path, capsys, argv, message):
    p = tmp_path / "p.txt"
    p.write_text("a fox\n")
    argv = [a.format(p=p, t=tmp_path) for a in argv]
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"segquant-fx {argv[0]}: error:" in err and message in err


def test_quantize_calib_set_from_other_backbone(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    calib = tmp_path / "c"
    assert (
        main(
            [
                "calibrate",
                "--pipeline",
                "tiny-sd35",
                "--prompts",
                str(prompts),
                "--out",
                str(calib),
                "--steps",
                "1",
                *SMALL,
            ]
        )
        == 0
    )
    assert main(["quantize", "--model", "tiny-sd3", "--calib-set", str(calib), "--quiet"]) == 1
    assert "was recorded from a backbone with another config than tiny-sd3" in capsys.readouterr().err


def test_quantize_from_prompts_in_one_step(tmp_path, capsys):
    """`quantize --pipeline X --prompts FILE` records an in-memory calibration set, then quantizes and saves."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n# a comment\nred car\n")
    qdir = tmp_path / "q"
    argv = ["quantize", "--pipeline", "tiny-sd3", "--prompts", str(prompts), "--steps", "2"]
    assert (
        main([*argv, "--static-shapes", "--height", "32", "--width", "32", "--out", str(qdir), "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    # 2 prompts x 2 recorded steps = 4 items; the report and the error line are printed, the model saved
    assert "on 4 items" in out and "output relative error vs float on the first item" in out
    qmodel = segquant_fx.load(qdir)
    assert len(qmodel.plan) > 0
