"""Affiner configs: frozen dataclasses mirroring the reference's ``config/affine/*.json`` files.

Two spellings are accepted by :meth:`AffinerConfig.from_dict` (and by ``process_affiner``):

* the reference's nested file layout::

      {"type": "blockwise",
       "config": {"max_timestep": 50, "sample_size": 256, "enable_timesteps": null,
                  "recurrent": true, "noise_target": "uncond", "enable_latent_affine": false,
                  "solver_type": "mserel",
                  "solver_config": {"blocksize": 8, "alpha": 0.5, "lambda1": 0.1, "lambda2": 0.1,
                                    "sample_mode": "interpolate", "percentile": 100,
                                    "greater": true, "scale": 1, "verbose": true}},
       "extra_args": {"controlnet_conditioning_scale": 0, "guidance_scale": 7}}

* the same keys flat (``{"type": ..., "max_timestep": ..., "solver_config": {...}, "extra_args": {...}}``).

:meth:`AffinerConfig.to_dict` writes the nested layout. Our additions (all optional): ``batch_size``
(prompts per pipeline call), ``seed`` (prompt shuffling and initial noise) and ``eps`` in the solver
configs. ``enable_latent_affine`` is accepted only as ``false`` (the reference's latent offset stored
noise instead of latents; it is not implemented). Unknown keys and bad values raise
:class:`~segquant_fx.errors.ConfigError` naming the key path, the value and what is allowed.

``type`` names the affiner and ``solver_type`` the solver; they come in fixed pairs
(``blockwise``/``mserel``, ``ptqd``/``ptqd``, ``tac``/``tac``), so giving one is enough.

Example:
    >>> from segquant_fx.affiner.config import AffinerConfig
    >>> cfg = AffinerConfig.from_dict({"type": "tac", "max_timestep": 4, "sample_size": 2})
    >>> cfg.solver_type, cfg.solver.threshold
    ('tac', 4.0)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from segquant_fx.config import FrozenDict
from segquant_fx.errors import ConfigError
from segquant_fx.stepper import NOISE_TARGETS

__all__ = [
    "AffinerConfig",
    "MSERelConfig",
    "PTQDConfig",
    "TACConfig",
    "SOLVER_CONFIGS",
    "TYPE_OF_SOLVER",
    "RESERVED_PIPELINE_ARGS",
]

#: affiner ``type`` of each ``solver_type``
TYPE_OF_SOLVER: Mapping[str, str] = FrozenDict({"mserel": "blockwise", "ptqd": "ptqd", "tac": "tac"})
_SOLVER_OF_TYPE = {v: k for k, v in TYPE_OF_SOLVER.items()}

#: pipeline call arguments that ``process_affiner`` sets itself; ``extra_args`` may not name them
RESERVED_PIPELINE_ARGS = frozenset(
    {
        "prompt",
        "num_inference_steps",
        "latents",
        "stepper",
        "output_type",
        "return_dict",
        "num_images_per_prompt",
    }
)


def _err(where: str, value: Any, problem: str, allowed: Any = None) -> ConfigError:
    msg = f"{where} = {value!r}: {problem}"
    if allowed is not None:
        msg += f" (allowed: {', '.join(repr(a) for a in allowed)})"
    return ConfigError(msg)


def _unknown(where: str, keys: set[str], allowed: tuple[str, ...]) -> ConfigError:
    key = sorted(keys)[0]
    hint = difflib.get_close_matches(key, allowed, n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(
        f"{where}: unknown key {key!r}{did} (allowed keys: {', '.join(allowed)})"
        + (f"; other unknown keys: {sorted(keys - {key})}" if len(keys) > 1 else "")
    )


def _bool(where: str, v: Any) -> None:
    if type(v) is not bool:
        raise _err(where, v, "expected a bool", (True, False))


def _num(
    where: str, v: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _err(where, v, "expected a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _err(where, v, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise _err(where, v, f"must be <= {hi}")


def _int(where: str, v: Any, *, lo: int) -> None:
    if type(v) is not int:
        raise _err(where, v, "expected an int")
    if v < lo:
        raise _err(where, v, f"must be >= {lo}")


class _SolverConfig:
    """Shared ``from_dict``/``to_dict`` of the solver configs."""

    solver: ClassVar[str]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "solver_config") -> Any:
        """Build from a dict (``None`` = defaults); unknown keys raise ConfigError."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise _err(where, data, "expected a dict of solver options or null")
        allowed = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        unknown = set(data) - set(allowed)
        if unknown:
            raise _unknown(f"{where} ({cls.solver})", unknown, allowed)
        kwargs = dict(data)
        # JSON has no float/int distinction: 100 means 100.0 for float fields
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in kwargs and f.type == "float" and type(kwargs[f.name]) is int:
                kwargs[f.name] = float(kwargs[f.name])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True, kw_only=True)
