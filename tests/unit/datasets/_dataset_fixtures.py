"""Builders of synthetic COCO-2017 / MJHQ-30K / DCI copies in their published layouts (used by the tests).

A uniquely named module rather than conftest helpers: this directory has no ``__init__.py`` (a test package
named ``datasets`` would shadow the Hugging Face library), so its files import each other as top-level
modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def rect_image(h: int = 32, w: int = 40, box: tuple[int, int, int, int] = (8, 10, 24, 30), value: int = 255):
    """RGB uint8 array: black with a filled rectangle rows box[0]:box[2], cols box[1]:box[3]."""
    a = np.zeros((h, w, 3), np.uint8)
    y0, x0, y1, x1 = box
    a[y0:y1, x0:x1] = value
    return a


def save_image(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # JPEG at quality 100 keeps the rectangle edges sharp enough for the known-edge checks
    Image.fromarray(arr).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def _box(i: int) -> tuple[int, int, int, int]:
    return (4 + i % 5, 6 + i % 7, 22 + i % 4, 30 + i % 3)


def make_coco(root: Path, n_images: int = 8, split: str = "val2017") -> Path:
    """COCO root: annotations/captions_<split>.json (official schema) + <split>/<12-digit id>.jpg."""
    images, anns = [], []
    ann_id = 1000
    for i in range(n_images):
        image_id = 100 + 7 * i
        fn = f"{image_id:012d}.jpg"
        images.append(
            {
                "license": 4,
                "file_name": fn,
                "coco_url": f"http://images.cocodataset.org/{split}/{fn}",
                "height": 32,
                "width": 40,
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "",
                "id": image_id,
            }
        )
        save_image(root / split / fn, rect_image(box=_box(i)))
        # 6 captions for even images (COCO has 5-7), written out of id order on purpose
        n_caps = 6 if i % 2 == 0 else 5
        for k in reversed(range(n_caps)):
            anns.append({"image_id": image_id, "id": ann_id + 10 * i + k, "caption": f"img{i} caption {k}"})
    data = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}],
        "images": images,
        "annotations": anns,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


MJHQ_CATS = ("animals", "art", "people")


def make_mjhq(root: Path, per_cat: dict[str, int] | None = None, subdir: str = "") -> Path:
    """MJHQ-30K: meta_data.json {name: {category, prompt}} + <category>/<name>.jpg (optionally under subdir)."""
    per_cat = per_cat or dict.fromkeys(MJHQ_CATS, 6)
    meta = {}
    i = 0
    for cat, n in per_cat.items():
        for k in range(n):
            name = f"{(i * 2654435761) % 2**32:08x}{k:02d}{cat[:2]}"
            meta[name] = {"category": cat, "prompt": f"a {cat} picture number {k}"}
            save_image(root / subdir / cat / f"{name}.jpg", rect_image(box=_box(i)))
            i += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta_data.json").write_text(json.dumps(meta))
    return root


def make_dci(root: Path, n: int = 6, nested: bool = False) -> Path:
    """DCI: densely_captioned_images/annotations/<key>.json + photos/<image> (fields of the DCI release)."""
    base = root / "densely_captioned_images" if nested else root
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = f"sa_{1000 + i}.jpg"
        save_image(base / "photos" / image, rect_image(box=_box(i)))
        d = {
            "image": image,
            "short_caption": f"short caption {i}",
            "mask_data": {
                "0": {
                    "idx": 0,
                    "outer_mask": "iVBORw0KGgo=",
                    "mask_quality": 0,
                    "label": "thing",
                    "caption": "a thing",
                    "parent": -1,
                    "requirements": [],
                    "bounds": {"topLeft": {"x": 0, "y": 0}, "bottomRight": {"x": 5, "y": 5}},
                    "area": 25,
                }
            },
            "mask_keys": ["0"],
        }
        if i != 1:  # one entry without extra_caption
            d["extra_caption"] = f"extra caption {i}"
        (base / "annotations" / f"sa_{1000 + i}.json").write_text(json.dumps(d))
    return base
