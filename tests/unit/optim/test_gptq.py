"""GPTQ: output error vs round-to-nearest, exact stored codes, damping retries and fallback."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import ops, quantize
from segquant_fx.optim.common import quant_codes, store_codes, weight_scale_columns, weight_scales
from segquant_fx.optim.gptq import MAX_DAMP_RETRIES, gptq_quantize

from ._helpers import PLAIN, OneLinear, cache_capture, rel_error

K, N = 128, 64


def _correlated(g: torch.Generator, rows: int, mix: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, K, generator=g) @ mix


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    x, x_test = _correlated(g, 2048, mix), _correlated(g, 2048, mix)
    w = torch.randn(N, K, generator=g)
    return w, 2 * x.T @ x / x.shape[0], x_test


CASES = [  # qtype, granularity, group, actorder, static_groups
    ("int4", "per_channel", None, False, False),
    ("int8", "per_channel", None, False, False),
    ("int4", "per_tensor", None, False, False),
    ("int4", "per_group", 32, False, False),
    ("int4", "per_group", 32, False, True),
    ("int4", "per_channel", None, True, False),
    ("int4", "per_group", 32, True, True),
]


def _run(w, h, qtype, gran, group, actorder, static):
    scale, wsegs = weight_scales(w, qtype, gran, group)
    if gran == "per_group" and not static and not actorder:
        res = gptq_quantize(w[None], h[None], qtype, group_size=group)
    else:
        index = torch.arange(K) // group if gran == "per_group" else torch.zeros(K, dtype=torch.long)
        s = scale.reshape(1, 1, 1) if scale.dim() == 1 else scale[None]
        res = gptq_quantize(w[None], h[None], qtype, scale=s, scale_index=index, actorder=actorder)
    return scale, wsegs, res


@pytest.mark.parametrize(("qtype", "gran", "group", "actorder", "static"), CASES)
def test_gptq_cuts_layer_output_error_vs_round_to_nearest(problem, qtype, gran, group, actorder, static):
    w, h, x = problem
    scale, wsegs, res = _run(w, h, qtype, gran, group, actorder, static)
    cols = weight_scale_columns(scale, wsegs, K)
    rtn = quant_codes(w, cols, qtype).float() * cols
    got = res.codes[0].float() * weight_scale_columns(res.scale[0], wsegs, K)

    def err(wh: torch.Tensor) -> float:
        return float(((x @ w.T - x @ wh.T) ** 2).sum())

    ratio = err(got) / err(rtn)
    print(
        f"\nGPTQ {qtype} {gran} g={group} actorder={actorder} static={static}: error {ratio:.3f} of round-to-nearest"
    )
    assert ratio < 0.7
    assert not res.fallback[0]


def test_stored_codes_are_exactly_gptqs_choice(problem):
    w, h, _ = problem
    scale, wsegs, res = _run(w, h, "int4", "per_group", 32, False, False)
    codes, s = res.codes[0], res.scale[0]
    stored = store_codes(codes, "int4")
    deq = ops.dequantize(stored, s, qtype="int4", segments=wsegs, out_dtype=torch.float32)
    assert torch.equal(ops.quantize(deq, s, qtype="int4", segments=wsegs), stored)
    torch.testing.assert_close(deq, codes.float() * weight_scale_columns(s, wsegs, K), rtol=0, atol=0)


def test_gptq_through_quantize_beats_round_to_nearest():
    torch.manual_seed(0)
    model = cache_capture(OneLinear(K, N).eval())
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    items = [(_correlated(g, 256, mix).reshape(4, 64, K),) for _ in range(6)]
    test = [(_correlated(g, 256, mix).reshape(4, 64, K),) for _ in range(4)]
    base = {
        **PLAIN,
        "input_quant": {"type": "fp16"},
        "weight_quant": {"type": "int4", "axis": 0},
        "opt": {"type": "default"},
    }
    rtn = rel_error(model, quantize(model, items, {"default": base}, progress=False), test)
    q = quantize(model, items, {"default": {**base, "calib": {"type": "gptq"}}}, progress=False)
    gptq = rel_error(model, q, test)
    print(f"\nW4A16 held-out output error: round-to-nearest {rtn:.3e}, GPTQ {gptq:.3e} ({gptq / rtn:.1%})")
    assert gptq < 0.75 * rtn
    assert q.meta["optimizer"]["layers"]["lin"]["gptq"][0] > 0


def test_damping_is_retried_x10():
    h = torch.eye(16, dtype=torch.float64)
    h[5, 5] = -0.05  # needs damping > 0.05; the first try adds 0.01 * mean(diag) ~ 0.0093
    w = torch.randn(1, 8, 16)
    res = gptq_quantize(w, h[None], "int8", scale=torch.full((1, 8, 1), 0.02))
    mean = float(h.diagonal().mean())
    assert res.damp[0] == pytest.approx(0.1 * mean)
    assert not res.fallback[0]


def test_singular_hessian_falls_back_to_round_to_nearest_with_a_warning():
    w = torch.randn(2, 8, 16)
    h = torch.stack([-torch.eye(16), torch.eye(16)]).double()  # the first never becomes positive definite
    scale = torch.full((2, 8, 1), 0.02)
    with pytest.warns(
        RuntimeWarning, match=f"after {MAX_DAMP_RETRIES} damping retries.*rounding this weight to nearest"
    ):
        res = gptq_quantize(w, h, "int8", scale=scale, names=["bad.layer", "good.layer"])
    assert res.fallback == [True, False]
    assert torch.equal(res.codes[0], quant_codes(w[0], scale[0], "int8"))
    # an identity Hessian makes GPTQ round to nearest too (no correlated columns)
    assert torch.equal(res.codes[1], quant_codes(w[1], scale[1], "int8"))


def test_nan_hessian_through_quantize_falls_back(monkeypatch):
    torch.manual_seed(0)
    model = cache_capture(OneLinear(K, N).eval())
    items = [(torch.randn(2, 8, K),) for _ in range(2)]
    from segquant_fx.passes import observers

    real = observers.HessianAccumulator.hessian

    def broken(self, device=None, dtype=None):
        return torch.full_like(real(self, device, dtype), float("nan"))

    monkeypatch.setattr(observers.HessianAccumulator, "hessian", broken)
    cfg = {"default": {**PLAIN, "opt": {"type": "default"}, "calib": {"type": "gptq"}}}
    with pytest.warns(RuntimeWarning, match="rounding this weight to nearest"):
        q = quantize(model, items, cfg, progress=False)
    assert q.meta["optimizer"]["layers"]["lin"]["gptq_fallback"] is True
    monkeypatch.undo()
    rtn = quantize(model, items, {"default": {**PLAIN, "opt": {"type": "default"}}}, progress=False)
    assert torch.equal(q.graph_module.lin.qweight, rtn.graph_module.lin.qweight)


def test_one_hessian_per_input_tensor_shared_by_q_k_v():
    from segquant_fx.api import prepare
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.models import build_model, calibration_items
    from segquant_fx.passes.calibrate import calibrate

    model, _ = build_model("tiny-sd3", batch_size=1)
    cache_capture(model)
    items = calibration_items("tiny-sd3", 2, batch_size=1)
    prepared = prepare(model, items[0], QuantizeConfig.coerce("segquant-g-w8a8"))
    observers, _ = calibrate(prepared.gm, items, prepared.signature, prepared.constants, progress=False)
    by_module = {}
    for node in prepared.gm.graph.nodes:
        if node.name in observers:
            by_module[node.meta["segquant_annotation"].module] = observers[node.name]
    q, k, v = (by_module[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv")
    assert q is k is v and q.hessian is not None
    assert q.hessian.n == 2 * 64  # every image token of both items, counted once
    n_obs = len({id(o) for o in observers.values()})
    n_hess = len({id(o.hessian) for o in observers.values()})
    print(f"\ntiny-sd3: {len(observers)} quantized linears, {n_obs} observers, {n_hess} Hessians")
    assert n_hess == n_obs < len(observers)


def test_factorization_in_sub_batches_gives_the_same_result(monkeypatch):
    from segquant_fx.optim import gptq

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 256, 16, generator=g)
    h = torch.einsum("lri,lrj->lij", x, x) / 128
    h[1] = -torch.eye(16)  # singular: falls back, while its neighbours factorize
    w = torch.randn(3, 8, 16, generator=g)
    scale = torch.full((3, 8, 1), 0.02)
    with pytest.warns(RuntimeWarning):
        whole = gptq_quantize(w, h, "int8", scale=scale)
    monkeypatch.setattr(gptq, "_FACTOR_BYTES", 1)  # one problem per factorization
    with pytest.warns(RuntimeWarning):
        split = gptq_quantize(w, h, "int8", scale=scale)
    assert torch.equal(whole.codes, split.codes)
    assert whole.fallback == split.fallback == [False, True, False]
