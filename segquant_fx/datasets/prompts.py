"""Prompt files for calibration and generation: plain text, JSON Lines, or a unified dataset directory.

:func:`read_prompts` is what the ``calibrate`` / ``quantize`` / ``generate`` commands call on a
``--prompts`` argument, so every command accepts the same three forms:

* ``prompts.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``prompts.jsonl``: one JSON object per line with a string ``"prompt"`` field (other fields ignored);
* a directory made by ``segquant-fx dataset prepare`` (or by hand): its ``metadata.json`` is a list of
  ``{"id", "prompt", "image", "control"}`` entries (see :mod:`segquant_fx.datasets.unified`); a path
  to such a ``metadata.json`` (or any ``.json`` list of such objects) works too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from segquant_fx.datasets._io import atomic_write_text, read_json
from segquant_fx.errors import DatasetError

__all__ = ["read_prompts", "write_prompts"]

_FORMS = 'a .txt file (one prompt per line), a .jsonl file ({"prompt": ...} per line) or a dataset directory'


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    r"""Read the prompts of a prompt file or a unified dataset directory, in file order.

    Args:
        path: A ``.txt`` file (one prompt per line, ``#`` comments and blank lines skipped), a ``.jsonl``
            file (objects with a ``"prompt"`` string), a directory containing ``metadata.json``, or a
            ``.json`` file holding a list of objects with a ``"prompt"`` string.

    Returns:
        The prompts, stripped of surrounding whitespace. Never empty.

    Raises:
        DatasetError: If the path does not exist, has another extension, cannot be decoded, a line or
            entry is malformed (the message names the file and the line or entry), or it holds no prompt.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "p.txt"
        >>> _ = p.write_text("# calibration\na red fox\n\na blue car\n")
        >>> read_prompts(p)
        ['a red fox', 'a blue car']
    """
    path = Path(path)
    if path.is_dir():
        meta = path / "metadata.json"
        if not meta.is_file():
            raise DatasetError(
                f"prompt source {path} is a directory without metadata.json; give {_FORMS} "
                "(make one with `segquant-fx dataset prepare`)"
            )
        prompts = _read_json_list(meta)
    elif not path.exists():
        raise DatasetError(f"prompt file {path} does not exist; give {_FORMS}")
    else:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            prompts = _read_txt(path)
        elif suffix == ".jsonl":
            prompts = _read_jsonl(path)
        elif suffix == ".json":
            prompts = _read_json_list(path)
        else:
            raise DatasetError(f"prompt file {path} has unknown extension {path.suffix!r}; give {_FORMS}")
    if not prompts:
        raise DatasetError(f"prompt source {path} contains no prompts")
    return prompts


def write_prompts(prompts: list[str], path: str | os.PathLike[str]) -> Path:
    """Write prompts atomically as ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}`` per line).

    Args:
        prompts: Non-empty strings without line breaks for ``.txt`` (``.jsonl`` escapes them).
        path: Destination; the extension picks the format.

    Returns:
        The path written.

    Raises:
        DatasetError: On an unknown extension, or a prompt that the ``.txt`` format cannot round-trip.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    elif suffix == ".txt":
        for i, p in enumerate(prompts):
            if not p.strip() or "\n" in p or "\r" in p or p.lstrip().startswith("#") or p != p.strip():
                raise DatasetError(
                    f"prompt {i} ({p[:40]!r}) cannot be stored in a .txt prompt file (empty, multi-line, "
                    "padded or starting with '#'); write a .jsonl file instead"
                )
        text = "".join(p + "\n" for p in prompts)
    else:
        raise DatasetError(f"prompt file {path} must end in .txt or .jsonl")
    atomic_write_text(path, text)
    return path


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"prompt file {path} is not UTF-8 text (byte {e.start}): {e.reason}") from e
    except OSError as e:
        raise DatasetError(f"prompt file {path} cannot be read: {e}") from e


def _read_txt(path: Path) -> list[str]:
    out = []
    for line in _lines(path):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    return out


def _read_jsonl(path: Path) -> list[str]:
    out = []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        out.append(_prompt_of(obj, f"{path}:{lineno}"))
    return out


def _read_json_list(path: Path) -> list[str]:
    data = read_json(path, "prompt file")
    if not isinstance(data, list):
        raise DatasetError(
            f'{path} must hold a JSON list of {{"id", "prompt", "image", "control"}} objects, '
            f"not a {type(data).__name__}"
        )
    return [_prompt_of(obj, f"{path} entry {i}") for i, obj in enumerate(data)]


def _prompt_of(obj: object, where: str) -> str:
    if not isinstance(obj, dict):
        raise DatasetError(f'{where}: expected a JSON object with a "prompt" field, got {type(obj).__name__}')
    if "prompt" not in obj:
        raise DatasetError(f'{where}: object has no "prompt" field (fields: {sorted(obj)})')
    p = obj["prompt"]
    if not isinstance(p, str) or not p.strip():
        raise DatasetError(f'{where}: "prompt" must be a non-empty string, got {p!r}')
    return p.strip()
