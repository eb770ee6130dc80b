"""The unified format: metadata.json validation, CaptionControlDataset items, missing and corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _dataset_fixtures import rect_image, save_image

from segquant_fx.datasets import CaptionControlDataset, DatasetEntry, read_metadata, write_metadata
from segquant_fx.errors import DatasetError


def _make(root, n=3, control=True):
    entries = []
    for i in range(n):
        save_image(root / "images" / f"{i}.jpg", rect_image())
        if control:
            save_image(root / "control" / f"{i}.png", rect_image()[..., 0])
        entries.append(
            DatasetEntry(
                id=str(i),
                prompt=f"prompt {i}",
                image=f"images/{i}.jpg",
                control=f"control/{i}.png" if control else None,
                category="art" if i == 0 else None,
            )
        )
    write_metadata(root, entries)
    return entries


def test_round_trip_and_reference_format(tmp_path):
    entries = _make(tmp_path)
    raw = json.loads((tmp_path / "metadata.json").read_text())
    # the SegQuant reference's format: a list of {id, prompt, image, control}; category only when set
    assert raw[1] == {"id": "1", "prompt": "prompt 1", "image": "images/1.jpg", "control": "control/1.png"}
    assert raw[0]["category"] == "art"
    assert read_metadata(tmp_path) == entries
    assert read_metadata(tmp_path / "metadata.json") == entries


def test_dataset_items(tmp_path):
    _make(tmp_path)
    ds = CaptionControlDataset(tmp_path)
    assert len(ds) == 3 and ds.prompts == ["prompt 0", "prompt 1", "prompt 2"]
    prompt, image, control = ds[1]
    assert prompt == "prompt 1" and image.mode == "RGB" and image.size == (40, 32)
    assert control.mode == "RGB" and np.asarray(control)[12, 20, 0] == 255
    assert ds[-1][0] == "prompt 2"
    with pytest.raises(IndexError):
        ds[3]
    batches = list(ds.get_dataloader(batch_size=2))
    assert [len(b) for b in batches] == [2, 1] and batches[0][0][0] == "prompt 0"
    grey = CaptionControlDataset(tmp_path, mode="L", transform=np.asarray)
    assert grey[0][1].shape == (32, 40) and grey[0][2].shape == (32, 40)


def test_reference_style_integer_ids(tmp_path):
    """The reference writes integer ids; they are read as strings."""
    _make(tmp_path, n=1)
    (tmp_path / "metadata.json").write_text(
        json.dumps([{"id": 7, "prompt": "p", "image": "images/0.jpg", "control": "control/0.png"}])
    )
    assert read_metadata(tmp_path)[0].id == "7"


def test_prompt_only_dataset(tmp_path):
    _make(tmp_path, n=2, control=False)
    assert CaptionControlDataset(tmp_path)[0][2] is None


def test_missing_file_named_at_construction(tmp_path):
    """A referenced file that is gone is reported when the dataset is opened, with entry and path."""
    _make(tmp_path)
    (tmp_path / "control" / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"entry 2 \(id '2'\): control file .*2\.png does not exist"):
        CaptionControlDataset(tmp_path)
    ds = CaptionControlDataset(tmp_path, check_files=False)
    with pytest.raises(DatasetError, match=r"image .*2\.png does not exist"):
        ds[2]


def test_corrupt_image_named(tmp_path):
    """An undecodable image raises DatasetError naming it, not a PIL traceback."""
    _make(tmp_path)
    (tmp_path / "images" / "0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"image .*0\.jpg cannot be decoded"):
        CaptionControlDataset(tmp_path)[0]


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ('{"id": 1}', "must be a JSON list of entries"),
        ('[{"prompt": "p"}]', r"entry 0: missing field 'id'"),
        ('[{"id": "a", "prompt": ""}]', r"entry 0: 'prompt' must be a non-empty string"),
        ('[{"id": true, "prompt": "p"}]', r"entry 0: 'id' must be a string or integer"),
        ('[{"id": "a", "prompt": "p", "image": 3}]', r"entry 0: 'image' must be a non-empty string or null"),
        ('[{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}]', r"entries 0 and 1 share the id 'a'"),
        ("[", r"not valid JSON"),
    ],
)
def test_bad_metadata(tmp_path, meta, match):
    """Every malformed metadata.json is named with the entry index and what is wrong."""
    (tmp_path / "metadata.json").write_text(meta)
    with pytest.raises(DatasetError, match=match):
        read_metadata(tmp_path)


def test_missing_metadata(tmp_path):
    """A directory without metadata.json names the file."""
    with pytest.raises(DatasetError, match=r"metadata\.json does not exist"):
        CaptionControlDataset(tmp_path)
