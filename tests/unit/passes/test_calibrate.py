"""Calibration (``CalibrationInterpreter`` + ``ChannelMinMaxObserver``) on the toy DiT block.

* numerics: each observer's ``pos_max`` / ``neg_min`` equal the per-channel extremes of that layer's
  input over the calibration items, computed independently with forward pre-hooks on the float
  model; the interpreter's outputs are the float model's;
* structure and count: one observer per annotated linear, keyed by node name, sized by in_features;
  the number of items and observed rows;
* properties (Hypothesis): the observer's bookkeeping (``segment_stats`` with any segments and any
  positive smoothing vector, streaming over batches) equals a direct computation on ``x / s``;
* bad items, one test each.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.errors import CalibrationError
from segquant_fx.passes.annotate import annotations
from segquant_fx.passes.calibrate import CalibrationInterpreter, bind_inputs, calibrate, flatten_inputs
from segquant_fx.passes.observers import ChannelMinMaxObserver

from ._toys import LINEARS, calib_items, captured_toy, prepared_toy

N_ITEMS, BATCH, TOKENS = 4, 2, 5


def hooked_inputs(model: torch.nn.Module, items) -> dict[str, torch.Tensor]:
    """Module name -> every row its linear saw over ``items`` (float model, forward pre-hooks)."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in LINEARS}
    handles = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda mod, args, m=m: seen[m].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for m in LINEARS
    ]
    try:
        with torch.no_grad():
            for item in items:
                model(**item)
    finally:
        for h in handles:
            h.remove()
    return {m: torch.cat(rows) for m, rows in seen.items()}


@pytest.fixture(scope="module")
def calibrated():
    """(prepared w8a8 block, observers by node name, items seen, the items)."""
    p = prepared_toy("w8a8")
    items = calib_items(N_ITEMS, batch=BATCH, tokens=TOKENS)
    observers, n = calibrate(p.gm, items, p.signature, p.constants, progress=False)
    return p, observers, n, items


# ------------------------------------------------------------------------------------------ numerics


def test_observer_extremes_equal_forward_hook_extremes(calibrated):
    p, observers, _, items = calibrated
    model, _ = captured_toy()
    rows = hooked_inputs(model, items)
    anns = annotations(p.gm)
    for node, obs in observers.items():
        x = rows[anns[node].module]
        assert torch.equal(obs.pos_max, x.amax(dim=0).clamp(min=0)), anns[node].module
        assert torch.equal(obs.neg_min, x.amin(dim=0).clamp(max=0)), anns[node].module
        assert torch.equal(obs.absmax, x.abs().amax(dim=0))
        assert obs.count == x.shape[0]


def test_both_signs_are_observed(calibrated):
    """The SiLU/GELU inputs (DualScale layers) have a small negative side, the others are symmetric-ish."""
    p, observers, _, _ = calibrated
    by_module = {annotations(p.gm)[n].module: o for n, o in observers.items()}
    for m in ("ada", "ff2"):
        assert -0.3 < by_module[m].neg_min.min() < 0 < by_module[m].pos_max.max()
    assert by_module["to_v"].neg_min.min() < -1 and by_module["to_v"].pos_max.max() > 1


def test_interpreter_computes_the_float_model():
    model, _ = captured_toy()
    p = prepared_toy("w8a8")
    interp = CalibrationInterpreter(p.gm)
    for item in calib_items(2, seed=7):
        flat = flatten_inputs(p.gm, bind_inputs(p.signature, item, p.constants))
        with torch.no_grad():
            torch.testing.assert_close(interp.run(*flat), model(**item), rtol=1e-6, atol=1e-6)


def test_item_order_does_not_matter():
    """Running extremes: the same items in reverse order give identical statistics."""
    p = prepared_toy("w8a8")
    items = calib_items(N_ITEMS, batch=BATCH, tokens=TOKENS)
    forward, _ = calibrate(p.gm, items, p.signature, p.constants, progress=False)
    backward, _ = calibrate(p.gm, items[::-1], p.signature, p.constants, progress=False)
    for name in forward:
        assert torch.equal(forward[name].pos_max, backward[name].pos_max)
        assert torch.equal(forward[name].neg_min, backward[name].neg_min)
        assert forward[name].count == backward[name].count


