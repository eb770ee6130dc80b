"""Trajectories: forward hooks that pair the float and the quantized backbone on the same inputs.

How the affiner gets its training pairs (and why it is correct)
---------------------------------------------------------------

A correction for step ``i`` must be learned from the quantized and the float prediction **on the same
backbone input**; otherwise it learns the trajectory drift of whichever model ran, not the
quantization error. The reference got this wrong (spec §5.3: its replay applied the correction to
the float model and never read the quantized trajectory). Here a single pipeline run produces both
predictions of every step:

* :class:`BackboneRecorder` registers a forward hook (``with_kwargs=True``) on the float pipeline's
  backbone. Every time the pipeline calls the backbone, the hook calls the *partner* (the quantized
  backbone) with exactly the same positional and keyword arguments (latents, timestep, text
  embeddings, ControlNet residuals, ...). The hook can let either output continue the pipeline:
  ``drive="module"`` keeps the float output (teacher forcing: the run follows the float trajectory and
  the quantized backbone is evaluated on the float model's inputs), ``drive="partner"`` replaces it by
  the quantized output (the run follows the quantized trajectory and the float backbone is evaluated on
  the quantized model's inputs).
* :class:`PairedStepper` is the stepper of that run. The pipeline hands it the prediction of the driving
  model, combined exactly as the pipeline combines it (CFG, or a branch). The stepper applies the
  same combination (:func:`select_target`) to the other model's raw output, after checking that this
  combination reproduces the pipeline's own result on the driving model's raw output (so a pipeline
  that combines differently, e.g. with ``guidance_rescale``, is an error rather than silently wrong
  data). It then hands ``(info, quant, real)`` to a callback and returns what the callback returns,
  which is how the recurrent mode steers the trajectory with the correction learned so far.

Recording, replaying or keeping latents is not needed: both backbones see the same tensors in the
same call, so each step costs one float and one quantized backbone evaluation per backbone call.

Backbone calls per step: one (CFG batched as ``[uncond; text]``, or no CFG), or FLUX's two true-CFG
calls (text-conditioned first, then the negative prompt). For ``noise_target="uncond"``/``"text"`` the
adapters hand the branch over from inside the backbone call that produced it, so the stepper pairs
the latest call; for ``"all"`` it combines the calls of the step. Pipelines that call the backbone
more often per step (SD3 skip-layer guidance) or combine differently (``guidance_rescale``) are
rejected with a :class:`~segquant_fx.errors.CalibrationError` rather than learned from wrong pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from segquant_fx.errors import CalibrationError, ConfigError
from segquant_fx.stepper import StepInfo

__all__ = ["BackboneRecorder", "PairedStepper", "output_tensor", "select_target", "record_backbone_calls"]


def output_tensor(out: Any) -> torch.Tensor:
    """The prediction tensor of a backbone output: a tensor, the first item of a tuple, or ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise CalibrationError(
        f"cannot find the prediction in a backbone output of type {type(out).__name__}; expected a tensor, "
        "a tuple whose first item is the prediction, or an object with .sample"
    )


def _detach(value: Any, to_cpu: bool) -> Any:
    if isinstance(value, torch.Tensor):
        v = value.detach()
        return v.cpu() if to_cpu else v.clone()
    if isinstance(value, tuple | list):
        return type(value)(_detach(v, to_cpu) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v, to_cpu) for k, v in value.items()}
    return value


