"""Timestep samplers: which denoising steps of a generation a calibration set records.

Selections are made in the reference's "steps remaining" units: with ``T`` inference steps a counter
starts at ``T - 1`` on the first (noisiest) step and reaches ``0`` on the last one, so counter ``c`` is
step index ``T - 1 - c``. For ``nums`` steps per sample (``timestep_per_sample``):

* :class:`BaseSampler`: counters ``T-1, T-2, ..., T-nums`` -- the first ``nums`` steps;
* :class:`UniformSampler` (Q-Diffusion; alias :data:`QDiffusionSampler`):
  ``numpy.linspace(T-1, 0, nums, dtype=int)`` -- spread over the whole trajectory;
* :class:`NormalSampler` (PTQ4DM; alias :data:`DNTCSampler`): ``nums`` draws from
  ``N(mean, ((T-1)/2)^2)``, clamped to ``[0, T-1]``, rounded (Python ``round``) and de-duplicated,
  so at most ``nums`` steps. Unlike the reference (global RNG), draws come from a generator seeded
  with ``(seed, sample_index)``: every prompt gets its own draw, and reruns (and resumed runs) make
  the same ones.

Counters outside ``[0, T-1]`` (``nums > T``) select nothing, as in the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segquant_fx.errors import ConfigError

__all__ = ["BaseSampler", "DNTCSampler", "NormalSampler", "QDiffusionSampler", "UniformSampler"]


def _check(max_timestep: int, nums: int) -> None:
    if isinstance(max_timestep, bool) or not isinstance(max_timestep, int) or max_timestep < 0:
        raise ConfigError(f"max_timestep (last counter value, T-1) must be an int >= 0, got {max_timestep!r}")
    if isinstance(nums, bool) or not isinstance(nums, int) or nums < 1:
        raise ConfigError(f"timestep_per_sample must be a positive int, got {nums!r}")


class BaseSampler:
    """Records the first ``nums`` denoising steps of every sample."""

    def sample_timesteps(self, max_timestep: int, nums: int, sample_index: int = 0) -> list[int]:
        """Selected counters (steps remaining), in the reference's order.

        Args:
            max_timestep: ``T - 1`` (the counter on the first step).
            nums: Steps to select per sample.
            sample_index: Index of the prompt (only :class:`NormalSampler` uses it).
        """
        _check(max_timestep, nums)
        return list(range(max_timestep, max_timestep - nums, -1))

    def select_steps(self, num_inference_steps: int, nums: int, sample_index: int = 0) -> list[int]:
        """Selected step indices (0 = the noisiest step), ascending, without duplicates.

        Raises:
            ConfigError: ``num_inference_steps`` or ``nums`` is not a positive int.
        """
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ConfigError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        last = num_inference_steps - 1
        counters = self.sample_timesteps(last, nums, sample_index)
        return sorted({last - int(c) for c in counters if 0 <= int(c) <= last})

    def settings(self) -> dict[str, Any]:
        """What defines the selection (stored in a calibration set's manifest)."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "type")
        return f"{type(self).__name__}({args})"


class UniformSampler(BaseSampler):
    """Q-Diffusion's uniform selection: ``linspace(T-1, 0, nums)`` as ints (floor)."""

    def sample_timesteps(self, max_timestep: int, nums: int, sample_index: int = 0) -> list[int]:
        """``numpy.linspace(max_timestep, 0, nums, dtype=int)`` (see :meth:`BaseSampler.sample_timesteps`)."""
        _check(max_timestep, nums)
        return [int(v) for v in np.linspace(max_timestep, 0, nums, dtype=int)]


class NormalSampler(BaseSampler):
    """PTQ4DM's normally distributed selection around ``mean`` (in counter units), seeded.

    Args:
        mean: Centre of the distribution in steps remaining (0 = the last, least noisy step);
            ``None`` centres it on the trajectory, ``(T - 1) / 2``.
        seed: Seed of the per-sample generators.
    """

    def __init__(self, mean: float | None = None, seed: int = 0) -> None:
        if mean is not None and (
            isinstance(mean, bool) or not isinstance(mean, (int, float)) or not np.isfinite(mean)
        ):
            raise ConfigError(
                f"NormalSampler mean must be a finite number of steps remaining or None, got {mean!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"NormalSampler seed must be an int, got {seed!r}")
        self.mean = mean
        self.seed = seed

    def sample_timesteps(self, max_timestep: int, nums: int, sample_index: int = 0) -> list[int]:
        """Draw, clamp, round and de-duplicate (see the module docstring); ascending counters."""
        _check(max_timestep, nums)
        mean = max_timestep / 2 if self.mean is None else float(self.mean)
        std = max_timestep / 2
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, int(sample_index)]).generate_state(
            2, np.uint32
        )
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        if std == 0:  # a single step: every draw is that step
            return [0]
        samples = torch.normal(mean=mean, std=std, size=(nums,), generator=g, dtype=torch.float64)
        clamped = samples.clamp(min=0, max=max_timestep)
        return sorted({int(round(v)) for v in clamped.tolist()})

    def settings(self) -> dict[str, Any]:
        """Type, mean and seed."""
        return {"type": type(self).__name__, "mean": self.mean, "seed": self.seed}


#: Q-Diffusion's name for :class:`UniformSampler`.
QDiffusionSampler = UniformSampler
#: The reference's name for :class:`NormalSampler` (PTQ4DM's normally distributed timestep calibration).
DNTCSampler = NormalSampler