def test_streaming_matches_one_big_item():
    """Four items one by one vs their concatenation as one item (equal up to the float rounding of a
    batch-8 forward vs four batch-2 forwards)."""
    p = prepared_toy("w8a8")
    items = calib_items(N_ITEMS, batch=BATCH, tokens=TOKENS)
    one = {k: torch.cat([it[k] for it in items]) for k in items[0]}
    obs_stream, _ = calibrate(p.gm, items, p.signature, p.constants, progress=False)
    obs_one, n = calibrate(p.gm, [one], p.signature, p.constants, progress=False)
    assert n == 1
    for name in obs_stream:
        torch.testing.assert_close(obs_stream[name].pos_max, obs_one[name].pos_max, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(obs_stream[name].neg_min, obs_one[name].neg_min, rtol=1e-5, atol=1e-6)
        assert obs_stream[name].count == obs_one[name].count


def test_max_items_stops_early():
    p = prepared_toy("w8a8")
    items = calib_items(N_ITEMS)
    obs_two, n = calibrate(p.gm, iter(items), p.signature, p.constants, progress=False, max_items=2)
    obs_ref, _ = calibrate(p.gm, items[:2], p.signature, p.constants, progress=False)
    assert n == 2
    for name in obs_ref:
        assert torch.equal(obs_two[name].pos_max, obs_ref[name].pos_max)


# ----------------------------------------------------------------------------------- structure/count


def test_one_observer_per_annotated_linear(calibrated):
    p, observers, n, _ = calibrated
    anns = annotations(p.gm)
    assert n == N_ITEMS
    assert observers.keys() == anns.keys()
    assert len(observers) == 5
    for name, obs in observers.items():
        assert isinstance(obs, ChannelMinMaxObserver)
        assert obs.in_features == LINEARS[anns[name].module][0]
        assert obs.pos_max.shape == obs.neg_min.shape == (obs.in_features,)
        assert obs.name == f"{name} ({anns[name].module})"


def test_rows_counted_per_layer(calibrated):
    """``ada`` sees one row per sample, every other linear one per token."""
    p, observers, _, _ = calibrated
    counts = {annotations(p.gm)[n].module: o.count for n, o in observers.items()}
    per_token = N_ITEMS * BATCH * TOKENS
    assert counts == {
        "ada": N_ITEMS * BATCH,
        "to_v": per_token,
        "to_out": per_token,
        "ff1": per_token,
        "ff2": per_token,
    }


def test_unannotated_layers_get_no_observer():
    p = prepared_toy({"default": {"real_quant": True}, "ff*": {"enable": False}})
    observers, _ = calibrate(p.gm, calib_items(1), p.signature, p.constants, progress=False)
    assert sorted(annotations(p.gm)[n].module for n in observers) == ["ada", "to_out", "to_v"]


# ------------------------------------------------------------------------------------- properties


@st.composite
def observed_batches(draw):
    """Random rows (in 1-3 batches), random segments of K, a random positive smoothing vector."""
    k = draw(st.integers(1, 24))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=min(k - 1, 5)))) if k > 1 else []
    bounds = [0, *cuts, k]
    segments = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n_batches = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    batches = [scale * torch.randn(draw(st.integers(1, 6)), k, generator=g) for _ in range(n_batches)]
    log_s = torch.empty(k).uniform_(math.log(1e-3), math.log(1e3), generator=g)
    return segments, batches, log_s.exp()


