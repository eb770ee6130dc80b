"""The fast calibration path: compiled instrumented graph, batched observer session, item binder.

``calibrate`` runs items through a compiled copy of the graph (observers as plain calls, constants
bound once, no-op nodes elided) and feeds an ``ObserverSession`` that stages per-channel extremes per
item. These tests pin that it changes nothing but speed:

* numerics: statistics (extremes, counts, row reservoirs, Hessians, histograms) are bit-identical to
  a node-by-node run where every observer's own ``forward`` sees every layer input, on the toy DiT
  block and on a toy full of no-op nodes; the compiled path is really taken (no silent fallback);
* the retry guard: when the compiled run fails midway and the node-by-node re-run succeeds, nothing
  is counted twice (this failed before: sums counted part of the item twice);
* properties (Hypothesis): a session fed random batches (any rank, empty ones, other dtypes, several
  calls per item, retries) equals the observers' own ``forward``, bit for bit;
* no-op elision only while the inputs have their captured dtypes; the item binder's shortcut gives
  exactly the full path's inputs and never skips a check; NaN/Inf still names the node.
"""

from __future__ import annotations

import functools
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from segquant_fx import api
from segquant_fx.capture import capture
from segquant_fx.config import QuantizeConfig
from segquant_fx.errors import CalibrationError
from segquant_fx.passes import calibrate as calibrate_mod
from segquant_fx.passes.calibrate import (
    CalibrationInterpreter,
    _ItemBinder,
    bind_inputs,
    calibrate,
    flatten_inputs,
)
from segquant_fx.passes.observers import (
    ChannelMinMaxObserver,
    HessianAccumulator,
    LinearInputObserver,
    ObserverNeeds,
    ObserverSession,
)

from ._toys import calib_items, prepared_toy

W8A8 = QuantizeConfig.coerce("w8a8").to_dict()["default"]

#: Every kind of statistic at once: smoothing + alpha search (row reservoirs), GPTQ (Hessians) by
#: default, percentile calibration (histograms) on the unsmoothed FFN down-projection.
SUMS = {
    "default": {
        **W8A8,
        "opt": {"type": "smooth", "alpha": 0.5, "search_alpha_config": {"enable": True, "step": 0.5}},
        "calib": {"type": "gptq"},
    },
    "ff2": {"opt": {"type": "default"}, "calib": {"type": "percentile", "bins": 64}},
    "out": {"opt": {"type": "default"}, "calib": {"type": "percentile", "bins": 64}},
}


class NoopToy(nn.Module):
    """Linears around the nodes the compiled copy drops: eval dropout, a same-dtype cast, a full slice;
    a buffer (a ``get_attr`` constant), a non-tensor argument, a linear reading a graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16)
        self.drop = nn.Dropout(0.25)
        self.register_buffer("shift", torch.randn(32))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.drop(self.inp(x)).to(torch.float32)[:, :]
        h = F.silu(h + self.shift) * scale
        return self.out(F.gelu(self.mid(h)))


def noop_items(n: int, seed: int = 3) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": 3 * torch.randn(2, 2 + i % 3, 16, generator=g)} for i in range(n)]


@functools.cache
def _noop_capture() -> tuple[NoopToy, Any]:
    torch.manual_seed(0)
    model = NoopToy().eval()
    return model, capture(model, noop_items(1, seed=99)[0])


def prepared_noop(config: Any = "w8a8") -> api.Prepared:
    model, cm = _noop_capture()
    with mock.patch.object(api, "capture", return_value=cm):
        return api.prepare(model, noop_items(1, seed=99)[0], QuantizeConfig.coerce(config))


def sums_config(names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in SUMS.items() if k == "default" or k in names}


CASES = {
    "toy-w8a8": (lambda: prepared_toy("w8a8"), lambda: calib_items(4)),
    "toy-sums": (lambda: prepared_toy(sums_config(("ff2",))), lambda: calib_items(4)),
    "noop-w8a8": (lambda: prepared_noop("w8a8"), lambda: noop_items(5)),
    "noop-sums": (lambda: prepared_noop(sums_config(("out",))), lambda: noop_items(5)),
}


class _ForwardObserver(LinearInputObserver):
    """Same statistics, but not a class the session batches: it is fed through its own ``forward``."""


def snapshot(observers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every statistic of every observer, as tensors (compared bitwise)."""
    out: dict[str, torch.Tensor] = {}
    for name, o in observers.items():
        out[f"{name}.pos"], out[f"{name}.neg"] = o.pos_max.clone(), o.neg_min.clone()
        out[f"{name}.count"] = torch.tensor(o.count)
        r = getattr(o, "reservoir", None)
        if r is not None:
            out[f"{name}.res.seen"] = torch.tensor(r.seen)
            if r.rows is not None:
                out[f"{name}.res.rows"], out[f"{name}.res.keys"] = r.rows.clone(), r.keys.clone()
        h = getattr(o, "hessian", None)
        if h is not None and h.sum is not None:
            out[f"{name}.hess"], out[f"{name}.hess.n"] = h.sum.clone(), torch.tensor(h.n)
        for segs, hist in (getattr(o, "histograms", None) or {}).items():
            for a in ("counts", "zeros", "range", "maxval"):
                out[f"{name}.hist{segs}.{a}"] = getattr(hist, a).clone()
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dim():
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
        else:
            assert torch.equal(x, y), k