class MSERelConfig(_SolverConfig):
    """Options of the ``mserel`` solver (SegQuant's blockwise affine correction, spec §5.1).

    Attributes:
        blocksize: Spatial granularity: one ``(K, b)`` per ``blocksize x blocksize`` block (``block``
            mode) or per element of the latent downsampled by ``blocksize`` (``interpolate`` mode).
        alpha: Mix of absolute and relative squared error: the weight of an element is
            ``alpha + (1 - alpha) / (e**2 + eps)`` (``e`` = float prediction). Default 1.0 (plain
            squared error); the reference's files use 0.5, which was the worst mserel setting in
            every measurement here and raised the held-out per-step MSE on SD3 and FLUX
            (benchmarks/RESULTS.md, "Affiner (CPU)").
        lambda1: Regulariser pulling ``K`` towards 1.
        lambda2: Regulariser pulling ``b`` towards 0.
        sample_mode: ``"interpolate"`` (bilinear down/up-sampling) or ``"block"`` (per block).
        percentile: Share (in %) of the elements of each sample that are corrected, chosen by
            ``|prediction|``; 100 corrects all.
        greater: Correct the largest-magnitude ``percentile`` % (True) or the smallest (False).
        scale: Blend ``(1 - scale) * pred + scale * corrected``.
        eps: Floor of ``e**2`` in the relative weight (keeps near-zero targets from dominating).
        verbose: Log a per-step summary of the fit.
    """

    solver: ClassVar[str] = "mserel"
    blocksize: int = 8
    alpha: float = 1.0
    lambda1: float = 0.1
    lambda2: float = 0.1
    sample_mode: str = "interpolate"
    percentile: float = 100.0
    greater: bool = True
    scale: float = 1.0
    eps: float = 1e-3
    verbose: bool = True

    def __post_init__(self) -> None:
        w = "solver_config"
        _int(f"{w}.blocksize", self.blocksize, lo=1)
        _num(f"{w}.alpha", self.alpha, lo=0.0, hi=1.0)
        _num(f"{w}.lambda1", self.lambda1, lo=0.0)
        _num(f"{w}.lambda2", self.lambda2, lo=0.0)
        if self.sample_mode not in ("interpolate", "block"):
            raise _err(f"{w}.sample_mode", self.sample_mode, "unknown mode", ("interpolate", "block"))
        _num(f"{w}.percentile", self.percentile, lo=0.0, hi=100.0)
        _bool(f"{w}.greater", self.greater)
        _num(f"{w}.scale", self.scale)
        _num(f"{w}.eps", self.eps, lo=0.0, lo_open=True)
        _bool(f"{w}.verbose", self.verbose)


