"""``quantize`` across 2 gloo processes equals one process: statistics, quantized tensors, errors.

One process group runs every case (module fixture): the toy block is quantized with each config of
``_toys.CONFIGS`` by both processes together (``distributed`` left at its default: the initialized
default group), and by process 0 alone (``distributed=False``) as the reference, in the same process
so that both see the same threads and kernels. Checked:

* statistics (``calibrate_sharded`` vs ``calibrate``): per-channel extremes, counts, row reservoirs
  (rows, keys, order), histograms bit for bit; GPTQ Hessians to float-summation order, row counts exact;
* every stored tensor of the quantized model (weights, scales, smoothing vectors, low-rank branches)
  bit-identical to the single-process model, for amax / DualScale / percentile / MSE / alpha search /
  GPTQ (w4a8, segquant-g), and the same on both processes;
* a generator (length unknown: items dealt in turn) and ``max_items``; only process 0 writes the
  alpha-search state file;
* errors: different configs, more processes than items, a failing item in one process, a shuffling
  DataLoader: every process raises, naming the cause.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
import torch

from ._spawn import error_of, run_group

STATS_CONFIG = {  # every kind of statistic at once
    "default": {
        "opt": {
            "type": "smooth",
            "alpha": 0.5,
            "search_alpha_config": {"enable": True, "step": 0.5, "rows": 24},
        },
        "calib": {"type": "gptq"},
    },
    "ff2": {"opt": {"type": "default"}, "calib": {"type": "percentile", "bins": 64}},
}


def _snapshot(observers: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, o in observers.items():
        out[f"{name}.pos"], out[f"{name}.neg"] = o.pos_max.clone(), o.neg_min.clone()
        out[f"{name}.count"] = torch.tensor(o.count)
        r = getattr(o, "reservoir", None)
        if r is not None:
            out[f"{name}.res.seen"] = torch.tensor(r.seen)
            out[f"{name}.res.rows"], out[f"{name}.res.keys"] = r.rows.clone(), r.keys.clone()
            out[f"{name}.res.order"] = r.order.clone()
        h = getattr(o, "hessian", None)
        if h is not None:
            out[f"{name}.hess"], out[f"{name}.hess.n"] = h.sum.clone(), torch.tensor(h.n)
        for segs, hist in (getattr(o, "histograms", None) or {}).items():
            for a in ("counts", "zeros", "range", "maxval", "top"):
                out[f"{name}.hist{segs}.{a}"] = getattr(hist, a).clone()
    return out


def _statistics(rank: int) -> dict[str, Any]:
    from segquant_fx import api
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.distributed import calibrate_sharded, resolve_distributed
    from segquant_fx.passes.calibrate import calibrate

    from ._toys import _capture, items, toy

    def prepared() -> Any:
        with mock.patch.object(api, "capture", return_value=_capture()):
            return api.prepare(toy(), items(1, seed=99)[0], QuantizeConfig.coerce(STATS_CONFIG))

    ctx = resolve_distributed(True)
    p = prepared()
    observers, n, per = calibrate_sharded(ctx, p, items(), progress=False)
    out = {"dist": _snapshot(observers), "n": n, "per_process": per}
    if rank == 0:
        q = prepared()
        single, n1 = calibrate(q.gm, items(), q.signature, q.constants, progress=False)
        out["single"], out["n_single"] = _snapshot(single), n1
    return out


def _errors(rank: int, tmp: str) -> dict[str, Any]:
    from segquant_fx.optim.search import SearchState

    from ._toys import CONFIGS, items, quantize_toy

    errs: dict[str, Any] = {}
    alpha = 0.5 if rank == 0 else 0.4
    cfg = {"default": {"opt": {"type": "smooth", "alpha": alpha}}}
    errs["config"] = error_of(lambda: quantize_toy(items(), cfg))
    errs["too_few_items"] = error_of(lambda: quantize_toy(items(1), "w8a8"))
    bad = items()
    bad[5]["x"][0, 0, 0] = float("nan")  # item 5 belongs to process 1 ([3, 7) of 7)
    errs["nan_in_one_process"] = error_of(lambda: quantize_toy(bad, "w8a8"))
    loader = torch.utils.data.DataLoader(items(), batch_size=1, shuffle=True, collate_fn=list)
    errs["shuffled"] = error_of(lambda: quantize_toy(loader, "w8a8"))
    saves = []
    orig = SearchState.save

    def spy(self: SearchState) -> None:
        if self.path is not None:
            saves.append(str(self.path))
        orig(self)

    with mock.patch.object(SearchState, "save", spy):
        quantize_toy(items(), CONFIGS["alpha-search"], search_state=f"{tmp}/alpha.json")
    errs["state_saves"] = saves
    return errs


def _worker(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from ._toys import CONFIGS, items, quantize_toy, state

    out: dict[str, Any] = {"quantized": {}}
    calib = items()
    for name, cfg in CONFIGS.items():
        q = quantize_toy(calib, cfg)
        entry = {
            "dist": state(q),
            "meta": json.dumps(q.meta["distributed"]),
            "n": q.meta["calibration_items"],
        }
        if rank == 0:
            entry["single"] = state(quantize_toy(calib, cfg, distributed=False))
        out["quantized"][name] = entry
    gen = quantize_toy((x for x in calib), "w8a8")
    out["generator"] = {"dist": state(gen), "meta": json.dumps(gen.meta["distributed"])}
    capped = quantize_toy(calib, "w8a8", max_items=5)
    out["max_items"] = {"dist": state(capped), "n": capped.meta["calibration_items"]}
    if rank == 0:
        out["max_items"]["single"] = state(quantize_toy(calib[:5], "w8a8", distributed=False))
    out["statistics"] = _statistics(rank)
    out["errors"] = _errors(rank, tmp)
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("quantize_group")
    return run_group(_worker, tmp, str(tmp))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_statistics_equal_single_process(group):
    """Extremes, counts, reservoirs and histograms bit-identical; Hessians to summation order."""
    r0, r1 = group[0]["statistics"], group[1]["statistics"]
    assert r0["n"] == r1["n"] == r0["n_single"] == 7 and r0["per_process"] == [3, 4]
    single, dist0, dist1 = r0["single"], r0["dist"], r1["dist"]
    assert single.keys() == dist0.keys() == dist1.keys()
    for kind in (".res.rows", ".res.order", ".hess", ".counts"):  # every kind of statistic is there
        assert any(k.endswith(kind) for k in single), kind
    full = [k for k in single if k.endswith(".res.rows") and single[k].shape[0] == 24]
    assert full  # reservoirs that saw more rows than they keep: the merge really had to choose
    for k in single:
        assert torch.equal(dist0[k], dist1[k]), f"processes disagree on {k}"
        if k.endswith(".hess"):
            torch.testing.assert_close(dist0[k], single[k], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(dist0[k], single[k]), k


def test_histogram_range_grew_across_processes(group):
    """The power-of-two value 8.0 (item 2, process 0) sits at a range edge; still bit-identical."""
    single = group[0]["statistics"]["single"]
    ranges = [v for k, v in single.items() if k.endswith(".range")]
    assert ranges and all(bool((r > 0).all()) for r in ranges)


@pytest.mark.parametrize(
    "name",
    [
        "w8a8",
        "dualscale-amax",
        "percentile",
        "mse",
        "mse-smoothed",
        "alpha-search",
        "w4a8",
        "segquant-g-w8a8",
    ],
)
def test_quantized_tensors_equal_single_process(group, name):
    """Every stored tensor is bit-identical to the single-process model's, on both processes."""
    e0, e1 = group[0]["quantized"][name], group[1]["quantized"][name]
    assert e0["n"] == e1["n"] == 7
    assert json.loads(e0["meta"]) == {"world_size": 2, "backend": "gloo", "items_per_process": [3, 4]}
    _assert_same(e0["dist"], e1["dist"], f"{name}: process 0 vs 1")
    _assert_same(e0["dist"], e0["single"], f"{name}: distributed vs single process")
    assert any(v.dtype in (torch.int8, torch.uint8) for v in e0["dist"].values())  # really quantized