def reference_stats(p: api.Prepared, items: list[Any]) -> dict[str, torch.Tensor]:
    """Node by node, each observer's own ``forward`` on each layer input (the pre-session semantics)."""
    with mock.patch.object(calibrate_mod, "LinearInputObserver", _ForwardObserver):
        interp = CalibrationInterpreter(p.gm)
    assert not interp.session.groups  # nothing batched
    for item in items:
        interp.run(*flatten_inputs(p.gm, bind_inputs(p.signature, item, p.constants)))
    interp.close()
    return snapshot(interp.observers)


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_statistics_bit_identical_to_observer_forward(case, monkeypatch):
    make, make_items = CASES[case]
    p, items = make(), make_items()
    want = reference_stats(p, items)
    calls = []
    orig = CalibrationInterpreter.run_node
    monkeypatch.setattr(CalibrationInterpreter, "run_node", lambda self, n: calls.append(n) or orig(self, n))
    observers, n = calibrate(p.gm, items, p.signature, p.constants, progress=False)
    assert n == len(items)
    assert not calls, "the compiled path fell back to the interpreter"
    got = snapshot(observers)
    assert_bitwise_equal(got, want)
    if case.endswith("sums"):  # the config really collects every kind of statistic
        assert any(".res.rows" in k for k in got) and any(".hess" in k for k in got)
        assert any(".hist" in k for k in got)


def test_observers_own_their_buffers_after_calibrate():
    """The batched storage is given back: no two observers share memory (safetensors can save them)."""
    p = prepared_toy("w8a8")
    observers, _ = calibrate(p.gm, calib_items(2), p.signature, p.constants, progress=False)
    ptrs = set()
    for o in {id(o): o for o in observers.values()}.values():
        for t in (o.pos_max, o.neg_min):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            ptrs.add(t.data_ptr())
    assert len(ptrs) == 2 * len({id(o) for o in observers.values()})


def test_interpreter_run_commits_each_item():
    """``CalibrationInterpreter.run`` (node by node, no ``calibrate``) also counts each item once."""
    p = prepared_toy("w8a8")
    items = calib_items(3)
    interp = CalibrationInterpreter(p.gm)
    for item in items:
        interp.run(*flatten_inputs(p.gm, bind_inputs(p.signature, item, p.constants)))
    fast, _ = calibrate(p.gm, items, p.signature, p.constants, progress=False)
    assert_bitwise_equal(snapshot(interp.observers), snapshot(fast))


# ------------------------------------------------------------------------------------- retry guard


def _flaky(fn, fail_on: set[int]):
    """``fn`` that raises a RuntimeError on the listed (0-based) calls."""
    count = [0]

    def wrapper(*a: Any) -> Any:
        i = count[0]
        count[0] += 1
        if i in fail_on:
            raise RuntimeError(f"transient failure on call {i}")
        return fn(*a)

    return wrapper


def _run(interp: CalibrationInterpreter, p: api.Prepared, items: list[Any]) -> None:
    bind = _ItemBinder(p.gm, p.signature, p.constants)
    for item in items:
        interp.fast_run(*bind(item))
    interp.close()


@pytest.mark.parametrize("case", ["toy-sums", "noop-sums"])
def test_compiled_failure_midway_counts_the_item_once(case):
    """The compiled run of item 2 fails at the last observed node, after every earlier observer saw
    the item; the node-by-node re-run succeeds. Sums (Hessians, reservoirs, histograms), counts and
    extremes equal a run without the failure."""
    make, make_items = CASES[case]
    p, items = make(), make_items()
    clean = CalibrationInterpreter(p.gm)
    _run(clean, p, items)
    interp = CalibrationInterpreter(p.gm)
    last = list(interp._feed_at)[-1]
    # calls to the last feed: item 0 -> 0, item 1 -> 1, item 2 -> 2 (fails), its re-run -> 3
    interp._feed_at[last] = _flaky(interp._feed_at[last], {2})
    _run(interp, p, items)
    assert interp.fallbacks == 1 and clean.fallbacks == 0
    assert_bitwise_equal(snapshot(interp.observers), snapshot(clean.observers))


