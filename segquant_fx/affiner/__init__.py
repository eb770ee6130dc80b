"""The affiner: learned per-step corrections of a quantized diffusion backbone's noise prediction.

Workflow (spec §5; the third step of generate_calibrate_set -> quantize -> process_affiner)::

    import segquant_fx
    qtransformer = segquant_fx.quantize(pipe.transformer, calib_items, config="w8a8")
    affiner = segquant_fx.process_affiner(
        {"type": "blockwise", "max_timestep": 28, "sample_size": 32, "extra_args": {"guidance_scale": 7.0}},
        prompts, pipe, qtransformer,
    )
    affiner.save("affiner/")                      # affiner.json + affiner.safetensors
    pipe.transformer = qtransformer
    image = pipe("a cat", num_inference_steps=28, guidance_scale=7.0,
                 stepper=segquant_fx.load_affiner("affiner/")).images[0]

Pieces: :mod:`~segquant_fx.affiner.config` (the config), :mod:`~segquant_fx.affiner.solvers` (``mserel``,
``ptqd``, ``tac``: closed forms and their math), :mod:`~segquant_fx.affiner.trajectory` (how the
float/quantized prediction pairs are obtained, and why that is correct),
:mod:`~segquant_fx.affiner.process` (``process_affiner``, ``evaluate_affiner``, the two trajectory
modes), :mod:`~segquant_fx.affiner.affiner` (the :class:`Affiner` stepper and the third-party
protocol), :mod:`~segquant_fx.affiner.io` (safe saving), :mod:`~segquant_fx.affiner.layout` (FLUX
packing).
"""

from __future__ import annotations

from segquant_fx.affiner.affiner import Affiner, ThirdPartyAffiner, apply_solution
from segquant_fx.affiner.config import AffinerConfig, MSERelConfig, PTQDConfig, TACConfig
from segquant_fx.affiner.io import load_affiner, save_affiner
from segquant_fx.affiner.process import AffinerEvaluation, evaluate_affiner, process_affiner
from segquant_fx.affiner.solvers import (
    SOLVERS,
    MSERelSolver,
    PTQDSolver,
    TACSolver,
    blend,
    variance_schedule_calibration,
)
from segquant_fx.affiner.trajectory import (
    BackboneRecorder,
    PairedStepper,
    record_backbone_calls,
    select_target,
)

__all__ = [
    "Affiner",
    "AffinerConfig",
    "AffinerEvaluation",
    "BackboneRecorder",
    "MSERelConfig",
    "MSERelSolver",
    "PTQDConfig",
    "PTQDSolver",
    "PairedStepper",
    "SOLVERS",
    "TACConfig",
    "TACSolver",
    "ThirdPartyAffiner",
    "apply_solution",
    "blend",
    "evaluate_affiner",
    "load_affiner",
    "process_affiner",
    "record_backbone_calls",
    "save_affiner",
    "select_target",
    "variance_schedule_calibration",
]
