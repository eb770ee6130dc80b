"""SmoothQuant: quality on planted outlier channels, the alpha search, per-segment smoothing, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import segquant_fx
from segquant_fx import quantize
from segquant_fx.config import SearchAlphaConfig
from segquant_fx.optim.search import SearchState, pick_best

from ._helpers import PLAIN, OneLinear, cache_capture, rel_error

K, N = 64, 48
OUTLIERS = [3, 17, 40]


def _outlier_items(seed: int, n: int = 8, k: int = K) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        x = torch.randn(4, 32, k, generator=g)
        x[..., OUTLIERS] *= 40.0
        items.append((x,))
    return items


@pytest.fixture(scope="module")
def toy() -> OneLinear:
    torch.manual_seed(0)
    return cache_capture(OneLinear(K, N).eval())


def _cfg(**opt) -> dict:
    return {"default": {**PLAIN, "opt": opt}}


def test_smoothquant_beats_plain_w8a8(toy):
    cal, test = _outlier_items(1), _outlier_items(2)
    plain = rel_error(toy, quantize(toy, cal, _cfg(type="default"), progress=False), test)
    smooth = rel_error(toy, quantize(toy, cal, _cfg(type="smooth", alpha=0.5), progress=False), test)
    print(
        f"\nW8A8 outlier channels: plain {plain:.3e}, SmoothQuant a=0.5 {smooth:.3e} ({smooth / plain:.1%} of plain)"
    )
    assert smooth < 0.5 * plain


def test_alpha_search_never_worse_than_half_and_grid_is_inclusive(toy, tmp_path):
    cal = _outlier_items(1)  # 1024 rows: the reservoir (2048) holds every calibration row
    state = tmp_path / "search.json"
    half = rel_error(toy, quantize(toy, cal, _cfg(type="smooth", alpha=0.5), progress=False), cal)
    search_cfg = _cfg(type="smooth", alpha=0.5, search_alpha_config={"enable": True})
    q = quantize(toy, cal, search_cfg, progress=False, search_state=state)
    searched = rel_error(toy, q, cal)
    units = json.loads(state.read_text())["layers"]["lin"]["units"]["g0"]
    grid = sorted(float(a) for a in units)
    errs = {float(a): e for a, e in units.items()}
    best = q.meta["optimizer"]["layers"]["lin"]["alphas"][0][0]
    print(f"\nalpha search: a=0.5 {half:.4e}, searched a={best} {searched:.4e}; grid {grid}")
    assert grid == pytest.approx([i / 10 for i in range(11)]), "0.0 and 1.0 (both ends) are evaluated"
    assert errs[best] == min(errs.values())
    assert searched <= half * (1 + 1e-6)
    assert q.meta["optimizer"]["search_evaluations"] == 11


def test_grid_always_ends_at_max():
    assert SearchAlphaConfig(min=0.2, max=0.5, step=0.2).grid == (0.2, 0.4, 0.5)
    assert SearchAlphaConfig(min=0.0, max=1.0, step=0.1).grid[-1] == 1.0
    assert len(SearchAlphaConfig(min=0.0, max=1.0, step=0.1).grid) == 11
    assert SearchAlphaConfig(min=0.3, max=0.3).grid == (0.3,)
    assert pick_best({0.4: 1.0, 0.6: 1.0, 0.8: 2.0}, (0.4, 0.6, 0.8), base=0.55) == 0.6, "ties go to the base"


class CatLinear(torch.nn.Module):
    """``lin(cat([a, b], -1))``: two input segments (``concat_to_linear``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2 * K, N)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([a, b], dim=-1))


def test_input_segments_get_their_own_alpha_and_weight_scales():
    torch.manual_seed(0)
    model = cache_capture(CatLinear().eval())
    g = torch.Generator().manual_seed(3)
    items = []
    for _ in range(6):
        a = torch.randn(2, 16, K, generator=g)
        a[..., OUTLIERS] *= 60.0  # segment 0: strong outliers, segment 1: none
        items.append((a, torch.randn(2, 16, K, generator=g)))
    seg = {"seglinear": True, "search_patterns": ["concat_to_linear"]}
    plain = quantize(model, items, {"default": {**PLAIN, **seg, "opt": {"type": "default"}}}, progress=False)
    cfg = {"default": {**PLAIN, **seg, "opt": {"type": "smooth", "search_alpha_config": {"enable": True}}}}
    q = quantize(model, items, cfg, progress=False)
    alphas = q.meta["optimizer"]["layers"]["lin"]["alphas"]
    e_plain, e_q = rel_error(model, plain, items), rel_error(model, q, items)
    print(f"\nper-input-segment alphas {alphas}; error plain {e_plain:.3e}, searched {e_q:.3e}")
    assert q.plan["lin"]["in_segments"] == [K, K]
    assert len(alphas) == 1 and len(alphas[0]) == 2
    assert list(q.graph_module.lin.w_scale.shape) == [N, 2], (
        "one weight scale per output channel and input segment"
    )
    assert e_q < e_plain


