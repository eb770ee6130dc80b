"""Built-in models: a zoo of diffusers denoisers with random weights and example inputs.

Importing this package is cheap: ``diffusers`` is imported only when a model is built.
"""

from __future__ import annotations

from segquant_fx.models.zoo import (
    MODELS,
    ModelSpec,
    build_model,
    calibration_items,
    count_linear,
    get_model_spec,
    list_models,
)

__all__ = ["MODELS", "ModelSpec", "build_model", "calibration_items", "count_linear", "get_model_spec", "list_models"]