@settings(max_examples=60, deadline=None)
@given(observed_batches())
def test_segment_stats_equal_direct_computation_on_smoothed_input(case):
    segments, batches, s = case
    k = s.numel()
    obs = ChannelMinMaxObserver(k, name="prop")
    for b in batches:
        assert obs(b) is b
    x = torch.cat(batches)
    y = x / s  # float division by a positive vector is monotone, so the extremes commute with it
    stats = obs.segment_stats(segments if len(segments) > 1 else (), s)
    pieces = y.split(list(segments), dim=1)
    want_pos = torch.stack([t.max() for t in pieces]).clamp(min=0)
    want_neg = torch.stack([t.min() for t in pieces]).clamp(max=0)
    assert torch.equal(stats["pos_max"], want_pos)
    assert torch.equal(stats["neg_min"], want_neg)
    assert torch.equal(stats["amax"], torch.stack([t.abs().max() for t in pieces]))
    assert obs.count == x.shape[0]
    # without smoothing: the plain extremes
    plain = obs.segment_stats(segments if len(segments) > 1 else ())
    assert torch.equal(plain["amax"], torch.stack([t.abs().max() for t in x.split(list(segments), dim=1)]))


@settings(max_examples=40, deadline=None)
@given(observed_batches())
def test_reset_forgets_everything(case):
    segments, batches, _ = case
    obs = ChannelMinMaxObserver(batches[0].shape[1])
    for b in batches:
        obs(b)
    obs.reset()
    assert obs.count == 0
    assert not obs.pos_max.any() and not obs.neg_min.any()
    obs(batches[-1])
    assert torch.equal(obs.pos_max, batches[-1].amax(dim=0).clamp(min=0))


# ---------------------------------------------------------------------------------- negative / errors


def test_empty_calibration_set():
    """No items: CalibrationError, nothing silently returned."""
    p = prepared_toy("w8a8")
    with pytest.raises(CalibrationError, match="the calibration set is empty"):
        calibrate(p.gm, [], p.signature, p.constants, progress=False)


def test_nan_names_the_node():
    """A NaN token reaches ``to_v`` first (``ada`` reads only ``emb``): the error names that node."""
    p = prepared_toy("w8a8")
    items = calib_items(2)
    items[1]["x"][1, 2, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"non-finite activation at linear_1 \(to_v\) \(channel 0\)"):
        calibrate(p.gm, items, p.signature, p.constants, progress=False)


def test_missing_argument():
    """An item without ``emb``: CalibrationError naming it."""
    p = prepared_toy("w8a8")
    with pytest.raises(CalibrationError, match=r"lacks argument\(s\) 'emb'"):
        calibrate(p.gm, [{"x": calib_items(1)[0]["x"]}], p.signature, p.constants, progress=False)


def test_unknown_argument():
    """An item with an argument forward does not take: CalibrationError naming it."""
    p = prepared_toy("w8a8")
    item = {**calib_items(1)[0], "temb": torch.zeros(1)}
    with pytest.raises(CalibrationError, match=r"argument\(s\) 'temb' that forward\(x, emb\) does not take"):
        calibrate(p.gm, [item], p.signature, p.constants, progress=False)


def test_item_with_another_structure():
    """A list where the capture had a tensor: CalibrationError describing both structures."""
    p = prepared_toy("w8a8")
    item = calib_items(1)[0]
    item["x"] = [item["x"]]
    with pytest.raises(CalibrationError, match=r"(?s)structure .* differs from the captured example's"):
        calibrate(p.gm, [item], p.signature, p.constants, progress=False)


def test_failing_node_is_named():
    """A width the graph was not captured with fails in the graph (its shape guard): CalibrationError
    naming the node and the failed guard."""
    p = prepared_toy("w8a8")
    item = {"x": torch.randn(2, 5, 12), "emb": torch.randn(2, 8)}
    with pytest.raises(
        CalibrationError, match=r"calibration failed at node=%_guards_fn .*x\.size\(\)\[2\] == 16"
    ):
        calibrate(p.gm, [item], p.signature, p.constants, progress=False)


def test_observer_rejects_another_width():
    """An observer fed a tensor of the wrong last dim raises instead of broadcasting."""
    obs = ChannelMinMaxObserver(8, name="linear_9 (m)")
    with pytest.raises(CalibrationError, match=r"linear_9 \(m\): observed last dim 6, expected 8"):
        obs(torch.randn(3, 6))