class AdaChunk(torch.nn.Module):
    """``lin(silu(e)).chunk(3, -1)``: three output segments and DualScale."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(K, 3 * 32)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        a, b, c = self.lin(F.silu(e)).chunk(3, dim=-1)
        return a * 2 + b - c


def _ada_items(seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(6):
        e = torch.randn(8, K, generator=g) * 3
        e[:, OUTLIERS] *= 20
        items.append((e,))
    return items


@pytest.mark.parametrize("real", [True, False], ids=["real", "fake"])
def test_per_output_segment_smoothing(real, tmp_path):
    torch.manual_seed(0)
    model = cache_capture(AdaChunk().eval())
    with torch.no_grad():
        model.lin.weight[32:64] *= 8.0  # the segments' weights differ in range
    items = _ada_items(5)
    base = {**PLAIN, "real_quant": real, "seglinear": True, "dual_scale": True}
    base["search_patterns"] = ["linear_to_chunk", "activation_to_linear"]
    opt = {"type": "smooth", "search_alpha_config": {"enable": True, "step": 0.25}}
    one = quantize(model, items, {"default": {**base, "opt": opt}}, progress=False)
    per = quantize(
        model, items, {"default": {**base, "opt": {**opt, "per_segment_smoothing": True}}}, progress=False
    )
    qlinears = [n for n in per.graph_module.graph.nodes if n.target is torch.ops.segquant.qlinear.default]
    assert per.plan["lin"]["smooth_groups"] == [32, 32, 32] and per.plan["lin"]["dual"]
    assert list(per.graph_module.lin.smooth.shape) == [3, K]
    assert list(per.graph_module.lin.x_scale_pos.shape) == [3, 1]
    assert len(qlinears) == (3 if real else 0)
    assert len(per.meta["optimizer"]["layers"]["lin"]["alphas"]) == 3
    e_one, e_per = rel_error(model, one, items), rel_error(model, per, items)
    print(
        f"\n{'real' if real else 'fake'}: one smoothing vector {e_one:.3e}, one per output segment {e_per:.3e}"
    )
    assert e_per < 1e-2 and e_one < 1e-2
    per.save(tmp_path / "q")
    loaded = segquant_fx.load(tmp_path / "q", model=AdaChunk().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(*items[0]), per(*items[0]), rtol=0, atol=0)


def test_real_and_fake_per_group_paths_agree():
    torch.manual_seed(0)
    model = cache_capture(AdaChunk().eval())
    items = _ada_items(6)
    base = {
        **PLAIN,
        "seglinear": True,
        "dual_scale": True,
        "search_patterns": ["linear_to_chunk", "activation_to_linear"],
    }
    opt = {"type": "smooth", "alpha": 0.5, "per_segment_smoothing": True}
    outs = []
    for real in (True, False):
        q = quantize(model, items, {"default": {**base, "real_quant": real, "opt": opt}}, progress=False)
        with torch.no_grad():
            outs.append(q(*items[0]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_search_state_resume_skips_work(toy, tmp_path):
    cal = _outlier_items(1, n=4)
    path = tmp_path / "state.json"
    cfg = _cfg(type="smooth", search_alpha_config={"enable": True, "state_file": str(path)})
    first = quantize(toy, cal, cfg, progress=False)
    assert first.meta["optimizer"]["search_evaluations"] == 11 and path.exists()
    again = quantize(toy, cal, cfg, progress=False)
    assert again.meta["optimizer"]["search_evaluations"] == 0
    assert again.meta["optimizer"]["search_skipped"] == 11
    assert again.meta["optimizer"]["layers"] == first.meta["optimizer"]["layers"]
    # an interrupted search: three points missing -> only those are evaluated
    data = json.loads(path.read_text())
    for a in ("0.3", "0.7", "1.0"):
        del data["layers"]["lin"]["units"]["g0"][a]
    path.write_text(json.dumps(data))
    resumed = quantize(
        toy, cal, _cfg(type="smooth", search_alpha_config={"enable": True}), progress=False, search_state=path
    )
    print(
        f"\nresume: first run 11 evaluations, rerun 0, after deleting 3 points {resumed.meta['optimizer']['search_evaluations']}"
    )
    assert resumed.meta["optimizer"]["search_evaluations"] == 3
    assert resumed.meta["optimizer"]["layers"] == first.meta["optimizer"]["layers"]
    assert len(json.loads(path.read_text())["layers"]["lin"]["units"]["g0"]) == 11
    # the same file with another quantization setting (int4 weights): scores do not carry over
    other = {"default": {**PLAIN, "weight_quant": {"type": "int4", "axis": 0}, "opt": cfg["default"]["opt"]}}
    with pytest.warns(UserWarning, match="re-evaluating"):
        redone = quantize(toy, cal, other, progress=False)
    assert redone.meta["optimizer"]["search_evaluations"] == 11


def test_search_state_file_with_another_shape_or_garbage_is_redone(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        st = SearchState(path)
    assert st.layers == {}
    st.record("lin", [4, 4], 0.5, {"g0": 1.0})
    st.save()
    st2 = SearchState(path)
    with pytest.warns(UserWarning, match="weight shape/setting"):
        assert st2.missing("lin", [8, 4], ["g0"], [0.5]) == [0.5]


def test_fake_quant_dualscale_layer_round_trips(tmp_path):
    """The fake DualScale path reads only x_scale_pos/neg; the combined x_scale is still saved."""
    torch.manual_seed(0)
    model = cache_capture(AdaChunk().eval())
    items = _ada_items(7)
    base = {**PLAIN, "real_quant": False, "seglinear": True, "dual_scale": True}
    base["search_patterns"] = ["linear_to_chunk", "activation_to_linear"]
    q = quantize(model, items, {"default": {**base, "opt": {"type": "smooth"}}}, progress=False)
    assert q.plan["lin"]["dual"]
    q.save(tmp_path / "q")
    loaded = segquant_fx.load(tmp_path / "q", model=AdaChunk().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(*items[0]), q(*items[0]), rtol=0, atol=0)
