"""Prompt and image datasets for calibration and generation (COCO, MJHQ-30K, DCI) with control maps.

* :func:`read_prompts` reads a ``.txt`` / ``.jsonl`` prompt file or a unified dataset directory; the
  ``calibrate`` / ``quantize`` / ``generate`` commands call it on ``--prompts``.
* :class:`CaptionControlDataset` is a torch ``Dataset`` of ``(prompt, image, control)`` over a unified
  dataset directory (``metadata.json`` entries ``{id, prompt, image, control}``).
* :func:`prepare_dataset` (``segquant-fx dataset prepare``) makes such a directory from a local copy of
  COCO-2017 captions, MJHQ-30K or DCI (:mod:`~segquant_fx.datasets.sources` documents the layouts),
  sampled by seed, with control maps from :mod:`~segquant_fx.datasets.control` (Canny, depth, your own).

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
    "prepare_dataset": "segquant_fx.datasets.prepare",
    "PrepareResult": "segquant_fx.datasets.prepare",
    "CocoCaptions": "segquant_fx.datasets.sources",
    "MJHQ30K": "segquant_fx.datasets.sources",
    "DCI": "segquant_fx.datasets.sources",
    "SourceRecord": "segquant_fx.datasets.sources",
    "get_source": "segquant_fx.datasets.sources",
    "sample_ids": "segquant_fx.datasets.sampling",
    "sample_balanced": "segquant_fx.datasets.sampling",
    "CannyControl": "segquant_fx.datasets.control",
    "DepthControl": "segquant_fx.datasets.control",
    "ControlMapMaker": "segquant_fx.datasets.control",
    "register_control": "segquant_fx.datasets.control",
    "make_control": "segquant_fx.datasets.control",
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
