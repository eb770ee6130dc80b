"""read_prompts / write_prompts: the three prompt-source forms, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from segquant_fx.datasets import read_prompts, write_prompts
from segquant_fx.errors import DatasetError, SegQuantError


def test_txt_skips_blank_and_comment_lines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n  a red fox  \n\n   \n  # indented comment\na blue car\n", encoding="utf-8")
    assert read_prompts(p) == ["a red fox", "a blue car"]


def test_txt_keeps_hash_inside_prompt_and_utf8(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\ufeffcafé #1 at night\r\nneon ★ sign\n", encoding="utf-8")  # BOM and CRLF
    assert read_prompts(str(p)) == ["café #1 at night", "neon ★ sign"]


def test_jsonl_reads_prompt_field(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": " b ", "extra": [1]}\n', encoding="utf-8")
    assert read_prompts(p) == ["a", "b"]


def test_directory_reads_metadata(tmp_path):
    meta = [
        {"id": "1", "prompt": "first", "image": "images/1.jpg", "control": "control/1.png"},
        {"id": "2", "prompt": "second", "image": None, "control": None},
    ]
    (tmp_path / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    assert read_prompts(tmp_path) == ["first", "second"]
    assert read_prompts(tmp_path / "metadata.json") == ["first", "second"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_write_read_round_trip(tmp_path, suffix):
    prompts = ["a red fox", "café ★", "with #hash inside"]
    path = write_prompts(prompts, tmp_path / f"p{suffix}")
    assert read_prompts(path) == prompts
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_write_jsonl_keeps_what_txt_cannot(tmp_path):
    """Multi-line and '#'-leading prompts survive .jsonl; .txt refuses them instead of corrupting them."""
    prompts = ["line one\nline two", "# not a comment"]
    assert read_prompts(write_prompts(prompts, tmp_path / "p.jsonl")) == prompts
    with pytest.raises(DatasetError, match=r"prompt 0 .*write a \.jsonl"):
        write_prompts(prompts, tmp_path / "p.txt")
    assert not (tmp_path / "p.txt").exists()
    with pytest.raises(DatasetError, match=r"\.txt or \.jsonl"):
        write_prompts(prompts, tmp_path / "p.csv")


def test_missing_file_names_it(tmp_path):
    """A missing path is reported with its name and the accepted forms."""
    with pytest.raises(DatasetError, match=r"missing\.txt does not exist.*\.jsonl"):
        read_prompts(tmp_path / "missing.txt")


def test_directory_without_metadata(tmp_path):
    """A directory without metadata.json says so and how to make one."""
    with pytest.raises(DatasetError, match=r"without metadata\.json.*dataset prepare"):
        read_prompts(tmp_path)


def test_unknown_extension(tmp_path):
    """Another extension is refused rather than guessed."""
    p = tmp_path / "prompts.csv"
    p.write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"prompts\.csv has unknown extension '\.csv'"):
        read_prompts(p)


def test_empty_sources(tmp_path):
    """A file with only comments (or an empty metadata list) is an error, not an empty calibration set."""
    p = tmp_path / "p.txt"
    p.write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match=r"p\.txt contains no prompts"):
        read_prompts(p)
    (tmp_path / "metadata.json").write_text("[]")
    with pytest.raises(DatasetError, match="contains no prompts"):
        read_prompts(tmp_path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"p\.jsonl:2: not valid JSON"),
        ('["a list"]', r"p\.jsonl:2: expected a JSON object"),
        ('{"text": "x"}', r"p\.jsonl:2: object has no \"prompt\" field \(fields: \['text'\]\)"),
        ('{"prompt": 3}', r"p\.jsonl:2: \"prompt\" must be a non-empty string, got 3"),
        ('{"prompt": "  "}', r"p\.jsonl:2: \"prompt\" must be a non-empty string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    """Each malformed line is reported as file:line with what is wrong."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=match):
        read_prompts(p)


def test_not_utf8(tmp_path):
    """Undecodable bytes give a DatasetError naming the file, not a UnicodeDecodeError."""
    p = tmp_path / "p.txt"
    p.write_bytes(b"ok\n\xff\xfe\xfa bad\n")
    with pytest.raises(DatasetError, match=r"p\.txt is not UTF-8"):
        read_prompts(p)


def test_metadata_errors(tmp_path):
    """A corrupt metadata.json, a non-list, or an entry without a prompt are named with the entry index."""
    meta = tmp_path / "metadata.json"
    meta.write_text('[{"id": "1", "prompt": "x"},')
    with pytest.raises(DatasetError, match=r"metadata\.json is not valid JSON \(line 1"):
        read_prompts(tmp_path)
    meta.write_text('{"id": "1"}')
    with pytest.raises(DatasetError, match="must hold a JSON list"):
        read_prompts(tmp_path)
    meta.write_text('[{"id": "1", "prompt": "x"}, {"id": "2"}]')
    with pytest.raises(DatasetError, match=r"metadata\.json entry 1: object has no \"prompt\""):
        read_prompts(tmp_path)


def test_dataset_error_is_a_segquant_error():
    assert issubclass(DatasetError, SegQuantError)


def test_docstring_examples():
    import doctest

    from segquant_fx.datasets import prompts, sampling

    for mod in (prompts, sampling):
        failed, attempted = doctest.testmod(mod)
        assert attempted > 0 and failed == 0
