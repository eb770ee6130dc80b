"""The learned affiner: per-step corrections packaged as a :class:`~segquant_fx.stepper.Stepper`.

An :class:`Affiner` holds one solution per learned denoising step (a dict of tensors, see
:mod:`segquant_fx.affiner.solvers`) and the :class:`~segquant_fx.affiner.config.AffinerConfig` it was
learned with. A pipeline calls :meth:`Affiner.correct` at every step on the prediction named by
:attr:`Affiner.noise_target`; steps outside ``enable_timesteps`` pass through unchanged. Packed FLUX
predictions are unpacked to ``[B, C, H, W]``, corrected in float32 and packed again, so one affiner
format serves every family.

Third-party corrections plug in through :class:`ThirdPartyAffiner`, a two-method protocol::

    class MyAffiner:
        def fit_step(self, info, quant, real):   # called for every calibration batch and step
            ...                                   # quant/real: [B, C, H, W] float32, same inputs
        def apply_step(self, info, quant):        # called at generation time, [B, C, H, W] float32
            return corrected                      # same shape
        # optional, to save and load it: state_dict() -> {name: Tensor}, load_state_dict(dict)

``process_affiner(..., thirdparty_affiner=MyAffiner())`` drives it with the same trajectories as the
built-in solvers (``fit_step`` for every enabled step, in step order within each batch; in recurrent
mode ``apply_step`` right after ``fit_step`` advances the trajectory) and wraps it in an
:class:`Affiner`, which handles layouts, dtypes, ``enable_timesteps`` and saving.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from segquant_fx.affiner.config import AffinerConfig
from segquant_fx.affiner.layout import from_bchw, to_bchw
from segquant_fx.affiner.solvers import SOLVERS, blend
from segquant_fx.errors import ConfigError
from segquant_fx.stepper import StepInfo

__all__ = ["Affiner", "ThirdPartyAffiner", "apply_solution", "check_thirdparty"]


@runtime_checkable
class ThirdPartyAffiner(Protocol):
    """A user-supplied correction learned by ``process_affiner`` (see the module docstring)."""

    def fit_step(self, info: StepInfo, quant: torch.Tensor, real: torch.Tensor) -> None:
        """Learn from float32 ``[B, C, H, W]`` predictions of the quantized and float model on the same inputs."""
        ...

    def apply_step(self, info: StepInfo, quant: torch.Tensor) -> torch.Tensor:
        """Return the corrected float32 ``[B, C, H, W]`` prediction."""
        ...


def check_thirdparty(obj: Any) -> None:
    """Raise ConfigError unless ``obj`` implements :class:`ThirdPartyAffiner`."""
    missing = [m for m in ("fit_step", "apply_step") if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(
            f"thirdparty_affiner {type(obj).__name__} lacks {', '.join(missing)}: a third-party affiner needs "
            "fit_step(info, quant, real) and apply_step(info, quant) (see segquant_fx.affiner.ThirdPartyAffiner)"
        )


def apply_solution(
    config: AffinerConfig, solution: Mapping[str, torch.Tensor], quant: torch.Tensor
) -> torch.Tensor:
    """Apply one step's built-in solution to a ``[B, C, H, W]`` float prediction, blending included."""
    cfg = config.solver
    corrected = SOLVERS[config.resolved_solver_type].apply(solution, quant, cfg)
    if config.resolved_solver_type == "mserel":
        corrected = blend(quant, corrected, percentile=cfg.percentile, greater=cfg.greater, scale=cfg.scale)
    return corrected


