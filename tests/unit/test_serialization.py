"""QuantizedModel.save / segquant_fx.load: safetensors + JSON, bit-exact round trips, integrity, atomicity."""

from __future__ import annotations

import ast
import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import segquant_fx
from segquant_fx import serialization as S
from segquant_fx.config import QuantizeConfig
from segquant_fx.errors import SerializationError
from segquant_fx.models.zoo import build_model, get_model_spec
from segquant_fx.patterns import PATTERNS


class Net(torch.nn.Module):
    """A user model (not diffusers): chunked projection, a non-persistent buffer, a tied buffer."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.up = torch.nn.Linear(32, 2 * width)
        self.down = torch.nn.Linear(width, 16)
        shift = torch.linspace(-1, 1, width)
        self.register_buffer("shift", shift, persistent=False)
        self.down.register_buffer("shift_again", shift)  # the same tensor under two names

    def forward(self, x: torch.Tensor, scale: float = 1.0, mode: str = "a") -> torch.Tensor:
        u, v = self.up(x).chunk(2, dim=-1)
        h = torch.nn.functional.silu(u) * v + self.shift - self.down.shift_again
        return self.down(h) * scale


def _quantize_net(config="w8a8", seed: int = 0, width: int = 64):
    torch.manual_seed(seed)
    net = Net(width)
    g = torch.Generator().manual_seed(seed + 100)
    calib = [{"x": torch.randn(4, 32, generator=g), "scale": 2.0, "mode": "b"} for _ in range(2)]
    return segquant_fx.quantize(net, calib, config, progress=False)


def _net_out(q, seed: int = 7) -> torch.Tensor:
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return q(x, scale=2.0, mode="b")


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def zoo_quantized(request):
    model, first = build_model(request.param, batch_size=2, seed=1)
    spec = get_model_spec(request.param)
    second, unseen = (spec.example(2, sample_seed=s) for s in (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = segquant_fx.quantize(model, [first, second], "w8a8", progress=False)
    return request.param, q, unseen


@pytest.fixture(scope="module")
def net_save(tmp_path_factory):
    q = _quantize_net()
    path = tmp_path_factory.mktemp("net") / "save"
    q.save(path)
    return q, path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _rewrite_json(path: Path, edit, fix_checksum: bool) -> None:
    jpath = path / S.JSON_NAME
    doc = json.loads(jpath.read_text())
    edit(doc)
    if fix_checksum:
        doc["json_sha256"] = S._doc_checksum(doc)
    jpath.write_text(json.dumps(doc))


# ---- round trips ---------------------------------------------------------------------------------


def test_diffusers_round_trip_is_bit_exact(zoo_quantized, tmp_path):
    name, q, inputs = zoo_quantized
    q.save(tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["quantized.json", "weights.safetensors"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q2 = segquant_fx.load(str(tmp_path / "q"))  # no model=: diffusers classes are allow-listed
    assert not [w for w in caught if "meta device failed" in str(w.message)], "meta-device rebuild fell back to CPU"
    with torch.no_grad():
        (a,) = q(**inputs, return_dict=False)
        (b,) = q2(**inputs, return_dict=False)
    assert a.dtype == b.dtype and torch.equal(a, b), name
    assert q2.plan == q.plan
    assert q2.model_class == q.model_class
    assert q2._constants == q._constants
    assert q2.meta["config"] == q.meta["config"] and q2.meta["model_config"] == q.meta["model_config"]
    sd, sd2 = q.graph_module.state_dict(), q2.graph_module.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for n, t in [*q2.graph_module.named_parameters(), *q2.graph_module.named_buffers()]:
        assert t.device.type == "cpu", n
    assert all(isinstance(p, torch.nn.Parameter) for _, p in q2.graph_module.named_parameters())

    # saving the loaded model again gives the same tensors, byte for byte
    q2.save(tmp_path / "again")
    first = json.loads((tmp_path / "q" / "quantized.json").read_text())
    again = json.loads((tmp_path / "again" / "quantized.json").read_text())
    assert again["files"] == first["files"] and again["plan"] == first["plan"]


def test_json_contents(zoo_quantized, tmp_path):
    name, q, _ = zoo_quantized
    q.save(tmp_path / "q")
    doc = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert doc["format"] == S.FORMAT and doc["format_version"] == S.FORMAT_VERSION
    assert doc["versions"]["torch"] == torch.__version__ and "segquant_fx" in doc["versions"]
    assert doc["model_class"].startswith("diffusers.") and isinstance(doc["model_config"], dict)
    assert doc["input_spec"]["hidden_states"] == {
        "tensor": {"shape": list(q.meta["example_kwargs"]["hidden_states"].shape), "dtype": "float32"}
    }
    assert set(doc["layers"]) == set(q.plan)
    for fqn, layer in doc["layers"].items():
        assert isinstance(layer["w_segments"], list)
        assert layer["tensors"]["qweight"] == f"{fqn}.qweight"
    n_tensors = len({id(t) for t in [*q.graph_module.parameters(), *q.graph_module.buffers()]})
    assert len(doc["tensors"]) == n_tensors
    info = doc["files"]["weights.safetensors"]
    assert info["size"] == (tmp_path / "q" / "weights.safetensors").stat().st_size and len(info["sha256"]) == 64


def test_user_module_needs_model(net_save):
    q, path = net_save
    with pytest.raises(SerializationError, match="model="):
        segquant_fx.load(str(path))
    q2 = segquant_fx.load(str(path), model=Net())
    assert torch.equal(_net_out(q), _net_out(q2))
    assert q2.plan == q.plan and q2._constants == {"scale": 2.0, "mode": "b"}
    # the tied buffer stays one tensor; the non-persistent one stays non-persistent
    assert q2.graph_module.shift is q2.graph_module.down.shift_again
    assert "shift" in q2.graph_module._non_persistent_buffers_set


def test_cpu_fallback_when_meta_rebuild_fails(net_save, monkeypatch):
    q, path = net_save

    def no_meta(model):
        raise RuntimeError("no meta clone")

    monkeypatch.setattr(S, "_meta_clone", no_meta)
    with pytest.warns(UserWarning, match="meta device failed"):
        q2 = segquant_fx.load(str(path), model=Net())
    assert torch.equal(_net_out(q), _net_out(q2))


def test_device_argument_moves_the_result(net_save):
    q2 = S.load_quantized(net_save[1], model=Net(), device="meta")
    assert q2.device.type == "meta"
    assert all(t.is_meta for t in q2.graph_module.buffers())


def test_user_module_other_architecture_is_refused(net_save):
    _, path = net_save
    with pytest.raises(SerializationError, match="differs|architecture"):
        segquant_fx.load(str(path), model=Net(width=48))


@pytest.mark.parametrize("config", ["w8a8-fp8", "w8a16", "w8a8-dynamic", "fake-quant"])
def test_other_formats_round_trip(config, tmp_path):
    if config == "fake-quant":
        d = QuantizeConfig.coerce("w8a8", known_patterns=PATTERNS).to_dict()
        d["default"]["real_quant"] = False
        config = d
    q = _quantize_net(config)
    q.save(tmp_path / "q")
    q2 = segquant_fx.load(tmp_path / "q", model=Net())
    assert torch.equal(_net_out(q), _net_out(q2))
    if config == "w8a8-fp8":
        header = _safetensors_header(tmp_path / "q" / "weights.safetensors")
        assert header["up.qweight"]["dtype"] == "F8_E4M3"  # stored natively, not as a byte view


def test_dtype_without_safetensors_support_is_stored_as_bytes(monkeypatch, tmp_path):
    q = _quantize_net()
    monkeypatch.setattr(S, "_NATIVE_DTYPES", S._NATIVE_DTYPES - {torch.int8})
    q.save(tmp_path / "q")
    doc = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert doc["tensors"]["up.qweight"]["stored_as"] == "uint8"
    q2 = segquant_fx.load(tmp_path / "q", model=Net())
    assert q2.graph_module.up.qweight.dtype == torch.int8
    assert torch.equal(_net_out(q), _net_out(q2))


# ---- integrity --------------------------------------------------------------------------------------


def test_truncated_weights_file(net_save, tmp_path):
    path = _copy(net_save[1], tmp_path)
    w = path / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(SerializationError, match=r"weights\.safetensors.*bytes"):
        segquant_fx.load(str(path), model=Net())


def test_edited_weights_file(net_save, tmp_path):
    path = _copy(net_save[1], tmp_path)
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(SerializationError, match=r"weights\.safetensors.*sha256"):
        segquant_fx.load(str(path), model=Net())


def test_edited_json_fails_checksum(net_save, tmp_path):
    path = _copy(net_save[1], tmp_path)

    def edit(doc):
        doc["plan"]["up"]["in_segments"] = [16, 16]

    _rewrite_json(path, edit, fix_checksum=False)
    with pytest.raises(SerializationError, match=r"quantized\.json.*modified"):
        segquant_fx.load(str(path), model=Net())


def test_edited_plan_with_fixed_checksum_fails_validation(net_save, tmp_path):
    path = _copy(net_save[1], tmp_path)

    def edit(doc):
        doc["plan"]["up"]["out_segments"] = [32, 96]

    _rewrite_json(path, edit, fix_checksum=True)
    with pytest.raises(SerializationError, match="plan differs"):
        segquant_fx.load(str(path), model=Net())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.pop("layers"), "'layers' is missing"),
        (lambda d: d.update(format="something else"), "not a segquant_fx save"),
    ],
)
def test_bad_document(net_save, tmp_path, edit, message):
    path = _copy(net_save[1], tmp_path)
    _rewrite_json(path, edit, fix_checksum=True)
    with pytest.raises(SerializationError, match=message):
        segquant_fx.load(str(path), model=Net())


@pytest.mark.parametrize("model_class", ["os.system", "builtins.eval", "diffusers.__loader__", "diffusers.NoSuchModel"])
def test_model_class_outside_allow_list(net_save, tmp_path, model_class):
    path = _copy(net_save[1], tmp_path)
    _rewrite_json(path, lambda d: d.update(model_class=model_class), fix_checksum=True)
    with pytest.raises(SerializationError, match="model="):
        segquant_fx.load(str(path))


def test_missing_directory(tmp_path):
    with pytest.raises(SerializationError, match="not a directory"):
        segquant_fx.load(str(tmp_path / "nothing"))


# ---- atomic writes ----------------------------------------------------------------------------------


def test_failed_save_keeps_previous_save(net_save, tmp_path, monkeypatch):
    q, _ = net_save
    target = tmp_path / "q"
    q.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    other = _quantize_net(seed=1)
    with pytest.raises(SerializationError, match="disk full"):
        other.save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directories left
    assert torch.equal(_net_out(segquant_fx.load(target, model=Net())), _net_out(q))


def test_save_replaces_previous_save(net_save, tmp_path):
    target = tmp_path / "q"
    net_save[0].save(target)
    other = _quantize_net(seed=1)
    other.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert torch.equal(_net_out(segquant_fx.load(target, model=Net())), _net_out(other))


def test_save_into_empty_existing_directory(net_save, tmp_path):
    (tmp_path / "q").mkdir()
    net_save[0].save(tmp_path / "q")
    assert (tmp_path / "q" / "quantized.json").is_file()


def test_refuses_unrelated_non_empty_directory(net_save, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(SerializationError, match=r"refusing to overwrite .*mine"):
        net_save[0].save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    # a previous save with a foreign file added is not ours to delete either
    save = tmp_path / "save"
    net_save[0].save(save)
    (save / "extra.bin").write_bytes(b"x")
    with pytest.raises(SerializationError, match="refusing to overwrite"):
        net_save[0].save(save)
    # a plain file is refused
    (tmp_path / "file").write_text("x")
    with pytest.raises(SerializationError, match="not a directory"):
        net_save[0].save(tmp_path / "file")


# ---- no pickle ---------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def test_only_json_and_safetensors_are_written(net_save):
    _, path = net_save
    files = sorted(p.name for p in path.rglob("*"))
    assert files == ["quantized.json", "weights.safetensors"]
    json.loads((path / "quantized.json").read_text())  # plain JSON
    header = _safetensors_header(path / "weights.safetensors")
    assert "up.qweight" in header
    for p in path.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"
        assert not p.read_bytes().startswith(b"PK"), f"{p} looks like a zip (torch.save)"


def test_serialization_source_never_unpickles():
    tree = ast.parse(Path(S.__file__).read_text())
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & banned_modules
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned_modules
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {("torch", "load"), ("torch", "save"), ("np", "load")}
            assert node.value.id not in banned_modules
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"eval", "exec", "__import__"}
    src = Path(S.__file__).read_text()
    assert "import_module" not in src and "torch.load(" not in src


# ---- JSON value encoding ---------------------------------------------------------------------------


def test_value_encoding_round_trips():
    value = {
        "t": (1, (2.5, None), [True, "s"]),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "dtype": torch.bfloat16,
        "tagged": {"__tuple__": [1]},  # a user dict that looks like a tag
    }
    enc = S._encode(value, "v")
    decoded = S._decode(json.loads(json.dumps(enc, allow_nan=False)), "v")
    assert decoded == value
    nan = S._decode(S._encode(float("nan"), "v"), "v")
    assert nan != nan
    with pytest.raises(SerializationError, match=r"v\.bad.*object"):
        S._encode({"bad": object()}, "v")
