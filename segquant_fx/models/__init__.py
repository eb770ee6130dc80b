"""Built-in models and pipelines, and the pipeline adapters that take ``stepper=``.

:mod:`~segquant_fx.models.zoo` builds diffusers denoisers with random weights and example inputs,
:mod:`~segquant_fx.models.pipeline_zoo` whole pipelines (offline), and
:mod:`~segquant_fx.models.pipelines` holds the adapters.

Importing this package is cheap: ``diffusers`` / ``transformers`` are imported only when a model or a
pipeline is built.
"""

from __future__ import annotations

from segquant_fx.models.pipeline_zoo import (
    PIPELINES,
    PipelineSpec,
    build_pipeline,
    list_pipelines,
    load_pipeline,
)
from segquant_fx.models.pipelines import as_segquant_pipeline, backbone_of, track_denoising
from segquant_fx.models.zoo import (
    MODELS,
    ModelSpec,
    build_model,
    calibration_items,
    count_linear,
    get_model_spec,
    list_models,
)

__all__ = [
    "MODELS",
    "PIPELINES",
    "ModelSpec",
    "PipelineSpec",
    "as_segquant_pipeline",
    "backbone_of",
    "build_model",
    "build_pipeline",
    "calibration_items",
    "count_linear",
    "get_model_spec",
    "list_models",
    "list_pipelines",
    "load_pipeline",
    "track_denoising",
]
