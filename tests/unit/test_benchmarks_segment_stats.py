"""benchmarks/segment_stats.py: the per-scheme error measurements on planted data, and a run on the built-in MMDiT."""

from __future__ import annotations

import json

import pytest
import torch
from _utils.bench import load_benchmark

ss = load_benchmark("segment_stats")


def _data(seed=0, rows=512, k=64, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * 0.1


def test_input_segments_help_exactly_when_segment_ranges_differ():
    x, w = _data()
    gain = torch.cat([torch.full((32,), 100.0), torch.full((32,), 1.0)])
    # both segments contribute equally to the output: the small one is lost in the per-tensor scale's steps
    spread = ss.input_segment_stats(x * gain, w / gain, (32, 32))
    assert spread["spread"] > 50
    assert spread["err_seg"] < 0.3 * spread["err_tensor"]
    same = ss.input_segment_stats(x, w, (32, 32))
    assert same["spread"] < 1.5
    assert same["err_seg"] == pytest.approx(same["err_tensor"], rel=0.2)
    one = ss.input_segment_stats(x, w, (64,))
    assert one["err_seg"] == one["err_tensor"] and one["spread"] == 1.0


def test_dualscale_helps_on_a_skewed_activation_and_not_on_a_symmetric_one():
    x, w = _data(1)
    skewed = ss.dual_stats(torch.nn.functional.silu(3 * x), w)
    # the positive part keeps its scale, so the gain is the negative tail's error: a quarter here
    assert skewed["pos_over_neg"] > 5 and skewed["err_seg"] < 0.85 * skewed["err_tensor"]
    symmetric = ss.dual_stats(x, w)
    assert symmetric["pos_over_neg"] == pytest.approx(1.0, abs=0.3)
    assert symmetric["err_seg"] == pytest.approx(symmetric["err_tensor"], rel=0.25)


def test_output_segments_help_when_weight_segments_differ():
    x, w = _data(2)
    w = w * torch.cat([torch.full((16, 1), 50.0), torch.full((16, 1), 1.0)])
    st = ss.output_segment_stats(x, w, (16, 16))
    assert st["spread"] > 20 and st["err_seg"] < st["err_tensor"]


def test_smoothing_moves_range_from_activations_to_weights():
    x, w = _data(3)
    x = x * torch.linspace(0.1, 10, 64)
    xs, ws = ss._smooth(x, w)
    assert torch.allclose(xs @ ws.T, x @ w.T, rtol=1e-4, atol=1e-4)  # the product is unchanged
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).min())  # noqa: E731
    assert ratio(xs) < ratio(x)


def test_reservoir_keeps_a_bounded_sample():
    r = ss._Reservoir(10, seed=0)
    for i in range(5):
        r.add(torch.full((4, 3), float(i)))
    assert r.rows.shape == (10, 3) and r.seen == 20
    assert set(r.rows[:, 0].tolist()) - {0.0, 1.0, 2.0, 3.0, 4.0} == set()


def test_summary_rows_and_markdown():
    res = {
        "model": "toy",
        "prompts": 1,
        "steps": 2,
        "guidance": 1.0,
        "rows_per_layer": 8,
        "torch": torch.__version__,
        "layers": {
            "a": {"dual/raw": {"pos_over_neg": 4.0, "err_tensor": 0.02, "err_seg": 0.01}},
            "b": {"dual/raw": {"pos_over_neg": 1.0, "err_tensor": 0.01, "err_seg": 0.01}},
        },
    }
    (row,) = ss.summary_rows(res)
    assert row["layers"] == 2 and row["ratio_min"] == 0.5 and row["ratio_max"] == 1.0
    assert row["ratio_geo"] == pytest.approx(0.5**0.5)
    md = ss.markdown(res, "cmd")
    assert "| DualScale (positive / negative activation scales) | raw | 2 |" in md


def test_runs_on_the_builtin_mmdit(tmp_path):
    from segquant_fx.t2i.models import builtin_weights_dir

    if not (builtin_weights_dir("mmdit") / "backbone.safetensors").is_file():
        pytest.skip("no built-in MMDiT weights")
    n = torch.get_num_threads()
    try:
        assert (
            ss.main(
                [
                    "--model",
                    "mmdit",
                    "--prompts",
                    "1",
                    "--rows",
                    "64",
                    "--threads",
                    "1",
                    "--out",
                    str(tmp_path),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "segment_stats_mmdit.json").read_text())
    kinds = {k.split("/")[0] for e in res["layers"].values() for k in e if "/" in k}
    assert kinds == {"input_segments", "output_segments", "dual", "unsegmented"}
    assert len(res["layers"]) == 86
    assert (tmp_path / "segment_stats_mmdit.md").read_text().startswith("### Segment statistics: mmdit")
