"""Hypothesis properties: round trips, int4 packing, segment bookkeeping, DualScale, fake == dq(q)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx import ops
from segquant_fx.ops import formats

_SETTINGS = settings(max_examples=40, deadline=None)
_QMIN = {"int8": -128, "int4": -8, "fp8_e4m3": -448}
_QMAX = {"int8": 127, "int4": 7, "fp8_e4m3": 448}
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def _layouts(draw, *, even_k=False):
    """(lead, segments, scale shape kind); segments may be [] or unequal positive sizes."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    segments = draw(st.one_of(st.just([]), st.lists(st.integers(1, 7), min_size=1, max_size=5)))
    k = sum(segments) if segments else draw(st.integers(1, 12))
    if even_k and k % 2:
        if segments:
            segments = [*segments[:-1], segments[-1] + 1]
        k += 1
    kind = draw(st.sampled_from(["tensor", "segment", "token", "token_segment"]))
    return lead, segments, k, kind


def _scale_shape(lead, nseg, kind):
    return {
        "tensor": (1,),
        "segment": (nseg,),
        "token": (*lead, 1),
        "token_segment": (*lead, nseg),
    }[kind]


def _expanded(scale, lead, segments, k):
    cols = [i for i, n in enumerate(segments or [k]) for _ in range(n)]
    return torch.broadcast_to(scale, (*lead, max(len(segments), 1)))[..., cols]


def _case(seed, layout, lo=0.01, hi=1.0):
    lead, segments, k, kind = layout
    g = torch.Generator().manual_seed(seed)
    scale = lo + (hi - lo) * torch.rand(_scale_shape(lead, max(len(segments), 1), kind), generator=g)
    return g, lead, segments, k, scale


_seeds = st.integers(0, 2**31 - 1)


@_SETTINGS
@given(seed=_seeds, qtype=st.sampled_from(["int8", "int4"]), layout=_layouts(even_k=True))
def test_int_round_trip_error_is_at_most_half_a_step(seed, qtype, layout):
    g, lead, segments, k, scale = _case(seed, layout)
    s = _expanded(scale, lead, segments, k)
    # Inside the representable range [qmin * s, qmax * s].
    u = torch.rand(*lead, k, generator=g)
    x = (_QMIN[qtype] + (_QMAX[qtype] - _QMIN[qtype]) * u) * s
    q = ops.quantize(x, scale, qtype=qtype, segments=segments)
    x_hat = ops.dequantize(q, scale, qtype=qtype, segments=segments, out_dtype=torch.float32)
    bound = s / 2 * (1 + 2**-20) + x.abs() * 2**-22
    assert bool(((x_hat - x).abs() <= bound).all())


@_SETTINGS
@given(seed=_seeds, qtype=st.sampled_from(["int8", "int4", "fp8_e4m3"]), layout=_layouts(even_k=True))
def test_each_element_uses_the_scale_of_its_segment(seed, qtype, layout):
    """Segment bookkeeping: quantize == per-element quantization with an explicitly expanded scale."""
    g, lead, segments, k, scale = _case(seed, layout)
    x = 3 * torch.randn(*lead, k, generator=g)
    q = ops.quantize(x, scale, qtype=qtype, segments=segments)
    per_element = ops.quantize(
        x, _expanded(scale, lead, segments, k).contiguous(), qtype=qtype, segments=[1] * k
    )
    assert q.dtype == per_element.dtype
    assert torch.equal(q.view(torch.uint8), per_element.view(torch.uint8))
    x_hat = ops.dequantize(q, scale, qtype=qtype, segments=segments, out_dtype=torch.float32)
    assert torch.equal(x_hat, ops.dequantize(q, _expanded(scale, lead, segments, k), qtype=qtype,
                                             segments=[1] * k, out_dtype=torch.float32))  # fmt: skip


@_SETTINGS
@given(
    seed=_seeds,
    qtype=st.sampled_from(["int8", "int4", "fp8_e4m3"]),
    layout=_layouts(even_k=True),
    dtype=st.sampled_from(_DTYPES),
    smooth=st.booleans(),
)
def test_fake_quantize_equals_dequantize_of_quantize(seed, qtype, layout, dtype, smooth):
    g, lead, segments, k, scale = _case(seed, layout)
    x = (3 * torch.randn(*lead, k, generator=g)).to(dtype)
    sm = 0.25 + 2 * torch.rand(k, generator=g) if smooth else None
    fq = ops.fake_quantize(x, scale, qtype=qtype, segments=segments, smooth=sm)
    q = ops.quantize(x, scale, qtype=qtype, segments=segments, smooth=sm)
    dq = ops.dequantize(q, scale, qtype=qtype, segments=segments, out_dtype=dtype)
    assert fq.dtype == dtype
    assert fq.shape == x.shape
    assert torch.equal(fq, dq)


