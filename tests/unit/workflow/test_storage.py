"""Calibration-set storage: safe encoding, chunk files, checksums, LRU cache, Dataset/DataLoader use."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.calibset import ChunkedCalibrationSet, MemoryCalibrationSet, load_calibrate_set
from segquant_fx.calibset.storage import decode_chunk, decode_item, encode_chunk, encode_item
from segquant_fx.errors import CalibrationError, ConfigError, SerializationError


def _item(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "hidden_states": torch.randn(2, 4, 3, 3, generator=g),
        "timestep": torch.tensor(float(i)).expand(2),  # an expanded (stride-0) view, as pipelines pass it
        "block_controlnet_hidden_states": [torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)],
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 3, generator=g), "time_ids": torch.arange(6.0)},
        "pair": (torch.ones(1, dtype=torch.bfloat16), 3, "x"),
        "joint_attention_kwargs": None,
        "conditioning_scale": 0.7,
        "return_dict": False,
        "mask": torch.tensor([True, False]),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _write(tmp_path, n=7, chunk_size=3, compress=True):
    items = [_item(i) for i in range(n)]
    infos = [{"prompt_index": i // 2, "step_index": i % 2, "call_index": 0} for i in range(n)]
    MemoryCalibrationSet(items, infos, {"calib_layer": "transformer"}).save(
        tmp_path / "set", chunk_size, compress
    )
    return items, infos, tmp_path / "set"


@pytest.mark.parametrize("compress", [True, False, 9])
def test_round_trip_chunked(tmp_path, compress):
    items, infos, path = _write(tmp_path, compress=compress)
    ds = load_calibrate_set(path)
    assert len(ds) == 7 and len(ds.chunks) == 3  # 3 + 3 + 1
    assert [c["items"] for c in ds.chunks] == [3, 3, 1]
    suffix = ".safetensors.zst" if compress else ".safetensors"
    assert all(c["file"].endswith(suffix) for c in ds.chunks)
    for i in range(7):
        assert _same(ds[i], items[i])
        assert ds.info(i) == infos[i]
    assert _same(ds[-1], items[-1])
    assert [_same(a, b) for a, b in zip(ds, items, strict=True)] == [True] * 7
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_items"] == 7
    assert all(len(c["sha256"]) == 64 for c in manifest["chunks"])
    with pytest.raises(IndexError):
        ds[7]


def test_no_pickle_in_chunks(tmp_path):
    _, _, path = _write(tmp_path, compress=False)
    data = (path / "chunk_00000.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])  # a plain safetensors header with a JSON structure
    meta = json.loads(header["__metadata__"]["segquant_calibset"])
    assert meta["items"][0]["$d"]["return_dict"] is False
    assert meta["items"][0]["$d"]["joint_attention_kwargs"] is None
    assert "$l" in meta["items"][0]["$d"]["block_controlnet_hidden_states"]
    assert b"\x80\x04" not in data[: 8 + header_len]  # no pickle protocol marker


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=5)
)
tensors = st.builds(
    lambda shape, dt: (
        torch.arange(int(torch.tensor(shape).prod().item()) if shape else 1).reshape(shape).to(dt)
    ),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]),
)
values = st.recursive(
    st.one_of(scalars, tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(min_size=1, max_size=4), inner, max_size=3),
    ),
    max_leaves=8,
)


@given(item=st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=4))
@settings(max_examples=60, deadline=None)
def test_encoding_round_trip_property(item):
    tensors: dict = {}
    struct = encode_item(item, tensors, "0.")
    json.dumps(struct)  # pure JSON
    assert _same(decode_item(struct, tensors), item)
    items, infos = decode_chunk(encode_chunk([item], [{}], 3), True, "x")
    assert _same(items[0], item) and infos == [{}]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"x": torch.float32}, r"item\['x'\] is a dtype"),
        ({"x": [object()]}, r"item\['x'\]\[0\] is a object"),
        ({"x": {1: torch.ones(1)}}, "non-string key"),
    ],
)
def test_unsupported_values(value, match):
    with pytest.raises(SerializationError, match=match):
        encode_item(value, {}, "0.")


def test_corrupt_chunk_names_file(tmp_path):
    _, _, path = _write(tmp_path)
    f = path / "chunk_00001.safetensors.zst"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(data))
    ds = load_calibrate_set(path)  # lazy: opening works, chunk 0 still reads
    assert ds[0]["return_dict"] is False
    with pytest.raises(SerializationError, match=r"chunk_00001\.safetensors\.zst is corrupt: sha256"):
        ds[3]
    with pytest.raises(SerializationError, match=r"chunk_00001\.safetensors\.zst is corrupt"):
        load_calibrate_set(path, verify="eager")


def test_truncated_and_missing_chunks(tmp_path):
    _, _, path = _write(tmp_path)
    f = path / "chunk_00002.safetensors.zst"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(SerializationError, match=r"chunk_00002\.safetensors\.zst has \d+ bytes"):
        load_calibrate_set(path)
    f.unlink()
    with pytest.raises(SerializationError, match=r"chunk_00002\.safetensors\.zst is missing"):
        load_calibrate_set(path)


def test_bad_manifests(tmp_path):
    with pytest.raises(SerializationError, match="not a calibration set"):
        load_calibrate_set(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(SerializationError, match="not valid JSON"):
        load_calibrate_set(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SerializationError, match="not a segquant_fx calibration-set manifest"):
        load_calibrate_set(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "segquant_fx.calibset", "version": 99}))
    with pytest.raises(SerializationError, match="version 99"):
        load_calibrate_set(tmp_path)


def test_incomplete_set(tmp_path):
    _, _, path = _write(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    m["complete"] = False
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CalibrationError, match="incomplete.*same dump_path"):
        load_calibrate_set(path)
    assert len(load_calibrate_set(path, allow_incomplete=True)) == 7


def test_lru_cache_and_max_len(tmp_path, monkeypatch):
    _, _, path = _write(tmp_path)
    ds = load_calibrate_set(path, max_cache_size=1, max_len=5)
    assert len(ds) == 5
    reads = []
    real = ChunkedCalibrationSet._read
    monkeypatch.setattr(ChunkedCalibrationSet, "_read", lambda self, ci: reads.append(ci) or real(self, ci))
    for i in [0, 1, 2, 3, 4, 0]:
        ds[i]
    assert reads == [0, 1, 0]  # sequential access reads each chunk once; going back evicts and rereads
    ds2 = load_calibrate_set(path, max_cache_size=2)
    reads.clear()
    for i in [0, 3, 0, 3, 6, 0]:
        ds2[i]
    assert reads == [0, 1, 2, 0]
    with pytest.raises(ConfigError, match="max_cache_size"):
        load_calibrate_set(path, max_cache_size=0)
    with pytest.raises(ConfigError, match="verify"):
        load_calibrate_set(path, verify="sometimes")


def test_dataloader_lists_of_dicts(tmp_path):
    items, _, path = _write(tmp_path)
    ds = load_calibrate_set(path)
    batches = list(ds.get_dataloader(batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(isinstance(x, dict) for b in batches for x in b)
    assert _same(batches[1][0], items[3])
    shuffled = [x["hidden_states"] for b in ds.get_dataloader(batch_size=2, shuffle=True) for x in b]
    assert len(shuffled) == 7
    # a worker process can read the chunks too
    via_worker = list(ds.get_dataloader(batch_size=4, num_workers=1))
    assert _same(via_worker[0][2], items[2])


def test_device_option_and_memory_set(tmp_path):
    items, infos, path = _write(tmp_path)
    ds = load_calibrate_set(path, device="meta")
    assert ds[0]["hidden_states"].device.type == "meta"
    assert ds[0]["block_controlnet_hidden_states"][0].device.type == "meta"
    mem = MemoryCalibrationSet(items, infos, {"calib_layer": "unet"})
    assert len(mem) == 7 and _same(mem[2], items[2]) and mem.info(2) == infos[2]
    assert "MemoryCalibrationSet(7 items, calib_layer='unet'" in repr(mem)
    with pytest.raises(ConfigError, match="2 items but 1 infos"):
        MemoryCalibrationSet(items[:2], infos[:1])


def test_save_refuses_to_overwrite(tmp_path):
    _, _, path = _write(tmp_path)
    with pytest.raises(ConfigError, match="already holds a calibration set"):
        MemoryCalibrationSet([_item(0)]).save(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty directory"):
        MemoryCalibrationSet([_item(0)]).save(other)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="chunk_size"):
        MemoryCalibrationSet([_item(0)]).save(tmp_path / "x", chunk_size=0)
