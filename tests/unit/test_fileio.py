"""segquant_fx.fileio: atomic writes leave the old content or the new one, never a half-written file."""

from __future__ import annotations

import pytest

from segquant_fx.fileio import atomic_write_bytes, atomic_write_text


def test_write_replace_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "f.txt"
    with pytest.raises(FileNotFoundError):
        atomic_write_text(target, "x")
    assert atomic_write_text(target, "old", make_parents=True) == target
    assert atomic_write_bytes(str(target), b"new") == target
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temporary left behind


def test_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("segquant_fx.fileio.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
