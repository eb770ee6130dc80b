"""Saving and loading affiners: a directory with ``affiner.json`` and ``affiner.safetensors``.

``affiner.json`` holds a format marker and version, the config (nested reference layout), the solver,
the learned steps, a manifest of every tensor (shape, dtype), the calibration facts (``meta``), the
sha256 and size of the safetensors file and a sha256 of the JSON document itself.
``affiner.safetensors`` holds the solutions as ``step0007.K`` etc., or a third-party affiner's
``state_dict()`` under ``thirdparty.``. Loading reads only JSON and safetensors: nothing in the files
is executed or imported (a third-party affiner is rebuilt from an instance the caller passes).

Writes are atomic: both files are written and fsynced in a temporary directory next to the target,
which then replaces the target; an existing directory that is not an affiner save is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch as st
import torch

from segquant_fx.affiner.affiner import Affiner, check_thirdparty
from segquant_fx.affiner.config import AffinerConfig
from segquant_fx.errors import SegQuantError, SerializationError

__all__ = ["save_affiner", "load_affiner", "FORMAT", "FORMAT_VERSION", "JSON_NAME", "WEIGHTS_NAME"]

FORMAT = "segquant_fx.affiner"
FORMAT_VERSION = 1
JSON_NAME = "affiner.json"
WEIGHTS_NAME = "affiner.safetensors"
_MAX_JSON_BYTES = 64 << 20


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some platforms
        pass
    finally:
        os.close(fd)


def _step_name(step: int, key: str) -> str:
    return f"step{step:04d}.{key}"


def _is_affiner_save(path: Path) -> bool:
    try:
        doc = json.loads((path / JSON_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _tensors(affiner: Affiner) -> dict[str, torch.Tensor]:
    if affiner.thirdparty is not None:
        state = getattr(affiner.thirdparty, "state_dict", None)
        if not callable(state):
            raise SerializationError(
                f"the third-party affiner {type(affiner.thirdparty).__name__} has no state_dict(); add "
                "state_dict() -> {name: Tensor} and load_state_dict(dict) to save it"
            )
        out = {}
        for k, v in dict(state()).items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise SerializationError(f"third-party state_dict entry {k!r} is not a str -> Tensor pair")
            out[f"thirdparty.{k}"] = v.detach().cpu().contiguous()
        return out
    return {
        _step_name(step, k): v.contiguous()
        for step in affiner.steps
        for k, v in affiner.solution(step).items()
    }


def save_affiner(affiner: Affiner, path: str | os.PathLike[str]) -> Path:
    """Save ``affiner`` into directory ``path`` atomically; returns the path.

    Raises:
        SerializationError: ``path`` exists and is not an affiner save, or a third-party affiner
            cannot be saved.
    """
    if not isinstance(affiner, Affiner):
        raise SerializationError(f"save_affiner expects an Affiner, got {type(affiner).__name__}")
    target = Path(path)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or _is_affiner_save(target))):
        raise SerializationError(
            f"{str(target)!r} exists and is not an affiner save; choose a new or empty directory"
        )
    tensors = _tensors(affiner)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        wpath = tmp / WEIGHTS_NAME
        st.save_file(tensors, str(wpath), metadata={"format": FORMAT})
        _fsync(wpath)
        sha, size = _digest(wpath)
        tp = affiner.thirdparty
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "solver": affiner.solver_type,
            "config": affiner.config.to_dict(),
            "steps": list(affiner.steps),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in tensors.items()
            },
            "weights_sha256": sha,
            "weights_bytes": size,
            "thirdparty": None if tp is None else {"class": f"{type(tp).__module__}.{type(tp).__qualname__}"},
            "meta": affiner.meta,
            "versions": {"torch": torch.__version__},
        }
        try:
            doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
        except (TypeError, ValueError) as e:
            raise SerializationError(f"affiner meta is not JSON-serialisable: {e}") from e
        jpath = tmp / JSON_NAME
        jpath.write_text(json.dumps(doc, indent=1, sort_keys=True))
        _fsync(jpath)
        _fsync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_doc(root: Path) -> dict[str, Any]:
    jpath = root / JSON_NAME
    if not root.is_dir() or not jpath.is_file():
        raise SerializationError(f"{str(root)!r} is not an affiner save: {JSON_NAME} is missing")
    if jpath.stat().st_size > _MAX_JSON_BYTES:
        raise SerializationError(
            f"{str(jpath)!r} is larger than {_MAX_JSON_BYTES} bytes; not an affiner save"
        )
    try:
        doc = json.loads(jpath.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SerializationError(f"{str(jpath)!r} is not valid JSON ({e}); the save is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{str(jpath)!r} is not an affiner save (format marker missing)")
    if doc.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"{str(jpath)!r} has format version {doc.get('version')!r}; this segquant_fx reads version "
            f"{FORMAT_VERSION}"
        )
    claimed = doc.pop("sha256", None)
    if claimed != hashlib.sha256(_canonical(doc)).hexdigest():
        raise SerializationError(f"{str(jpath)!r} was edited or damaged (document checksum mismatch)")
    return doc


def load_affiner(path: str | os.PathLike[str], *, thirdparty: Any = None) -> Affiner:
    """Load an affiner saved by :meth:`Affiner.save` / :func:`save_affiner`.

    Args:
        path: The save directory.
        thirdparty: For a save of a third-party affiner: a fresh instance whose
            ``load_state_dict`` receives the saved tensors (class code is never loaded from files).

    Raises:
        SerializationError: missing, damaged, edited or incompatible files.
    """
    root = Path(path)
    doc = _read_doc(root)
    wpath = root / WEIGHTS_NAME
    if not wpath.is_file():
        raise SerializationError(f"{str(wpath)!r} is missing; the save is incomplete")
    sha, size = _digest(wpath)
    if sha != doc.get("weights_sha256") or size != doc.get("weights_bytes"):
        raise SerializationError(
            f"{str(wpath)!r} does not match its checksum in {JSON_NAME}; the save is damaged"
        )
    try:
        with safetensors.safe_open(str(wpath), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types
        raise SerializationError(f"{str(wpath)!r} could not be read as safetensors: {e}") from e
    manifest = doc.get("tensors")
    if not isinstance(manifest, dict) or set(manifest) != set(tensors):
        raise SerializationError(f"{str(wpath)!r}: tensor names do not match the manifest in {JSON_NAME}")
    for name, t in tensors.items():
        if list(t.shape) != manifest[name].get("shape"):
            raise SerializationError(
                f"{str(wpath)!r}: tensor {name!r} has shape {list(t.shape)}, manifest says otherwise"
            )
    try:
        config = AffinerConfig.from_dict(doc["config"])
    except SegQuantError as e:
        raise SerializationError(f"{str(root)!r}: the saved config is invalid: {e}") from e
    meta = doc.get("meta") or {}
    if doc.get("solver") == "thirdparty":
        if thirdparty is None:
            cls = (doc.get("thirdparty") or {}).get("class", "?")
            raise SerializationError(
                f"{str(root)!r} holds a third-party affiner ({cls}); pass a fresh instance as "
                "load_affiner(path, thirdparty=...) to load its tensors"
            )
        check_thirdparty(thirdparty)
        loader = getattr(thirdparty, "load_state_dict", None)
        if not callable(loader):
            raise SerializationError(f"{type(thirdparty).__name__} has no load_state_dict(dict)")
        loader({k.removeprefix("thirdparty."): v for k, v in tensors.items()})
        return Affiner(config, thirdparty=thirdparty, meta=meta)
    if doc.get("solver") != config.resolved_solver_type:
        raise SerializationError(f"{str(root)!r}: solver {doc.get('solver')!r} does not match its config")
    solutions: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        head, _, key = name.partition(".")
        if not head.startswith("step") or not head[4:].isdigit() or not key:
            raise SerializationError(f"{str(wpath)!r}: unexpected tensor name {name!r}")
        solutions.setdefault(int(head[4:]), {})[key] = t
    if sorted(solutions) != doc.get("steps"):
        raise SerializationError(f"{str(root)!r}: the tensors' steps do not match the manifest's steps")
    try:
        return Affiner(config, solutions, meta=meta)
    except SegQuantError as e:
        if isinstance(e, SerializationError):
            raise
        raise SerializationError(f"{str(root)!r}: {e}") from e
