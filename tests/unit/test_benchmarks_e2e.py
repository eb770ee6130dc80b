"""benchmarks/e2e.py and benchmarks/e2e_report.py: variant parsing, kernel classification, weight bytes,
a CPU smoke run of the benchmark on tiny-sd3, and the report merger on real and synthetic results."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from _utils.bench import load_benchmark

from segquant_fx.errors import ConfigError

e2e = load_benchmark("e2e")
report = load_benchmark("e2e_report")


@pytest.fixture
def one_thread():
    """The smoke runs pass --threads 1 (tiny ops on a shared machine); restore the caller's setting after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- variants


def test_parse_variants_orders_bf16_torchao_then_presets():
    vs = e2e.parse_variants(
        "segquant_w4a8_compile,bf16_eager,segquant_w4a8_eager,segquant_w8a8_eager,torchao_fp8_compile,bf16_compile"
    )
    assert [v.name for v in vs] == [
        "bf16_eager",
        "bf16_compile",
        "torchao_fp8_compile",
        "segquant_w4a8_eager",
        "segquant_w4a8_compile",
        "segquant_w8a8_eager",
    ]
    v = vs[2]
    assert (v.kind, v.mode, v.scheme) == ("torchao", "compile", "fp8")
    assert (vs[3].kind, vs[3].scheme, vs[3].mode) == ("segquant", "w4a8", "eager")


def test_parse_variants_given_order_is_kept():
    names = "bf16_eager,segquant_w4a8_eager,bf16_compile,segquant_w4a8_compile"
    assert [v.name for v in e2e.parse_variants(names, order="given")] == names.split(",")
    with pytest.raises(ConfigError, match="order must be"):
        e2e.parse_variants(names, order="random")


def test_parse_variants_groups_expand_and_dedupe():
    vs = e2e.parse_variants("all,bf16_eager,segquant")
    names = [v.name for v in vs]
    assert len(names) == len(set(names)) == 10
    assert names[:2] == ["bf16_eager", "bf16_compile"]
    assert {"segquant_w8a8-fp8_eager", "segquant_w8a8-fp8_compile", "torchao_int8_compile"} <= set(names)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("bf16_fast", "unknown variant 'bf16_fast'"),
        ("segquant_w9a9_eager", "variant 'segquant_w9a9_eager'.*w9a9"),
        ("torchao_int4_compile", "unknown variant"),
        (" , ", "--variants is empty"),
    ],
)
def test_parse_variants_rejects_bad_names(spec, match):
    """Bad names raise ConfigError naming the value (the CLI turns it into a usage error)."""
    with pytest.raises(ConfigError, match=match):
        e2e.parse_variants(spec)


def test_cli_bad_model_is_a_usage_error(tmp_path, capsys):
    """An unknown model exits with status 2 before anything is built."""
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--model", "no-such-model", "--device", "cpu", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no-such-model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- classification

CUTLASS = (
    "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, "
    "cutlass::epilogue::thread::LinearCombination<cutlass::NumericConverter<float>>>>(Params)"
)


@pytest.mark.parametrize(
    ("name", "ancestors", "category"),
    [
        (CUTLASS, (), "gemm"),  # "NumericConverter" must not read as a convolution
        ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", (), "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", (), "gemm"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", (), "conv"),
        ("void at::native::elementwise_kernel<...>", ("aten::add", "aten::convolution"), "conv"),
        ("void quantize_rows_kernel<__nv_bfloat16, 0, 8, 0>(Params, sq_segments)", (), "quantize"),
        (
            "void at::native::vectorized_elementwise_kernel<4, DivFunctor>",
            ("aten::div", "segquant::quantize"),
            "quantize",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, MulFunctor>",
            ("aten::mul", "segquant::qlinear"),
            "gemm",
        ),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", (), "attention"),
        (
            "void at::native::elementwise_kernel<...>",
            ("aten::mul", "aten::scaled_dot_product_attention"),
            "attention",
        ),
        ("triton_poi_fused__to_copy_clamp_div_round_3", (), "quantize"),
        ("triton_poi_fused_add_addmm_gelu_1", (), "other"),  # a bias epilogue, not the GEMM
        ("triton_tem_fused_mm_0", (), "gemm"),
        ("triton_red_fused_native_layer_norm_2", (), "other"),
        ("Memcpy HtoD (Pageable -> Device)", (), "other"),
        ("aten::addmm", (), "gemm"),
        ("segquant::qlinear", (), "gemm"),
    ],
)
def test_classify_kernel(name, ancestors, category):
    assert e2e.classify_kernel(name, ancestors) == category


