"""onnxscript translations of the ``torch.ops.segquant`` ops, for ``torch.onnx.export(custom_translation_table=...)``.

Two formats (:func:`translation_table`):

``"qdq"``: standard ONNX ops only, so ONNX Runtime and TensorRT-style QDQ consumers run the model.

* ``quantize`` (int8, fp8 e4m3): ``QuantizeLinear(x / smooth, scale, zero)``; a per-tensor scale is
  a scalar; per-segment scales (SegLinear input segments) are expanded to an exact per-channel ``[K]``
  vector with a constant ``Gather`` and quantized per axis on the last dim (``axis=-1``).
* ``quantize_dual`` (DualScale): two Q paths, ``QuantizeLinear(Relu(v), s_pos)`` and
  ``QuantizeLinear(Min(v, 0), s_neg)``, concatenated along the last dim like the op's storage.
* ``quantize_dynamic`` (per-token): ``QuantizeLinear`` cannot take one scale per row before opset 21
  (and not per row *and* unequal segment there), so the absmax reduction and the quantization are
  spelled out: ``Abs``/``ReduceMax`` per segment (``Split`` + ``Concat``), ``Max(., 2^-24) / qmax``,
  then ``Clip(Round(v / scale))`` and ``Cast`` (int8) or ``Clip`` + saturating ``Cast`` (fp8), which is
  what ``QuantizeLinear`` computes (round-half-to-even, saturation).
* ``qlinear``: the QDQ GEMM form, ``MatMul(DQ(qx), DQ(qw)^T) + bias``. The activation ``DQ`` uses the
  same scale layout as its ``Q`` (per-token scales: ``Cast`` + ``Mul``); DualScale adds the two halves'
  ``DQ``; weights are ``DequantizeLinear`` per output channel (``axis=1`` on the transposed weight,
  the transpose of the int8 initializer is constant-folded), per tensor, or group-wise with
  ``block_size`` (opset >= 21; below, ``Cast`` + ``Mul`` by the expanded scale). Packed int4 weights
  are unpacked with ``BitwiseAnd``/``BitShift`` into an int8 container first (constant-folded).
* ``dequantize``, ``fake_quantize``, ``fake_quantize_dual``: ``DequantizeLinear`` / QDQ pairs.
* Not expressible in ``qdq`` (checked before export, see :mod:`segquant_fx.export.onnx`): int4
  *activations* (our packed storage has no standard QDQ consumer; use ``format="segquant"``) and fp8
  below opset 19.

``"segquant"``: custom ops in the ``com.segquant`` domain (version 1) whose schemas are registered
with ``onnx.defs`` (:func:`register_schemas`), so ``onnx.checker`` validates them. A quantized linear
is one ``QLinear`` node taking the float activation, the quantized weight and every scale, with the
quantization mode, qtypes and segments as attributes (see ``SCHEMA_DOC``); the remaining ops map
one-to-one (``Quantize``, ``QuantizeDual``, ``QuantizeDynamic``, ``Dequantize``, ``FakeQuantize``,
``FakeQuantizeDual``, and ``QLinear`` with ``act="quantized"`` for an already quantized input).
Attribute values follow ``segquant_fx/ops/README.md`` exactly (qtype names, dequant scales, segment
sizes along the last dim, DualScale halves), so a runtime that loads the kernels of ``kernels_cuda``
implements them directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import ir, values

from segquant_fx.ops.formats import AMAX_FLOOR, qtype_info

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "SCHEMA_DOC",
    "register_schemas",
    "translation_table",
    "QDQ_QTYPES",
]

#: Custom op domain of the ``segquant`` format.
DOMAIN = "com.segquant"
#: Its opset version.
DOMAIN_VERSION = 1
#: Activation/weight qtypes the ``qdq`` format expresses with standard ops.
QDQ_QTYPES = {"act": ("int8", "fp8_e4m3"), "weight": ("int8", "int4", "fp8_e4m3")}

SCHEMA_DOC = {
    "QLinear": (
        "y = dequant(quant(x)) @ dequant(qweight)^T + bias, as segquant::quantize* + segquant::qlinear. "
        "act='static': quantize x (divided by smooth) with x_scale; 'dual': DualScale with x_scale "
        "(positive half) and x_scale_neg; 'dynamic': per-token absmax scales; 'none': weight-only "
        "(x stays float); 'quantized': x is already quantized storage with scale x_scale (dual=1: both "
        "halves, scales [pos..., neg...]). Scales are dequant scales; segments are sizes along the "
        "last dim (absent: one segment); int4 is packed two per byte, low nibble first."
    ),
    "Quantize": "segquant::quantize: q = clamp(round(x / smooth / scale)) per segment of the last dim.",
    "QuantizeDual": "segquant::quantize_dual: DualScale, cat(Q(max(x,0), scale_pos), Q(min(x,0), scale_neg)).",
    "QuantizeDynamic": "segquant::quantize_dynamic: per-token, per-segment absmax quantization -> (q, scale).",
    "Dequantize": "segquant::dequantize: y = q * scale, cast to out_dtype.",
    "FakeQuantize": "segquant::fake_quantize: dequantize(quantize(x)).",
    "FakeQuantizeDual": "segquant::fake_quantize_dual: DualScale quantize, then dequantize.",
}

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_STORAGE = ["tensor(int8)", "tensor(uint8)", "tensor(float8e4m3fn)"]
_F32 = ir.DataType.FLOAT


def _schemas() -> list[OpSchema]:
    fp = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    att = OpSchema.Attribute
    string, ints, integer = OpSchema.AttrType.STRING, OpSchema.AttrType.INTS, OpSchema.AttrType.INT

    def schema(name, inputs, outputs, attributes, constraints):
        return OpSchema(
            name, DOMAIN, DOMAIN_VERSION, SCHEMA_DOC[name],
            inputs=inputs, outputs=outputs, attributes=attributes, type_constraints=constraints,
        )  # fmt: skip

    f_tc = ("TF", _FLOATS, "float tensors (activations, scales, bias, smooth)")
    x_tc = ("TX", _FLOATS + _STORAGE, "float activation, or quantized storage for act='quantized'")
    q_tc = ("TQ", _STORAGE, "quantized storage: int8, packed int4 (uint8) or float8e4m3fn")
    qtype = att("qtype", string, "int8 | int4 | fp8_e4m3")
    segs = att("segments", ints, "segment sizes along the last dim (absent: one segment)", required=False)
    out_dtype = att("out_dtype", integer, "ONNX element type of the output", required=False)
    smooth = fp("smooth", "TF", "SmoothQuant divisor [K]", param_option=opt)
    return [
        schema(
            "QLinear",
            [
                fp("x", "TX", "activation [*, K] (float, or quantized storage for act='quantized')"),
                fp("qweight", "TQ", "quantized weight [N, K] (int4: [N, K/2] packed)"),
                fp("w_scale", "TF", "weight dequant scales, broadcastable to [N, nseg_w]"),
                fp("bias", "TF", "bias [N]", param_option=opt),
                fp(
                    "x_scale",
                    "TF",
                    "activation dequant scale (positive half for act='dual')",
                    param_option=opt,
                ),
                fp("x_scale_neg", "TF", "negative-half scale for act='dual'", param_option=opt),
                smooth,
            ],
            [fp("y", "TF", "output [*, N]")],
            [
                att("act", string, "static | dual | dynamic | none | quantized"),
                att("act_qtype", string, "int8 | int4 | fp8_e4m3 | none", required=False),
                att("x_segments", ints, "activation segments along K (absent: one)", required=False),
                att("w_qtype", string, "int8 | int4 | fp8_e4m3"),
                att("w_segments", ints, "weight segments along K (absent: one)", required=False),
                att("dual", integer, "act='quantized' only: x holds both DualScale halves", required=False),
                out_dtype,
            ],
            [f_tc, x_tc, q_tc],
        ),
        schema(
            "Quantize",
            [fp("x", "TF"), fp("scale", "TF"), smooth],
            [fp("q", "TQ")],
            [qtype, segs],
            [f_tc, q_tc],
        ),
        schema(
            "QuantizeDual",
            [fp("x", "TF"), fp("scale_pos", "TF"), fp("scale_neg", "TF"), smooth],
            [fp("q", "TQ")],
            [qtype, segs],
            [f_tc, q_tc],
        ),
        schema(
            "QuantizeDynamic",
            [fp("x", "TF"), smooth],
            [fp("q", "TQ"), fp("scale", "TF", "per-token scales [*, nseg] (float32)")],
            [qtype, segs],
            [f_tc, q_tc],
        ),
        schema(
            "Dequantize",
            [fp("q", "TQ"), fp("scale", "TF")],
            [fp("y", "TF")],
            [qtype, segs, out_dtype],
            [f_tc, q_tc],
        ),
        schema(
            "FakeQuantize",
            [fp("x", "TF"), fp("scale", "TF"), smooth],
            [fp("y", "TF")],
            [qtype, segs],
            [f_tc],
        ),
        schema(
            "FakeQuantizeDual",
            [fp("x", "TF"), fp("scale_pos", "TF"), fp("scale_neg", "TF"), smooth],
            [fp("y", "TF")],
            [qtype, segs],
            [f_tc],
        ),
    ]


def register_schemas() -> None:
    """Register the ``com.segquant`` op schemas with ``onnx.defs`` (idempotent).

    Call it before ``onnx.checker.check_model(model, full_check=True)`` on a ``segquant``-format file
    in a fresh process, so the checker validates our nodes (without it, it skips unknown domains).
    """
    for s in _schemas():
        if not onnx.defs.has(s.name, DOMAIN):
            onnx.defs.register_schema(s)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _numel(v: Any) -> int | None:
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    n = 1
    for d in shape:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def _rank(v: Any) -> int | None:
    shape = getattr(v, "shape", None)
    return None if shape is None else len(shape)


def _sizes(segments: Sequence[int]) -> list[int]:
    return [int(s) for s in segments]


def _onnx_type(qtype: str) -> ir.DataType:
    return {"int8": ir.DataType.INT8, "fp8_e4m3": ir.DataType.FLOAT8E4M3FN, "int4": ir.DataType.UINT8}[qtype]


class _Qdq:
    """The ``qdq`` translations for one opset version."""

    def __init__(self, opset: int):
        self.opset = opset
        self.op = values.Opset("", opset)

    # -- constants -------------------------------------------------------------------------------
    def i64(self, vals: Sequence[int]) -> Any:
        return self.op.Constant(value=ir.tensor(np.asarray(vals, dtype=np.int64)))

    def f32(self, value: float) -> Any:
        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32)))

    def zero(self, qtype: str, n: int | None) -> Any:
        shape = () if n is None else (n,)
        if qtype == "fp8_e4m3":
            import ml_dtypes

            arr = np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn)
        else:
            arr = np.zeros(shape, dtype=np.int8)
        return self.op.Constant(value=ir.tensor(arr))

    def to_f32(self, x: Any) -> Any:
        return x if getattr(x, "dtype", None) == _F32 else self.op.Cast(x, to=_F32)

    # -- scales ----------------------------------------------------------------------------------
    def expand(self, scale: Any, sizes: Sequence[int]) -> Any:
        """``[..., nseg]`` -> ``[..., K]``: column j holds the scale of segment seg(j) (exact)."""
        if len(sizes) <= 1 or _numel(scale) == 1:
            return scale
        idx = np.repeat(np.arange(len(sizes)), sizes)
        return self.op.Gather(scale, self.i64(idx), axis=-1)

    def static_params(self, scale: Any, sizes: Sequence[int], qtype: str) -> tuple[Any, Any, int | None]:
        """(scale, zero point, axis) of a rank-1 static scale: a scalar, or a per-channel [K] vector."""
        s = self.to_f32(scale)
        if _numel(scale) == 1 or len(sizes) <= 1:
            return self.op.Reshape(s, self.i64([])), self.zero(qtype, None), None
        return self.expand(s, sizes), self.zero(qtype, int(sum(sizes))), -1

    def ql(self, v: Any, scale: Any, sizes: Sequence[int], qtype: str) -> Any:
        s, zp, axis = self.static_params(scale, sizes, qtype)
        return (
            self.op.QuantizeLinear(v, s, zp, axis=axis)
            if axis is not None
            else self.op.QuantizeLinear(v, s, zp)
        )

    def dql(self, q: Any, scale: Any, sizes: Sequence[int], qtype: str, static: bool | None = None) -> Any:
        """float32 dequantization of an activation: ``DequantizeLinear`` for static (rank-1) scales.

        Per-token scales (``[*lead, nseg]``, from ``quantize_dynamic``) use ``Cast`` + ``Mul``.
        """
        if static if static is not None else _rank(scale) == 1:
            s, zp, axis = self.static_params(scale, sizes, qtype)
            if axis is not None:
                return self.op.DequantizeLinear(q, s, zp, axis=axis)
            return self.op.DequantizeLinear(q, s, zp)
        return self.op.Mul(self.op.Cast(q, to=_F32), self.expand(self.to_f32(scale), sizes))

    def dual_vector(self, scale_pos: Any, scale_neg: Any, sizes: Sequence[int], k: Any) -> Any:
        """``[2K]`` per-channel scales of a DualScale pair ``[pos..., neg...]``.

        fp8 tensors cannot be concatenated or split in ONNX, so fp8 DualScale quantizes (and
        dequantizes) both halves at once with this vector.
        """
        if not isinstance(k, int):
            raise TypeError(f"DualScale needs a static last dim, got {k!r}")

        def full(s: Any) -> Any:
            s = self.to_f32(s)
            if len(sizes) > 1:
                return self.expand(s, sizes)
            return self.op.Expand(self.op.Reshape(s, self.i64([1])), self.i64([k]))

        return self.op.Concat(full(scale_pos), full(scale_neg), axis=0)

    def prepare(self, x: Any, smooth: Any) -> Any:
        v = self.to_f32(x)
        return v if smooth is None else self.op.Div(v, self.to_f32(smooth))

    def unpack_int4(self, p: Any) -> Any:
        """Packed uint8 ``[..., K/2]`` -> int8 values ``[..., K]`` (low nibble = even element)."""
        op = self.op
        u8 = lambda v: op.Constant(value=ir.tensor(np.asarray(v, dtype=np.uint8)))  # noqa: E731
        lo = op.BitwiseAnd(p, u8(15))
        hi = op.BitShift(p, u8(4), direction="RIGHT")
        both = op.Concat(op.Unsqueeze(lo, self.i64([-1])), op.Unsqueeze(hi, self.i64([-1])), axis=-1)
        shape = op.Concat(op.Slice(op.Shape(p), self.i64([0]), self.i64([-1])), self.i64([-1]), axis=0)
        nib = op.Cast(op.Reshape(both, shape), to=ir.DataType.INT16)
        i16 = lambda v: op.Constant(value=ir.tensor(np.asarray(v, dtype=np.int16)))  # noqa: E731
        return op.Cast(op.Sub(op.BitwiseXor(nib, i16(8)), i16(8)), to=ir.DataType.INT8)

    def weight_t(self, qw: Any, w_scale: Any, w_segments: Sequence[int], w_qtype: str) -> Any:
        """Dequantized, transposed weight ``[K, N]`` (float32)."""
        op = self.op
        q = self.unpack_int4(qw) if w_qtype == "int4" else qw
        sizes = _sizes(w_segments)
        s = self.to_f32(w_scale)
        if len(sizes) <= 1:
            if _numel(w_scale) == 1:
                return op.DequantizeLinear(op.Transpose(q, perm=[1, 0]), op.Reshape(s, self.i64([])))
            return op.DequantizeLinear(op.Transpose(q, perm=[1, 0]), op.Reshape(s, self.i64([-1])), axis=1)
        if len(set(sizes)) == 1 and self.opset >= 21 and _rank(w_scale) == 2:
            w = op.DequantizeLinear(q, s, axis=1, block_size=sizes[0])
            return op.Transpose(w, perm=[1, 0])
        w = op.Mul(op.Cast(q, to=_F32), self.expand(s, sizes))
        return op.Transpose(w, perm=[1, 0])

    # -- translations ----------------------------------------------------------------------------
    def quantize(self, x, scale, segments, qtype, smooth=None):
        return self.ql(self.prepare(x, smooth), scale, _sizes(segments), qtype)

    def quantize_dual(self, x, scale_pos, scale_neg, segments, qtype, smooth=None):
        v = self.prepare(x, smooth)
        sizes = _sizes(segments)
        if qtype == "fp8_e4m3":
            k = x.shape[-1]
            halves = self.op.Concat(self.op.Relu(v), self.op.Min(v, self.f32(0.0)), axis=-1)
            vec = self.dual_vector(scale_pos, scale_neg, sizes, k)
            return self.op.QuantizeLinear(halves, vec, self.zero(qtype, 2 * k), axis=-1)
        pos = self.ql(self.op.Relu(v), scale_pos, sizes, qtype)
        neg = self.ql(self.op.Min(v, self.f32(0.0)), scale_neg, sizes, qtype)
        return self.op.Concat(pos, neg, axis=-1)

    def quantize_dynamic(self, x, segments, qtype, smooth=None):
        op = self.op
        info = qtype_info(qtype)
        v = self.prepare(x, smooth)
        a = op.Abs(v)
        sizes = _sizes(segments)
        axes = self.i64([-1])
        if len(sizes) <= 1:
            amax = op.ReduceMax(a, axes, keepdims=1)
        else:
            offsets = np.cumsum([0, *sizes]).tolist()
            parts = [
                op.Slice(a, self.i64([b]), self.i64([e]), self.i64([-1]))
                for b, e in zip(offsets[:-1], offsets[1:], strict=True)
            ]
            amax = op.Concat(*[op.ReduceMax(p, axes, keepdims=1) for p in parts], axis=-1)
        scale = op.Div(op.Max(amax, self.f32(AMAX_FLOOR)), self.f32(info.qmax))
        r = op.Div(v, self.expand(scale, sizes))
        if info.is_float:
            q = op.Cast(op.Clip(r, self.f32(info.qmin), self.f32(info.qmax)), to=_onnx_type(qtype))
        else:
            q = op.Cast(op.Clip(op.Round(r), self.f32(info.qmin), self.f32(info.qmax)), to=_onnx_type(qtype))
        return q, scale

    def dequantize(self, q, scale, segments, qtype, out_dtype):
        return self.op.Cast(self.dql(q, scale, _sizes(segments), qtype), to=out_dtype)

    def fake_quantize(self, x, scale, segments, qtype, smooth=None):
        sizes = _sizes(segments)
        q = self.ql(self.prepare(x, smooth), scale, sizes, qtype)
        return self.op.Cast(self.dql(q, scale, sizes, qtype), to=x.dtype)

    def fake_quantize_dual(self, x, scale_pos, scale_neg, segments, qtype, smooth=None):
        v = self.prepare(x, smooth)
        sizes = _sizes(segments)
        pos = self.dql(self.ql(self.op.Relu(v), scale_pos, sizes, qtype), scale_pos, sizes, qtype)
        neg = self.dql(
            self.ql(self.op.Min(v, self.f32(0.0)), scale_neg, sizes, qtype), scale_neg, sizes, qtype
        )
        return self.op.Cast(self.op.Add(pos, neg), to=x.dtype)

    def qlinear(
        self, qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype
    ):
        op = self.op
        sizes = _sizes(x_segments)
        if x_qtype == "none":
            xh = self.to_f32(qx)
        elif dual:
            nseg = max(len(sizes), 1)
            sp = op.Slice(x_scale, self.i64([0]), self.i64([nseg]), self.i64([-1]))
            sn = op.Slice(x_scale, self.i64([nseg]), self.i64([2 * nseg]), self.i64([-1]))
            if x_qtype == "fp8_e4m3":
                k = qx.shape[-1] // 2
                both = op.DequantizeLinear(qx, self.dual_vector(sp, sn, sizes, k), axis=-1)
                a, b = op.Split(both, axis=-1, num_outputs=2)
                xh = op.Add(a, b)
            else:
                a, b = op.Split(qx, axis=-1, num_outputs=2)
                static = _rank(x_scale) in (None, 1)
                xh = op.Add(self.dql(a, sp, sizes, x_qtype, static), self.dql(b, sn, sizes, x_qtype, static))
        else:
            xh = self.dql(qx, x_scale, sizes, x_qtype)
        y = op.MatMul(xh, self.weight_t(qw, w_scale, w_segments, w_qtype))
        if bias is not None:
            y = op.Add(y, self.to_f32(bias))
        return op.Cast(y, to=out_dtype)


class _Segquant:
    """The ``segquant`` (custom domain) translations."""

    def __init__(self) -> None:
        register_schemas()
        self.op = values.Opset(DOMAIN, DOMAIN_VERSION)

    @staticmethod
    def _segs(name: str, segments: Sequence[int]) -> dict[str, Any]:
        return {name: _sizes(segments)} if len(segments) else {}

    def quantize(self, x, scale, segments, qtype, smooth=None):
        return self.op.Quantize(x, scale, smooth, qtype=qtype, **self._segs("segments", segments))

    def quantize_dual(self, x, scale_pos, scale_neg, segments, qtype, smooth=None):
        return self.op.QuantizeDual(
            x, scale_pos, scale_neg, smooth, qtype=qtype, **self._segs("segments", segments)
        )

    def quantize_dynamic(self, x, segments, qtype, smooth=None):
        return self.op.QuantizeDynamic(
            x, smooth, qtype=qtype, **self._segs("segments", segments), _num_outputs=2
        )

    def dequantize(self, q, scale, segments, qtype, out_dtype):
        return self.op.Dequantize(
            q, scale, qtype=qtype, out_dtype=int(out_dtype), **self._segs("segments", segments)
        )

    def fake_quantize(self, x, scale, segments, qtype, smooth=None):
        return self.op.FakeQuantize(x, scale, smooth, qtype=qtype, **self._segs("segments", segments))

    def fake_quantize_dual(self, x, scale_pos, scale_neg, segments, qtype, smooth=None):
        return self.op.FakeQuantizeDual(
            x, scale_pos, scale_neg, smooth, qtype=qtype, **self._segs("segments", segments)
        )

    def qlinear(
        self, qx, x_scale, x_segments, x_qtype, qw, w_scale, w_segments, w_qtype, bias, dual, out_dtype
    ):
        quantized = x_qtype != "none"
        return self.op.QLinear(
            qx, qw, w_scale, bias, x_scale if quantized else None, None, None,
            act="quantized" if quantized else "none", act_qtype=x_qtype, w_qtype=w_qtype, dual=int(bool(dual)),
            out_dtype=int(out_dtype), **self._segs("x_segments", x_segments), **self._segs("w_segments", w_segments),
        )  # fmt: skip

    def linear(self, x, smooth, x_scale, x_scale_neg, x_segments, x_qtype, act, qw, w_scale, w_segments, w_qtype,
               bias, out_dtype):  # fmt: skip
        return self.op.QLinear(
            x, qw, w_scale, bias, x_scale, x_scale_neg, smooth,
            act=act, act_qtype=x_qtype, w_qtype=w_qtype, out_dtype=int(out_dtype),
            **self._segs("x_segments", x_segments), **self._segs("w_segments", w_segments),
        )  # fmt: skip


_OPS = (
    "quantize",
    "quantize_dual",
    "quantize_dynamic",
    "dequantize",
    "fake_quantize",
    "fake_quantize_dual",
    "qlinear",
)


def translation_table(format: str, opset: int) -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: every segquant overload -> onnxscript.

    Args:
        format: ``"qdq"`` (standard ops) or ``"segquant"`` (``com.segquant`` domain).
        opset: Target default-domain opset (``qdq`` picks ops/attributes by it).

    Returns:
        A dict keyed by ``torch.ops.segquant.<op>.default`` (and, for ``"segquant"``, the fused
        ``torch.ops.segquant_onnx.linear.default`` of :mod:`segquant_fx.export.onnx`).
    """
    impl: Any = _Qdq(opset) if format == "qdq" else _Segquant()
    table: dict[Callable[..., Any], Callable[..., Any]] = {
        getattr(torch.ops.segquant, name).default: _function(getattr(impl, name)) for name in _OPS
    }
    if format == "segquant":
        table[torch.ops.segquant_onnx.linear.default] = _function(impl.linear)
    return table


def _function(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function with the method's signature (the exporter sets attributes on it)."""

    @functools.wraps(method)
    def translation(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return translation
