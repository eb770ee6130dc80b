"""``segquant-fx demo`` (segquant_fx.t2i.demo): end to end on a small random-weight MMDiT, model and config
resolution, the missing-weights error, the ONNX failure record, the grid layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segquant_fx import cli
from segquant_fx.errors import ConfigError, SerializationError
from segquant_fx.t2i import demo, models
from segquant_fx.t2i.metrics import psnr, ssim


@pytest.fixture
def no_builtin_weights(tmp_path, monkeypatch):
    """Point the built-in weights at an empty directory."""
    root = tmp_path / "no-weights"
    root.mkdir()
    monkeypatch.setattr(models, "WEIGHTS_ROOT", root)
    return root


def test_demo_end_to_end(tmp_path):
    """Small random-weight MMDiT, 2 prompts x 2 steps: every artifact is written and consistent."""
    from PIL import Image

    out = tmp_path / "demo"
    with pytest.warns(UserWarning, match="SMOKE TEST"):
        res = demo.run_demo(
            demo.DemoSettings(
                random_weights=True,
                small=True,
                prompts=demo.DEMO_PROMPTS[:2],
                calib_prompts=1,
                steps=2,
                out=str(out),
                progress=False,
            )
        )
    for name in ("grid.png", "metrics.json", "metrics.md", "report.md"):
        assert (out / name).is_file(), name
    # grid: 2 rows x 3 columns of 128 px cells (pad 2), plus the title row and the prompt column
    with Image.open(out / "grid.png") as im:
        im.load()
        assert im.size == (3 * 130 + 2 + 360, 2 * 130 + 2 + 16 + 24)  # + title and smoke-test lines
    m = json.loads((out / "metrics.json").read_text())
    assert m["random_weights"] is True and m["model"] == "mmdit" and m["config"] == "w8a8"
    assert {"psnr", "ssim", "adherence", "per_prompt", "onnx", "timings", "settings"} <= set(m)
    assert set(m["adherence"]) >= {"float", "quantized", "chance"}
    assert 0.0 <= m["adherence"]["chance"]["overall"] <= 1.0
    assert [r["prompt"] for r in m["per_prompt"]] == list(demo.DEMO_PROMPTS[:2])
    assert m["calibration_items"] == 2 and m["quantized_layers"] == len(res.qmodel.plan) > 0
    # the numbers are those of the returned images, and quantization changed them only a little
    p = psnr(res.float_images, res.quantized_images)
    assert m["per_prompt"][1]["psnr"] == pytest.approx(float(p[1]))
    assert m["ssim"] == pytest.approx(float(ssim(res.float_images, res.quantized_images).mean()))
    assert 20.0 < m["psnr"] < math.inf and 0.5 < m["ssim"] < 1.0
    # same noise, same model: the float images are what generate() gives for those seeds
    from segquant_fx.t2i.diffusion import generate

    bundle = models.build_bundle(models.small_spec("mmdit"))
    ref = generate(
        bundle, list(demo.DEMO_PROMPTS[:2]), [demo.EVAL_SEED_BASE, demo.EVAL_SEED_BASE + 1], steps=2
    )
    torch.testing.assert_close(res.float_images, ref)
    assert "SMOKE TEST" in (out / "metrics.md").read_text()
    report = (out / "report.md").read_text()
    assert "quantized linear layers" in report and "SMOKE TEST" in report
    if m["onnx"]["ok"]:
        import onnx

        model = onnx.load(str(out / demo.ONNX_FILE))
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
        assert not (out / demo.ONNX_ERROR_FILE).exists()
    else:  # the reason is recorded, never silently dropped
        assert m["onnx"]["error"] and (out / demo.ONNX_ERROR_FILE).read_text().strip()


def test_missing_builtin_weights_give_the_install_error(no_builtin_weights, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "segquant-fx demo: error:" in err
    assert "has no trained weights" in err and "train_t2i.py" in err and "segquant_fx.t2i install" in err
    assert not out.exists()  # failed before writing anything
    with pytest.raises(SerializationError, match="train_t2i.py"):
        demo.load_demo_model("flux")


def test_model_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="--small needs --random-weights"):
        demo.load_demo_model("mmdit", small=True)
    with pytest.raises(ConfigError, match="neither a built-in model"):
        demo.load_demo_model("tiny-sd3")
    with pytest.raises(ConfigError, match="built-in model names only"):
        demo.load_demo_model(str(tmp_path), random_weights=True)
    with pytest.raises(ConfigError, match="expected a weights directory"):
        demo.load_demo_model(str(tmp_path))


def test_model_from_weights_and_diffusers_directories(bundle_of, tmp_path, monkeypatch):
    small = bundle_of("mmdit", small=True)
    # save_bundle format
    models.save_bundle(small, tmp_path / "weights", card={"note": "test"})
    b = demo.load_demo_model(str(tmp_path / "weights"))
    assert b.card["note"] == "test" and b.spec.config == small.spec.config
    # diffusers save_pretrained dir: text encoder and card from the built-in model of that class
    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path / "root")
    models.save_bundle(small, tmp_path / "root" / "mmdit")
    builtin = models.load_builtin("mmdit")
    tuned = models.build_bundle(models.small_spec("mmdit"), seed=7).backbone  # "fine-tuned" backbone
    tuned.save_pretrained(str(tmp_path / "diffusers"))
    d = demo.load_demo_model(str(tmp_path / "diffusers"))
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(d.backbone.state_dict()[k], v)
    for k, v in builtin.text_encoder.state_dict().items():
        torch.testing.assert_close(d.text_encoder.state_dict()[k], v)
    assert d.card["source"]["text_encoder"] == "built-in 'mmdit'"
    # an interface the text encoder does not fit is refused before loading
    cfg_path = tmp_path / "diffusers" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "joint_attention_dim": 64}))
    with pytest.raises(ConfigError, match="joint_attention_dim=64"):
        demo.load_demo_model(str(tmp_path / "diffusers"))
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ConfigError, match="'AutoencoderKL'"):
        demo.load_demo_model(str(tmp_path / "diffusers"))


def test_resolve_config(tmp_path):
    from segquant_fx.config import QuantizeConfig

    cfg, label = demo.resolve_config("w8a8-fp8")
    assert label == "w8a8-fp8" and cfg == QuantizeConfig.coerce("w8a8-fp8")
    ablated = QuantizeConfig.ablation("w8a8", dual_scale=False)
    (tmp_path / "c.json").write_text(ablated.to_json())
    cfg, label = demo.resolve_config(str(tmp_path / "c.json"))
    assert cfg == ablated and label == "c.json"
    (tmp_path / "c.yaml").write_text(
        "default:\n  input_quant: {type: fp8}\n  weight_quant: {type: fp8, axis: 0}\n"
    )
    cfg, _ = demo.resolve_config(str(tmp_path / "c.yaml"))
    assert cfg.default.input_quant.type == "fpe4m3"
    with pytest.raises(ConfigError, match="no such file"):
        demo.resolve_config(str(tmp_path / "missing.json"))
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match=r"\.json, \.yaml or \.yml"):
        demo.resolve_config(str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match="w8a8"):  # the message lists the presets
        demo.resolve_config("w9a9")


def test_bad_prompts_fail_before_loading(no_builtin_weights, tmp_path):
    with pytest.raises(ConfigError):
        demo.run_demo(demo.DemoSettings(prompts=("a purple elephant on the moon",), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_prompt_sets():
    assert demo.eval_prompts(3) == demo.DEMO_PROMPTS[:3]
    ten = demo.eval_prompts(10)
    assert ten[:8] == demo.DEMO_PROMPTS and len(ten) == 10 and len(set(ten)) == 10
    calib = demo.calibration_prompts(4)
    assert calib == demo.calibration_prompts(4) and not set(calib) & set(demo.DEMO_PROMPTS)
    # seeds of calibration and evaluation never meet
    assert demo.CALIB_SEED_BASE > demo.EVAL_SEED_BASE + 10_000
    with pytest.raises(ConfigError, match="positive int"):
        demo.eval_prompts(0)


def test_onnx_failure_is_recorded(tmp_path):
    stale = tmp_path / demo.ONNX_FILE
    stale.write_bytes(b"old")  # an earlier run's export must not survive a failed one
    info = demo.export_backbone_onnx(torch.nn.Linear(2, 2), stale)
    assert info["ok"] is False and "OnnxExportError" in info["error"]
    assert not stale.exists()
    assert "OnnxExportError" in (tmp_path / demo.ONNX_ERROR_FILE).read_text()


def test_comparison_grid_layout():
    f = torch.zeros(2, 3, 32, 32)
    q = torch.full((2, 3, 32, 32), 0.1)
    q[1] = 1.0
    g = demo.comparison_grid(f, q, scale=1, pad=0)
    assert g.shape == (3, 64, 96)
    torch.testing.assert_close(g[:, :32, 32:64], q[0])
    torch.testing.assert_close(g[:, :32, 64:], torch.full((3, 32, 32), 0.4))  # |diff| x 4
    torch.testing.assert_close(g[:, 32:, 64:], torch.ones(3, 32, 32))  # clipped to 1
    with pytest.raises(ConfigError, match="differ in shape"):
        demo.comparison_grid(f, q[:1])


def test_cli_defaults_are_the_readme_main_command():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.model, args.config, args.out, args.prompts) == (
        "mmdit",
        "w8a8",
        "segquant-demo",
        demo.EVAL_PROMPTS,
    )
    assert not args.random_weights and not args.no_onnx and args.func is demo.main
    args = cli.build_parser().parse_args(
        ["demo", "--prompt", "a red circle on a blue background", "--prompt", "x"]
    )
    assert args.prompt == ["a red circle on a blue background", "x"]