def test_generator_is_dealt_in_turn_and_max_items_caps_the_whole_set(group):
    g0, g1 = group[0]["generator"], group[1]["generator"]
    assert json.loads(g0["meta"])["items_per_process"] == [4, 3]  # 0, 2, 4, 6 and 1, 3, 5
    _assert_same(g0["dist"], g1["dist"], "generator")
    _assert_same(g0["dist"], group[0]["quantized"]["w8a8"]["single"], "generator vs list")
    m0 = group[0]["max_items"]
    assert m0["n"] == group[1]["max_items"]["n"] == 5
    _assert_same(m0["dist"], m0["single"], "max_items")


def test_only_process_0_writes_the_alpha_search_state(group):
    assert group[0]["errors"]["state_saves"] and group[1]["errors"]["state_saves"] == []


def test_different_configs_are_refused_in_every_process(group):
    for r in (0, 1):
        e = group[r]["errors"]["config"]
        assert e["type"] == "ConfigError"
        assert "process 1 has config=" in e["message"] and "same call" in e["message"]


def test_more_processes_than_items(group):
    for r in (0, 1):
        e = group[r]["errors"]["too_few_items"]
        assert e["type"] == "ConfigError" and "2 processes but only 1 calibration item" in e["message"]


def test_a_failure_in_one_process_is_raised_in_every_process(group):
    own, other = group[1]["errors"]["nan_in_one_process"], group[0]["errors"]["nan_in_one_process"]
    assert own["type"] == other["type"] == "CalibrationError"
    assert "non-finite" in own["message"]
    assert "process 1 of 2 failed" in other["message"] and "non-finite" in other["message"]


def test_shuffling_dataloader_is_refused(group):
    for r in (0, 1):
        e = group[r]["errors"]["shuffled"]
        assert e["type"] == "ConfigError" and "shuffle=False" in e["message"]
