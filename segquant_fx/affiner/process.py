"""``process_affiner``: learn per-step corrections by running the pipeline; ``evaluate_affiner``: measure them.

Calibration runs the float pipeline ``model_real`` over ``sample_size`` prompts with the quantized
backbone paired to its backbone (:mod:`segquant_fx.affiner.trajectory`): every denoising step yields
the float and the quantized prediction on the same input. Two trajectory modes:

``recurrent=True`` (default, as the reference)
    The quantized backbone drives the run and each step is corrected with the solution fitted so far,
    so step ``i`` is learned on the latents the *corrected quantized* model actually reaches at step
    ``i`` at generation time, with the float backbone's prediction on those same latents as the
    target. All prompts of a pipeline call (``batch_size``) are fitted before their correction is
    applied; later calls also use the statistics of earlier ones. With ``batch_size >= sample_size``
    this is exactly "fit step ``i`` on all prompts, correct, advance"; smaller batches are a streaming
    approximation of it (the final solution of every step still uses every prompt).
``recurrent=False`` (teacher forcing)
    The float backbone drives the run: step ``i`` is learned on the float model's trajectory. Cheaper
    to reason about and independent of the batching, but it does not see the quantized model's drift.

In both modes the final solution of step ``i`` minimises its objective over all prompts' pairs of step
``i``. The pipeline must be one of the adapter pipelines (:mod:`segquant_fx.models.pipelines`) or any
pipeline whose ``__call__`` takes ``stepper=`` and calls it once per step with the prediction named by
``stepper.noise_target``, with the backbone called once per step (CFG batched as ``[uncond, text]``)
or, for FLUX true CFG, twice (see :mod:`segquant_fx.affiner.trajectory`).

Cost: every step of every calibration prompt runs the float and the quantized backbone once each
(plus the pipeline's text encoders once per call); nothing but per-step sufficient statistics is kept,
so memory does not grow with ``sample_size``.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from segquant_fx.affiner.affiner import Affiner, apply_solution, check_thirdparty
from segquant_fx.affiner.config import AffinerConfig
from segquant_fx.affiner.layout import from_bchw, to_bchw
from segquant_fx.affiner.solvers import SOLVERS, Solver
from segquant_fx.affiner.trajectory import BackboneRecorder, PairedStepper
from segquant_fx.config import FrozenDict
from segquant_fx.errors import CalibrationError, ConfigError
from segquant_fx.stepper import StepInfo

__all__ = ["process_affiner", "evaluate_affiner", "AffinerEvaluation", "denoiser_of"]

logger = logging.getLogger("segquant_fx.affiner")

_LAYER_ALIASES = {"transformer": "transformer", "dit": "transformer", "unet": "unet"}


# ----------------------------------------------------------------------------------- model lookup


def denoiser_of(pipe: Any, calib_layer: str | None = None) -> tuple[str, nn.Module]:
    """``(attribute, module)`` of a pipeline's denoising backbone (``transformer`` or ``unet``)."""
    if calib_layer is not None:
        if calib_layer == "controlnet":
            raise ConfigError(
                "calib_layer='controlnet': the affiner corrects the noise prediction of the denoising backbone; "
                "learning it for a quantized ControlNet is not supported (quantize the transformer/unet, or "
                "use the quantized ControlNet without an affiner)"
            )
        if calib_layer not in _LAYER_ALIASES:
            raise ConfigError(f"calib_layer = {calib_layer!r}: expected one of {sorted(_LAYER_ALIASES)}")
        names: tuple[str, ...] = (_LAYER_ALIASES[calib_layer],)
    else:
        names = ("transformer", "unet")
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ConfigError(
        f"model_real ({type(pipe).__name__}) has no {' or '.join(names)} backbone; pass a diffusion pipeline "
        "(an adapter from segquant_fx.models.pipelines)"
    )


