"""Calibration sets: record a diffusion backbone's inputs along real denoising trajectories.

* :func:`generate_calibrate_set` runs a pipeline over prompts and records the backbone's forward
  arguments at the denoising steps a sampler selects (kwargs dicts keyed by parameter names);
* samplers (:class:`BaseSampler`, :class:`UniformSampler` = :data:`QDiffusionSampler`,
  :class:`NormalSampler` = :data:`DNTCSampler`) choose the steps;
* sets are kept in memory or written as zstandard-compressed safetensors chunks with a checksummed
  JSON manifest (resumable; :func:`load_calibrate_set` reopens them safely, as a torch ``Dataset``).

Example::

    from segquant_fx.calibset import UniformSampler, generate_calibrate_set
    calib = generate_calibrate_set(pipe, UniformSampler(), prompts, "transformer", dump_path="calib/",
                                   num_inference_steps=28, timestep_per_sample=7)
    qtransformer = segquant_fx.quantize(pipe.transformer, calib, "w8a8")
"""

from __future__ import annotations

from segquant_fx.calibset.generate import generate_calibrate_set
from segquant_fx.calibset.samplers import (
    BaseSampler,
    DNTCSampler,
    NormalSampler,
    QDiffusionSampler,
    UniformSampler,
)
from segquant_fx.calibset.storage import (
    BaseCalibSet,
    CalibrationSet,
    ChunkedCalibrationSet,
    MemoryCalibrationSet,
    load_calibrate_set,
)

__all__ = [
    "BaseCalibSet",
    "BaseSampler",
    "CalibrationSet",
    "ChunkedCalibrationSet",
    "DNTCSampler",
    "MemoryCalibrationSet",
    "NormalSampler",
    "QDiffusionSampler",
    "UniformSampler",
    "generate_calibrate_set",
    "load_calibrate_set",
]