@dataclass(frozen=True, kw_only=True)
class PTQDConfig(_SolverConfig):
    """Options of the ``ptqd`` solver (PTQD's noise decomposition, He et al. 2023).

    Attributes:
        variance_mode: How the uncorrelated residual's variance is handled. ``"shrink"`` (default):
            absorbed into the estimate by a per-channel linear-MMSE shrinkage, the deterministic-
            sampler counterpart of PTQD's variance-schedule calibration (see
            :mod:`segquant_fx.affiner.solvers`); ``"none"``: PTQD's correlated-noise and bias
            correction only (what the reference implements).
        verbose: Log a per-step summary of the fit.
    """

    solver: ClassVar[str] = "ptqd"
    variance_mode: str = "shrink"
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.variance_mode not in ("shrink", "none"):
            raise _err("solver_config.variance_mode", self.variance_mode, "unknown mode", ("shrink", "none"))
        _bool("solver_config.verbose", self.verbose)


@dataclass(frozen=True, kw_only=True)
class TACConfig(_SolverConfig):
    """Options of the ``tac`` solver (TAC-Diffusion's timestep-aware noise-estimate correction).

    Attributes:
        lambda1: Weight of the relative error against the absolute error (``0..1``).
        lambda2: Regulariser pulling the per-channel scale towards 1.
        threshold: Only elements with ``|pred| > threshold * mean(|pred|)`` (per sample and
            channel) are fitted and corrected; 0 corrects all.
        eps: Floor of ``e**2`` in the relative error.
        verbose: Log a per-step summary of the fit.
    """

    solver: ClassVar[str] = "tac"
    lambda1: float = 0.8
    lambda2: float = 0.1
    threshold: float = 4.0
    eps: float = 1e-3
    verbose: bool = True

    def __post_init__(self) -> None:
        w = "solver_config"
        _num(f"{w}.lambda1", self.lambda1, lo=0.0, hi=1.0)
        _num(f"{w}.lambda2", self.lambda2, lo=0.0)
        _num(f"{w}.threshold", self.threshold, lo=0.0)
        _num(f"{w}.eps", self.eps, lo=0.0, lo_open=True)
        _bool(f"{w}.verbose", self.verbose)


#: solver_type -> its config class
SOLVER_CONFIGS: Mapping[str, type] = FrozenDict(
    {"mserel": MSERelConfig, "ptqd": PTQDConfig, "tac": TACConfig}
)

_TOP_KEYS = ("type", "config", "extra_args")
_INNER_KEYS = (
    "max_timestep",
    "sample_size",
    "enable_timesteps",
    "recurrent",
    "noise_target",
    "enable_latent_affine",
    "solver_type",
    "solver_config",
    "batch_size",
    "seed",
)