def test_breakdown_sums_per_step_and_fractions():
    items = [
        ("triton_tem_fused_mm_0", 3000.0, ()),
        ("quantize_rows_kernel<x>", 1000.0, ()),
        ("flash_fwd_kernel", 2000.0, ()),
        ("void at::native::elementwise_kernel<x>", 4000.0, ()),
    ]
    b = e2e.breakdown_from_items(items, steps=2)
    assert b["ms_per_step"] == {"gemm": 1.5, "quantize": 0.5, "attention": 1.0, "conv": 0.0, "other": 2.0}
    assert b["total_ms_per_step"] == pytest.approx(5.0)
    assert sum(b["fraction"].values()) == pytest.approx(1.0)
    assert b["top"][0] == {
        "name": "void at::native::elementwise_kernel<x>",
        "category": "other",
        "ms_per_step": 2.0,
    }


# ------------------------------------------------------------------------------------------- weight bytes


def test_weight_bytes_counts_stored_formats_once():
    m = torch.nn.Module()
    lin = torch.nn.Module()
    lin.register_buffer("qweight", torch.zeros(16, 4, dtype=torch.uint8))  # int4 packed: 16 x 8 values
    lin.register_buffer("w_scale", torch.ones(16, 1))
    lin.register_buffer("x_scale", torch.ones(1))
    lin.register_buffer("smooth", torch.ones(8))
    lin.register_buffer("lr_down", torch.zeros(2, 8, dtype=torch.bfloat16))
    lin.register_buffer("lr_up", torch.zeros(16, 2, dtype=torch.bfloat16))
    lin.bias = torch.nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    m.lin = lin
    shared = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    m.a, m.b = shared, shared  # registered twice: counted once
    wb = e2e.weight_bytes(m)
    assert wb["qweight"] == 64
    assert wb["scales"] == (16 + 1 + 8) * 4
    assert wb["low_rank"] == (16 + 32) * 2
    assert wb["float"] == 16 * 2 + 64 * 2
    assert wb["dequantized_copy"] == 0
    assert wb["float_buffers"] == 0
    m.register_buffer("pos_table", torch.zeros(10, dtype=torch.bfloat16))  # a float buffer, not a parameter
    wb = e2e.weight_bytes(m)
    assert wb["float_buffers"] == 20
    assert wb["total"] == 64 + 100 + 96 + 160 + 20


