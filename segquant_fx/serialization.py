"""Saving and loading quantized models: safetensors + JSON, no executable content.

A save is a directory holding exactly two files::

    quantized.json       format marker and version, segquant_fx/torch versions, the float model's
                         class import path and diffusers config, the quantization config, the plan,
                         the captured non-tensor arguments, a shape/dtype spec of the example inputs,
                         the quantized layers (tensor names and weight segments), a manifest of every
                         tensor, the sha256 and byte size of weights.safetensors, and a sha256 of the
                         JSON document itself
    weights.safetensors  every parameter and buffer of ``qmodel.graph_module`` (non-persistent
                         buffers and lifted constants included), keyed by its FQN in the graph module

Loading reads nothing but JSON and safetensors, so it never executes code from the files. The float
architecture is rebuilt from an allow-list: a class exported by :mod:`diffusers` (built from the saved
config), or the ``model=`` the caller passes. The model is rebuilt on the ``meta`` device (no weight
allocation), re-captured on meta example inputs made from the input spec, pattern-matched and
annotated again, then rewritten with the saved layer tensors; every saved tensor is then assigned
onto the rebuilt graph module. If capture on the meta device fails, the rebuild falls back to CPU
tensors (with a warning).

Writes are atomic: everything is written and fsynced in a temporary directory next to the target,
which is then renamed into place; a previous save in the target is replaced only once the new one is
complete. A non-empty directory that is not a previous save is never overwritten.

Example::

    qmodel.save("out/sd3-w8a8")
    qmodel2 = segquant_fx.load("out/sd3-w8a8")  # diffusers models need no model=
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch as st
import torch

from segquant_fx.errors import SegQuantError, SerializationError
from segquant_fx.quantized import spec_child

__all__ = ["save_quantized", "load_quantized", "FORMAT", "FORMAT_VERSION", "JSON_NAME", "WEIGHTS_NAME"]

#: Marker identifying a segquant_fx save (``quantized.json["format"]``).
FORMAT = "segquant_fx.quantized"
#: Version of the on-disk layout written by this module.
FORMAT_VERSION = 1
_KNOWN_VERSIONS = frozenset({1})
JSON_NAME = "quantized.json"
WEIGHTS_NAME = "weights.safetensors"

_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "versions": dict,
    "model_class": str,
    "model_config": (dict, type(None)),
    "config": dict,
    "dtype": str,
    "plan": dict,
    "constants": dict,
    "input_spec": dict,
    "layers": dict,
    "tensors": dict,
    "aliases": dict,
    "meta": dict,
    "files": dict,
    "json_sha256": str,
}
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
#: dtypes safetensors stores natively; others are stored as a flat uint8 view (recorded in the JSON).
_NATIVE_DTYPES = frozenset(getattr(st, "_TYPES", {}).values()) or frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8, torch.bool}
)
_CHUNK = 1 << 22


# ------------------------------------------------------------------------------------------------
# JSON value encoding (round-trips tuples, non-finite floats and dtypes)
# ------------------------------------------------------------------------------------------------


def _encode(value: Any, where: str) -> Any:
    """Encode a plain Python value as JSON; tuples, non-finite floats and dtypes are tagged."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SerializationError(f"{where}: dict key {k!r} is not a string; it cannot be saved as JSON")
            out[k] = _encode(v, f"{where}.{k}")
        if len(out) == 1 and next(iter(out)).startswith("__") and next(iter(out)).endswith("__"):
            return {"__dict__": out}  # a user dict that looks like a tag
        return out
    raise SerializationError(
        f"{where}: a value of type {type(value).__name__} cannot be saved "
        "(only None, bool, int, float, str, dtypes, lists, tuples and str-keyed dicts)"
    )


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tuple__" and isinstance(inner, list):
            return tuple(_decode(v, where) for v in inner)
        if tag == "__float__" and inner in ("inf", "-inf", "nan"):
            return float(inner)
        if tag == "__dtype__":
            return _dtype(inner, where)
        if tag == "__dict__" and isinstance(inner, dict):
            return {k: _decode(v, where) for k, v in inner.items()}
    return {k: _decode(v, where) for k, v in value.items()}


