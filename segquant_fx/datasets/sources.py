"""Loaders for local copies of COCO-2017 captions, MJHQ-30K and DCI, in their published layouts.

Nothing is downloaded: each loader reads a directory the user already has. A loader lists its
candidates cheaply (:meth:`SourceLoader.candidates`), a subset is chosen by seed
(:mod:`segquant_fx.datasets.sampling`), and only the chosen candidates are resolved to a prompt and an
image path (:meth:`SourceLoader.resolve`), which matters for DCI where every item is its own JSON file.

Prompt rules (SegQuant's evaluation protocol, ``docs/segquant-method.md`` section 8):

* COCO: the image's reference captions (the first ``captions_per_prompt``, 5 by default, in annotation
  id order), each ending in a full stop, joined with spaces;
* MJHQ-30K: the ``prompt`` of ``meta_data.json``;
* DCI: ``short_caption`` and ``extra_caption`` joined with a space.

Every missing or malformed input raises :class:`~segquant_fx.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from segquant_fx.datasets._io import read_json
from segquant_fx.datasets.sampling import sample_balanced, sample_ids
from segquant_fx.errors import ConfigError, DatasetError

__all__ = ["SourceRecord", "SourceLoader", "CocoCaptions", "MJHQ30K", "DCI", "SOURCES", "get_source"]


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """One item of a source dataset.

    Attributes:
        id: Identifier unique within the source (COCO image id, MJHQ image name, DCI annotation stem).
        image: Path of the source image (set once resolved).
        prompt: The prompt (set once resolved).
        category: The category (MJHQ) or ``None``.
        origin: The annotation file the item comes from, for error messages.
    """

    id: str
    image: Path | None = None
    prompt: str | None = None
    category: str | None = None
    origin: Path | None = None


class SourceLoader(ABC):
    """A source dataset on disk: list candidates, sample them, resolve the chosen ones."""

    name: ClassVar[str]
    has_categories: ClassVar[bool] = False

    @abstractmethod
    def candidates(self) -> list[SourceRecord]:
        """All items (ids and categories; prompts and images may be unresolved), sorted by id."""

    def resolve(self, record: SourceRecord) -> SourceRecord:
        """Fill in ``prompt`` and ``image`` of a candidate (parsing its own file where needed)."""
        return record

    def settings(self) -> dict[str, Any]:
        """What decides the content, besides the sampling (recorded for resume)."""
        return {}

    def sample(
        self, n: int | None = None, *, seed: int = 0, per_category: bool = False
    ) -> list[SourceRecord]:
        """Choose items deterministically and resolve them.

        Args:
            n: Number of items (``per_category``: per category); ``None`` for all.
            seed: Sampling seed; the same seed gives the same items in the same order.
            per_category: Take ``n`` from every category (MJHQ only).

        Raises:
            ConfigError: If ``per_category`` is asked of a source without categories.
            DatasetError: If there are too few items, or a chosen item's files are missing or malformed.
        """
        cands = self.candidates()
        if per_category:
            if not self.has_categories:
                raise ConfigError(
                    f"--per-category: the {self.name} dataset has no categories (only mjhq has)"
                )
            chosen = sample_balanced(cands, n, seed, category=lambda r: r.category or "", key=lambda r: r.id)
        else:
            chosen = sample_ids(cands, n, seed, key=lambda r: r.id)
        return [self.resolve(r) for r in chosen]


def _check_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist; {hint}")
    return path


def _unique(records: list[SourceRecord], origin: Path) -> list[SourceRecord]:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DatasetError(f"{origin}: id {r.id!r} appears twice")
        seen.add(r.id)
    return sorted(records, key=lambda r: r.id)


def _as_sentence(caption: str) -> str:
    caption = " ".join(caption.split())
    return caption if caption[-1:] in ".!?" else caption + "."


class CocoCaptions(SourceLoader):
    """COCO-2017 captions from a local copy of the official release.

    Expected layout (``src`` is the COCO root; ``split`` is ``val2017`` by default)::

        src/
          annotations/captions_val2017.json   from annotations_trainval2017.zip
          val2017/000000397133.jpg ...        from val2017.zip

    ``captions_val2017.json`` is the standard COCO captions file::

        {"info": {...}, "licenses": [...],
         "images": [{"id": 397133, "file_name": "000000397133.jpg", "height": 427, "width": 640, ...}, ...],
         "annotations": [{"id": 370509, "image_id": 397133, "caption": "A man is in a kitchen ..."}, ...]}

    Item id: the image id (``"397133"``). Prompt: the image's captions in annotation-id order, the first
    ``captions_per_prompt`` of them (``None``: all; COCO has 5 to 7 per image), each ending in a full
    stop, joined with spaces. Images without captions are left out.
    """

    name = "coco"

    def __init__(
        self, src: str | os.PathLike[str], *, split: str = "val2017", captions_per_prompt: int | None = 5
    ):
        """Point the loader at a COCO root.

        Args:
            src: The COCO root directory.
            split: ``val2017`` or ``train2017`` (any ``captions_<split>.json`` + ``<split>/`` pair works).
            captions_per_prompt: How many captions form a prompt (``None``: all).

        Raises:
            ConfigError: If ``captions_per_prompt`` is not positive.
        """
        if captions_per_prompt is not None and captions_per_prompt < 1:
            raise ConfigError(f"captions_per_prompt must be >= 1 or None, got {captions_per_prompt}")
        self.src = Path(src)
        self.split = split
        self.captions_per_prompt = captions_per_prompt
        self.annotation_file = self.src / "annotations" / f"captions_{split}.json"
        self.image_dir = self.src / split

    def settings(self) -> dict[str, Any]:
        """Split and captions per prompt."""
        return {"split": self.split, "captions_per_prompt": self.captions_per_prompt}

    def candidates(self) -> list[SourceRecord]:
        """Parse the captions file; raises :class:`DatasetError` naming it (and the entry) when malformed."""
        f = self.annotation_file
        if not f.is_file():
            raise DatasetError(
                f"COCO captions file {f} does not exist; --src must be the COCO root containing "
                f"annotations/captions_{self.split}.json and {self.split}/"
            )
        _check_dir(self.image_dir, "COCO image directory", f"unzip {self.split}.zip into {self.src}")
        data = read_json(f, "COCO captions file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(f"COCO captions file {f} has no 'images' list; is it a COCO captions file?")
        if not isinstance(data.get("annotations"), list):
            raise DatasetError(
                f"COCO captions file {f} has no 'annotations' list; is it a COCO captions file?"
            )
        files: dict[int, str] = {}
        for i, im in enumerate(data["images"]):
            if (
                not isinstance(im, dict)
                or not isinstance(im.get("id"), int)
                or not isinstance(im.get("file_name"), str)
            ):
                raise DatasetError(
                    f"{f}: images[{i}] needs an integer 'id' and a string 'file_name', got {im!r:.120}"
                )
            files[im["id"]] = im["file_name"]
        caps: dict[int, list[tuple[int, str]]] = {}
        for i, ann in enumerate(data["annotations"]):
            if (
                not isinstance(ann, dict)
                or not isinstance(ann.get("image_id"), int)
                or not isinstance(ann.get("caption"), str)
            ):
                raise DatasetError(
                    f"{f}: annotations[{i}] needs an integer 'image_id' and a string 'caption', got {ann!r:.120}"
                )
            if ann["image_id"] not in files:
                raise DatasetError(
                    f"{f}: annotations[{i}] refers to image_id {ann['image_id']}, which is not in 'images'"
                )
            if ann["caption"].strip():
                caps.setdefault(ann["image_id"], []).append((int(ann.get("id", i)), ann["caption"]))
        records = []
        for image_id, cs in caps.items():
            cs.sort()
            chosen = [c for _, c in cs][: self.captions_per_prompt]
            prompt = " ".join(_as_sentence(c) for c in chosen)
            records.append(
                SourceRecord(
                    id=str(image_id), image=self.image_dir / files[image_id], prompt=prompt, origin=f
                )
            )
        return _unique(records, f)


MJHQ_CATEGORIES = (
    "animals",
    "art",
    "fashion",
    "food",
    "indoor",
    "landscape",
    "logo",
    "people",
    "plants",
    "vehicles",
)


class MJHQ30K(SourceLoader):
    """MJHQ-30K (playgroundai/MJHQ-30K) from a local copy of ``meta_data.json`` and ``mjhq30k_imgs.zip``.

    Expected layout (``src`` holds ``meta_data.json``; the zip unpacked next to it, either directly or
    into ``mjhq30k_imgs/``)::

        src/
          meta_data.json
          animals/<name>.jpg  art/...  fashion/...  ...  vehicles/...      (or mjhq30k_imgs/animals/...)

    ``meta_data.json`` maps each image name to its category and prompt::

        {"<name>": {"category": "animals", "prompt": "a cute fox in the snow, ..."}, ...}

    The published file has 3000 images in each of 10 categories (``MJHQ_CATEGORIES``). Item id: the image
    name. Prompt: its ``prompt``. Category: its ``category`` (``per_category`` sampling balances over it).
    """

    name = "mjhq"
    has_categories = True

    def __init__(self, src: str | os.PathLike[str], *, categories: list[str] | None = None):
        """Point the loader at an MJHQ-30K directory.

        Args:
            src: The directory with ``meta_data.json``.
            categories: Keep only these categories (default: all in the file).
        """
        self.src = Path(src)
        self.meta_file = self.src / "meta_data.json"
        self.categories = sorted(categories) if categories else None

    def settings(self) -> dict[str, Any]:
        """The category filter."""
        return {"categories": self.categories}

    def _image_root(self, cats: set[str]) -> Path:
        for root in (self.src, self.src / "mjhq30k_imgs"):
            if any((root / c).is_dir() for c in cats):
                return root
        raise DatasetError(
            f"MJHQ-30K images not found: neither {self.src} nor {self.src / 'mjhq30k_imgs'} has a category folder "
            f"({', '.join(sorted(cats)[:3])}, ...); unzip mjhq30k_imgs.zip into {self.src}"
        )

    def candidates(self) -> list[SourceRecord]:
        """Parse ``meta_data.json``; raises :class:`DatasetError` naming it (and the entry) when malformed."""
        f = self.meta_file
        if not f.is_file():
            raise DatasetError(
                f"MJHQ-30K metadata {f} does not exist; --src must be the directory with meta_data.json"
            )
        data = read_json(f, "MJHQ-30K metadata")
        if not isinstance(data, dict):
            raise DatasetError(
                f"MJHQ-30K metadata {f} must map image names to {{category, prompt}}, not a {type(data).__name__}"
            )
        entries = []
        for name, v in data.items():
            if (
                not isinstance(v, dict)
                or not isinstance(v.get("category"), str)
                or not isinstance(v.get("prompt"), str)
            ):
                raise DatasetError(
                    f"{f}: entry {name!r} needs string 'category' and 'prompt' fields, got {v!r:.120}"
                )
            if not v["prompt"].strip():
                raise DatasetError(f"{f}: entry {name!r} has an empty prompt")
            entries.append((name, v["category"], v["prompt"].strip()))
        if self.categories is not None:
            present = {c for _, c, _ in entries}
            unknown = [c for c in self.categories if c not in present]
            if unknown:
                raise ConfigError(f"MJHQ-30K categories {unknown} are not in {f} (it has {sorted(present)})")
            entries = [e for e in entries if e[1] in self.categories]
        if not entries:
            raise DatasetError(f"MJHQ-30K metadata {f} has no entries")
        root = self._image_root({c for _, c, _ in entries})
        records = [
            SourceRecord(id=name, category=cat, prompt=prompt, image=root / cat / f"{name}.jpg", origin=f)
            for name, cat, prompt in entries
        ]
        return _unique(records, f)


class DCI(SourceLoader):
    """Densely Captioned Images (facebookresearch/DCI) from a local copy of the released ``dci.tar.gz``.

    Expected layout (``src`` is the extracted ``densely_captioned_images`` directory, or its parent)::

        src/
          annotations/<key>.json     one file per image (``complete/`` is used if ``annotations/`` is absent)
          photos/<image>             the SA-1B photos the annotations name

    Each annotation file is one JSON object; the fields read are::

        {"image": "sa_1234.jpg", "short_caption": "A standard short-form caption ...",
         "extra_caption": "Additional long form caption ...", "mask_data": {...}, "mask_keys": [...]}

    Item id: the annotation file name without ``.json``. Prompt: ``short_caption`` and ``extra_caption``
    (when present and non-empty) joined with a space. Only the sampled annotation files are parsed.
    """

    name = "dci"

    def __init__(self, src: str | os.PathLike[str]):
        """Point the loader at a DCI directory."""
        src = Path(src)
        if not (src / "annotations").is_dir() and (src / "densely_captioned_images").is_dir():
            src = src / "densely_captioned_images"
        self.src = src
        ann = src / "annotations"
        self.annotation_dir = ann if ann.is_dir() or not (src / "complete").is_dir() else src / "complete"
        self.photo_dir = src / "photos"

    def candidates(self) -> list[SourceRecord]:
        """List the annotation files (not parsed yet)."""
        _check_dir(
            self.annotation_dir,
            "DCI annotation directory",
            "--src must be the extracted densely_captioned_images/ directory (with annotations/ and photos/)",
        )
        _check_dir(self.photo_dir, "DCI photo directory", "extract dci.tar.gz completely")
        files = sorted(p for p in self.annotation_dir.iterdir() if p.suffix == ".json" and p.is_file())
        if not files:
            raise DatasetError(f"DCI annotation directory {self.annotation_dir} has no .json files")
        return [SourceRecord(id=p.stem, origin=p) for p in files]

    def resolve(self, record: SourceRecord) -> SourceRecord:
        """Parse the record's annotation file; raises :class:`DatasetError` naming it when malformed."""
        f = record.origin
        assert f is not None  # set by candidates()
        d = read_json(f, "DCI annotation")
        if not isinstance(d, dict):
            raise DatasetError(f"DCI annotation {f} must be a JSON object, not a {type(d).__name__}")
        short, extra, image = d.get("short_caption"), d.get("extra_caption"), d.get("image")
        if not isinstance(image, str) or not image:
            raise DatasetError(f"DCI annotation {f} has no 'image' field naming its photo")
        if not isinstance(short, str) or not short.strip():
            raise DatasetError(f"DCI annotation {f} has no non-empty 'short_caption'")
        if extra is not None and not isinstance(extra, str):
            raise DatasetError(
                f"DCI annotation {f}: 'extra_caption' must be a string, got {type(extra).__name__}"
            )
        prompt = " ".join(s.strip() for s in (short, extra or "") if s.strip())
        return replace(record, prompt=prompt, image=self.photo_dir / image)


SOURCES: dict[str, type[SourceLoader]] = {"coco": CocoCaptions, "mjhq": MJHQ30K, "dci": DCI}


def get_source(name: str, src: str | os.PathLike[str], **options: Any) -> SourceLoader:
    """Build the loader ``name`` (``coco``, ``mjhq``, ``dci``) for the directory ``src``.

    Raises:
        ConfigError: If the name is unknown.
    """
    cls = SOURCES.get(name)
    if cls is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    return cls(src, **options)
