"""Small file helpers shared by the dataset modules: atomic writes and JSON reading with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from segquant_fx.errors import DatasetError
from segquant_fx.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`atomic_write_bytes` for a JSON document (UTF-8, indented, non-ASCII kept)."""
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Load a JSON file; a missing, unreadable or malformed file raises :class:`DatasetError` naming it.

    Args:
        path: The file.
        what: What the file is, for the message (``"COCO captions file"``).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {path} cannot be read: {e}") from e
