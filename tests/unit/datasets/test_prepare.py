"""prepare_dataset end to end on synthetic copies: content, atomic output, resume, settings, bad inputs."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest
from _dataset_fixtures import make_coco, rect_image
from PIL import Image

from segquant_fx.datasets import CaptionControlDataset, read_prompts
from segquant_fx.datasets.prepare import prepare_dataset, work_dir_for
from segquant_fx.datasets.sources import CocoCaptions
from segquant_fx.errors import ConfigError, DatasetError


def _prep(src, out, dataset="coco", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return prepare_dataset(dataset, src, out, **kw)


def test_coco_end_to_end(coco_src, tmp_path):
    out = tmp_path / "out"
    res = _prep(coco_src, out, sample_size=5, seed=2)
    assert (res.made, res.reused, len(res.entries)) == (5, 0, 5)
    assert out.is_dir() and not work_dir_for(out).exists()
    assert not [p for p in out.rglob("*.tmp")]
    expected = CocoCaptions(coco_src).sample(5, seed=2)
    assert [e.id for e in res.entries] == [r.id for r in expected]
    assert read_prompts(out) == [r.prompt for r in expected]
    ds = CaptionControlDataset(out, mode="L")
    for e, r, (prompt, _image, control) in zip(res.entries, expected, ds, strict=True):
        assert prompt == r.prompt
        # images are byte copies of the source; the control map is OpenCV's Canny of the decoded image
        assert (out / e.image).read_bytes() == r.image.read_bytes()
        src_rgb = np.asarray(Image.open(r.image).convert("RGB"))
        want = cv2.Canny(cv2.cvtColor(src_rgb, cv2.COLOR_RGB2GRAY), 100, 200)
        np.testing.assert_array_equal(np.asarray(control), want)
        assert want.max() == 255
    settings = json.loads((out / "prepare.json").read_text())["settings"]
    assert settings["seed"] == 2 and settings["control"]["name"] == "canny"


def test_same_seed_same_dataset_other_seed_other(coco_src, tmp_path):
    a = _prep(coco_src, tmp_path / "a", sample_size=4, seed=0)
    b = _prep(coco_src, tmp_path / "b", sample_size=4, seed=0)
    c = _prep(coco_src, tmp_path / "c", sample_size=4, seed=9)
    assert (tmp_path / "a" / "metadata.json").read_bytes() == (tmp_path / "b" / "metadata.json").read_bytes()
    assert [e.id for e in a.entries] == [e.id for e in b.entries]
    assert {e.id for e in a.entries} != {e.id for e in c.entries}


def test_mjhq_per_category_and_blur(mjhq_src, tmp_path):
    res = _prep(
        mjhq_src, tmp_path / "m", "mjhq", sample_size=2, per_category=True, control_options={"blur": 3}
    )
    assert Counter(e.category for e in res.entries) == {"animals": 2, "art": 2, "people": 2}
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert all(m["category"] for m in meta)
    e = res.entries[0]
    src = mjhq_src / e.category / f"{e.id}.jpg"
    g = cv2.GaussianBlur(
        cv2.cvtColor(np.asarray(Image.open(src).convert("RGB")), cv2.COLOR_RGB2GRAY), (3, 3), 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m" / e.control)), cv2.Canny(g, 100, 200))


def test_dci_without_control(dci_src, tmp_path):
    res = _prep(dci_src, tmp_path / "d", "dci", control=None)
    assert len(res.entries) == 6 and all(e.control is None for e in res.entries)
    assert not (tmp_path / "d" / "control").exists()
    assert CaptionControlDataset(tmp_path / "d")[0][2] is None
    assert "short caption 0 extra caption 0" in read_prompts(tmp_path / "d")


def test_interrupted_run_resumes(coco_src, tmp_path):
    """A corrupt image stops the run with its name; nothing appears at --out; after the fix the rerun
    reuses the finished items and then publishes the directory."""
    out = tmp_path / "out"
    chosen = CocoCaptions(coco_src).sample(6, seed=0)
    bad = chosen[3].image
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:40])  # truncated JPEG
    with pytest.raises(
        DatasetError,
        match=rf"image .*{bad.name} \(item '{chosen[3].id}' of .*captions_val2017\.json\) is corrupt",
    ):
        _prep(coco_src, out, sample_size=6, workers=1)
    assert not out.exists()
    work = work_dir_for(out)
    assert (work / "prepare.json").is_file() and not (work / "metadata.json").exists()
    assert len(list((work / "control").iterdir())) == 3  # items before the bad one, each complete
    assert not [p for p in work.rglob("*.tmp")]
    bad.write_bytes(good_bytes)
    res = _prep(coco_src, out, sample_size=6, workers=1)
    assert (res.made, res.reused) == (3, 3)
    assert out.is_dir() and not work.exists() and len(read_prompts(out)) == 6


def test_resume_with_other_settings_is_refused(coco_src, tmp_path):
    """Resuming an unfinished or finished directory with other settings lists the differences."""
    out = tmp_path / "out"
    img = CocoCaptions(coco_src).sample(3, seed=0)[1].image
    img.unlink()
    with pytest.raises(DatasetError, match=rf"image .*{img.name} .* does not exist"):
        _prep(coco_src, out, sample_size=3, workers=1)
    make_coco(coco_src)  # restore the images
    with pytest.raises(
        DatasetError, match=r"other settings \(seed: 0 there, 1 now\); delete the unfinished .*\.out\.partial"
    ):
        _prep(coco_src, out, sample_size=3, seed=1)
    _prep(coco_src, out, sample_size=3)
    with pytest.raises(
        DatasetError, match=r"control\.blur: None there, 3 now; sample_size: 3 there, 4 now\); delete .*out"
    ):
        _prep(coco_src, out, sample_size=4, control_options={"blur": 3})
    with pytest.raises(DatasetError, match=r"control: \{'name': 'canny'.*\} there, None now"):
        _prep(coco_src, out, sample_size=3, control=None)


def test_complete_rerun_reuses_and_repairs(coco_src, tmp_path):
    out = tmp_path / "out"
    first = _prep(coco_src, out, sample_size=4)
    before = (out / "metadata.json").read_bytes()
    assert _prep(coco_src, out, sample_size=4).made == 0
    (out / first.entries[2].control).unlink()
    res = _prep(coco_src, out, sample_size=4)
    assert (res.made, res.reused) == (1, 3) and (out / first.entries[2].control).is_file()
    assert (out / "metadata.json").read_bytes() == before


def test_foreign_output_directory(coco_src, tmp_path):
    """A non-empty directory that prepare did not make is never written into; an empty one is used."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="is not empty and was not made by `segquant-fx dataset prepare`"):
        _prep(coco_src, out, sample_size=2)
    assert (out / "notes.txt").read_text() == "keep me" and not work_dir_for(out).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_prep(coco_src, empty, sample_size=2).entries) == 2