class Affiner:
    """Per-step noise-prediction corrections; a :class:`~segquant_fx.stepper.Stepper`.

    Args:
        config: The config the corrections were learned with (defines steps, target and solver).
        solutions: Step index -> solution tensors of the config's solver (built-in solvers).
        thirdparty: A :class:`ThirdPartyAffiner` used instead of built-in solutions.
        meta: JSON-serialisable facts about the calibration (saved alongside).

    Example::

        affiner = segquant_fx.process_affiner(cfg, prompts, pipe, qtransformer)
        images = pipe("a cat", stepper=affiner).images
        affiner.save("affiner/"); affiner = segquant_fx.load_affiner("affiner/")
    """

    def __init__(
        self,
        config: AffinerConfig,
        solutions: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        *,
        thirdparty: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, AffinerConfig):
            raise ConfigError(f"config must be an AffinerConfig, got {type(config).__name__}")
        if thirdparty is not None:
            check_thirdparty(thirdparty)
            if solutions:
                raise ConfigError(
                    "an affiner holds either built-in solutions or a third-party affiner, not both"
                )
        self.config = config
        self.thirdparty = thirdparty
        self.meta: dict[str, Any] = dict(meta or {})
        self._solutions: dict[int, dict[str, torch.Tensor]] = {}
        solver_cls = SOLVERS[config.resolved_solver_type]
        for step, sol in (solutions or {}).items():
            if type(step) is not int or not 0 <= step < config.max_timestep:
                raise ConfigError(f"solution step {step!r} is not in [0, max_timestep={config.max_timestep})")
            if not config.enabled(step):
                raise ConfigError(f"solution for step {step} but enable_timesteps={config.enable_timesteps}")
            sol = {k: v.detach().float().cpu() for k, v in sol.items()}
            solver_cls.check_solution(sol, f"step {step}")
            self._solutions[step] = sol
        self._cache: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ Stepper

    @property
    def noise_target(self) -> str:
        """Which prediction the pipeline hands to :meth:`correct` (``config.noise_target``)."""
        return self.config.noise_target

    @property
    def solver_type(self) -> str:
        """``"mserel"``, ``"ptqd"``, ``"tac"`` or ``"thirdparty"``."""
        return "thirdparty" if self.thirdparty is not None else self.config.resolved_solver_type

    @property
    def steps(self) -> tuple[int, ...]:
        """Steps with a built-in solution (every enabled step for a third-party affiner)."""
        if self.thirdparty is not None:
            return tuple(s for s in range(self.config.max_timestep) if self.config.enabled(s))
        return tuple(sorted(self._solutions))

    def solution(self, step: int) -> dict[str, torch.Tensor]:
        """The solution tensors of ``step`` (CPU float32 copies)."""
        if step not in self._solutions:
            raise KeyError(f"no solution for step {step}; learned steps: {list(self.steps)}")
        return {k: v.clone() for k, v in self._solutions[step].items()}

    def _check_info(self, info: StepInfo) -> None:
        if info.num_inference_steps != self.config.max_timestep:
            raise ConfigError(
                f"this affiner was learned for max_timestep={self.config.max_timestep} denoising steps, the "
                f"pipeline runs num_inference_steps={info.num_inference_steps}; call the pipeline with "
                f"num_inference_steps={self.config.max_timestep} or learn an affiner for that many steps"
            )
        if info.branch != self.noise_target:
            raise ConfigError(
                f"the pipeline passed the {info.branch!r} prediction to an affiner learned on noise_target="
                f"{self.noise_target!r}; the pipeline must honour stepper.noise_target"
            )

    def correct_bchw(self, info: StepInfo, quant: torch.Tensor) -> torch.Tensor:
        """Correct a ``[B, C, H, W]`` float prediction for step ``info.step_index`` (no checks of ``info``)."""
        step = info.step_index
        if not self.config.enabled(step):
            return quant
        if self.thirdparty is not None:
            out = self.thirdparty.apply_step(info, quant)
            if not isinstance(out, torch.Tensor) or out.shape != quant.shape:
                raise ConfigError(
                    f"thirdparty_affiner.apply_step returned {type(out).__name__} "
                    f"{tuple(getattr(out, 'shape', ()))}, expected a tensor of shape {tuple(quant.shape)}"
                )
            return out.to(quant.dtype)
        sol = self._solutions.get(step)
        if sol is None:
            return quant
        key = (step, quant.device)
        dev = self._cache.get(key)
        if dev is None:
            dev = {k: v.to(quant.device) for k, v in sol.items()}
            self._cache[key] = dev
        return apply_solution(self.config, dev, quant)

    def correct(self, info: StepInfo, noise_pred: torch.Tensor) -> torch.Tensor:
        """The corrected prediction (same shape, dtype and device as ``noise_pred``)."""
        self._check_info(info)
        if not self.config.enabled(info.step_index):
            return noise_pred
        if self.thirdparty is None and info.step_index not in self._solutions:
            return noise_pred
        x = to_bchw(noise_pred, info).float()
        y = self.correct_bchw(info, x)
        return from_bchw(y, info).to(noise_pred.dtype)

    # ------------------------------------------------------------------ PTQD extras

    def residual_variance(self, step: int) -> torch.Tensor:
        """Per-channel variance of the uncorrelated noise left after PTQD's correction at ``step``.

        For stochastic samplers: pass it to
        :func:`~segquant_fx.affiner.solvers.variance_schedule_calibration` (PTQD's schedule calibration).
        """
        if self.config.resolved_solver_type != "ptqd" or self.thirdparty is not None:
            raise ConfigError(f"residual_variance needs a ptqd affiner, this one is {self.solver_type!r}")
        return self.solution(step)["residual_var"]

    # ------------------------------------------------------------------ persistence

    def save(self, path: Any) -> Any:
        """Save to directory ``path`` (JSON + safetensors, atomic); returns the path."""
        from segquant_fx.affiner.io import save_affiner

        return save_affiner(self, path)

    @classmethod
    def load(cls, path: Any, *, thirdparty: Any = None) -> Affiner:
        """Load a save of :meth:`save` (see :func:`segquant_fx.affiner.load_affiner`)."""
        from segquant_fx.affiner.io import load_affiner

        return load_affiner(path, thirdparty=thirdparty)

    def __repr__(self) -> str:
        steps = self.steps
        shown = f"{len(steps)} steps" if len(steps) > 6 else f"steps={list(steps)}"
        return (
            f"Affiner(solver={self.solver_type!r}, noise_target={self.noise_target!r}, "
            f"max_timestep={self.config.max_timestep}, {shown})"
        )