@_SETTINGS
@given(
    seed=_seeds,
    qtype=st.sampled_from(["int8", "int4", "fp8_e4m3"]),
    layout=_layouts(even_k=True),
    smooth=st.booleans(),
)
def test_dual_reconstructs_within_its_half_steps(seed, qtype, layout, smooth):
    g, lead, segments, k, scale_pos = _case(seed, layout)
    scale_neg = 0.01 + torch.rand(scale_pos.shape, generator=g)
    sp = _expanded(scale_pos, lead, segments, k)
    sn = _expanded(scale_neg, lead, segments, k)
    # Random signs, magnitudes inside each side's range.
    u = torch.rand(*lead, k, generator=g)
    neg_side = torch.rand(*lead, k, generator=g) < 0.5
    x = torch.where(neg_side, _QMIN[qtype] * u * sn, _QMAX[qtype] * u * sp)
    sm = 0.25 + 2 * torch.rand(k, generator=g) if smooth else None
    x_in = x * sm if smooth else x  # so that x_in / smooth is (about) x
    x_ref = x_in / sm if smooth else x
    x_hat = ops.fake_quantize_dual(x_in, scale_pos, scale_neg, qtype=qtype, segments=segments, smooth=sm)
    step = torch.where(x_ref < 0, sn, sp)
    if qtype == "fp8_e4m3":
        # e4m3 keeps 3 mantissa bits: relative half-step 2^-4, plus the subnormal spacing 2^-9.
        bound = x_ref.abs() * 2**-4 + step * 2**-10 + x_ref.abs() * 2**-20
    else:
        bound = step / 2 * (1 + 2**-20) + x_ref.abs() * 2**-22
    assert bool(((x_hat - x_ref).abs() <= bound).all())
    q = ops.quantize_dual(x_in, scale_pos, scale_neg, qtype=qtype, segments=segments, smooth=sm)
    half = q.shape[-1] // 2
    pos = ops.dequantize(q[..., :half], torch.ones(1), qtype=qtype, out_dtype=torch.float32)
    neg = ops.dequantize(q[..., half:], torch.ones(1), qtype=qtype, out_dtype=torch.float32)
    assert bool((pos >= 0).all())
    assert bool((neg <= 0).all())
    assert bool((pos * neg == 0).all())


@_SETTINGS
@given(
    seed=_seeds,
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    half_k=st.integers(1, 9),
)
def test_int4_pack_unpack_round_trip_is_exact(seed, lead, half_k):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (*lead, 2 * half_k), generator=g, dtype=torch.int8)
    packed = ops.pack_int4(q)
    assert packed.shape == (*lead, half_k)
    assert torch.equal(ops.unpack_int4(packed), q)
    raw = torch.randint(0, 256, (*lead, half_k), generator=g, dtype=torch.uint8)
    assert torch.equal(ops.pack_int4(ops.unpack_int4(raw)), raw)


@_SETTINGS
@given(
    a=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    b_cuts=st.sets(st.integers(1, 35), max_size=6),
)
def test_refined_segments_tile_both_segmentations(a, b_cuts):
    k = sum(a)
    cuts = sorted(c for c in b_cuts if c < k)
    b = [y - x for x, y in zip([0, *cuts], [*cuts, k], strict=True)]
    pieces = formats.refine_segments(a, b)
    oa, ob = formats.segment_offsets(a), formats.segment_offsets(b)
    assert pieces[0][0] == 0
    assert pieces[-1][1] == k
    for (start, stop, ia, ib), nxt in zip(pieces, [*pieces[1:], None], strict=True):
        assert start < stop
        assert oa[ia] <= start < stop <= oa[ia + 1]
        assert ob[ib] <= start < stop <= ob[ib + 1]
        if nxt is not None:
            assert nxt[0] == stop
    assert len(pieces) == len(set(oa) | set(ob)) - 1


@_SETTINGS
@given(seed=_seeds, qtype=st.sampled_from(["int8", "int4", "fp8_e4m3"]), layout=_layouts(even_k=True))
def test_quantize_dynamic_scale_is_segment_absmax_over_qmax(seed, qtype, layout):
    g, lead, segments, k, _ = _case(seed, layout)
    x = torch.randn(*lead, k, generator=g) * torch.rand(*lead, 1, generator=g)
    q, scale = ops.quantize_dynamic(x, qtype=qtype, segments=segments)
    sizes = segments or [k]
    amax = torch.stack([c.abs().amax(-1) for c in x.split(sizes, dim=-1)], dim=-1)
    assert scale.shape == (*lead, len(sizes))
    assert torch.equal(scale, ops.scale_from_amax(amax, qtype))
    assert torch.equal(
        q.view(torch.uint8), ops.quantize(x, scale, qtype=qtype, segments=segments).view(torch.uint8)
    )
