"""The unified on-disk dataset format and :class:`CaptionControlDataset`.

A prepared dataset is a directory::

    out/
      metadata.json        [{"id": "000000139", "prompt": "...", "image": "images/000000139.jpg",
                             "control": "control/000000139.png"}, ...]
      images/              copies of the source images
      control/             control maps (PNG), one per image
      prepare.json         the settings `segquant-fx dataset prepare` used (for resume); optional

``metadata.json`` is a JSON list, the same format as the SegQuant reference's ``CaptionControlDataset``.
``image`` and ``control`` are paths relative to the directory (absolute paths are accepted too); either
may be ``null`` for a prompt-only dataset. ``id`` is a string unique within the file. An optional
``category`` (MJHQ-30K) is kept; other extra fields are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.utils.data

from segquant_fx.datasets._io import atomic_write_json, read_json
from segquant_fx.errors import DatasetError

__all__ = ["METADATA_FILE", "DatasetEntry", "CaptionControlDataset", "read_metadata", "write_metadata"]

METADATA_FILE = "metadata.json"


@dataclass(frozen=True, kw_only=True)
class DatasetEntry:
    """One item of a unified dataset.

    Attributes:
        id: Identifier unique within the dataset (COCO image id, MJHQ image hash, DCI file stem).
        prompt: The text prompt.
        image: Path of the image relative to the dataset directory, or ``None``.
        control: Path of the control map relative to the dataset directory, or ``None``.
        category: The source category (MJHQ-30K), or ``None``; an optional extra field.
    """

    id: str
    prompt: str
    image: str | None = None
    control: str | None = None
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``metadata.json`` object of this entry (``category`` only when set)."""
        d = asdict(self)
        if d["category"] is None:
            del d["category"]
        return d

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> DatasetEntry:
        """Validate one ``metadata.json`` object.

        Args:
            obj: The decoded JSON value.
            where: Location for error messages (``"out/metadata.json entry 3"``).

        Raises:
            DatasetError: If a field is missing or has the wrong type.
        """
        if not isinstance(obj, dict):
            raise DatasetError(
                f"{where}: expected an object {{id, prompt, image, control}}, got {type(obj).__name__}"
            )
        for key in ("id", "prompt"):
            if key not in obj:
                raise DatasetError(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
        ident = obj["id"]
        if isinstance(ident, bool) or not isinstance(ident, str | int):
            raise DatasetError(f"{where}: 'id' must be a string or integer, got {ident!r}")
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        paths = {}
        for key in ("image", "control", "category"):
            v = obj.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise DatasetError(f"{where}: {key!r} must be a non-empty string or null, got {v!r}")
            paths[key] = v
        return cls(id=str(ident), prompt=prompt, **paths)


def read_metadata(root: str | os.PathLike[str]) -> list[DatasetEntry]:
    """Read and validate ``root/metadata.json``.

    Args:
        root: The dataset directory (or the ``metadata.json`` file itself).

    Raises:
        DatasetError: If the file is missing or malformed, an entry is invalid, or ids repeat.
    """
    root = Path(root)
    path = root if root.is_file() else root / METADATA_FILE
    data = read_json(path, "dataset metadata")
    if not isinstance(data, list):
        raise DatasetError(
            f"dataset metadata {path} must be a JSON list of entries, not a {type(data).__name__}"
        )
    entries = [DatasetEntry.from_dict(obj, f"{path} entry {i}") for i, obj in enumerate(data)]
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.id in seen:
            raise DatasetError(
                f"{path}: entries {seen[e.id]} and {i} share the id {e.id!r}; ids must be unique"
            )
        seen[e.id] = i
    return entries


def write_metadata(root: str | os.PathLike[str], entries: list[DatasetEntry]) -> Path:
    """Write ``root/metadata.json`` atomically; returns its path."""
    path = Path(root) / METADATA_FILE
    atomic_write_json(path, [e.to_dict() for e in entries])
    return path


def _load_image(path: Path, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image {path} cannot be decoded ({e}); re-create it or remove its entry") from e


class CaptionControlDataset(torch.utils.data.Dataset):
    """A torch ``Dataset`` of ``(prompt, image, control)`` over a unified dataset directory.

    Images are PIL images (``mode``, RGB by default because ControlNet pipelines take 3-channel
    conditions); a ``null`` image or control gives ``None``. ``transform`` (if given) is applied to
    both images. Use :meth:`get_dataloader` (or :meth:`collate_fn`) to batch as lists, since PIL
    images do not stack.

    Example::

        ds = CaptionControlDataset("coco-canny-256/")
        prompt, image, control = ds[0]
        prompts = ds.prompts                      # for calibration
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        mode: str = "RGB",
        transform: Callable[[Any], Any] | None = None,
        check_files: bool = True,
    ) -> None:
        """Open a dataset directory.

        Args:
            root: Directory with ``metadata.json``.
            mode: PIL mode the images and control maps are converted to.
            transform: Optional callable applied to the image and to the control map.
            check_files: Check up front that every referenced file exists (so a missing file fails at
                construction, naming it, rather than in the middle of a generation run).

        Raises:
            DatasetError: If the metadata is missing or malformed, or (``check_files``) a file is missing.
        """
        super().__init__()
        self.root = Path(root)
        self.entries = read_metadata(self.root)
        self.mode = mode
        self.transform = transform
        if check_files:
            for i, e in enumerate(self.entries):
                for key in ("image", "control"):
                    rel = getattr(e, key)
                    if rel is not None and not self._resolve(rel).is_file():
                        raise DatasetError(
                            f"{self.root / METADATA_FILE} entry {i} (id {e.id!r}): {key} file "
                            f"{self._resolve(rel)} does not exist"
                        )

    def _resolve(self, rel: str) -> Path:
        return self.root / rel  # an absolute rel stays absolute

    @property
    def prompts(self) -> list[str]:
        """All prompts in order (what calibration uses)."""
        return [e.prompt for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def _get(self, rel: str | None) -> Any:
        if rel is None:
            return None
        img = _load_image(self._resolve(rel), self.mode)
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, idx: int) -> tuple[str, Any, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} items")
        e = self.entries[idx]
        return e.prompt, self._get(e.image), self._get(e.control)

    def __iter__(self) -> Iterator[tuple[str, Any, Any]]:
        for i in range(len(self)):
            yield self[i]

    @staticmethod
    def collate_fn(batch: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
        """Keep a batch as a list of ``(prompt, image, control)`` tuples."""
        return list(batch)

    def get_dataloader(
        self, batch_size: int = 1, shuffle: bool = False, **kwargs: Any
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` yielding lists of ``(prompt, image, control)``."""
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn, **kwargs
        )
