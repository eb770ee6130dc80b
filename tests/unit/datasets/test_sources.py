"""COCO / MJHQ-30K / DCI loaders on synthetic copies in the published layouts: prompt rules, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from _dataset_fixtures import make_coco, make_dci, make_mjhq

from segquant_fx.datasets.sources import DCI, MJHQ30K, CocoCaptions, get_source
from segquant_fx.errors import ConfigError, DatasetError

# ---------------------------------------------------------------- COCO


def test_coco_prompts_combine_captions_in_id_order(coco_src):
    recs = {r.id: r for r in CocoCaptions(coco_src).candidates()}
    assert len(recs) == 8 and sorted(recs) == sorted(str(100 + 7 * i) for i in range(8))
    # image 0 has 6 captions written in reverse id order: the first 5 by annotation id, as sentences
    assert recs["100"].prompt == " ".join(f"img0 caption {k}." for k in range(5))
    assert recs["100"].image == coco_src / "val2017" / "000000000100.jpg"
    assert recs["107"].prompt.count("caption") == 5


def test_coco_all_captions_and_sentence_endings(tmp_path):
    root = make_coco(tmp_path / "c", n_images=2)
    f = root / "annotations" / "captions_val2017.json"
    d = json.loads(f.read_text())
    d["annotations"][0]["caption"] = "  A dog   on a bench!  "
    f.write_text(json.dumps(d))
    recs = {r.id: r for r in CocoCaptions(root, captions_per_prompt=None).candidates()}
    assert recs["100"].prompt.count("caption") + recs["100"].prompt.count("dog") == 6
    assert "A dog on a bench! " in recs["100"].prompt or recs["100"].prompt.endswith("A dog on a bench!")


def test_coco_other_split(tmp_path):
    root = make_coco(tmp_path / "c", n_images=3, split="train2017")
    assert len(CocoCaptions(root, split="train2017").candidates()) == 3
    with pytest.raises(DatasetError, match=r"captions_val2017\.json does not exist.*COCO root"):
        CocoCaptions(root).candidates()


def test_coco_missing_image_dir(coco_src):
    """The captions file without the unzipped images says which directory is missing."""
    (coco_src / "val2017").rename(coco_src / "elsewhere")
    with pytest.raises(
        DatasetError, match=r"COCO image directory .*val2017 does not exist; unzip val2017\.zip"
    ):
        CocoCaptions(coco_src).candidates()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t[:-10], r"captions_val2017\.json is not valid JSON \(line 1"),
        (lambda t: json.dumps({"images": []}), r"has no 'annotations' list"),
        (lambda t: json.dumps([1, 2]), r"has no 'images' list"),
    ],
)
def test_coco_corrupt_file(coco_src, mutate, match):
    """Truncated or foreign JSON is reported with the file name."""
    f = coco_src / "annotations" / "captions_val2017.json"
    f.write_text(mutate(f.read_text()))
    with pytest.raises(DatasetError, match=match):
        CocoCaptions(coco_src).candidates()


def test_coco_bad_entries(coco_src):
    """A malformed image or caption entry is named by its index; dangling image ids are errors."""
    f = coco_src / "annotations" / "captions_val2017.json"
    good = json.loads(f.read_text())
    d = json.loads(json.dumps(good))
    del d["images"][2]["file_name"]
    f.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"images\[2\] needs an integer 'id' and a string 'file_name'"):
        CocoCaptions(coco_src).candidates()
    d = json.loads(json.dumps(good))
    d["annotations"][3]["caption"] = None
    f.write_text(json.dumps(d))
    with pytest.raises(
        DatasetError, match=r"annotations\[3\] needs an integer 'image_id' and a string 'caption'"
    ):
        CocoCaptions(coco_src).candidates()
    d = json.loads(json.dumps(good))
    d["annotations"][0]["image_id"] = 999
    f.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"annotations\[0\] refers to image_id 999"):
        CocoCaptions(coco_src).candidates()


def test_coco_bad_option():
    """captions_per_prompt must be positive."""
    with pytest.raises(ConfigError, match="captions_per_prompt"):
        CocoCaptions("x", captions_per_prompt=0)


# ---------------------------------------------------------------- MJHQ-30K


@pytest.mark.parametrize("subdir", ["", "mjhq30k_imgs"])
def test_mjhq_layouts(tmp_path, subdir):
    root = make_mjhq(tmp_path / "m", subdir=subdir)
    recs = MJHQ30K(root).candidates()
    assert len(recs) == 18 and Counter(r.category for r in recs) == {"animals": 6, "art": 6, "people": 6}
    r = recs[0]
    assert r.image == root / subdir / r.category / f"{r.id}.jpg" and r.image.is_file()
    meta = json.loads((root / "meta_data.json").read_text())
    assert all(r.prompt == meta[r.id]["prompt"] for r in recs)


def test_mjhq_per_category_sample(tmp_path):
    root = make_mjhq(tmp_path / "m", per_cat={"animals": 5, "art": 9, "people": 4})
    out = MJHQ30K(root).sample(3, seed=0, per_category=True)
    assert Counter(r.category for r in out) == {"animals": 3, "art": 3, "people": 3}
    assert [r.id for r in out] == [r.id for r in MJHQ30K(root).sample(3, seed=0, per_category=True)]
    assert {r.id for r in out} != {r.id for r in MJHQ30K(root).sample(3, seed=5, per_category=True)}
    with pytest.raises(DatasetError, match=r"\{'people': 4\}"):
        MJHQ30K(root).sample(5, seed=0, per_category=True)


def test_mjhq_category_filter(mjhq_src):
    recs = MJHQ30K(mjhq_src, categories=["people", "art"]).candidates()
    assert {r.category for r in recs} == {"art", "people"}
    with pytest.raises(ConfigError, match=r"categories \['cars'\] are not in"):
        MJHQ30K(mjhq_src, categories=["cars"]).candidates()


def test_mjhq_errors(tmp_path, mjhq_src):
    """Missing metadata, missing image folders and malformed entries name the file or entry."""
    with pytest.raises(DatasetError, match=r"meta_data\.json does not exist"):
        MJHQ30K(tmp_path / "nowhere").candidates()
    f = mjhq_src / "meta_data.json"
    meta = json.loads(f.read_text())
    name = next(iter(meta))
    meta[name] = {"prompt": "no category"}
    f.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=rf"entry '{name}' needs string 'category' and 'prompt'"):
        MJHQ30K(mjhq_src).candidates()
    f.write_text(json.dumps(["a", "list"]))
    with pytest.raises(DatasetError, match="must map image names"):
        MJHQ30K(mjhq_src).candidates()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "meta_data.json").write_text(json.dumps({"x": {"category": "art", "prompt": "p"}}))
    with pytest.raises(DatasetError, match=r"unzip mjhq30k_imgs\.zip"):
        MJHQ30K(bare).candidates()


def test_per_category_needs_categories(coco_src):
    """--per-category on a source without categories is a configuration error."""
    with pytest.raises(ConfigError, match="the coco dataset has no categories"):
        CocoCaptions(coco_src).sample(2, per_category=True)


# ---------------------------------------------------------------- DCI


@pytest.mark.parametrize("nested", [False, True])
def test_dci_prompt_is_short_plus_extra(tmp_path, nested):
    base = make_dci(tmp_path / "d", nested=nested)
    loader = DCI(tmp_path / "d")  # the parent of densely_captioned_images/ works too
    recs = {r.id: loader.resolve(r) for r in loader.candidates()}
    assert sorted(recs) == [f"sa_{1000 + i}" for i in range(6)]
    assert recs["sa_1000"].prompt == "short caption 0 extra caption 0"
    assert recs["sa_1001"].prompt == "short caption 1"  # no extra_caption
    assert recs["sa_1002"].image == base / "photos" / "sa_1002.jpg"


def test_dci_complete_dir_fallback(dci_src):
    (dci_src / "annotations").rename(dci_src / "complete")
    assert len(DCI(dci_src).candidates()) == 6


def test_dci_parses_only_sampled_files(dci_src):
    """A corrupt annotation that is not sampled does not matter; one that is sampled is named."""
    loader = DCI(dci_src)
    chosen = {r.id for r in loader.sample(2, seed=0)}
    other = next(i for i in (f"sa_{1000 + k}" for k in range(6)) if i not in chosen)
    (dci_src / "annotations" / f"{other}.json").write_text("{broken")
    assert len(loader.sample(2, seed=0)) == 2
    with pytest.raises(DatasetError, match=rf"DCI annotation .*{other}\.json is not valid JSON"):
        loader.sample(None, seed=0)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"short_caption": ""}, "no non-empty 'short_caption'"),
        ({"image": None}, "no 'image' field"),
        ({"extra_caption": 3}, "'extra_caption' must be a string"),
    ],
)
def test_dci_bad_annotation(dci_src, patch, match):
    """Missing or mistyped fields name the annotation file."""
    f = dci_src / "annotations" / "sa_1003.json"
    d = json.loads(f.read_text())
    d.update(patch)
    f.write_text(json.dumps(d))
    loader = DCI(dci_src)
    rec = next(r for r in loader.candidates() if r.id == "sa_1003")
    with pytest.raises(DatasetError, match=rf"sa_1003\.json .*{match}|sa_1003\.json: {match}"):
        loader.resolve(rec)


def test_dci_missing_dirs(tmp_path, dci_src):
    """Without annotations/ or photos/ the message names the directory."""
    with pytest.raises(DatasetError, match="DCI annotation directory .* does not exist"):
        DCI(tmp_path / "empty").candidates()
    (dci_src / "photos").rename(dci_src / "p")
    with pytest.raises(DatasetError, match=r"DCI photo directory .*photos does not exist"):
        DCI(dci_src).candidates()


def test_get_source_unknown():
    """An unknown dataset name lists the known ones."""
    with pytest.raises(
        ConfigError, match=r"unknown dataset 'laion'; choose one of \['coco', 'dci', 'mjhq'\]"
    ):
        get_source("laion", "x")
