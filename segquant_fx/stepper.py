"""The stepper protocol: a per-denoising-step hook on a diffusion pipeline's noise prediction.

A *stepper* is handed to an adapter pipeline's call (``pipe(prompt, ..., stepper=affiner)``). At every
denoising step the pipeline calls :meth:`Stepper.correct` on the noise prediction selected by the
stepper's :attr:`Stepper.noise_target`:

* ``"all"``: the guided prediction, after classifier-free guidance has combined the branches (or the
  only prediction when the pipeline runs without CFG, e.g. FLUX's guidance-distilled transformer);
* ``"uncond"``: the unconditional half of the backbone's CFG batch, before guidance combines it;
* ``"text"``: the text-conditioned half, before guidance combines it.

For ``"uncond"`` on a run without CFG there is no unconditional branch: pipelines raise
:class:`~segquant_fx.errors.ConfigError` naming the target and suggesting ``"all"``. ``"text"`` on a run
without CFG corrects the only prediction (it is the text-conditioned one).

The pipeline then continues unchanged (guidance combine, scheduler step). The stepper never sees the
scheduler, so any scheduler works. :class:`StepInfo` tells the stepper where it is; FLUX's packed latents
``[B, tokens, C*4]`` come with ``latent_layout="packed"`` and the unpacked latent size in
``latent_hw`` so that spatial corrections can unpack them.

This module is only the contract; implementations live in :mod:`segquant_fx.affiner` and user code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["NOISE_TARGETS", "IdentityStepper", "StepInfo", "Stepper"]

NOISE_TARGETS = ("all", "uncond", "text")


@dataclass(frozen=True, kw_only=True)
class StepInfo:
    """Where a pipeline is when it calls a stepper.

    Attributes:
        step_index: 0-based index of the denoising step (0 = the noisiest step).
        num_inference_steps: Total number of denoising steps of this run.
        timestep: The scheduler's timestep value for this step (float, scheduler units).
        family: ``"sd3"``, ``"flux"`` or ``"sdxl"`` (the adapter that calls).
        latent_layout: ``"bchw"`` for ``[B, C, H, W]`` latents, ``"packed"`` for FLUX's ``[B, N, C*4]``.
        latent_hw: ``(height, width)`` of the unpacked latent grid (``H``, ``W`` of ``[B, C, H, W]``).
        do_cfg: Whether this run uses classifier-free guidance (two branches).
        guidance_scale: The guidance scale of the run.
        branch: Which prediction :meth:`Stepper.correct` receives: ``"all"``, ``"uncond"`` or ``"text"``.
    """

    step_index: int
    num_inference_steps: int
    timestep: float
    family: str
    latent_layout: Literal["bchw", "packed"]
    latent_hw: tuple[int, int]
    do_cfg: bool
    guidance_scale: float
    branch: str


@runtime_checkable
class Stepper(Protocol):
    """A per-step correction of the noise prediction (see the module docstring)."""

    noise_target: str

    def correct(self, info: StepInfo, noise_pred: torch.Tensor) -> torch.Tensor:
        """Return the corrected prediction; same shape, dtype and device as ``noise_pred``."""
        ...


class IdentityStepper:
    """A stepper that changes nothing (tests, and a template for third-party steppers)."""

    def __init__(self, noise_target: str = "all") -> None:
        if noise_target not in NOISE_TARGETS:
            from segquant_fx.errors import ConfigError

            raise ConfigError(f"noise_target={noise_target!r} is not one of {NOISE_TARGETS}")
        self.noise_target = noise_target
        self.calls: list[StepInfo] = []

    def correct(self, info: StepInfo, noise_pred: torch.Tensor) -> torch.Tensor:
        """Record the call and return ``noise_pred`` unchanged."""
        self.calls.append(info)
        return noise_pred
