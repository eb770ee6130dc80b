"""Prompt and image datasets for calibration and generation (COCO, MJHQ-30K, DCI) with control maps.

* :func:`read_prompts` reads a ``.txt`` / ``.jsonl`` prompt file or a unified dataset directory; the
  ``calibrate`` / ``quantize`` / ``generate`` commands call it on ``--prompts``.
* :class:`CaptionControlDataset` is a torch ``Dataset`` of ``(prompt, image, control)`` over a unified
  dataset directory (``metadata.json`` entries ``{id, prompt, image, control}``).

Submodules import their heavy dependencies (torch, OpenCV, PIL) only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from segquant_fx.datasets.prompts import read_prompts, write_prompts

# public name -> module that defines it (imported on first use)
_LAZY: dict[str, str] = {
    "CaptionControlDataset": "segquant_fx.datasets.unified",
    "DatasetEntry": "segquant_fx.datasets.unified",
    "read_metadata": "segquant_fx.datasets.unified",
    "write_metadata": "segquant_fx.datasets.unified",
}

__all__ = ["read_prompts", "write_prompts", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'segquant_fx.datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