class _QTensor(torch.Tensor):
    """A minimal torchao-like wrapper subclass: logical bf16, stored as int8 data plus a float32 scale."""

    @staticmethod
    def __new__(cls, qdata, scale):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=torch.bfloat16, device=qdata.device
        )

    def __init__(self, qdata, scale):
        self.qdata, self.scale = qdata, scale

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, size, stride):
        return _QTensor(inner["qdata"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_weight_bytes_flattens_tensor_subclasses():
    """Wrapper subclasses are counted by their stored parts, not by their logical dtype."""
    t = _QTensor(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 1))
    m = torch.nn.Module()
    m.register_buffer("weight", t)
    wb = e2e.weight_bytes(m)
    assert (wb["qweight"], wb["scales"], wb["float"], wb["float_buffers"]) == (128, 32, 0, 0)
    assert e2e.tensor_bytes(t) == 160  # not 8 * 16 * 2 (the logical bf16 size)


# ------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One CPU run of the benchmark: bf16 eager and segquant W8A8 eager on tiny-sd3 (a few seconds)."""
    out = tmp_path_factory.mktemp("e2e")
    n = torch.get_num_threads()
    try:
        rc = e2e.main(
            "--model tiny-sd3 --device cpu --batch 1 --calib-items 2 --variants bf16_eager,segquant_w8a8_eager "
            "--warmup 1 --steps-timed 3 --profile-steps 1 --threads 1 --quiet --tag smoke".split()
            + ["--out", str(out)]
        )
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return out


def test_smoke_run_writes_json_and_markdown(smoke_dir):
    res = json.loads((smoke_dir / "e2e_tiny-sd3_b1_smoke.json").read_text())
    assert res["benchmark"] == "e2e" and res["model"] == "tiny-sd3" and res["batch"] == 1
    assert res["backbone_batch"] == 1 and res["device_type"] == "cpu"
    by = {v["name"]: v for v in res["variants"]}
    assert [v["name"] for v in res["variants"]] == ["bf16_eager", "segquant_w8a8_eager"]
    base, q = by["bf16_eager"], by["segquant_w8a8_eager"]
    assert base["status"] == "ok" and q["status"] == "ok", q.get("traceback")
    assert base["rel_err"] == 0.0 and base["speedup_vs_bf16_eager"] == 1.0
    assert base["speedup_vs_bf16_compile"] is None  # not requested: no baseline, no made-up speedup
    assert 0.0 < q["rel_err"] < 0.2 and q["finite"]
    assert q["ms_per_step"] > 0 and q["steps_timed"] == 3
    # int8 weights + scales + float leftovers: well under bf16, above a quarter of it
    wb = q["weight_bytes"]
    assert wb["qweight"] > 0 and wb["scales"] > 0 and wb["low_rank"] == 0
    assert 0.25 < q["weight_ratio_vs_bf16"] < 1.0
    assert q["quantize_s"] > 0 and q["quantize"]["items"] == 2 and q["quantize"]["quantized_linears"] == 32
    prof = q["profile"]["ms_per_step"]
    assert prof["gemm"] > 0 and prof["quantize"] > 0
    assert "profile" not in base  # profiles are for the segquant variants by default
    md = (smoke_dir / "e2e.md").read_text()
    assert "| segquant_w8a8_eager | ok |" in md


def test_time_budget_skips_remaining_variants(tmp_path, one_thread):
    """With the budget used up after the build, every variant is recorded as skipped, not dropped."""
    argv = "--model tiny-sd3 --device cpu --variants bf16_eager,segquant_w8a8_eager --time-budget-s 0 --threads 1"
    rc = e2e.main([*argv.split(), "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "e2e_tiny-sd3_b1.json").read_text())
    assert [(v["name"], v["status"]) for v in res["variants"]] == [
        ("bf16_eager", "skipped"),
        ("segquant_w8a8_eager", "skipped"),
    ]
    assert "time budget" in res["variants"][0]["note"]


def test_sdxl_runs_the_unet_on_a_cfg_pair(tmp_path, one_thread):
    """SDXL's backbone batch is 2 x the image batch (cond + uncond), as the issue specifies."""
    argv = (
        "--model tiny-sdxl --device cpu --variants bf16_eager --warmup 1 --steps-timed 1 --threads 1 --quiet"
    )
    assert e2e.main([*argv.split(), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "e2e_tiny-sdxl_b1.json").read_text())
    assert (res["cfg_factor"], res["backbone_batch"]) == (2, 2)
    assert res["input_shapes"]["sample"] == [2, 4, 16, 16]
    assert res["variants"][0]["status"] == "ok"


def test_variant_timeout_interrupts_and_skips_the_preset(tmp_path, one_thread):
    """A quantization cut off by --variant-timeout-s is recorded as a timeout; the preset's other variant is
    skipped (not quantized again), and the run still writes its results."""
    argv = "--model tiny-sd3 --device cpu --variants segquant_w8a8_eager,segquant_w8a8_compile --threads 1 --quiet"
    rc = e2e.main([*argv.split(), "--variant-timeout-s", "0.05", "--out", str(tmp_path)])
    assert rc == 0
    eager, compiled = json.loads((tmp_path / "e2e_tiny-sd3_b1.json").read_text())["variants"]
    assert eager["status"] == "timeout" and "interrupted after" in eager["note"]
    assert compiled["status"] == "skipped" and "failed earlier" in compiled["note"]


def test_deadline_fires_again_when_the_first_alarm_is_swallowed():
    """Python drops an exception raised inside a gc callback; the deadline must still end the block."""
    import time

    caught = []

    def busy_swallowing_the_first_alarm() -> None:
        with e2e._deadline(0.02):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 5.0:
                try:
                    time.sleep(0.01)
                except e2e._Timeout:
                    caught.append(1)  # what a swallowing gc callback does to the first alarm
                    if len(caught) > 1:
                        raise

    with pytest.raises(e2e._Timeout):
        busy_swallowing_the_first_alarm()
    assert len(caught) == 2


def test_deadline_is_cancelled_after_the_block():
    import time

    with e2e._deadline(0.05):
        pass
    time.sleep(0.4)  # a still-armed repeating timer would raise here


def test_missing_torchao_is_skipped_with_a_note(tmp_path, one_thread, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if not installed
    argv = "--model tiny-sd3 --device cpu --variants torchao_int8_compile --threads 1 --quiet"
    rc = e2e.main([*argv.split(), "--out", str(tmp_path)])
    assert rc == 0
    (v,) = json.loads((tmp_path / "e2e_tiny-sd3_b1.json").read_text())["variants"]
    assert v["status"] == "skipped" and "torchao is not importable" in v["note"]


# ------------------------------------------------------------------------------------------------ report


def test_report_merges_the_smoke_run(smoke_dir, tmp_path):
    md_path = tmp_path / "e2e_section.md"
    argv = [str(smoke_dir), "--md", str(md_path)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--png", str(tmp_path / "speedup.png")]
    assert report.main(argv) == 0
    md = md_path.read_text()
    assert md.startswith("## End-to-end per-step speed")
    assert "| tiny-sd3 | 1 | segquant_w8a8_eager | 1 | ok |" in md
    assert "e2e.py --model tiny-sd3" in md  # the command is recorded
    if "--png" in argv:
        assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _variant(name, kind, mode, scheme, ms, **kw):
    return {
        "name": name,
        "kind": kind,
        "mode": mode,
        "scheme": scheme,
        "status": "ok",
        "ms_per_step": ms,
        **kw,
    }


def _synthetic(tmp_path, date="2026-11-26T10:00:00Z", fp8_ms=80.0):
    variants = [
        _variant("bf16_eager", "bf16", "eager", None, 181.3, weight_gib=22.2, weight_ratio_vs_bf16=1.0),
        _variant("bf16_compile", "bf16", "compile", None, 130.2, compile_s=142.0),
        _variant("torchao_fp8_compile", "torchao", "compile", "fp8", 95.0, compile_s=400.0),
        _variant(
            "segquant_w8a8-fp8_eager",
            "segquant",
            "eager",
            "w8a8-fp8",
            120.0,
            weight_ratio_vs_bf16=0.51,
            weight_gib=11.3,
            quantize_s=600.0,
            quantize={"items": 32},
        ),
        _variant(
            "segquant_w8a8-fp8_compile",
            "segquant",
            "compile",
            "w8a8-fp8",
            fp8_ms,
            compile_s=150.0,
            profile={
                "ms_per_step": {"gemm": 50.0, "quantize": 5.0, "attention": 20.0, "conv": 0.0, "other": 5.0},
                "fraction": {
                    "gemm": 0.625,
                    "quantize": 0.0625,
                    "attention": 0.25,
                    "conv": 0.0,
                    "other": 0.0625,
                },
                "top": [{"name": "cutlass_gemm", "category": "gemm", "ms_per_step": 30.0}],
            },
        ),
        {
            "name": "segquant_w4a8_compile",
            "kind": "segquant",
            "mode": "compile",
            "scheme": "w4a8",
            "status": "timeout",
            "note": "interrupted after 300 s",
        },
    ]
    e2e._add_speedups(variants)
    res = {
        "schema": 1,
        "benchmark": "e2e",
        "model": "flux-dev",
        "batch": 1,
        "backbone_batch": 1,
        "tag": "fp8",
        "device": "NVIDIA H100 80GB HBM3",
        "date": date,
        "torch": "2.11.0+cu130",
        "torchao": "0.17.0",
        "settings": {"command": "benchmarks/e2e.py --model flux-dev"},
        "variants": variants,
    }
    path = tmp_path / f"e2e_flux-dev_b1_{date[:10]}.json"
    path.write_text(json.dumps(res))
    return path


def test_report_targets_on_synthetic_results(tmp_path):
    _synthetic(tmp_path)
    results = report.load_results([tmp_path])
    checks = {
        (c["variant"], c["target"]): (c["measured"], c["verdict"]) for c in report.target_checks(results)
    }
    # 130.2 / 80 = 1.63x >= 1.5x; torchao 130.2 / 95 = 1.37x
    assert checks[("segquant_w8a8-fp8_compile", "speed >= 1.5x compiled bf16")] == ("1.63x", "PASS")
    assert checks[("segquant_w8a8-fp8_compile", "faster than torchao_fp8_compile")][1] == "PASS"
    assert checks[("segquant_w8a8-fp8_eager", "weights <= 0.53x bf16")] == ("0.510x", "PASS")
    assert checks[("segquant_w8a8-fp8_eager", "quantize <= 900 s")] == ("600.0 s", "PASS")
    assert checks[("segquant_w8a8-fp8_compile", "compile time <= bf16 compile")] == ("150 s vs 142 s", "FAIL")
    md = report.markdown_report(results)
    assert "| flux-dev | 1 | segquant_w4a8_compile | 1 | timeout: interrupted after 300 s |" in md
    assert "50.00 (62%)" in md  # profile row: GEMM ms and share


def test_report_uses_the_latest_run_and_keeps_every_row(tmp_path):
    _synthetic(tmp_path, "2026-11-26T10:00:00Z", fp8_ms=80.0)
    _synthetic(tmp_path, "2026-11-27T10:00:00Z", fp8_ms=100.0)
    results = report.load_results([tmp_path])
    assert [r["date"][:10] for r in results] == ["2026-11-26", "2026-11-27"]
    checks = [c for c in report.target_checks(results) if c["target"].startswith("speed")]
    assert [(c["measured"], c["verdict"], c["run"]) for c in checks] == [("1.30x", "FAIL", 2)]
    md = report.markdown_report(results)
    assert md.count("| flux-dev | 1 | bf16_compile |") == 2


def test_report_rejects_foreign_files(tmp_path, capsys):
    """A JSON that benchmarks/e2e.py did not write is named in the error; the CLI exits 2."""
    bad = tmp_path / "e2e_other.json"
    bad.write_text(json.dumps({"benchmark": "kernels", "variants": []}))
    with pytest.raises(ConfigError, match="e2e_other.json: not an e2e result"):
        report.load_results([bad])
    assert report.main([str(bad)]) == 2
    assert "not an e2e result" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such file"):
        report.load_results([tmp_path / "missing"])
