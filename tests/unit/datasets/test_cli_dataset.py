"""segquant-fx dataset prepare: one command per dataset, resume, depth from a user file, errors."""

from __future__ import annotations

import json
import textwrap
from collections import Counter

import pytest

from segquant_fx.cli import main
from segquant_fx.datasets import CaptionControlDataset, read_prompts


def _run(*args):
    return main(["dataset", "prepare", *map(str, args), "--quiet"])


def test_coco(coco_src, tmp_path, capsys):
    out = tmp_path / "coco-canny"
    assert (
        _run(
            "--dataset", "coco", "--src", coco_src, "--out", out, "--sample-size", 3, "--blur", 3, "--seed", 1
        )
        == 0
    )
    assert "3 items (3 made, 0 reused)" in capsys.readouterr().out
    s = json.loads((out / "prepare.json").read_text())["settings"]
    assert s["seed"] == 1 and s["control"]["blur"] == 3 and s["source"]["captions_per_prompt"] == 5
    assert len(read_prompts(out)) == 3 and len(CaptionControlDataset(out)) == 3
    # rerunning the same command is a no-op
    assert (
        _run(
            "--dataset", "coco", "--src", coco_src, "--out", out, "--sample-size", 3, "--blur", 3, "--seed", 1
        )
        == 0
    )
    assert "(0 made, 3 reused)" in capsys.readouterr().out


def test_coco_all_captions(coco_src, tmp_path):
    out = tmp_path / "o"
    assert (
        _run(
            "--dataset",
            "coco",
            "--src",
            coco_src,
            "--out",
            out,
            "--captions-per-prompt",
            0,
            "--control",
            "none",
        )
        == 0
    )
    assert max(p.count("caption") for p in read_prompts(out)) == 6


def test_mjhq_per_category(mjhq_src, tmp_path):
    out = tmp_path / "mjhq-canny"
    rc = _run("--dataset", "mjhq", "--src", mjhq_src, "--out", out, "--sample-size", 2, "--per-category")
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert Counter(m["category"] for m in meta) == {"animals": 2, "art": 2, "people": 2}
    out2 = tmp_path / "two"
    assert _run("--dataset", "mjhq", "--src", mjhq_src, "--out", out2, "--categories", "art,people") == 0
    assert {m["category"] for m in json.loads((out2 / "metadata.json").read_text())} == {"art", "people"}


def test_dci(dci_src, tmp_path):
    out = tmp_path / "dci-canny"
    assert (
        _run("--dataset", "dci", "--src", dci_src, "--out", out, "--sample-size", 4, "--canny-low", 50) == 0
    )
    assert json.loads((out / "prepare.json").read_text())["settings"]["control"]["low"] == 50
    assert all(p.startswith("short caption") for p in read_prompts(out))


def test_depth_from_user_file(coco_src, tmp_path):
    f = tmp_path / "depth.py"
    f.write_text(
        textwrap.dedent("""
        import numpy as np

        def make():
            return lambda im: np.tile(np.arange(im.size[0], dtype=float), (im.size[1], 1))
        """)
    )
    out = tmp_path / "depth"
    assert (
        _run(
            "--dataset",
            "coco",
            "--src",
            coco_src,
            "--out",
            out,
            "--sample-size",
            2,
            "--control",
            "depth",
            "--depth-model",
            f"{f}:make",
        )
        == 0
    )
    s = json.loads((out / "prepare.json").read_text())["settings"]["control"]
    assert s == {"name": "depth", "model": "depth.py:make"}
    _, image, control = CaptionControlDataset(out, mode="L")[0]
    assert control.size == image.size and control.getpixel((0, 0)) == 0 and control.getpixel((39, 0)) == 255


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--dataset", "coco", "--per-category"], "the coco dataset has no categories"),
        (["--dataset", "coco", "--blur", 4], "odd positive integer"),
        (["--dataset", "coco", "--control", "depth"], "needs --depth-model"),
        (["--dataset", "coco", "--control", "depth", "--depth-model", "nope.py:f"], "nope.py does not exist"),
        (["--dataset", "coco", "--control", "hed"], "unknown control map 'hed'"),
        (["--dataset", "coco", "--control", "none", "--blur", 3], "apply to --control canny"),
        (["--dataset", "mjhq", "--split", "train2017"], "apply to --dataset coco"),
        (["--dataset", "dci", "--categories", "art"], "applies to --dataset mjhq"),
        (["--dataset", "coco", "--sample-size", 99], "asked for 99 items but the source has only 8"),
    ],
)
def test_option_errors(coco_src, tmp_path, capsys, extra, match):
    """Bad option combinations exit with code 1 and a one-line reason (no traceback)."""
    assert _run("--src", coco_src, "--out", tmp_path / "o", *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("segquant-fx dataset: error:") and match in err


def test_missing_and_corrupt_inputs_named(coco_src, tmp_path, capsys):
    """A missing source or a corrupt annotation file is named in the error."""
    assert _run("--dataset", "mjhq", "--src", tmp_path / "nothing", "--out", tmp_path / "o") == 1
    assert "meta_data.json does not exist" in capsys.readouterr().err
    f = coco_src / "annotations" / "captions_val2017.json"
    f.write_text(f.read_text()[:100])
    assert _run("--dataset", "coco", "--src", coco_src, "--out", tmp_path / "o") == 1
    assert f"{f} is not valid JSON" in capsys.readouterr().err


def test_usage_errors():
    """Missing required arguments are argparse usage errors (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(["dataset", "prepare", "--dataset", "coco"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["dataset", "prepare", "--dataset", "laion", "--src", "a", "--out", "b"])