class BackboneRecorder:
    """Context manager: a forward hook on ``module`` that records calls and pairs it with ``partner``.

    Args:
        module: The backbone the pipeline calls (the float model's ``transformer`` / ``unet``).
        partner: Evaluated on the same ``(args, kwargs)`` at every call, or None.
        drive: ``"module"`` keeps the module's output, ``"partner"`` makes the pipeline continue with
            the partner's output.
        keep_inputs: Also keep detached copies of every call's ``(args, kwargs)`` (trajectory recording).
        to_cpu: Keep recorded inputs on the CPU.

    Each call appends a record ``{"output": Tensor, "partner": Tensor | None[, "args", "kwargs"]}``
    to :attr:`calls`; :meth:`pop` takes the records since the last pop.
    """

    def __init__(
        self,
        module: nn.Module,
        partner: nn.Module | Callable[..., Any] | None = None,
        *,
        drive: str = "module",
        keep_inputs: bool = False,
        to_cpu: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the backbone to hook must be an nn.Module, got {type(module).__name__}")
        if drive not in ("module", "partner"):
            raise ConfigError(f"drive = {drive!r}: expected 'module' or 'partner'")
        if drive == "partner" and partner is None:
            raise ConfigError("drive='partner' needs a partner backbone")
        if partner is module:
            raise ConfigError("the quantized backbone is the float backbone itself; pass the quantized model")
        self.module = module
        self.partner = partner
        self.drive = drive
        self.keep_inputs = keep_inputs
        self.to_cpu = to_cpu
        self.calls: list[dict[str, Any]] = []
        self._start = 0
        self._handle: Any = None
        self._busy = False

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._busy:  # the partner shares submodules with the module: don't recurse
            return None
        record: dict[str, Any] = {"output": output_tensor(output).detach(), "partner": None}
        if self.keep_inputs:
            record["args"] = _detach(args, self.to_cpu)
            record["kwargs"] = _detach(kwargs, self.to_cpu)
        result = None
        if self.partner is not None:
            self._busy = True
            try:
                other = self.partner(*args, **kwargs)
            finally:
                self._busy = False
            other_t = output_tensor(other).detach()
            main_t = record["output"]
            if other_t.shape != main_t.shape:
                raise CalibrationError(
                    f"the quantized backbone returned shape {tuple(other_t.shape)} where the float one returned "
                    f"{tuple(main_t.shape)} for the same inputs"
                )
            record["partner"] = other_t
            if self.drive == "partner":
                result = other if type(other) is type(output) else _like(output, other_t.to(main_t.dtype))
        self.calls.append(record)
        return result

    def pop(self) -> list[dict[str, Any]]:
        """Records since the previous pop."""
        out = self.calls[self._start :]
        self._start = len(self.calls)
        if not self.keep_inputs:  # nothing else needs old records: free memory
            self.calls.clear()
            self._start = 0
        return out

    def __enter__(self) -> BackboneRecorder:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _like(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its prediction tensor replaced by ``tensor``."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple | list):
        return type(output)([tensor, *output[1:]])
    if hasattr(output, "sample"):
        return type(output)(sample=tensor)
    raise CalibrationError(f"cannot replace the prediction in a {type(output).__name__}")


def record_backbone_calls(
    module: nn.Module, run: Callable[[], Any], *, to_cpu: bool = True
) -> list[dict[str, Any]]:
    """Run ``run()`` (e.g. a pipeline call) and return every call of ``module``: inputs and output.

    A small trajectory recorder for inspection and tests: record ``i`` holds ``args``, ``kwargs``
    (detached copies) and ``output`` of the ``i``-th backbone call.
    """
    with BackboneRecorder(module, keep_inputs=True, to_cpu=to_cpu) as rec:
        run()
    return rec.calls


def select_target(raw: torch.Tensor, info: StepInfo, target: str | None = None) -> torch.Tensor:
    """The prediction a stepper with ``noise_target=target`` receives, from the backbone's raw output.

    With CFG the backbone's batch is ``[uncond; text]`` (diffusers' order): ``"uncond"`` and ``"text"``
    take a half, ``"all"`` is ``uncond + guidance_scale * (text - uncond)``. Without CFG every target
    is the raw output (``"uncond"`` has no meaning there).
    """
    target = info.branch if target is None else target
    if not info.do_cfg:
        if target == "uncond":
            raise ConfigError("noise_target='uncond' needs classifier-free guidance; use 'all' or 'text'")
        return raw
    if raw.shape[0] % 2:
        raise CalibrationError(f"a CFG batch must have an even size, got backbone output {tuple(raw.shape)}")
    uncond, text = raw.chunk(2)
    if target == "uncond":
        return uncond
    if target == "text":
        return text
    return uncond + info.guidance_scale * (text - uncond)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


StepCallback = Callable[[StepInfo, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class PairedStepper:
    """The stepper of a paired run (see the module docstring).

    Args:
        recorder: The active :class:`BackboneRecorder` (float module, quantized partner).
        noise_target: The prediction to receive.
        on_step: ``on_step(info, quant, real)`` with both predictions in the pipeline's layout; its
            return value (if not None) replaces the prediction the pipeline continues with.
        check_tol: Largest relative difference allowed between the pipeline's prediction and
            :func:`select_target` of the driving model's raw output.
    """

    def __init__(
        self,
        recorder: BackboneRecorder,
        noise_target: str,
        on_step: StepCallback,
        *,
        check_tol: float | None = None,
    ) -> None:
        self.recorder = recorder
        self.noise_target = noise_target
        self.on_step = on_step
        self.check_tol = check_tol
        self.steps_seen = 0

    def _prediction(self, calls: list[dict[str, Any]], key: str, info: StepInfo, batch: int) -> torch.Tensor:
        """The ``noise_target`` prediction of one model (``key``) from the backbone calls of this step."""
        if self.noise_target != "all":
            # the pipeline hands over a branch from inside the backbone call that produced it: the last call
            raw = calls[-1][key]
            if raw.shape[0] == batch:  # already the branch (FLUX runs its CFG branches as separate calls)
                return raw
            return select_target(raw, info, self.noise_target)
        if len(calls) == 1:
            raw = calls[0][key]
            if raw.shape[0] == batch and info.do_cfg:
                raise CalibrationError(
                    f"step {info.step_index}: CFG run but one backbone call of the prediction's batch size "
                    f"{batch}; the affiner cannot tell the branches apart"
                )
            return select_target(raw, info, "all")
        if len(calls) == 2 and info.family == "flux" and info.do_cfg:
            # FLUX true CFG: the text-conditioned call, then the negative one
            text, uncond = calls[0][key], calls[1][key]
            return uncond + info.guidance_scale * (text - uncond)
        raise CalibrationError(
            f"step {info.step_index}: the backbone was called {len(calls)} times for one denoising step; the "
            "affiner needs one call per step (CFG batched into it) or FLUX's two true-CFG calls. Features "
            "that call it more often (e.g. SD3 skip-layer guidance) are not supported"
        )

    def correct(self, info: StepInfo, noise_pred: torch.Tensor) -> torch.Tensor:
        """Pair the step's predictions, hand them to ``on_step``, return its choice."""
        calls = self.recorder.pop()
        if not calls:
            raise CalibrationError(f"step {info.step_index}: the stepper was called without a backbone call")
        quant_driven = self.recorder.drive == "partner"
        driver, other = ("partner", "output") if quant_driven else ("output", "partner")
        batch = noise_pred.shape[0]
        mine = self._prediction(calls, driver, info, batch)
        tol = self.check_tol
        if tol is None:
            tol = 1e-4 if noise_pred.dtype in (torch.float32, torch.float64) else 2e-2
        if mine.shape != noise_pred.shape or _rel_err(mine, noise_pred) > tol:
            detail = (
                f"shape {tuple(mine.shape)} vs {tuple(noise_pred.shape)}"
                if mine.shape != noise_pred.shape
                else f"relative difference {_rel_err(mine, noise_pred):.3g}"
            )
            raise CalibrationError(
                f"step {info.step_index}: the pipeline's {self.noise_target!r} prediction is not the standard "
                f"combination of the backbone output ({detail}); the affiner supports pipelines that combine "
                "CFG as uncond + guidance_scale * (text - uncond) (no guidance_rescale)"
            )
        other_pred = self._prediction(calls, other, info, batch).to(noise_pred.dtype)
        quant, real = (noise_pred, other_pred) if quant_driven else (other_pred, noise_pred)
        self.steps_seen += 1
        out = self.on_step(info, quant, real)
        return noise_pred if out is None else out
