"""Calibration-set storage: safe chunk files, a checksummed JSON manifest, and the Dataset views.

On disk a calibration set is a directory::

    manifest.json                    format, settings, chunk list (file, items, bytes, sha256), progress
    chunk_00000.safetensors.zst      items 0..chunk_size-1 (zstandard-compressed safetensors)
    chunk_00001.safetensors.zst      ...

A chunk is one safetensors file holding every tensor of its items, plus (in the safetensors header's
string metadata) a JSON description of each item's structure: a kwargs dict whose values may be
tensors, ``None``, bools, numbers, strings, and lists / tuples / dicts of those (ControlNet residual
lists, ``added_cond_kwargs``, ``joint_attention_kwargs=None``, ``return_dict=False``). Loading never
executes code (no pickle). Every file is written to a temporary name and moved into place with
``os.replace``; the manifest is rewritten (atomically) after each chunk, so an interrupted run leaves a
consistent prefix that :func:`~segquant_fx.calibset.generate_calibrate_set` resumes.

Structure encoding (JSON): a tensor is ``{"$t": key}`` (key into the chunk's tensors), a list
``{"$l": [...]}``, a tuple ``{"$u": [...]}``, a dict ``{"$d": {...}}`` (string keys); ``None``, bools,
ints, floats and strings are themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from segquant_fx.errors import CalibrationError, ConfigError, SerializationError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "BaseCalibSet",
    "CalibrationSet",
    "ChunkedCalibrationSet",
    "MemoryCalibrationSet",
    "decode_item",
    "encode_item",
    "load_calibrate_set",
]

FORMAT = "segquant_fx.calibset"
VERSION = 1
MANIFEST = "manifest.json"
_META_KEY = "segquant_calibset"
_SCALARS = (type(None), bool, int, float, str)


# --------------------------------------------------------------------------------------------------
# item encoding
# --------------------------------------------------------------------------------------------------


def encode_item(item: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON structure of ``item``; its tensors are added to ``tensors`` under keys starting with ``prefix``.

    Raises:
        SerializationError: A value is none of the supported kinds (the message gives its path).
    """

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = value.detach().to("cpu").contiguous()
            return {"$t": key}
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, list):
            return {"$l": [enc(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"$u": [enc(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise SerializationError(f"calibration item value {path} has a non-string key {k!r}")
                out[k] = enc(v, f"{path}[{k!r}]")
            return {"$d": out}
        raise SerializationError(
            f"calibration item value {path} is a {type(value).__name__}; items may hold tensors, None, "
            "bools, numbers, strings and lists/tuples/dicts of them"
        )

    return enc(item, "item")


def decode_item(struct: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_item`."""
    if isinstance(struct, dict):
        if "$t" in struct:
            return tensors[struct["$t"]]
        if "$l" in struct:
            return [decode_item(v, tensors) for v in struct["$l"]]
        if "$u" in struct:
            return tuple(decode_item(v, tensors) for v in struct["$u"])
        if "$d" in struct:
            return {k: decode_item(v, tensors) for k, v in struct["$d"].items()}
        raise SerializationError(f"unknown structure entry {sorted(struct)}")
    return struct


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def encode_chunk(items: Sequence[dict[str, Any]], infos: Sequence[dict[str, int]], compress: int) -> bytes:
    """The bytes of a chunk file (zstandard level ``compress``, or plain safetensors for 0)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structs = [encode_item(item, tensors, f"{i}.") for i, item in enumerate(items)]
    meta = json.dumps({"version": VERSION, "items": structs, "info": list(infos)}, allow_nan=True)
    data = save(tensors, metadata={_META_KEY: meta})
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=int(compress), threads=-1).compress(data)
    return data


def decode_chunk(
    data: bytes, compressed: bool, where: str
) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """Items and infos of a chunk file's bytes.

    Raises:
        SerializationError: The bytes do not decode (names ``where``).
    """
    from safetensors.torch import load

    try:
        if compressed:
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(data)
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
        items = [decode_item(s, tensors) for s in meta["items"]]
        return items, [dict(i) for i in meta["info"]]
    except SerializationError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise SerializationError(
            f"calibration chunk {where} cannot be decoded ({type(e).__name__}: {e})"
        ) from None


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def _to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class CalibrationSet(torch.utils.data.Dataset):
    """A calibration set: a torch ``Dataset`` of kwargs dicts for the backbone's ``forward``.

    Feed it to :func:`segquant_fx.quantize` directly (``quantize(pipe.transformer, calibset)``) or
    through :meth:`get_dataloader`. Items are keyed by the backbone's forward parameter names.

    Attributes:
        settings: The sampler / pipeline settings the set was made with.
    """

    settings: dict[str, Any]

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> tuple[dict[str, Any], dict[str, int]]:
        raise NotImplementedError

    def _index(self, index: int) -> int:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"calibration set indices are ints, got {type(index).__name__}")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"calibration item {index} out of range for a set of {n} items")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._get(self._index(index))[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self._get(i)[0]

    def info(self, index: int) -> dict[str, int]:
        """Where item ``index`` came from: ``prompt_index``, ``step_index`` (0 = noisiest), ``call_index``."""
        return dict(self._get(self._index(index))[1])

    @staticmethod
    def collate_fn(batch: list[Any]) -> list[Any]:
        """Keep a batch as a list of item dicts (items do not stack: their shapes and kinds differ)."""
        return list(batch)

    def get_dataloader(
        self, batch_size: int = 1, shuffle: bool = False, **kwargs: Any
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` whose batches are lists of item dicts (:meth:`collate_fn`).

        With ``batch_size=1`` its batches can go straight to :func:`segquant_fx.quantize`.
        """
        kwargs.setdefault("collate_fn", self.collate_fn)
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, **kwargs)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"{type(self).__name__}({len(self)} items, calib_layer={s.get('calib_layer')!r}, "
            f"sampler={s.get('sampler', {}).get('type')!r}, steps={s.get('num_inference_steps')})"
        )


#: The reference's name.
BaseCalibSet = CalibrationSet


class MemoryCalibrationSet(CalibrationSet):
    """A calibration set held in memory (``generate_calibrate_set(..., dump_path=None)``).

    Args:
        items: Kwargs dicts.
        infos: Per item ``{"prompt_index", "step_index", "call_index"}`` (optional).
        settings: The settings it was made with.
        device: Move items there on access.
    """

    def __init__(
        self,
        items: Sequence[dict[str, Any]],
        infos: Sequence[dict[str, int]] | None = None,
        settings: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.items = list(items)
        self.infos = list(infos) if infos is not None else [{} for _ in self.items]
        if len(self.infos) != len(self.items):
            raise ConfigError(f"{len(self.items)} items but {len(self.infos)} infos")
        self.settings = dict(settings or {})
        self.device = torch.device(device) if device is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def _get(self, index: int) -> tuple[dict[str, Any], dict[str, int]]:
        return _to_device(self.items[index], self.device), self.infos[index]

    def save(
        self, dump_path: str | os.PathLike[str], chunk_size: int = 100, compress: bool | int = True
    ) -> Path:
        """Write the set to ``dump_path`` in the chunked format (reload with :func:`load_calibrate_set`)."""
        from segquant_fx.calibset.generate import _Store

        store = _Store.create(
            Path(dump_path), self.settings, chunk_size=chunk_size, compress=compress, resume=False
        )
        for item, info in zip(self.items, self.infos, strict=True):
            store.add(item, info)
        store.finish(num_prompts=1 + max((i.get("prompt_index", 0) for i in self.infos), default=-1))
        return Path(dump_path)


class ChunkedCalibrationSet(CalibrationSet):
    """A calibration set read lazily from its directory (see the module docstring).

    Chunks are loaded on demand, their sha256 checked against the manifest on every load, and kept in
    an LRU cache of ``max_cache_size`` chunks (sequential access needs 1; shuffled access over a set
    that does not fit in memory reloads chunks).

    Args:
        path: The set's directory.
        max_cache_size: Chunks kept in memory.
        max_len: Expose only the first ``max_len`` items.
        device: Move items there on access.
        allow_incomplete: Open a set whose generation was interrupted (only its finished chunks).
        verify: ``"lazy"`` checks a chunk's checksum when it is loaded; ``"eager"`` also checks every
            chunk now.

    Raises:
        SerializationError: No or malformed manifest, a chunk file missing or of the wrong size, or
            (eager) a checksum mismatch; messages name the file.
        CalibrationError: The set is incomplete and ``allow_incomplete`` is False.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_cache_size: int = 2,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        allow_incomplete: bool = False,
        verify: str = "lazy",
    ) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise SerializationError(
                f"{self.path} is not a calibration set (no {MANIFEST}); make one with generate_calibrate_set"
            )
        if not manifest.get("complete") and not allow_incomplete:
            raise CalibrationError(
                f"calibration set {self.path} is incomplete ({manifest.get('num_items', 0)} items in "
                f"{len(manifest.get('chunks', []))} chunks, stopped at prompt {manifest['cursor']['prompt']}); "
                "rerun generate_calibrate_set with the same dump_path and settings to finish it, or pass "
                "allow_incomplete=True"
            )
        if isinstance(max_cache_size, bool) or not isinstance(max_cache_size, int) or max_cache_size < 1:
            raise ConfigError(f"max_cache_size must be a positive int, got {max_cache_size!r}")
        if verify not in ("lazy", "eager"):
            raise ConfigError(f"verify={verify!r}: use 'lazy' or 'eager'")
        self.manifest = manifest
        self.settings = dict(manifest.get("settings", {}))
        self.chunks: list[dict[str, Any]] = list(manifest["chunks"])
        self.compressed = bool(self.settings.get("compress"))
        self.max_cache_size = max_cache_size
        self.device = torch.device(device) if device is not None else None
        self._starts: list[int] = []
        total = 0
        for chunk in self.chunks:
            f = self.path / chunk["file"]
            if not f.is_file():
                raise SerializationError(
                    f"calibration chunk {f} is missing (listed in {self.path / MANIFEST})"
                )
            if f.stat().st_size != chunk["bytes"]:
                raise SerializationError(
                    f"calibration chunk {f} has {f.stat().st_size} bytes, the manifest says {chunk['bytes']}: "
                    "the file is truncated or was replaced; regenerate the calibration set"
                )
            self._starts.append(total)
            total += int(chunk["items"])
        self._len = total if max_len is None else min(total, int(max_len))
        self._cache: OrderedDict[int, tuple[list[dict[str, Any]], list[dict[str, int]]]] = OrderedDict()
        if verify == "eager":
            for i in range(len(self.chunks)):
                self._read(i)

    def __len__(self) -> int:
        return self._len

    def _read(self, ci: int) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
        chunk = self.chunks[ci]
        f = self.path / chunk["file"]
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != chunk["sha256"]:
            raise SerializationError(
                f"calibration chunk {f} is corrupt: sha256 {digest[:16]}... does not match the manifest's "
                f"{chunk['sha256'][:16]}...; regenerate the calibration set"
            )
        items, infos = decode_chunk(data, self.compressed, str(f))
        if len(items) != int(chunk["items"]):
            raise SerializationError(
                f"calibration chunk {f} holds {len(items)} items, the manifest says {chunk['items']}"
            )
        return items, infos

    def _chunk(self, ci: int) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
        hit = self._cache.get(ci)
        if hit is not None:
            self._cache.move_to_end(ci)
            return hit
        loaded = self._read(ci)
        self._cache[ci] = loaded
        while len(self._cache) > self.max_cache_size:
            self._cache.popitem(last=False)
        return loaded

    def _get(self, index: int) -> tuple[dict[str, Any], dict[str, int]]:
        import bisect

        ci = bisect.bisect_right(self._starts, index) - 1
        items, infos = self._chunk(ci)
        off = index - self._starts[ci]
        return _to_device(items[off], self.device), infos[off]


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of calibration set ``path`` (None if there is none).

    Raises:
        SerializationError: The manifest exists but is not a calibration-set manifest.
    """
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SerializationError(f"{f} is not valid JSON ({e}); regenerate the calibration set") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SerializationError(f"{f} is not a segquant_fx calibration-set manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise SerializationError(
            f"{f} has calibration-set format version {manifest.get('version')!r}; this segquant_fx reads version {VERSION}"
        )
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically."""
    _atomic_write(path / MANIFEST, (json.dumps(manifest, indent=1, allow_nan=True) + "\n").encode())


def load_calibrate_set(
    dump_path: str | os.PathLike[str],
    max_cache_size: int = 2,
    max_len: int | None = None,
    *,
    device: torch.device | str | None = None,
    allow_incomplete: bool = False,
    verify: str = "lazy",
) -> ChunkedCalibrationSet:
    """Open a calibration set written by :func:`~segquant_fx.calibset.generate_calibrate_set`.

    Safe to use on files from elsewhere: nothing is unpickled, and every chunk's sha256 is checked
    against the manifest before its contents are used.

    Args:
        dump_path: The set's directory.
        max_cache_size: Chunks kept in memory (LRU).
        max_len: Expose only the first ``max_len`` items.
        device: Move items to this device on access.
        allow_incomplete: Open a set whose generation was interrupted.
        verify: ``"lazy"`` (check each chunk when loaded) or ``"eager"`` (also check all now).

    Returns:
        A :class:`ChunkedCalibrationSet` (a torch ``Dataset`` of kwargs dicts).

    Raises:
        SerializationError: Missing or corrupt files (the message names the file).
        CalibrationError: The set is incomplete.
    """
    return ChunkedCalibrationSet(
        dump_path,
        max_cache_size=max_cache_size,
        max_len=max_len,
        device=device,
        allow_incomplete=allow_incomplete,
        verify=verify,
    )
