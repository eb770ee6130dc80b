"""qtype table, int4 packing, segment helpers and scale helpers."""

from __future__ import annotations

import pytest
import torch

from segquant_fx import ops
from segquant_fx.errors import ConfigError
from segquant_fx.ops import formats


def test_qtype_table():
    assert formats.QTYPES == ("int8", "int4", "fp8_e4m3")
    ranges = {
        q: (ops.qtype_info(q).qmin, ops.qtype_info(q).qmax, ops.qtype_info(q).neg_range) for q in ops.QTYPES
    }
    assert ranges == {"int8": (-128, 127, 128), "int4": (-8, 7, 8), "fp8_e4m3": (-448, 448, 448)}
    assert [formats.storage_dtype(q) for q in ops.QTYPES] == [torch.int8, torch.uint8, torch.float8_e4m3fn]
    assert formats.storage_last_dim(10, "int4") == 5
    assert formats.logical_last_dim(5, "int4") == 10
    assert formats.logical_last_dim(5, "fp8_e4m3") == 5


def test_unknown_qtype_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown qtype 'uint8'; use one of 'int8', 'int4', 'fp8_e4m3'"):
        ops.qtype_info("uint8")


def test_pack_int4_layout():
    q = torch.tensor([[0, 1, -1, 7, -8, -2]], dtype=torch.int8)
    packed = ops.pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x10, 0x7F, 0xE8]]
    assert torch.equal(ops.unpack_int4(packed), q)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(3, 5, dtype=torch.int8), r"pack_int4: int4 values .* must be even, got last dim 5"),
        (torch.tensor([8, 0], dtype=torch.int8), r"values must lie in \[-8, 7\], got \[0, 8\]"),
        (torch.tensor([1, 2], dtype=torch.int32), r"expected a torch.int8 tensor, got torch.int32"),
        (torch.tensor(1, dtype=torch.int8), r"got a 0-dim tensor"),
    ],
)
def test_pack_int4_rejects(tensor, message):
    with pytest.raises(ConfigError, match=message):
        ops.pack_int4(tensor)


def test_unpack_int4_rejects_non_uint8():
    with pytest.raises(ConfigError, match=r"expected packed torch.uint8 storage, got torch.int8"):
        ops.unpack_int4(torch.zeros(2, dtype=torch.int8))


def test_segment_helpers():
    assert formats.normalize_segments([], 7) == (7,)
    assert formats.normalize_segments([3, 4], 7) == (3, 4)
    assert formats.num_segments([]) == 1
    assert formats.segment_offsets([3, 4]) == (0, 3, 7)
    assert formats.segment_index([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    assert formats.refine_segments([3, 4], [2, 5]) == [(0, 2, 0, 0), (2, 3, 0, 1), (3, 7, 1, 1)]
    with pytest.raises(ConfigError, match=r"segments=\[3, 5\] sum to 8 but the last dim is 7"):
        formats.normalize_segments([3, 5], 7)
    with pytest.raises(
        ConfigError, match=r"segment sizes must be positive .* got segments=\[\] for last dim 0"
    ):
        formats.normalize_segments([], 0)
    with pytest.raises(ConfigError, match=r"totals differ \(7 vs 8\)"):
        formats.refine_segments([3, 4], [8])


def test_scale_from_amax():
    amax = torch.tensor([254.0, 14.0, 896.0, 0.0])
    assert ops.scale_from_amax(amax[:1], "int8").tolist() == [2.0]
    assert ops.scale_from_amax(amax[1:2], "int4").tolist() == [2.0]
    assert ops.scale_from_amax(amax[2:3], "fp8_e4m3").tolist() == [2.0]
    floor = ops.scale_from_amax(amax[3:], "int8")
    assert floor.dtype == torch.float32
    assert torch.equal(floor, torch.tensor([2.0**-24]) / 127)
    assert ops.scale_from_amax(3.0, "int8").dtype == torch.float32


@pytest.mark.parametrize(
    ("qtype", "qmax", "neg_range"), [("int8", 127, 128), ("int4", 7, 8), ("fp8_e4m3", 448, 448)]
)
def test_dual_scales_from_minmax(qtype, qmax, neg_range):
    sp, sn = ops.dual_scales_from_minmax(torch.tensor([3.0, 0.0]), torch.tensor([-5.0, 0.0]), qtype)
    assert torch.equal(sp, torch.tensor([3.0, 2.0**-24]) / qmax)
    assert torch.equal(sn, torch.tensor([5.0, 2.0**-24]) / neg_range)
    with pytest.raises(ConfigError, match=r"dual_scales_from_minmax: unknown qtype 'int16'"):
        ops.dual_scales_from_minmax(1.0, -1.0, "int16")