def _quant_backbone(model_quant: Any, attr: str, real: nn.Module) -> nn.Module:
    if isinstance(model_quant, nn.Module) and not hasattr(model_quant, "scheduler"):
        module = model_quant
    else:
        module = getattr(model_quant, attr, None)
        if not callable(module):
            raise ConfigError(
                f"model_quant ({type(model_quant).__name__}) is neither a backbone module nor a pipeline with a "
                f"{attr!r}; pass the quantized {attr} (e.g. a QuantizedModel) or a pipeline holding it"
            )
    if module is real:
        raise ConfigError(
            f"model_quant's {attr} is the float model's own {attr}; pass the quantized backbone (or a pipeline "
            "holding it) and keep the float pipeline as model_real"
        )
    return module


def _check_pipeline(pipe: Any) -> bool:
    """Raise unless ``pipe`` takes ``stepper=``; return whether it takes ``control_image=``."""
    try:
        params = inspect.signature(pipe).parameters if callable(pipe) else {}
    except (TypeError, ValueError):
        params = {}
    if "stepper" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"model_real ({type(pipe).__name__}) does not accept stepper=; use an adapter pipeline from "
            "segquant_fx.models.pipelines (or any pipeline implementing segquant_fx.stepper)"
        )
    return "control_image" in params


# ---------------------------------------------------------------------------------------- prompts


def _item(item: Any, index: int, accepts_control: bool = True) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping):
        if not isinstance(item.get("prompt"), str):
            raise ConfigError(f"dataset item {index} is a dict without a str 'prompt': {sorted(item)}")
        return item["prompt"], {k: v for k, v in item.items() if k != "prompt"}
    if isinstance(item, tuple | list) and item and isinstance(item[0], str):
        extra = {}
        # (prompt, image, control) as CaptionControlDataset; the control map only for ControlNet pipelines
        if accepts_control and len(item) >= 3 and item[2] is not None:
            extra["control_image"] = item[2]
        return item[0], extra
    raise ConfigError(
        f"dataset item {index} ({type(item).__name__}) is not a prompt: items must be a str, a "
        "(prompt, image, control) tuple or a dict with 'prompt'"
    )


def _select(
    dataset: Any, n: int, shuffle: bool, seed: int, accepts_control: bool = True
) -> list[tuple[int, str, dict[str, Any]]]:
    if isinstance(dataset, str):
        raise ConfigError("dataset is a single str; pass a list of prompts")
    if isinstance(dataset, Sequence) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        size = len(dataset)
        get = dataset.__getitem__
    elif isinstance(dataset, Iterable):
        items = list(dataset)
        size, get = len(items), items.__getitem__
    else:
        raise ConfigError(
            f"dataset of type {type(dataset).__name__} is neither a sequence nor an iterable of prompts"
        )
    if size == 0:
        raise ConfigError("the dataset is empty; process_affiner needs prompts")
    order = (
        torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        if shuffle
        else range(size)
    )
    picked = list(order)[: min(n, size)]
    items = [(i, *_item(get(i), i, accepts_control)) for i in picked]
    if size < n:
        warnings.warn(
            f"sample_size={n} but the dataset has {size} items; using all of them", UserWarning, stacklevel=3
        )
    return items