def test_failure_inside_a_sum_update_is_not_counted_twice(monkeypatch):
    """A Hessian update fails (after that observer's reservoir took the rows); the re-run applies the
    Hessian once and does not offer the rows to the reservoir again."""
    p = prepared_toy(sums_config(("ff2",)))
    items = calib_items(3)
    clean = CalibrationInterpreter(p.gm)
    _run(clean, p, items)
    n_obs = sum(o.hessian is not None for o in clean.session.observers)
    monkeypatch.setattr(HessianAccumulator, "update", _flaky(HessianAccumulator.update, {n_obs + 1}))
    interp = CalibrationInterpreter(p.gm)
    _run(interp, p, items)
    assert interp.fallbacks == 1
    assert_bitwise_equal(snapshot(interp.observers), snapshot(clean.observers))


def test_real_failure_still_names_the_node():
    """A failure the re-run reproduces is reported by node; nothing of that item is counted."""
    p = prepared_toy("w8a8")
    items = calib_items(2)
    items[1]["x"] = torch.randn(2, 5, 12)
    interp = CalibrationInterpreter(p.gm)
    bind = _ItemBinder(p.gm, p.signature, p.constants)
    interp.fast_run(*bind(items[0]))
    before = snapshot(interp.observers)
    with pytest.raises(CalibrationError, match=r"calibration failed at node=%_guards_fn"):
        interp.fast_run(*bind(items[1]))
    assert_bitwise_equal(snapshot(interp.observers), before)


# ------------------------------------------------------------------------------------- properties


@st.composite
def session_streams(draw):
    """Observers of a few widths (some collecting sums) and items of calls with random batches."""
    n_obs = draw(st.integers(1, 5))
    widths = [draw(st.sampled_from([1, 3, 8])) for _ in range(n_obs)]
    sums = [draw(st.booleans()) for _ in range(n_obs)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    items = []
    for _ in range(draw(st.integers(1, 4))):
        calls = []
        for i in range(n_obs):
            for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
                lead = draw(st.sampled_from([(), (0,), (4,), (2, 3), (1, 2, 2)]))
                dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64]))
                x = draw(st.sampled_from([1e-3, 1.0, 40.0])) * torch.randn(*lead, widths[i], generator=g)
                calls.append((i, x.to(dtype)))
        retry_at = draw(st.one_of(st.none(), st.integers(0, len(calls))))
        items.append((calls, retry_at))
    return widths, sums, items


def _make(widths, sums, cls):
    needs = ObserverNeeds(reservoir_rows=5, hessian=True, histograms=((),), bins=16)
    return [
        cls(k, name=f"o{i}", needs=needs if s else None)
        for i, (k, s) in enumerate(zip(widths, sums, strict=True))
    ]


@settings(max_examples=60, deadline=None)
@given(session_streams())
def test_session_equals_forward_with_retries(stream):
    widths, sums, items = stream
    ref = _make(widths, sums, LinearInputObserver)
    for calls, _ in items:
        for i, x in calls:
            ref[i](x)
    obs = _make(widths, sums, LinearInputObserver)
    plain = [ChannelMinMaxObserver(k, name=f"p{i}") for i, k in enumerate(widths)]
    plain_ref = [ChannelMinMaxObserver(k, name=f"p{i}") for i, k in enumerate(widths)]
    session = ObserverSession(obs + plain)
    for calls, retry_at in items:
        session.begin()
        if retry_at is not None:  # a failed run that got as far as call retry_at, then the re-run
            for i, x in calls[:retry_at]:
                session.feeds[i](x)
                session.feeds[len(obs) + i](x)
            session.retry()
        for i, x in calls:
            session.feeds[i](x)
            session.feeds[len(obs) + i](x)
            plain_ref[i](x)
        session.commit()
    session.close()
    assert_bitwise_equal(snapshot(dict(enumerate(obs))), snapshot(dict(enumerate(ref))))
    assert_bitwise_equal(snapshot(dict(enumerate(plain))), snapshot(dict(enumerate(plain_ref))))


def test_uncommitted_item_is_not_counted():
    """begin + feeds without commit (the item failed for good): the next item starts clean."""
    obs = ChannelMinMaxObserver(4, name="o")
    session = ObserverSession([obs])
    session.begin()
    session.feeds[0](torch.full((2, 4), 100.0))
    session.begin()
    session.feeds[0](torch.ones(3, 4))
    session.commit()
    session.close()
    assert obs.count == 3 and torch.equal(obs.pos_max, torch.ones(4))


# ---------------------------------------------------------------------------------- no-op elision


