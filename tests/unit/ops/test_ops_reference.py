"""Numerics of the reference kernels against independent float64 oracles, and input validation."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import ops
from segquant_fx.errors import ConfigError, SegQuantError
from segquant_fx.ops.reference import sample_inputs

# --------------------------------------------------------------------------------------------------
# independent float64 oracle (no reference internals)
# --------------------------------------------------------------------------------------------------


def _cols(segments, k):
    sizes = list(segments) or [k]
    return [i for i, n in enumerate(sizes) for _ in range(n)]


def _expand64(scale, lead, segments, k):
    nseg = max(len(segments), 1)
    return torch.broadcast_to(scale.double(), (*lead, nseg))[..., _cols(segments, k)]


def _unpack4(p):
    lo = (p & 15).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    vals = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return torch.where(vals >= 8, vals - 16, vals)


def _values64(q, qtype):
    return (_unpack4(q) if qtype == "int4" else q).double()


def _oracle_qlinear(qx, x_scale, x_seg, x_qtype, qw, w_scale, w_seg, w_qtype, bias, dual, out_dtype):
    """float64 dequantize-then-matmul."""
    wv = _values64(qw, w_qtype)
    n, k = wv.shape
    w_hat = wv * _expand64(w_scale, (n,), w_seg, k)
    lead = qx.shape[:-1]
    if x_qtype == "none":
        x_hats = [qx.double()]
    else:
        nx = max(len(x_seg), 1)
        halves = 2 if dual else 1
        xs = torch.broadcast_to(x_scale.double(), (*lead, halves * nx))
        x_hats = [
            _values64(part, x_qtype) * _expand64(xs[..., h * nx : (h + 1) * nx], lead, x_seg, k)
            for h, part in enumerate(qx.chunk(halves, dim=-1))
        ]
    y = sum(xh @ w_hat.T for xh in x_hats)
    return y + bias.double() if bias is not None else y


def _segment_amax(t, segments):
    sizes = list(segments) or [t.shape[-1]]
    return torch.stack([c.amax(-1) for c in t.split(sizes, dim=-1)], dim=-1)


def _make_qlinear_case(x_qtype, w_qtype, dual, x_seg, w_seg, per_token, seed, lead=(2, 3), n=5, k=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g)
    w_scale = ops.scale_from_amax(_segment_amax(w.abs(), w_seg), w_qtype)
    qw = ops.quantize(w, w_scale, qtype=w_qtype, segments=w_seg)
    bias = torch.randn(n, generator=g)
    if x_qtype == "none":
        qx, x_scale = x.to(torch.bfloat16), torch.ones(1)
    elif dual:
        pos = _segment_amax(x.clamp(min=0), x_seg)
        neg = -_segment_amax(-x.clamp(max=0), x_seg)
        if not per_token:
            pos, neg = pos.flatten(0, -2).amax(0), neg.flatten(0, -2).amin(0)
        sp, sn = ops.dual_scales_from_minmax(pos, neg, x_qtype)
        qx = ops.quantize_dual(x, sp, sn, qtype=x_qtype, segments=x_seg)
        x_scale = torch.cat([sp, sn], dim=-1)
    elif per_token:
        qx, x_scale = ops.quantize_dynamic(x, qtype=x_qtype, segments=x_seg)
    else:
        x_scale = ops.scale_from_amax(_segment_amax(x.abs(), x_seg).flatten(0, -2).amax(0), x_qtype)
        qx = ops.quantize(x, x_scale, qtype=x_qtype, segments=x_seg)
    return (qx, x_scale, x_seg, x_qtype, qw, w_scale, w_seg, w_qtype, bias, dual, torch.float32)


_COMBOS = [
    ("int8", "int8", False),
    ("int8", "int4", False),
    ("int4", "int4", False),
    ("int4", "int8", False),
    ("int8", "int8", True),
    ("int4", "int4", True),
    ("int8", "int4", True),
    ("fp8_e4m3", "fp8_e4m3", False),
    ("fp8_e4m3", "fp8_e4m3", True),
    ("none", "int8", False),
    ("none", "int4", False),
    ("none", "fp8_e4m3", False),
]
_SEGMENTS = [([], []), ([6, 10], [4, 4, 4, 4]), ([3, 13], [8, 8]), ([5, 1, 10], [])]


def _assert_matches_oracle(args, seed=None):
    args32 = (*args[:10], torch.float32)
    y = torch.ops.segquant.qlinear(*args32)
    y64 = _oracle_qlinear(*args32)
    assert y.dtype == torch.float32
    assert y.shape == y64.shape
    try:
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5 * float(y64.abs().max()))
    except AssertionError as e:
        raise AssertionError(f"{e}\n(seed={seed})") from None


@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
@pytest.mark.parametrize(("x_seg", "w_seg"), _SEGMENTS, ids=lambda s: "x" + "-".join(map(str, s)))
@pytest.mark.parametrize(("x_qtype", "w_qtype", "dual"), _COMBOS, ids=lambda v: str(v))
def test_qlinear_matches_float64_oracle(x_qtype, w_qtype, dual, x_seg, w_seg, per_token):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    _assert_matches_oracle(_make_qlinear_case(x_qtype, w_qtype, dual, x_seg, w_seg, per_token, seed), seed)


@pytest.mark.parametrize("index", range(len(sample_inputs("qlinear"))))
def test_qlinear_samples_match_oracle_in_their_out_dtype(index):
    args = sample_inputs("qlinear", seed=100 + index)[index]
    _assert_matches_oracle(args)
    y = torch.ops.segquant.qlinear(*args)
    assert y.dtype == args[-1]
    torch.testing.assert_close(y, _oracle_qlinear(*args).to(args[-1]))


@pytest.mark.parametrize(("x_qtype", "w_qtype", "dual"), [c for c in _COMBOS if "int" in c[0]])
def test_qlinear_integer_path_is_exact_with_power_of_two_scales(x_qtype, w_qtype, dual):
    """With power-of-two scales and small K every float32 step is exact: the result is bit-exact."""
    g = torch.Generator().manual_seed(11)
    m, n, k = 7, 6, 12
    x_seg, w_seg = [5, 4, 3], [4, 4, 4]
    qmin_x, qmax_x = (-8, 7) if x_qtype == "int4" else (-128, 127)
    qmin_w, qmax_w = (-8, 7) if w_qtype == "int4" else (-128, 127)
    if dual:
        halves = [
            torch.randint(0, qmax_x + 1, (m, k), generator=g),
            torch.randint(qmin_x, 1, (m, k), generator=g),
        ]
    else:
        halves = [torch.randint(qmin_x, qmax_x + 1, (m, k), generator=g)]
    wv = torch.randint(qmin_w, qmax_w + 1, (n, k), generator=g)

    def store(v, qtype):
        v = v.to(torch.int8)
        return ops.pack_int4(v) if qtype == "int4" else v

    qx = torch.cat([store(v, x_qtype) for v in halves], dim=-1)
    x_scale = 2.0 ** -torch.randint(0, 3, (m, len(halves) * 3), generator=g).float()
    w_scale = 2.0 ** -torch.randint(0, 3, (n, 3), generator=g).float()
    args = (
        qx,
        x_scale,
        x_seg,
        x_qtype,
        store(wv, w_qtype),
        w_scale,
        w_seg,
        w_qtype,
        None,
        dual,
        torch.float32,
    )
    y = torch.ops.segquant.qlinear(*args)
    assert torch.equal(y, _oracle_qlinear(*args).float())


# --------------------------------------------------------------------------------------------------
# quantize / dequantize / dynamic / dual: pinned values
# --------------------------------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0, 126.6]])
    q = ops.quantize(x, torch.tensor([1.0]), qtype="int8")
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, -128, 127]]
    q4 = ops.quantize(x, torch.tensor([1.0]), qtype="int4")
    assert ops.unpack_int4(q4).tolist() == [[0, 2, 2, 0, -2, 7, -8, 7]]


@pytest.mark.parametrize("where", ["scale", "smooth"])
def test_quantize_divides_exactly_instead_of_multiplying_by_a_reciprocal(where):
    """x = (k + 0.5) * 7 makes x / 7 an exact tie; x * (1 / 7) misses many of them (78 of 255)."""
    k = torch.arange(-128, 127, dtype=torch.float32)
    x = (k + 0.5) * 7.0
    seven = torch.tensor([7.0])
    if where == "scale":
        q = ops.quantize(x, seven, qtype="int8")
    else:
        q = ops.quantize(x, torch.ones(1), qtype="int8", smooth=seven.expand(k.numel()).contiguous())
    assert torch.equal(q, torch.round(k + 0.5).to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_quantize_rounds_once_from_float32(dtype):
    """Many values: fake_quantize casts the float32 product once, exactly as dequantize does."""
    g = torch.Generator().manual_seed(17)
    x = (4 * torch.randn(256, 4096, generator=g)).to(dtype)
    scale = 0.001 + 0.1 * torch.rand(256, 2, generator=g)
    fq = ops.fake_quantize(x, scale, qtype="int8", segments=[1000, 3096])
    q = ops.quantize(x, scale, qtype="int8", segments=[1000, 3096])
    expected = (q.float() * _expand64(scale, (256,), [1000, 3096], 4096).float()).to(dtype)
    assert torch.equal(fq, expected)


def test_quantize_int4_packs_low_nibble_first():
    x = torch.tensor([1.0, -1.0, 7.0, -8.0])
    assert ops.quantize(x, torch.tensor([1.0]), qtype="int4").tolist() == [0xF1, 0x87]


def test_quantize_fp8_clamps_to_448_and_casts():
    x = torch.tensor([1000.0, -1000.0, 0.3, -3.3])
    q = ops.quantize(x, torch.tensor([0.5]), qtype="fp8_e4m3")
    assert q.dtype == torch.float8_e4m3fn
    expected = torch.tensor([448.0, -448.0, 0.6, -6.6]).to(torch.float8_e4m3fn)
    assert torch.equal(q.float(), expected.float())


def test_quantize_uses_the_scale_of_each_segment():
    x = torch.full((2, 6), 1.0)
    scale = torch.tensor([[0.5, 0.25, 1.0], [1.0, 0.1, 0.5]])
    q = ops.quantize(x, scale, qtype="int8", segments=[1, 3, 2])
    assert q.tolist() == [[2, 4, 4, 4, 1, 1], [1, 10, 10, 10, 2, 2]]
    x_hat = ops.dequantize(q, scale, qtype="int8", segments=[1, 3, 2], out_dtype=torch.float32)
    assert torch.equal(x_hat, x)


def test_quantize_applies_smooth_first():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    smooth = 0.5 + torch.rand(10, generator=g)
    scale = torch.tensor([0.02, 0.03])
    q = ops.quantize(x, scale, qtype="int8", segments=[4, 6], smooth=smooth)
    expected = ops.quantize(x.float() / smooth, scale, qtype="int8", segments=[4, 6])
    assert torch.equal(q, expected)


@pytest.mark.parametrize(("qtype", "qmax"), [("int8", 127), ("int4", 7), ("fp8_e4m3", 448)])
def test_quantize_dynamic_scales_and_zero_rows(qtype, qmax):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 10, generator=g)
    x[1, 2] = 0.0  # an all-zero token
    q, scale = ops.quantize_dynamic(x, qtype=qtype, segments=[3, 7])
    assert scale.shape == (3, 4, 2)
    assert scale.dtype == torch.float32
    amax = torch.stack([x[..., :3].abs().amax(-1), x[..., 3:].abs().amax(-1)], dim=-1)
    assert torch.equal(scale, torch.clamp(amax, min=2.0**-24) / qmax)
    floor = torch.tensor(2.0**-24) / qmax  # float32 division, as in the op
    assert torch.equal(scale[1, 2], floor.expand(2))
    values = ops.dequantize(q, torch.ones(1), qtype=qtype, out_dtype=torch.float32)
    assert values[1, 2].abs().max() == 0
    # The largest magnitude of every (token, segment) lands on the end of the grid.
    seg_max = torch.stack([values[..., :3].abs().amax(-1), values[..., 3:].abs().amax(-1)], dim=-1)
    nonzero = amax > 0
    assert torch.equal(seg_max[nonzero], torch.full_like(seg_max[nonzero], qmax))


def test_quantize_dynamic_equals_quantize_with_its_scale():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 12, generator=g, dtype=torch.bfloat16)
    smooth = 0.5 + torch.rand(12, generator=g)
    q, scale = ops.quantize_dynamic(x, qtype="int4", segments=[2, 10], smooth=smooth)
    assert torch.equal(q, ops.quantize(x, scale, qtype="int4", segments=[2, 10], smooth=smooth))


@pytest.mark.parametrize(
    ("qtype", "qmin", "qmax"), [("int8", -128, 127), ("int4", -8, 7), ("fp8_e4m3", -448, 448)]
)
def test_quantize_dual_layout_and_conventional_scales(qtype, qmin, qmax):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 8, generator=g)
    sp, sn = ops.dual_scales_from_minmax(x.clamp(min=0).amax(), x.clamp(max=0).amin(), qtype)
    q = ops.quantize_dual(x, sp.reshape(1), sn.reshape(1), qtype=qtype)
    half = q.shape[-1] // 2
    pos = ops.dequantize(q[:, :half], torch.ones(1), qtype=qtype, out_dtype=torch.float32)
    neg = ops.dequantize(q[:, half:], torch.ones(1), qtype=qtype, out_dtype=torch.float32)
    assert pos.shape == neg.shape == x.shape
    assert bool((pos >= 0).all())
    assert bool((neg <= 0).all())
    assert bool((pos[x < 0] == 0).all())
    assert bool((neg[x > 0] == 0).all())
    assert pos.max().item() == qmax
    assert neg.min().item() == qmin


def test_fake_quantize_dual_is_the_sum_of_dequantized_halves():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 10, generator=g, dtype=torch.float16)
    sp, sn = torch.tensor([[0.01, 0.02]]), torch.tensor([[0.03, 0.015]])
    q = ops.quantize_dual(x, sp, sn, qtype="int8", segments=[4, 6])
    pos = ops.dequantize(q[:, :10], sp, qtype="int8", segments=[4, 6], out_dtype=torch.float32)
    neg = ops.dequantize(q[:, 10:], sn, qtype="int8", segments=[4, 6], out_dtype=torch.float32)
    x_hat = ops.fake_quantize_dual(x, sp, sn, qtype="int8", segments=[4, 6])
    assert x_hat.dtype == torch.float16
    assert torch.equal(x_hat, (pos + neg).to(torch.float16))


# --------------------------------------------------------------------------------------------------
# validation: our errors, messages that name the value and the fix
# --------------------------------------------------------------------------------------------------

_X = torch.ones(2, 10)
_S = torch.ones(1)
_QW = torch.ones(4, 10, dtype=torch.int8)
_QX = torch.ones(2, 10, dtype=torch.int8)


def _qlinear(**kw):
    args = {
        "qx": _QX,
        "x_scale": _S,
        "x_segments": [],
        "x_qtype": "int8",
        "qw": _QW,
        "w_scale": _S,
        "w_segments": [],
        "w_qtype": "int8",
        "bias": None,
        "dual": False,
        "out_dtype": torch.float32,
    }
    args.update(kw)
    return lambda: torch.ops.segquant.qlinear(*args.values())


_BAD_CALLS = {
    "unknown_qtype": (lambda: ops.quantize(_X, _S, qtype="int3"), r"unknown qtype 'int3'; use one of 'int8'"),
    "segments_sum": (
        lambda: ops.quantize(_X, _S, qtype="int8", segments=[3, 3]),
        r"segquant::quantize: segments=\[3, 3\] sum to 6 but the last dim is 10",
    ),
    "segment_not_positive": (
        lambda: ops.fake_quantize(_X, _S, qtype="int8", segments=[0, 10]),
        r"segquant::fake_quantize: segment sizes must be positive",
    ),
    "int4_odd": (
        lambda: ops.quantize(torch.ones(3, 7), _S, qtype="int4"),
        r"int4 .* must be even, got last dim 7",
    ),
    "scale_shape": (
        lambda: ops.quantize(_X, torch.ones(3), qtype="int8", segments=[5, 5]),
        r"scale of shape \[3\] is not broadcastable to \[\*lead, nseg\] = \[2, 2\]",
    ),
    "scale_extra_dims": (
        lambda: ops.quantize(_X, torch.ones(1, 2, 1), qtype="int8"),
        r"scale of shape \[1, 2, 1\] is not broadcastable",
    ),
    "scale_dtype": (
        lambda: ops.quantize(_X, torch.ones(1, dtype=torch.int32), qtype="int8"),
        r"scale must be a floating tensor",
    ),
    "smooth_shape": (
        lambda: ops.quantize(_X, _S, qtype="int8", smooth=torch.ones(9)),
        r"smooth must have shape \[K\] = \[10\]",
    ),
    "x_not_float": (
        lambda: ops.quantize(_QX, _S, qtype="int8"),
        r"segquant::quantize: x must be float16, bfloat16, float32 or float64, got torch.int8",
    ),
    "dequant_dtype": (
        lambda: ops.dequantize(_X, _S, qtype="int8", out_dtype=torch.float32),
        r"q has dtype torch.float32 but qtype 'int8' is stored as torch.int8",
    ),
    "dequant_out_dtype": (
        lambda: ops.dequantize(_QX, _S, qtype="int8", out_dtype=torch.int32),
        r"out_dtype must be float16, bfloat16, float32 or float64, got torch.int32",
    ),
    "dual_scale_neg": (
        lambda: ops.quantize_dual(_X, _S, torch.ones(2, 3), qtype="int8"),
        r"segquant::quantize_dual: scale_neg of shape \[2, 3\]",
    ),
    "dynamic_segments": (
        lambda: ops.quantize_dynamic(_X, qtype="int8", segments=[11]),
        r"segquant::quantize_dynamic: segments=\[11\] sum to 11",
    ),
    "qlinear_k_mismatch": (
        _qlinear(qw=torch.ones(4, 12, dtype=torch.int8)),
        r"segquant::qlinear: K mismatch: qx of shape \[2, 10\] .* has K=10 but qw of shape \[4, 12\]",
    ),
    "qlinear_int_act_fp8_weight": (
        _qlinear(qw=_QW.to(torch.float8_e4m3fn), w_qtype="fp8_e4m3"),
        r"x_qtype='int8' cannot be combined with w_qtype='fp8_e4m3'",
    ),
    "qlinear_fp8_act_int_weight": (
        _qlinear(qx=_QX.to(torch.float8_e4m3fn), x_qtype="fp8_e4m3"),
        r"x_qtype='fp8_e4m3' cannot be combined with w_qtype='int8'",
    ),
    "qlinear_unknown_x_qtype": (_qlinear(x_qtype="int2"), r"unknown x_qtype 'int2'.*'none'"),
    "qlinear_unknown_w_qtype": (_qlinear(w_qtype="none"), r"unknown w_qtype 'none'"),
    "qlinear_dual_weight_only": (
        _qlinear(qx=_X, x_qtype="none", dual=True),
        r"dual=True needs a quantized activation",
    ),
    "qlinear_dual_odd": (
        _qlinear(qx=torch.ones(2, 9, dtype=torch.int8), dual=True),
        r"with dual=True qx holds a positive and a negative half, so its last dim must be even, got 9",
    ),
    "qlinear_w_segments": (
        _qlinear(w_segments=[4, 4]),
        r"segquant::qlinear \(w_segments\): segments=\[4, 4\] sum to 8 but the last dim is 10",
    ),
    "qlinear_x_scale": (
        _qlinear(x_scale=torch.ones(3, 1)),
        r"x_scale of shape \[3, 1\] is not broadcastable to \[\*lead, nseg\] = \[2, 1\]",
    ),
    "qlinear_dual_x_scale": (
        _qlinear(qx=torch.ones(2, 20, dtype=torch.int8), dual=True, x_scale=torch.ones(3)),
        r"x_scale of shape \[3\] is not broadcastable to \[\*lead, nseg\] = \[2, 2\]",
    ),
    "qlinear_w_scale": (_qlinear(w_scale=torch.ones(5, 1)), r"w_scale of shape \[5, 1\]"),
    "qlinear_qw_dtype": (
        _qlinear(qw=_QW, w_qtype="int4"),
        r"qw has dtype torch.int8 but qtype 'int4' is stored as torch.uint8",
    ),
    "qlinear_qw_dims": (_qlinear(qw=torch.ones(4, 10, 1, dtype=torch.int8)), r"qw must be 2-D"),
    "qlinear_bias": (_qlinear(bias=torch.ones(5)), r"bias must have shape \[N\] = \[4\], got \[5\]"),
    "qlinear_out_dtype": (_qlinear(out_dtype=torch.int8), r"out_dtype must be float16"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS), ids=list(_BAD_CALLS))
def test_bad_inputs_raise_config_error(case):
    call, message = _BAD_CALLS[case]
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert isinstance(info.value, SegQuantError)
    assert isinstance(info.value, ValueError)
