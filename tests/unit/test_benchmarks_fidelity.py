"""benchmarks/fidelity.py: method configs (the ablation chain, deduplication), the ablation verdict, the
RESULTS.md section writer, and a smoke run on a small random-weight MMDiT (then resumed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from _utils.bench import load_benchmark

from segquant_fx.config import QuantizeConfig
from segquant_fx.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


fidelity = load_benchmark("fidelity")
METHODS = {m.id: m for m in fidelity.METHODS}


def _cfg(mid: str, base: str = "paper") -> QuantizeConfig:
    return METHODS[mid].config(base)


def test_ablation_chain_is_the_papers_table4_setting():
    none, seg, dual, both = (_cfg(m) for m in fidelity.ABLATION_IDS)
    # the paper's ablation: per-tensor INT8 W8A8, SmoothQuant alpha 0.5, AMax; only the two components vary
    for c in (none, seg, dual, both):
        d = c.default
        assert (d.input_quant.type, d.input_quant.axis, d.weight_quant.type, d.weight_quant.axis) == (
            "int8",
            None,
            "int8",
            None,
        )
        assert (d.opt.type, d.opt.alpha, d.calib.type) == ("smooth", 0.5, "amax")
        assert not d.opt.search_alpha_config.enable
    assert (none.default.seglinear, none.default.dual_scale) == (False, False)
    assert (seg.default.seglinear, seg.default.dual_scale) == (True, False)
    assert (dual.default.seglinear, dual.default.dual_scale) == (False, True)
    assert (both.default.seglinear, both.default.dual_scale) == (True, True)
    assert "activation_to_linear" in both.default.search_patterns
    assert dual.default.search_patterns == ("activation_to_linear",)
    assert "activation_to_linear" not in seg.default.search_patterns
    # "no SegLinear, no DualScale" is PTQ4DiT's preset exactly (computed once by the benchmark)
    assert none.to_json() == _cfg("ptq4dit-w8a8").to_json()
    # baseline-w8a8 is per-tensor W8A8 too, but without smoothing
    base = _cfg("baseline-w8a8").default
    assert (base.weight_quant.axis, base.opt.type, base.seglinear, base.dual_scale) == (
        None,
        "default",
        False,
        False,
    )
    # on our w8a8 preset instead: per-channel weights
    assert _cfg("abl-none", "w8a8").default.weight_quant.axis == 0
    w4 = _cfg("segquant-w4a8").default
    assert (w4.seglinear, w4.dual_scale, w4.opt.type, w4.opt.low_rank) == (True, True, "svd", 64)


def test_every_method_config_builds():
    for m in fidelity.METHODS:
        if m.config is not None:
            assert isinstance(m.config("paper"), QuantizeConfig), m.id


def _row(value: float, per_image: list[float], metric: str = "psnr") -> dict:
    other = "ssim" if metric == "psnr" else "psnr"
    return {
        "status": "ok",
        metric: value,
        f"{metric}_per_image": per_image,
        other: 1.0,
        f"{other}_per_image": [1.0] * len(per_image),
    }


def _rows(values: dict[str, list[float]]) -> dict:
    out = {}
    for mid, per in values.items():
        r = _row(sum(per) / len(per), per)
        r["ssim"] = r["psnr"] / 100  # same order on SSIM
        r["ssim_per_image"] = [v / 100 for v in per]
        out[mid] = r
    return out


def test_ablation_verdict_reproduced():
    rows = _rows(
        {
            "abl-none": [20.0, 21.0, 22.0],
            "abl-seglinear": [21.0, 22.0, 23.0],
            "abl-dualscale": [20.5, 21.5, 22.5],
            "abl-both": [22.0, 23.0, 24.0],
        }
    )
    v = fidelity.ablation_verdict(rows)
    assert v["complete"] and v["reproduced"] and v["psnr"]["reproduced"] and v["ssim"]["reproduced"]
    assert v["text"].startswith("Paper's ablation order") and "reproduced on PSNR and SSIM" in v["text"]
    assert "+SegLinear +1.00 dB / +0.0100" in v["text"] and "standard errors" not in v["text"]


def test_ablation_verdict_names_violations_and_noise():
    rows = _rows(
        {
            "abl-none": [20.0, 21.0, 22.0, 23.0],
            "abl-seglinear": [20.1, 20.9, 22.1, 22.9],  # mean equal to baseline: within noise
            "abl-dualscale": [25.0, 26.0, 27.0, 28.0],
            "abl-both": [24.0, 25.0, 26.0, 27.0],  # 1 dB below +DualScale on every image: beyond noise
        }
    )
    v = fidelity.ablation_verdict(rows)
    assert v["complete"] and v["reproduced"] is False
    viol = {(x["lower"], x["higher"]): x for x in v["psnr"]["violations"]}
    assert set(viol) == {("abl-none", "abl-seglinear"), ("abl-dualscale", "abl-both")}
    assert viol[("abl-none", "abl-seglinear")]["within_noise"] is True
    assert viol[("abl-dualscale", "abl-both")]["within_noise"] is False
    assert viol[("abl-dualscale", "abl-both")]["paired_mean"] == pytest.approx(-1.0)
    assert "NOT fully reproduced" in v["text"] and "both is not above +DualScale" in v["text"]
    assert "beyond 2 standard errors" in v["text"] and "within 2 standard errors" in v["text"]
    assert "a real difference on this model" in v["text"]
    assert "+DualScale +5.00 dB" in v["text"]  # gains over the baseline


def test_ablation_verdict_incomplete():
    v = fidelity.ablation_verdict({"abl-none": _row(1.0, [1.0, 1.0]), "abl-both": {"status": "failed"}})
    assert v["complete"] is False and v["reproduced"] is None
    assert "abl-seglinear" in v["text"] and "abl-both" in v["text"]


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Kernels\n\nkeep me\n")
    fidelity.write_section(path, fidelity.SECTION_TITLE + "\n\nfirst\n")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n\n## Kernels\n\nkeep me\n") and text.endswith("first\n")
    path.write_text(text + "\n## Later\n\nme too\n")
    fidelity.write_section(path, fidelity.SECTION_TITLE + "\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and "keep me" in text and "## Later\n\nme too" in text
    assert text.count("## Fidelity") == 1


def test_bad_arguments(capsys):
    assert fidelity.main(["--models", "sd3"]) == 2
    assert "choose from mmdit, flux, unet" in capsys.readouterr().err
    assert fidelity.main(["--methods", "float,nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert fidelity.main(["--prompts", "1"]) == 2
    with pytest.raises(ConfigError):
        fidelity._select_methods("gptq")


def test_smoke_run_small_mmdit_then_resume(tmp_path, capsys):
    """One quantization (abl-none; ptq4dit-w8a8 reuses it), torchao (runs or is skipped), then --resume."""
    out = tmp_path / "out"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Other\n\nuntouched\n")
    argv = [
        "--models", "mmdit", "--methods", "abl-none,ptq4dit-w8a8,torchao-int8", "--prompts", "2",
        "--calib-prompts", "1", "--steps", "2", "--random-weights", "--small", "--out", str(out),
        "--md", str(md), "--quiet",
    ]  # fmt: skip
    assert fidelity.main(argv) == 0
    res = json.loads((out / "fidelity.json").read_text())
    rows = res["models"]["mmdit"]["methods"]
    assert rows["float"]["psnr"] == "inf" and rows["float"]["ssim"] == pytest.approx(1.0)
    q = rows["abl-none"]
    assert q["status"] == "ok" and 20 < q["psnr"] < math.inf and 0 < q["ssim"] < 1
    assert len(q["psnr_per_image"]) == 2 and q["fd_float"] >= 0 and q["fd_real"] > 0
    assert q["plan"]["layers"] > 0 and q["plan"]["segmented"] == q["plan"]["dual_scale"] == 0
    assert rows["ptq4dit-w8a8"]["same_as"] == "abl-none" and rows["ptq4dit-w8a8"]["psnr"] == q["psnr"]
    assert rows["torchao-int8"]["status"] in ("ok", "skipped")
    stdout = capsys.readouterr().out
    assert "SMOKE TEST" in stdout and "| float | FP32 |" in stdout
    assert "Ablation order not checked" in stdout
    text = md.read_text()
    assert "## Other\n\nuntouched" in text and "### mmdit" in text
    if importlib.util.find_spec("matplotlib") is not None:
        from PIL import Image

        with Image.open(out / "fidelity.png") as im:
            assert im.size[0] > 100
    # --resume: nothing is recomputed, the table is the same
    assert fidelity.main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "every method done before" in captured.err
    assert json.loads((out / "fidelity.json").read_text())["models"]["mmdit"]["methods"]["abl-none"] == q


def test_weights_root(tmp_path, monkeypatch, capsys):
    from segquant_fx.t2i import models
    from segquant_fx.t2i.demo import load_demo_model

    monkeypatch.setattr(models, "WEIGHTS_ROOT", models.WEIGHTS_ROOT)  # restored after the test
    small = models.build_bundle(models.small_spec("unet"))
    models.save_bundle(small, tmp_path / "root" / "unet", card={"note": "fresh"})
    fidelity.use_weights_root(tmp_path / "root")
    assert load_demo_model("unet").card["note"] == "fresh"
    assert fidelity.main(["--weights-root", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_ablation_verdict_all_within_noise():
    rows = _rows(
        {
            "abl-none": [20.0, 22.0, 24.0],
            "abl-seglinear": [21.0, 21.0, 23.9],  # slightly lower on average, noisy
            "abl-dualscale": [21.0, 23.0, 25.0],
            "abl-both": [22.0, 24.0, 26.0],
        }
    )
    v = fidelity.ablation_verdict(rows)
    assert v["reproduced"] is False
    assert all(x["within_noise"] for x in v["psnr"]["violations"] + v["ssim"]["violations"])
    assert "cannot separate those rows" in v["text"]


def test_merge_and_report_only(tmp_path, capsys):
    rows = _rows({m: [20.0 + i, 21.0 + i] for i, m in enumerate(fidelity.ABLATION_IDS)})
    for r in rows.values():
        r.update(adherence={"overall": 0.5}, fd_float=0.1, fd_real=1.0, quantize_s=1.0)
    settings = {
        "model_class": "X", "small": False, "random_weights": False, "prompts": 2, "heldout_seed": 1234,
        "steps": 2, "guidance": 1.0, "calib_prompts": 1, "ablation_base": "paper",
    }  # fmt: skip
    run = {"date": "d", "device_name": "NVIDIA H100", "torch": "t", "command": "c"}
    for model in ("mmdit", "unet"):
        data = {
            "format": fidelity.RESULTS_FORMAT,
            "models": {model: {"settings": settings, "methods": rows, "run": run}},
        }
        (tmp_path / f"{model}.json").write_text(json.dumps(data))
    argv = [
        "--models",
        "mmdit,unet",
        "--methods",
        ",".join(fidelity.ABLATION_IDS),
        "--report-only",
        "--note",
        "N0TE",
    ]
    argv += [
        "--out",
        str(tmp_path / "merged"),
        "--merge",
        str(tmp_path / "mmdit.json"),
        str(tmp_path / "unet.json"),
    ]
    assert fidelity.main(argv) == 0
    out = capsys.readouterr().out
    assert "### mmdit" in out and "### unet" in out and "on NVIDIA H100" in out
    assert out.count("reproduced on PSNR and SSIM") == 2 and "\nN0TE\n" in out
    merged = json.loads((tmp_path / "merged" / "fidelity.json").read_text())
    assert set(merged["models"]) == {"mmdit", "unet"}
    # nothing stored for flux: --report-only refuses instead of computing
    assert fidelity.main([*argv[:1], "mmdit,flux", *argv[2:]]) == 2
    assert "no results for 'flux'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert fidelity.main([*argv, str(tmp_path / "bad.json")]) == 2
    assert "not a format-1 fidelity.json" in capsys.readouterr().err