def _dtype(name: Any, where: str) -> torch.dtype:
    d = _DTYPES.get(name) if isinstance(name, str) else None
    if d is None:
        raise SerializationError(f"{where}: unknown dtype {name!r}")
    return d


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _encode_inputs(value: Any, where: str) -> Any:
    """Input spec: tensors become ``{"tensor": {"shape", "dtype"}}``; containers and values are tagged."""
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": [int(s) for s in value.shape], "dtype": _dtype_name(value.dtype)}}
    if isinstance(value, Mapping):
        return {"dict": {str(k): _encode_inputs(v, f"{where}.{k}") for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"tuple": [_encode_inputs(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return {"list": [_encode_inputs(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    return {"value": _encode(value, where)}


def _decode_inputs(node: Any, where: str, make: Any) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise SerializationError(f"{JSON_NAME}: input_spec {where}: malformed entry {node!r}")
    (kind, inner), = node.items()
    if kind == "tensor":
        if not isinstance(inner, dict) or not isinstance(inner.get("shape"), list):
            raise SerializationError(f"{JSON_NAME}: input_spec {where}: malformed tensor entry {inner!r}")
        shape = inner["shape"]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise SerializationError(f"{JSON_NAME}: input_spec {where}: bad shape {shape!r}")
        return make(tuple(shape), _dtype(inner.get("dtype"), f"input_spec {where}"))
    if kind == "dict" and isinstance(inner, dict):
        return {k: _decode_inputs(v, f"{where}.{k}", make) for k, v in inner.items()}
    if kind in ("tuple", "list") and isinstance(inner, list):
        items = [_decode_inputs(v, f"{where}[{i}]", make) for i, v in enumerate(inner)]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return _decode(inner, where)
    raise SerializationError(f"{JSON_NAME}: input_spec {where}: unknown entry kind {kind!r}")


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _doc_checksum(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in doc.items() if k != "json_sha256"})).hexdigest()


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------


def _owner(root: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    *path, attr = fqn.split(".")
    return (root.get_submodule(".".join(path)) if path else root), attr


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _collect_tensors(gm: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, str]]:
    """(canonical name -> tensor, manifest, alias -> canonical name) over every parameter and buffer."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for kind, store in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in store.items():
                if t is None:
                    continue
                name = _join(prefix, attr)
                if name in manifest or name in aliases:
                    continue
                if id(t) in seen:
                    aliases[name] = seen[id(t)]
                    continue
                seen[id(t)] = name
                tensors[name] = t
                manifest[name] = {
                    "kind": kind,
                    "dtype": _dtype_name(t.dtype),
                    "shape": [int(s) for s in t.shape],
                }
                if kind == "buffer" and attr in mod._non_persistent_buffers_set:
                    manifest[name]["persistent"] = False
    return tensors, manifest, aliases


def _storable(tensors: Mapping[str, torch.Tensor], manifest: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint tensors safetensors accepts (unsupported dtypes as uint8 views)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, str]] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _NATIVE_DTYPES:
            t = t.reshape(-1).view(torch.uint8)
            manifest[name]["stored_as"] = "uint8"
        key = (t.untyped_storage().data_ptr(), str(t.device))
        if key in storages and t.numel() > 0:
            t = t.clone()  # distinct tensors sharing memory: safetensors stores each on its own
        storages.add((t.untyped_storage().data_ptr(), str(t.device)))
        out[name] = t
    return out


def _layer_entries(qmodel: Any, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per quantized layer: its tensor names, weight segments and activation dtype."""
    gm = qmodel.graph_module
    ann_by_module: dict[str, Any] = {}
    wsegs_by_module: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        ann = node.meta.get("segquant_quantized")
        if ann is None:
            continue
        ann_by_module[ann.module] = (ann, node)
        if node.target is torch.ops.segquant.qlinear.default and len(node.args) > 6:
            wsegs_by_module[ann.module] = [int(s) for s in node.args[6]]
    layers: dict[str, dict[str, Any]] = {}
    for fqn, entry in qmodel.plan.items():
        try:
            owner = gm.get_submodule(fqn)
        except AttributeError:
            raise SerializationError(f"plan layer {fqn!r} has no module in the graph module") from None
        # exactly the tensors the rewrite was given (the plan's tensor_shapes), where stored as buffers
        wanted = entry.get("tensor_shapes") or {}
        names = {a: _join(fqn, a) for a in wanted if a in owner._buffers and _join(fqn, a) in manifest}
        if "qweight" not in names and "weight_hat" not in owner._buffers:
            raise SerializationError(f"quantized layer {fqn!r} holds neither a 'qweight' nor a 'weight_hat' buffer")
        if fqn in wsegs_by_module:
            wsegs = wsegs_by_module[fqn]
        elif entry.get("weight_granularity") == "per_group" and entry.get("weight_group_size"):
            g = int(entry["weight_group_size"])
            wsegs = [g] * (int(entry["in_features"]) // g)
        else:
            wsegs = []
        ann_node = ann_by_module.get(fqn)
        val = ann_node[1].meta.get("val") if ann_node is not None else None
        dtype = val.dtype if isinstance(val, torch.Tensor) else qmodel.dtype
        layers[fqn] = {"tensors": names, "w_segments": wsegs, "dtype": _dtype_name(dtype)}
    return layers


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # platforms without directory fds
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _is_previous_save(path: Path) -> bool:
    """True if ``path`` holds a segquant save (its JSON marker) and nothing but the files it lists."""
    jpath = path / JSON_NAME
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return False
    files = doc.get("files")
    allowed = {JSON_NAME, *(files if isinstance(files, dict) else ())}
    return all(p.name in allowed and p.is_file() for p in path.iterdir())


def _json_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    skip = {"example_kwargs", "config", "model_config", "segquant_fx", "torch"}
    for k, v in meta.items():
        if k in skip:
            continue
        try:
            out[k] = _encode(v, f"meta.{k}")
        except SerializationError as e:
            warnings.warn(f"segquant_fx.save: meta[{k!r}] is not saved: {e}", stacklevel=3)
    return out


def _versions() -> dict[str, str]:
    from segquant_fx.api import _version

    return {"segquant_fx": _version("segquant-fx"), "torch": torch.__version__, "safetensors": safetensors.__version__}


def save_quantized(qmodel: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``qmodel`` (a :class:`~segquant_fx.quantized.QuantizedModel`) into directory ``path``.

    Args:
        qmodel: The quantized model.
        path: Target directory. Created if missing; a previous save there is replaced atomically.

    Returns:
        The target directory.

    Raises:
        SerializationError: ``path`` is a file or a non-empty directory that is not a previous
            save, a non-tensor argument cannot be written as JSON, or writing failed (the previous
            content of ``path`` is then left untouched).
    """
    target = Path(os.path.abspath(os.fspath(path)))
    if target.exists():
        if not target.is_dir():
            raise SerializationError(f"cannot save to {str(target)!r}: it exists and is not a directory")
        if any(target.iterdir()) and not _is_previous_save(target):
            raise SerializationError(
                f"refusing to overwrite {str(target)!r}: the directory is not empty and does not hold a "
                "previous segquant_fx save; pass an empty or new directory"
            )
    doc = _build_document(qmodel)
    tensors, manifest, aliases = _collect_tensors(qmodel.graph_module)
    doc["tensors"] = manifest
    doc["aliases"] = aliases
    doc["layers"] = _layer_entries(qmodel, manifest)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        wpath = tmp / WEIGHTS_NAME
        st.save_file(_storable(tensors, manifest), str(wpath), metadata={"format": "pt"})  # one key: bytes are deterministic
        _fsync_path(wpath)
        sha, size = _file_digest(wpath)
        doc["files"] = {WEIGHTS_NAME: {"sha256": sha, "size": size}}
        doc["json_sha256"] = _doc_checksum(doc)
        jpath = tmp / JSON_NAME
        with open(jpath, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, sort_keys=True, indent=1, allow_nan=False))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp, directory=True)
        _swap_into_place(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SegQuantError) or not isinstance(e, Exception):
            raise
        raise SerializationError(f"saving to {str(target)!r} failed ({type(e).__name__}: {e}); nothing was changed there") from e
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` onto ``target``; an old ``target`` is removed only after the swap."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_path(target.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_document(qmodel: Any) -> dict[str, Any]:
    meta = dict(getattr(qmodel, "meta", {}) or {})
    if "config" not in meta:
        raise SerializationError("the quantized model has no meta['config']; it was not made by segquant_fx.quantize")
    if "example_kwargs" not in meta:
        raise SerializationError("the quantized model has no meta['example_kwargs'] (the capture example spec)")
    in_spec = getattr(qmodel.graph_module, "_in_spec", None)
    if in_spec is not None and in_spec.num_children == 2 and spec_child(in_spec, 0).num_children:
        raise SerializationError("models captured with positional-only inputs cannot be saved yet")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "quantized_with": {"segquant_fx": str(meta.get("segquant_fx", "unknown")), "torch": str(meta.get("torch", "unknown"))},
        "model_class": str(qmodel.model_class),
        "model_config": _encode(meta.get("model_config"), "model_config") if meta.get("model_config") is not None else None,
        "config": _encode(meta["config"], "config"),
        "dtype": _dtype_name(qmodel.dtype),
        "plan": _encode(qmodel.plan, "plan"),
        "constants": {k: _encode(v, f"constant argument {k!r}") for k, v in qmodel._constants.items()},
        "input_spec": {k: _encode_inputs(v, k) for k, v in meta["example_kwargs"].items()},
        "meta": _json_meta(meta),
    }


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------


def _read_document(path: Path) -> dict[str, Any]:
    jpath = path / JSON_NAME
    if not path.is_dir():
        raise SerializationError(f"{str(path)!r} is not a directory holding a segquant_fx save")
    if not jpath.is_file():
        raise SerializationError(f"{str(path)!r} holds no {JSON_NAME}: not a segquant_fx save")
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SerializationError(f"{JSON_NAME} in {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{JSON_NAME} in {str(path)!r} is not a segquant_fx save (format marker missing)")
    version = doc.get("format_version")
    if version not in _KNOWN_VERSIONS:
        raise SerializationError(
            f"{JSON_NAME}: format_version {version!r} is not supported by this segquant_fx "
            f"(known: {sorted(_KNOWN_VERSIONS)}); upgrade segquant_fx"
        )
    for field, typ in _REQUIRED_FIELDS.items():
        if field not in doc:
            raise SerializationError(f"{JSON_NAME}: required field {field!r} is missing")
        if not isinstance(doc[field], typ):
            raise SerializationError(f"{JSON_NAME}: field {field!r} has type {type(doc[field]).__name__}")
    actual = _doc_checksum(doc)
    if actual != doc["json_sha256"]:
        raise SerializationError(
            f"{JSON_NAME} in {str(path)!r} was modified after saving: its content checksum is {actual}, "
            f"the recorded one is {doc['json_sha256']}"
        )
    if WEIGHTS_NAME not in doc["files"]:
        raise SerializationError(f"{JSON_NAME}: the file manifest does not list {WEIGHTS_NAME}")
    for name, info in doc["files"].items():
        _verify_file(path, name, info)
    return doc


def _verify_file(root: Path, name: str, info: Any) -> None:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise SerializationError(f"{JSON_NAME}: bad file name {name!r} in the manifest")
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not isinstance(info.get("size"), int):
        raise SerializationError(f"{JSON_NAME}: manifest entry of {name!r} lacks sha256/size")
    fpath = root / name
    if not fpath.is_file():
        raise SerializationError(f"{name} is missing from {str(root)!r}")
    size = fpath.stat().st_size
    if size != info["size"]:
        raise SerializationError(
            f"{name} in {str(root)!r} has {size} bytes, the manifest records {info['size']} (truncated or replaced)"
        )
    sha, _ = _file_digest(fpath)
    if sha != info["sha256"]:
        raise SerializationError(f"{name} in {str(root)!r}: sha256 {sha} differs from the recorded {info['sha256']} (file edited)")


def _read_weights(path: Path, doc: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    wpath = path / WEIGHTS_NAME
    try:
        raw = st.load_file(str(wpath), device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure of the file
        raise SerializationError(f"{WEIGHTS_NAME} in {str(path)!r} cannot be read: {e}") from None
    manifest = doc["tensors"]
    missing = sorted(set(manifest) - set(raw))
    extra = sorted(set(raw) - set(manifest))
    if missing or extra:
        raise SerializationError(
            f"{WEIGHTS_NAME} does not match the manifest: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out = {}
    for name, info in manifest.items():
        t = raw[name]
        dtype = _dtype(info.get("dtype"), f"tensor {name!r}")
        shape = info.get("shape")
        if not isinstance(shape, list):
            raise SerializationError(f"{JSON_NAME}: tensor {name!r} has no shape")
        if info.get("stored_as") == "uint8":
            t = t.view(dtype).reshape(shape)
        if t.dtype != dtype or list(t.shape) != shape:
            raise SerializationError(
                f"{WEIGHTS_NAME}: tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                f"the manifest records {info.get('dtype')}{shape}"
            )
        out[name] = t
    for alias, canonical in doc["aliases"].items():
        if canonical not in out:
            raise SerializationError(f"{JSON_NAME}: alias {alias!r} refers to unknown tensor {canonical!r}")
    return out


def _resolve_class(model_class: str) -> type:
    if not model_class.startswith("diffusers."):
        raise SerializationError(
            f"the saved model class {model_class!r} is not a diffusers class: pass model=<a float instance of "
            "that class (same architecture; its weights are not used)> to segquant_fx.load"
        )
    import diffusers

    name = model_class.rsplit(".", 1)[-1]
    cls = getattr(diffusers, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module) or not hasattr(cls, "from_config"):
        raise SerializationError(
            f"the saved model class {model_class!r} is not a model class exported by diffusers "
            f"{diffusers.__version__}: pass model=<a float instance of that class> to segquant_fx.load"
        )
    return cls


def _meta_clone(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for is_param, store in ((True, mod._parameters), (False, mod._buffers)):
            for t in store.values():
                if t is None or id(t) in memo:
                    continue
                new = torch.empty_like(t, device="meta")
                memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
    return copy.deepcopy(model, memo)


def _align_dtypes(model: torch.nn.Module, doc: Mapping[str, Any]) -> None:
    """Give the rebuilt float model the saved dtypes (quantized linears' weights: the layer dtype)."""
    manifest = doc["tensors"]
    layer_dtypes = {_join(fqn, "weight"): e.get("dtype") for fqn, e in doc["layers"].items()}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for is_param, store in ((True, mod._parameters), (False, mod._buffers)):
            for attr, t in list(store.items()):
                if t is None:
                    continue
                name = _join(prefix, attr)
                want = manifest.get(name, {}).get("dtype") or layer_dtypes.get(name)
                if want is None:
                    continue
                dtype = _dtype(want, f"tensor {name!r}")
                if t.dtype != dtype:
                    new = t.detach().to(dtype)
                    store[attr] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _example(doc: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)

    def make(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        if dtype.is_floating_point and dtype.itemsize > 1:
            return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    return {k: _decode_inputs(v, k, make) for k, v in doc["input_spec"].items()}


def _precomputed(doc: Mapping[str, Any], plan: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    from segquant_fx.ops.formats import storage_dtype

    out: dict[str, dict[str, Any]] = {}
    for fqn, entry in doc["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise SerializationError(f"{JSON_NAME}: layer {fqn!r} entry is malformed")
        tensors: dict[str, Any] = {}
        for attr, name in entry["tensors"].items():
            if name not in weights:
                raise SerializationError(f"{JSON_NAME}: layer {fqn!r} names tensor {name!r}, absent from {WEIGHTS_NAME}")
            tensors[attr] = weights[name]
        segs = entry.get("w_segments")
        if not isinstance(segs, list) or not all(isinstance(s, int) for s in segs):
            raise SerializationError(f"{JSON_NAME}: layer {fqn!r} has malformed w_segments {segs!r}")
        tensors["w_segments"] = list(segs)
        p = plan.get(fqn)
        if not isinstance(p, dict) or not isinstance(p.get("tensor_shapes"), dict):
            raise SerializationError(f"{JSON_NAME}: quantized layer {fqn!r} has no plan entry with tensor_shapes")
        for attr in ("qweight", "w_scale"):
            if attr in tensors:
                continue
            # fake quant keeps only the dequantized weight (weight_hat, assigned afterwards); the rewrite
            # still dequantizes a qweight, so it gets shape-only stand-ins on the meta device
            try:
                shape = p["tensor_shapes"][attr]
                dtype = storage_dtype(p["weight"]) if attr == "qweight" else torch.float32
            except (KeyError, TypeError, SegQuantError) as e:
                raise SerializationError(f"{JSON_NAME}: plan of layer {fqn!r} lacks {e}") from None
            tensors[attr] = torch.zeros(shape, dtype=dtype, device="meta")
        out[fqn] = tensors
    return out


def _assign(gm: torch.nn.Module, weights: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> None:
    """Replace every parameter/buffer of ``gm`` with the saved tensor (parameters stay Parameters)."""
    placed: dict[str, torch.Tensor] = {}
    names = [(n, n) for n in weights] + list(doc["aliases"].items())
    for name, canonical in names:
        try:
            owner, attr = _owner(gm, name)
        except AttributeError:
            raise SerializationError(f"saved tensor {name!r} has no owner module in the rebuilt model") from None
        t = weights[canonical]
        if attr in owner._parameters:
            old = owner._parameters[attr]
            new = placed.get(canonical)
            if not isinstance(new, torch.nn.Parameter):
                new = torch.nn.Parameter(t, requires_grad=old.requires_grad if old is not None else False)
        elif attr in owner._buffers:
            old = owner._buffers[attr]
            new = placed.get(canonical, t)
        else:
            raise SerializationError(f"saved tensor {name!r} is neither a parameter nor a buffer of the rebuilt model")
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise SerializationError(
                f"saved tensor {name!r} has shape {list(t.shape)} but the rebuilt model expects {list(old.shape)}: "
                "the architecture differs from the saved one"
            )
        if attr in owner._parameters:
            owner._parameters[attr] = new
        else:
            owner._buffers[attr] = new
        placed[canonical] = new
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is not None and t.is_meta:
                    raise SerializationError(
                        f"tensor {_join(prefix, attr)!r} of the rebuilt model was not in the save (still on the "
                        "meta device): the architecture differs from the saved one"
                    )


def _rebuild(doc: Mapping[str, Any], model: torch.nn.Module | None, meta_device: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The float model to capture and its example inputs (on meta when ``meta_device``)."""
    if model is not None:
        if meta_device:
            float_model = _meta_clone(model)
            _align_dtypes(float_model, doc)
        else:
            float_model = model  # capture() switches to eval mode and back itself
        return float_model, _example(doc, _model_device(float_model))
    cls = _resolve_class(doc["model_class"])
    mcfg = doc["model_config"]
    if mcfg is None:
        raise SerializationError(
            f"the save has no model_config for {doc['model_class']!r}: pass model=<a float instance> to segquant_fx.load"
        )
    config = _decode(mcfg, "model_config")
    device = torch.device("meta") if meta_device else torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with device:
            float_model = cls.from_config(config)
    _align_dtypes(float_model, doc)
    float_model.eval()
    return float_model, _example(doc, device)


def _json_plain(value: Any) -> Any:
    return json.loads(json.dumps(_encode(value, "plan"), sort_keys=True))


def load_quantized(
    path: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a model saved by :func:`save_quantized` (``QuantizedModel.save``).

    Args:
        path: The save directory.
        model: A float instance of the saved architecture (its weights are not used). Needed unless
            the saved class is exported by ``diffusers``.
        device: Device of the returned model.

    Returns:
        The :class:`~segquant_fx.quantized.QuantizedModel`, computing bit-identically to the saved one.

    Raises:
        SerializationError: Missing, truncated or edited files, unknown format version, a model class
            outside the allow-list without ``model=``, or an architecture that does not match the save.
    """
    from segquant_fx.api import finish, prepare
    from segquant_fx.config import QuantizeConfig
    from segquant_fx.passes.rewrite import QuantizeRewritePass
    from segquant_fx.patterns import PATTERNS

    root = Path(os.fspath(path))
    doc = _read_document(root)
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise SerializationError(f"model= must be an nn.Module, got {type(model).__name__}")
        cls = type(model)
        given = f"{cls.__module__}.{cls.__qualname__}"
        if given != doc["model_class"]:
            warnings.warn(f"segquant_fx.load: model= is a {given}, the save was made from {doc['model_class']}", stacklevel=2)
    else:
        _resolve_class(doc["model_class"])  # fail fast, before reading the weights
    weights = _read_weights(root, doc)
    try:
        cfg = QuantizeConfig.from_dict(_decode(doc["config"], "config"), known_patterns=PATTERNS)
    except SegQuantError as e:
        raise SerializationError(f"{JSON_NAME}: the saved quantization config is invalid: {e}") from e
    plan = _decode(doc["plan"], "plan")
    precomputed = _precomputed(doc, plan, weights)

    try:
        float_model, example = _rebuild(doc, model, meta_device=True)
        prepared = prepare(float_model, example, cfg, dynamic=True)
    except SerializationError:
        raise
    except Exception as e:  # noqa: BLE001 - meta capture is best effort; CPU is the fallback
        warnings.warn(
            f"segquant_fx.load: rebuilding on the meta device failed ({type(e).__name__}: {e}); "
            "rebuilding with CPU tensors instead",
            stacklevel=2,
        )
        try:
            float_model, example = _rebuild(doc, model, meta_device=False)
            prepared = prepare(float_model, example, cfg, dynamic=True)
        except SerializationError:
            raise
        except Exception as e2:  # noqa: BLE001 - reported with the save's path
            raise SerializationError(
                f"cannot rebuild the saved {doc['model_class']} from {str(root)!r}: {type(e2).__name__}: {e2}"
            ) from e2

    qmodel = finish(prepared, QuantizeRewritePass(precomputed=precomputed))
    rebuilt_plan, saved_plan = _json_plain(qmodel.plan), _json_plain(plan)
    if rebuilt_plan != saved_plan:
        diff = sorted(set(rebuilt_plan) ^ set(saved_plan)) or [k for k in saved_plan if rebuilt_plan[k] != saved_plan[k]]
        raise SerializationError(
            f"the rebuilt model's quantization plan differs from the saved one (first layers: {diff[:3]}); "
            "the architecture, config or segquant_fx version does not match the save"
        )
    _assign(qmodel.graph_module, weights, doc)
    qmodel._retarget_device(torch.device("cpu"))

    qmodel.plan = dict(plan)
    qmodel._constants = {k: _decode(v, f"constant {k!r}") for k, v in doc["constants"].items()}
    meta = dict(qmodel.meta)
    meta.update(_decode(doc["meta"], "meta"))
    meta["config"] = _decode(doc["config"], "config")
    meta["model_config"] = _decode(doc["model_config"], "model_config") if doc["model_config"] is not None else None
    meta["segquant_fx"] = doc.get("quantized_with", {}).get("segquant_fx", meta.get("segquant_fx"))
    meta["torch"] = doc.get("quantized_with", {}).get("torch", meta.get("torch"))
    # the example values are not saved: keep zero tensors of the saved shapes and dtypes
    meta["example_kwargs"] = _decode_inputs(
        {"dict": doc["input_spec"]}, "", lambda shape, dtype: torch.zeros(shape, dtype=dtype)
    )
    qmodel.meta = meta
    qmodel.model_class = doc["model_class"]
    dev = torch.device(device)
    if dev.type != "cpu":
        qmodel.to(dev)
    return qmodel