def test_bad_inputs_write_nothing(coco_src, tmp_path):
    """Option and source errors are raised before anything is written."""
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="asked for 50 items but the source has only 8"):
        _prep(coco_src, out, sample_size=50)
    with pytest.raises(DatasetError, match="COCO captions file .* does not exist"):
        _prep(tmp_path / "nowhere", out)
    with pytest.raises(ConfigError, match="odd positive integer"):
        _prep(coco_src, out, control_options={"blur": 2})
    with pytest.raises(ConfigError, match="sample size must be a positive integer"):
        _prep(coco_src, out, sample_size=0)
    assert not out.exists() and not work_dir_for(out).exists()


def test_exif_rotated_source_is_stored_upright(tmp_path):
    """A JPEG with an EXIF rotation is stored upright (PNG) so the image and its control map align."""
    src = make_coco(tmp_path / "c", n_images=1)
    path = src / "val2017" / "000000000100.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(rect_image(h=32, w=40)).save(path, exif=exif, quality=100)
    res = _prep(src, tmp_path / "out")
    e = res.entries[0]
    assert e.image.endswith(".png")
    _, image, control = CaptionControlDataset(tmp_path / "out")[0]
    assert image.size == control.size == (32, 40)
    assert _prep(src, tmp_path / "out").made == 0  # the PNG counts as done on rerun


def test_control_maker_must_keep_size(coco_src, tmp_path):
    """A custom maker that changes the size is rejected with its name and the image."""

    class Shrink:
        def __call__(self, image):
            return image.resize((8, 8))

        def settings(self):
            return {"name": "shrink"}

    with pytest.raises(DatasetError, match=r"maker 'shrink' returned size \(8, 8\) for the \(40, 32\) image"):
        _prep(coco_src, tmp_path / "out", sample_size=1, control=Shrink())


def test_control_object_is_checked(coco_src, tmp_path):
    """A maker object without settings(), or with settings that JSON cannot store, is a ConfigError."""
    with pytest.raises(ConfigError, match=r"control: got a function, not a ControlMapMaker"):
        _prep(coco_src, tmp_path / "out", control=lambda im: im)

    class Opaque:
        def __call__(self, image):
            return image

        def settings(self):
            return {"model": object()}

    with pytest.raises(ConfigError, match="settings\\(\\) must be JSON-serializable"):
        _prep(coco_src, tmp_path / "out", control=Opaque())
    assert not (tmp_path / "out").exists()
