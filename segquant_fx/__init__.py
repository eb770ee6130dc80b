"""segquant_fx: semantics-aware quantization of diffusion models as torch.export graph passes.

The public API is re-exported here lazily, so ``import segquant_fx`` stays cheap and importing one
room (for example :mod:`segquant_fx.ops`) does not drag in the others.

Flow::

    gm = segquant_fx.capture(model, example)              # torch.export, un-decomposed ATen graph
    report = segquant_fx.find_patterns(model, example=ex)  # semantic patterns -> per-linear plan
    qmodel = segquant_fx.quantize(model, calib, config="w8a8")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "capture": "segquant_fx.capture",
    "CapturedModel": "segquant_fx.capture",
    "find_patterns": "segquant_fx.report",
    "PatternReport": "segquant_fx.report",
    "LayerPlan": "segquant_fx.report",
    "register_pattern": "segquant_fx.patterns",
    "Pattern": "segquant_fx.patterns",
    "PATTERNS": "segquant_fx.patterns",
    "find_matches": "segquant_fx.patterns",
    "QuantizeConfig": "segquant_fx.config",
    "quantize": "segquant_fx.api",
    "load": "segquant_fx.api",
    "compile": "segquant_fx.compile",
    "export_onnx": "segquant_fx.export.onnx",
    "generate_calibrate_set": "segquant_fx.calibset",
    "load_calibrate_set": "segquant_fx.calibset",
    "BaseSampler": "segquant_fx.calibset",
    "UniformSampler": "segquant_fx.calibset",
    "QDiffusionSampler": "segquant_fx.calibset",
    "NormalSampler": "segquant_fx.calibset",
    "DNTCSampler": "segquant_fx.calibset",
    "build_pipeline": "segquant_fx.models.pipeline_zoo",
    "load_pipeline": "segquant_fx.models.pipeline_zoo",
    "process_affiner": "segquant_fx.affiner",
    "load_affiner": "segquant_fx.affiner",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'segquant_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