@dataclass(frozen=True, kw_only=True)
class AffinerConfig:
    """What ``process_affiner`` learns and how (spec §5.4 plus ``batch_size`` and ``seed``).

    Attributes:
        type: ``"blockwise"``, ``"ptqd"`` or ``"tac"``; derived from ``solver_type`` when None.
        max_timestep: Number of denoising steps of the calibration runs (and of the runs the
            affiner corrects).
        sample_size: Number of calibration prompts taken from the dataset.
        enable_timesteps: Step indices (0 = noisiest) that are learned and corrected; None = all.
        recurrent: True: learn on the trajectory of the corrected quantized model (each step is
            fitted, then the correction is applied before the trajectory moves on); False: learn
            on the float model's trajectory (teacher forcing). See :mod:`segquant_fx.affiner`.
        noise_target: Which prediction is corrected: ``"all"`` (after CFG), ``"uncond"`` or ``"text"``.
        solver_type: ``"mserel"``, ``"ptqd"`` or ``"tac"``; derived from ``type`` when None.
        solver_config: The solver's options; None = its defaults (see :attr:`solver`).
        extra_args: Extra keyword arguments of the pipeline calls (``guidance_scale``, ``height``, ...).
        batch_size: Prompts per pipeline call.
        seed: Seed of prompt shuffling and of the initial noise.
        enable_latent_affine: Accepted for reference files; must be False.
    """

    type: str | None = None
    max_timestep: int = 50
    sample_size: int = 32
    enable_timesteps: tuple[int, ...] | None = None
    recurrent: bool = True
    noise_target: str = "all"
    solver_type: str | None = None
    solver_config: MSERelConfig | PTQDConfig | TACConfig | None = None
    extra_args: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
    batch_size: int = 4
    seed: int = 0
    enable_latent_affine: bool = False

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in _SOLVER_OF_TYPE:
            raise _err("type", self.type, "unknown affiner type", tuple(_SOLVER_OF_TYPE))
        if self.solver_type is not None and self.solver_type not in TYPE_OF_SOLVER:
            raise _err("config.solver_type", self.solver_type, "unknown solver", tuple(TYPE_OF_SOLVER))
        if (
            self.type is not None
            and self.solver_type is not None
            and TYPE_OF_SOLVER[self.solver_type] != self.type
        ):
            raise ConfigError(
                f"type = {self.type!r} does not go with solver_type = {self.solver_type!r}: "
                f"use type {TYPE_OF_SOLVER[self.solver_type]!r} with solver {self.solver_type!r} "
                "(or give only one of them)"
            )
        _int("config.max_timestep", self.max_timestep, lo=1)
        _int("config.sample_size", self.sample_size, lo=1)
        _int("config.batch_size", self.batch_size, lo=1)
        _int("config.seed", self.seed, lo=0)
        if self.enable_timesteps is not None:
            if not isinstance(self.enable_timesteps, tuple) or not self.enable_timesteps:
                raise _err(
                    "config.enable_timesteps",
                    self.enable_timesteps,
                    "expected a non-empty tuple of step indices or None (from_dict accepts lists)",
                )
            for s in self.enable_timesteps:
                if type(s) is not int or not 0 <= s < self.max_timestep:
                    raise _err(
                        "config.enable_timesteps",
                        self.enable_timesteps,
                        f"step {s!r} is not an int in [0, max_timestep={self.max_timestep})",
                    )
            if len(set(self.enable_timesteps)) != len(self.enable_timesteps):
                raise _err("config.enable_timesteps", self.enable_timesteps, "steps repeat")
        _bool("config.recurrent", self.recurrent)
        if self.noise_target not in NOISE_TARGETS:
            raise _err("config.noise_target", self.noise_target, "unknown target", NOISE_TARGETS)
        _bool("config.enable_latent_affine", self.enable_latent_affine)
        if self.enable_latent_affine:
            raise _err(
                "config.enable_latent_affine",
                True,
                "the latent offset is not implemented (the reference's stored noise instead of latents); "
                "set it to false",
            )
        if self.solver_config is not None:
            expected = SOLVER_CONFIGS[self.resolved_solver_type]
            if not isinstance(self.solver_config, expected):
                raise _err(
                    "config.solver_config",
                    self.solver_config,
                    f"solver {self.resolved_solver_type!r} needs a {expected.__name__}",
                )
        if not isinstance(self.extra_args, Mapping):
            raise _err("extra_args", self.extra_args, "expected a dict of pipeline keyword arguments")
        for key in self.extra_args:
            if not isinstance(key, str):
                raise _err("extra_args", key, "keys must be strings")
            if key in RESERVED_PIPELINE_ARGS:
                raise _err(
                    f"extra_args.{key}",
                    self.extra_args[key],
                    "process_affiner sets this pipeline argument itself "
                    f"(reserved: {', '.join(sorted(RESERVED_PIPELINE_ARGS))})",
                )

    # ------------------------------------------------------------------ derived views

    @property
    def resolved_solver_type(self) -> str:
        """The solver (``solver_type``, else the one of ``type``, else ``"mserel"``)."""
        if self.solver_type is not None:
            return self.solver_type
        if self.type is not None:
            return _SOLVER_OF_TYPE[self.type]
        return "mserel"

    @property
    def resolved_type(self) -> str:
        """The affiner type that goes with :attr:`resolved_solver_type`."""
        return TYPE_OF_SOLVER[self.resolved_solver_type]

    @property
    def solver(self) -> Any:
        """The solver config (defaults filled in)."""
        if self.solver_config is not None:
            return self.solver_config
        return SOLVER_CONFIGS[self.resolved_solver_type]()

    def enabled(self, step: int) -> bool:
        """Whether step ``step`` is learned and corrected."""
        return self.enable_timesteps is None or step in self.enable_timesteps

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AffinerConfig:
        """Build from the nested reference layout or the flat one (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise _err("config", data, "expected a dict (or an AffinerConfig / JSON file path)")
        data = dict(data)
        if "config" in data:
            unknown = set(data) - set(_TOP_KEYS)
            if unknown:
                raise _unknown("affiner config (nested layout)", unknown, _TOP_KEYS)
            inner = data["config"]
            if not isinstance(inner, Mapping):
                raise _err("config", inner, "expected a dict")
            unknown = set(inner) - set(_INNER_KEYS)
            if unknown:
                raise _unknown("config", unknown, _INNER_KEYS)
            flat = {**inner, **{k: data[k] for k in ("type", "extra_args") if k in data}}
        else:
            allowed = ("type", "extra_args", *_INNER_KEYS)
            unknown = set(data) - set(allowed)
            if unknown:
                raise _unknown("affiner config", unknown, allowed)
            flat = data
        kwargs: dict[str, Any] = {k: v for k, v in flat.items() if k not in ("solver_config", "extra_args")}
        if isinstance(kwargs.get("enable_timesteps"), list):
            kwargs["enable_timesteps"] = tuple(kwargs["enable_timesteps"])
        extra = flat.get("extra_args")
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise _err("extra_args", extra, "expected a dict of pipeline keyword arguments")
        kwargs["extra_args"] = FrozenDict(extra)
        # validate type/solver_type first so that solver_config errors name the right solver
        probe = cls(**{k: kwargs[k] for k in ("type", "solver_type") if k in kwargs})
        solver_cls = SOLVER_CONFIGS[probe.resolved_solver_type]
        kwargs["solver_config"] = solver_cls.from_dict(flat.get("solver_config"))
        return cls(**kwargs).normalized()

    def normalized(self) -> AffinerConfig:
        """The same config with ``type``, ``solver_type`` and ``solver_config`` filled in."""
        return dataclasses.replace(
            self, type=self.resolved_type, solver_type=self.resolved_solver_type, solver_config=self.solver
        )

    def to_dict(self) -> dict[str, Any]:
        """The nested reference layout, every value filled in (JSON-serialisable)."""
        extra = self.extra_args.thaw() if isinstance(self.extra_args, FrozenDict) else dict(self.extra_args)
        return {
            "type": self.resolved_type,
            "config": {
                "max_timestep": self.max_timestep,
                "sample_size": self.sample_size,
                "enable_timesteps": list(self.enable_timesteps)
                if self.enable_timesteps is not None
                else None,
                "recurrent": self.recurrent,
                "noise_target": self.noise_target,
                "enable_latent_affine": False,
                "solver_type": self.resolved_solver_type,
                "solver_config": self.solver.to_dict(),
                "batch_size": self.batch_size,
                "seed": self.seed,
            },
            "extra_args": extra,
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> AffinerConfig:
        """Read a JSON file in either layout."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"affiner config file {str(p)!r} does not exist")
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"affiner config {str(p)!r} could not be parsed as JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def coerce(
        cls, config: AffinerConfig | Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> AffinerConfig:
        """Normalise what ``process_affiner`` accepts: a config, a dict, a JSON path, or None (defaults)."""
        if config is None:
            return cls().normalized()
        if isinstance(config, AffinerConfig):
            return config.normalized()
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, str | os.PathLike):
            return cls.from_json(config)
        raise ConfigError(
            f"config = {config!r}: expected an AffinerConfig, a dict or the path of a JSON file, "
            f"not {type(config).__name__}"
        )