def _targets(gm) -> list[Any]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_noop_nodes_are_elided_only_for_captured_dtypes():
    p = prepared_noop("w8a8")
    aten = torch.ops.aten
    orig = _targets(p.gm)
    assert aten.dropout.default in orig and aten.to.dtype in orig and aten.slice.Tensor in orig
    interp = CalibrationInterpreter(p.gm)
    flat = flatten_inputs(p.gm, bind_inputs(p.signature, noop_items(1)[0], p.constants))
    fast = interp._compiled(flat)
    kept = _targets(fast.gm)
    assert aten.dropout.default not in kept and aten.to.dtype not in kept and aten.slice.Tensor not in kept
    assert not [n for n in fast.gm.graph.nodes if n.op == "get_attr"]  # constants are inputs
    other = interp._compiled([flat[0].double()])  # another input dtype: casts are no longer no-ops
    assert other is not fast and aten.to.dtype in _targets(other.gm)
    # the elided copy computes the model
    model, _ = _noop_capture()
    with torch.no_grad():
        torch.testing.assert_close(interp.fast_run(*flat)[0], model(flat[0]), rtol=0, atol=0)


def test_cast_that_changes_dtype_is_kept():
    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.to(torch.bfloat16).to(torch.float32))

    model = Cast().eval()
    p = api.prepare(model, {"x": torch.randn(2, 4)}, QuantizeConfig.coerce("w8a8"))
    interp = CalibrationInterpreter(p.gm)
    flat = [torch.randn(2, 4)]
    assert _targets(interp._compiled(flat).gm).count(torch.ops.aten.to.dtype) == 2
    obs, _ = calibrate(p.gm, [{"x": flat[0]}], p.signature, p.constants, progress=False)
    (o,) = obs.values()
    want = flat[0].to(torch.bfloat16).float()
    assert torch.equal(o.pos_max, want.amax(0).clamp(min=0))


# ---------------------------------------------------------------------------------- item binding


def test_binder_shortcut_gives_the_full_paths_inputs():
    p = prepared_toy("w8a8")
    bind = _ItemBinder(p.gm, p.signature, p.constants)
    for item in calib_items(3):
        got = bind(item)
        want = flatten_inputs(p.gm, bind_inputs(p.signature, item, p.constants))
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True))
    assert bind.keys == {"x", "emb"}  # the shortcut is armed


def test_binder_shortcut_still_rejects_bad_items():
    p = prepared_noop("w8a8")
    bind = _ItemBinder(p.gm, p.signature, p.constants)
    items = noop_items(2)
    bind(items[0])
    bind(items[1])
    with pytest.raises(CalibrationError, match=r"captured with scale=1.0"):
        bind({**items[0], "scale": 2.0})
    with pytest.raises(CalibrationError, match=r"(?s)structure .* differs"):
        bind({"x": [items[0]["x"]]})
    p2 = prepared_toy("w8a8")
    bind2 = _ItemBinder(p2.gm, p2.signature, p2.constants)
    bind2(calib_items(1)[0])
    with pytest.raises(CalibrationError, match=r"lacks argument\(s\) 'emb'"):
        bind2({"x": calib_items(1)[0]["x"]})
    with pytest.raises(CalibrationError, match=r"'temb' that forward\(x, emb\) does not take"):
        bind2({**calib_items(1)[0], "temb": torch.zeros(1)})
    item = calib_items(1)[0]
    assert all(a is b for a, b in zip(bind2((item["x"], item["emb"])), (item["x"], item["emb"]), strict=True))


# ---------------------------------------------------------------------------------------- NaN/Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_names_the_node_with_sums(bad):
    """With histograms and Hessians the error still names the first node (an Inf never reaches a
    histogram, whose range would grow forever)."""
    p = prepared_toy(sums_config(("ff2",)))
    items = calib_items(2)
    items[1]["x"][1, 2, 3] = bad
    with pytest.raises(CalibrationError, match=r"non-finite activation at linear_1 \(to_v\) \(channel \d+\)"):
        calibrate(p.gm, items, p.signature, p.constants, progress=False)


def test_nonfinite_in_a_later_layer_names_that_layer():
    """The first observer (in graph order) that saw a NaN/Inf is named, even if a later one saw an Inf
    too; nothing of the item is counted."""
    obs = [ChannelMinMaxObserver(2, name=f"layer{i}") for i in range(3)]
    session = ObserverSession(obs)
    session.begin()
    session.feeds[0](torch.ones(1, 2))
    session.feeds[1](torch.tensor([[1.0, float("nan")]]))
    session.feeds[2](torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(CalibrationError, match=r"non-finite activation at layer1 \(channel 1\)"):
        session.commit()
    assert all(o.count == 0 for o in obs)


def test_huge_finite_values_are_not_mistaken_for_inf():
    """The batched check sums the staged extremes; a sum that overflows is re-checked exactly."""
    obs = [ChannelMinMaxObserver(2, name=f"o{i}") for i in range(2)]
    session = ObserverSession(obs)
    session.begin()
    for f in session.feeds:
        f(torch.tensor([[3e38, -3e38], [3e38, 3e38]]))
    session.commit()
    session.close()
    assert all(o.count == 2 and o.pos_max[0] == 3e38 for o in obs)