def _groups(items: list[tuple[int, str, dict[str, Any]]], batch_size: int) -> list[list[int]]:
    """Positions in ``items`` per pipeline call; items with their own call arguments run alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    for pos, (_, _, extra) in enumerate(items):
        if extra:
            groups.append([pos])
            continue
        current.append(pos)
        if len(current) == batch_size:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _latents_for(latents: torch.Tensor | None, group: list[int], total: int) -> torch.Tensor | None:
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor):
        raise ConfigError(f"latents must be a tensor or None, got {type(latents).__name__}")
    if latents.shape[0] == 1:
        return latents.expand(len(group), *latents.shape[1:]).contiguous()
    if latents.shape[0] == total:
        return latents[group]
    raise ConfigError(
        f"latents has batch size {latents.shape[0]}; expected 1 (shared by every prompt) or {total} (one per prompt)"
    )


def _call_kwargs(
    cfg: AffinerConfig,
    extra_args: Mapping[str, Any],
    items: list[tuple[int, str, dict[str, Any]]],
    group: list[int],
    latents: torch.Tensor | None,
    stepper: Any,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        **extra_args,
        **items[group[0]][2],
        "prompt": [items[p][1] for p in group],
        "num_inference_steps": cfg.max_timestep,
        "output_type": "latent",
    }
    if stepper is not None:
        kwargs["stepper"] = stepper
    lat = _latents_for(latents, group, len(items))
    if lat is not None:
        kwargs["latents"] = lat
    elif "generator" not in kwargs:
        # one generator per prompt: a prompt's initial noise does not depend on how prompts are batched
        kwargs["generator"] = [
            torch.Generator().manual_seed(cfg.seed * 1_000_003 + items[p][0]) for p in group
        ]
    return kwargs


def _thaw(extra: Mapping[str, Any]) -> dict[str, Any]:
    return extra.thaw() if isinstance(extra, FrozenDict) else dict(extra)


def _run(pipe: Any, kwargs: Mapping[str, Any]) -> Any:
    with torch.no_grad():
        return pipe(**kwargs)


def _final_latents(out: Any) -> torch.Tensor:
    for value in (getattr(out, "images", None), out[0] if isinstance(out, tuple | list) else None, out):
        if isinstance(value, torch.Tensor):
            return value
    raise CalibrationError(f"cannot find the latents in the pipeline output {type(out).__name__}")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


# ------------------------------------------------------------------------------------ calibration


class _Learner:
    """The ``on_step`` callback of a calibration run: feeds solvers, corrects in recurrent mode."""

    def __init__(self, cfg: AffinerConfig, thirdparty: Any) -> None:
        self.cfg = cfg
        self.thirdparty = thirdparty
        self.solvers: dict[int, Solver] = {}
        self.mse_quant: dict[int, list[float]] = {}
        self.mse_online: dict[int, list[float]] = {}
        self.facts: dict[str, Any] = {}

    def _remember(self, info: StepInfo, bchw: torch.Tensor) -> None:
        facts = {
            "family": info.family,
            "latent_layout": info.latent_layout,
            "channels": int(bchw.shape[1]),
            "latent_hw": [int(bchw.shape[2]), int(bchw.shape[3])],
            "do_cfg": bool(info.do_cfg),
            "guidance_scale": float(info.guidance_scale),
        }
        if not self.facts:
            self.facts = facts
        elif facts["channels"] != self.facts["channels"]:
            raise CalibrationError(
                f"latent channels changed from {self.facts['channels']} to {facts['channels']}"
            )

    def __call__(self, info: StepInfo, quant: torch.Tensor, real: torch.Tensor) -> torch.Tensor | None:
        cfg = self.cfg
        if info.num_inference_steps != cfg.max_timestep:
            raise CalibrationError(
                f"the pipeline runs {info.num_inference_steps} steps, config.max_timestep is {cfg.max_timestep}"
            )
        step = info.step_index
        q = to_bchw(quant, info).float()
        r = to_bchw(real, info).float()
        self._remember(info, q)
        b = q.shape[0]
        self.mse_quant.setdefault(step, [0.0, 0])
        self.mse_quant[step][0] += _mse(q, r) * b
        self.mse_quant[step][1] += b
        if not cfg.enabled(step):
            return None
        if self.thirdparty is not None:
            self.thirdparty.fit_step(info, q, r)
        else:
            if step not in self.solvers:
                self.solvers[step] = SOLVERS[cfg.resolved_solver_type](cfg.solver)
            self.solvers[step].update(q, r)
        if not cfg.recurrent:
            return None
        if self.thirdparty is not None:
            corrected = self.thirdparty.apply_step(info, q)
        else:
            corrected = apply_solution(cfg, self.solvers[step].solve(), q)
        self.mse_online.setdefault(step, [0.0, 0])
        self.mse_online[step][0] += _mse(corrected, r) * b
        self.mse_online[step][1] += b
        return from_bchw(corrected, info).to(quant.dtype)


def _per_step(acc: Mapping[int, list[float]]) -> dict[str, float]:
    return {str(s): v[0] / v[1] for s, v in sorted(acc.items()) if v[1]}


def process_affiner(
    config: AffinerConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
    dataset: Any,
    model_real: Any,
    model_quant: Any,
    latents: torch.Tensor | None = None,
    shuffle: bool = True,
    thirdparty_affiner: Any = None,
    *,
    calib_layer: str | None = None,
    dump_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Affiner:
    """Learn per-step corrections of a quantized backbone's noise prediction.

    Args:
        config: An :class:`~segquant_fx.affiner.config.AffinerConfig`, a dict (reference layout or
            flat), the path of a JSON file, or None for the defaults.
        dataset: Prompts: a sequence (or iterable) of str, ``(prompt, image, control)`` tuples or
            dicts with ``"prompt"`` (other keys become pipeline arguments, e.g. ``control_image``).
        model_real: The float pipeline (an adapter pipeline accepting ``stepper=``).
        model_quant: The quantized backbone (e.g. a ``QuantizedModel``), or a pipeline holding it.
        latents: Initial latents in the pipeline's layout, batch 1 (shared) or ``sample_size``;
            None draws seeded noise per prompt (``config.seed``).
        shuffle: Draw the ``sample_size`` prompts at random (seeded) instead of taking the first ones.
        thirdparty_affiner: A :class:`~segquant_fx.affiner.ThirdPartyAffiner` to learn instead of
            the config's solver.
        calib_layer: ``"transformer"`` (alias ``"dit"``) or ``"unet"``; default: whichever the pipeline has.
        dump_path: Save the result there (see :func:`~segquant_fx.affiner.load_affiner`).
        progress: Show a progress bar.

    Returns:
        The learned :class:`~segquant_fx.affiner.Affiner`; pass it as ``pipe(..., stepper=affiner)``
        with the quantized backbone in the pipeline.

    Example::

        cfg = {"type": "blockwise", "max_timestep": 28, "sample_size": 32, "noise_target": "all",
               "extra_args": {"guidance_scale": 7.0}}
        affiner = segquant_fx.process_affiner(cfg, prompts, pipe, qtransformer)
        pipe.transformer = qtransformer
        image = pipe("a cat", num_inference_steps=28, guidance_scale=7.0, stepper=affiner).images[0]
    """
    cfg = AffinerConfig.coerce(config)
    if thirdparty_affiner is not None:
        check_thirdparty(thirdparty_affiner)
    accepts_control = _check_pipeline(model_real)
    attr, real_bb = denoiser_of(model_real, calib_layer)
    quant_bb = _quant_backbone(model_quant, attr, real_bb)
    items = _select(dataset, cfg.sample_size, shuffle, cfg.seed, accepts_control)
    groups = _groups(items, cfg.batch_size)
    extra = _thaw(cfg.extra_args)
    learner = _Learner(cfg, thirdparty_affiner)
    drive = "partner" if cfg.recurrent else "module"
    bar = tqdm(groups, desc=f"affiner ({cfg.resolved_solver_type})", unit="call", disable=not progress)
    done = 0
    with BackboneRecorder(real_bb, quant_bb, drive=drive) as rec:
        for group in bar:
            stepper = PairedStepper(rec, cfg.noise_target, learner)
            _run(model_real, _call_kwargs(cfg, extra, items, group, latents, stepper))
            rec.pop()
            if stepper.steps_seen == 0:
                raise CalibrationError(
                    f"{type(model_real).__name__} never called the stepper; use an adapter pipeline from "
                    "segquant_fx.models.pipelines that applies stepper= at every denoising step"
                )
            done += len(group)
            bar.set_postfix(prompts=done)
    enabled = [s for s in range(cfg.max_timestep) if cfg.enabled(s)]
    if thirdparty_affiner is None:
        missing = [s for s in enabled if s not in learner.solvers]
        if missing:
            raise CalibrationError(
                f"the pipeline never reached steps {missing} of max_timestep={cfg.max_timestep}"
            )
        solutions = {s: learner.solvers[s].solve() for s in enabled}
    else:
        solutions = None
    meta = {
        **learner.facts,
        "samples": len(items),
        "calls": len(groups),
        "backbone": f"{type(quant_bb).__module__}.{type(quant_bb).__qualname__}",
        "calib_mse_quant": _per_step(learner.mse_quant),
        "calib_mse_corrected_online": _per_step(learner.mse_online),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    affiner = Affiner(cfg, solutions, thirdparty=thirdparty_affiner, meta=meta)
    if getattr(cfg.solver, "verbose", False):
        for s in enabled:
            logger.info(
                "affiner step %d: %d samples, calibration MSE of the quantized prediction %.4g",
                s,
                learner.mse_quant.get(s, [0, 0])[1],
                float(meta["calib_mse_quant"].get(str(s), math.nan)),
            )
    if dump_path is not None:
        affiner.save(dump_path)
    return affiner


# ------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class AffinerEvaluation:
    """Per-step noise-prediction MSE against the float model, without and with the affiner.

    Attributes:
        mode: ``"teacher"`` (float trajectory) or ``"recurrent"`` (corrected quantized trajectory).
        steps: Step indices (0 = noisiest).
        mse_quant: Mean squared error of the quantized prediction vs the float one, per step.
        mse_corrected: The same after the affiner's correction.
        samples: Number of prompts.
        final_mse_quant: MSE of the final latents of the quantized run vs the float run (if measured).
        final_mse_corrected: The same for the quantized run corrected by the affiner (if measured).
    """

    mode: str
    steps: tuple[int, ...]
    mse_quant: tuple[float, ...]
    mse_corrected: tuple[float, ...]
    samples: int
    final_mse_quant: float | None = None
    final_mse_corrected: float | None = None

    @property
    def mean_mse_quant(self) -> float:
        """Mean over steps of :attr:`mse_quant`."""
        return sum(self.mse_quant) / len(self.mse_quant)

    @property
    def mean_mse_corrected(self) -> float:
        """Mean over steps of :attr:`mse_corrected`."""
        return sum(self.mse_corrected) / len(self.mse_corrected)

    @property
    def reduction(self) -> float:
        """Relative reduction of the mean per-step MSE (0.25 = 25 % lower with the affiner)."""
        return 1.0 - self.mean_mse_corrected / self.mean_mse_quant if self.mean_mse_quant > 0 else 0.0

    def summary(self) -> str:
        """One line for logs and reports."""
        line = (
            f"per-step noise MSE vs float ({self.mode} trajectory, {len(self.steps)} steps, {self.samples} prompts): "
            f"quantized {self.mean_mse_quant:.4g} -> corrected {self.mean_mse_corrected:.4g} "
            f"({100 * self.reduction:+.1f}% reduction)"
        )
        if self.final_mse_quant is not None and self.final_mse_corrected is not None:
            line += f"; final latents MSE {self.final_mse_quant:.4g} -> {self.final_mse_corrected:.4g}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def save_plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the per-step MSE with and without the affiner (needs matplotlib)."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("AffinerEvaluation.save_plot needs matplotlib: pip install matplotlib") from e

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.mse_quant, "o-", label="quantized")
        ax.plot(self.steps, self.mse_corrected, "s-", label="quantized + affiner")
        ax.set_xlabel("denoising step (0 = noisiest)")
        ax.set_ylabel("noise-prediction MSE vs float")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def evaluate_affiner(
    affiner: Any,
    dataset: Any,
    model_real: Any,
    model_quant: Any,
    *,
    sample_size: int | None = None,
    shuffle: bool = False,
    latents: torch.Tensor | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    extra_args: Mapping[str, Any] | None = None,
    mode: str = "auto",
    trajectory: bool = False,
    calib_layer: str | None = None,
    progress: bool = True,
) -> AffinerEvaluation:
    """Measure an affiner on prompts: per-step noise-prediction MSE against the float model.

    At every step, the quantized prediction and the corrected one are compared with the float
    backbone's prediction on the *same* input, so both numbers always share their inputs. ``mode``
    picks the trajectory: ``"teacher"`` follows the float model; ``"recurrent"`` follows the
    corrected quantized model (what generation with the affiner visits); ``"auto"`` uses the
    affiner's ``config.recurrent``. With ``trajectory=True`` the MSE of the final latents of full
    quantized runs (without and with the affiner) against the float run is measured too, from the
    same initial noise.

    ``sample_size``, ``seed``, ``batch_size`` and ``extra_args`` default to the affiner's config.
    """
    cfg: AffinerConfig = affiner.config
    if mode not in ("auto", "teacher", "recurrent"):
        raise ConfigError(f"mode = {mode!r}: expected 'auto', 'teacher' or 'recurrent'")
    recurrent = cfg.recurrent if mode == "auto" else mode == "recurrent"
    n = cfg.sample_size if sample_size is None else sample_size
    seed = cfg.seed if seed is None else seed
    run_cfg = dataclasses.replace(cfg, seed=seed, batch_size=batch_size or cfg.batch_size, sample_size=n)
    extra = _thaw(cfg.extra_args) if extra_args is None else dict(extra_args)
    accepts_control = _check_pipeline(model_real)
    attr, real_bb = denoiser_of(model_real, calib_layer)
    quant_bb = _quant_backbone(model_quant, attr, real_bb)
    items = _select(dataset, n, shuffle, seed, accepts_control)
    groups = _groups(items, run_cfg.batch_size)
    acc_q: dict[int, list[float]] = {}
    acc_c: dict[int, list[float]] = {}

    def on_step(info: StepInfo, quant: torch.Tensor, real: torch.Tensor) -> torch.Tensor | None:
        corrected = affiner.correct(info, quant)
        b = quant.shape[0]
        for acc, pred in ((acc_q, quant), (acc_c, corrected)):
            slot = acc.setdefault(info.step_index, [0.0, 0])
            slot[0] += _mse(pred, real) * b
            slot[1] += b
        return corrected if recurrent else None

    final_q = final_c = 0.0
    bar = tqdm(groups, desc="affiner evaluation", unit="call", disable=not progress)
    for group in bar:
        with BackboneRecorder(real_bb, quant_bb, drive="partner" if recurrent else "module") as rec:
            stepper = PairedStepper(rec, affiner.noise_target, on_step)
            _run(model_real, _call_kwargs(run_cfg, extra, items, group, latents, stepper))
        if stepper.steps_seen == 0:
            raise CalibrationError(f"{type(model_real).__name__} never called the stepper")
        if trajectory:
            ref = _final_latents(_run(model_real, _call_kwargs(run_cfg, extra, items, group, latents, None)))
            with BackboneRecorder(real_bb, quant_bb, drive="partner"):
                plain = _final_latents(
                    _run(model_real, _call_kwargs(run_cfg, extra, items, group, latents, None))
                )
                fixed = _final_latents(
                    _run(model_real, _call_kwargs(run_cfg, extra, items, group, latents, affiner))
                )
            final_q += _mse(plain, ref) * len(group)
            final_c += _mse(fixed, ref) * len(group)
    steps = tuple(sorted(acc_q))
    return AffinerEvaluation(
        mode="recurrent" if recurrent else "teacher",
        steps=steps,
        mse_quant=tuple(acc_q[s][0] / acc_q[s][1] for s in steps),
        mse_corrected=tuple(acc_c[s][0] / acc_c[s][1] for s in steps),
        samples=len(items),
        final_mse_quant=final_q / len(items) if trajectory else None,
        final_mse_corrected=final_c / len(items) if trajectory else None,
    )
