"""Pipeline adapters: diffusers pipelines that take a ``stepper=`` and accept quantized backbones.

Each adapter subclasses one diffusers pipeline and changes nothing in its denoising loop:

==========================================  ==============================  ========  ==========
adapter                                     diffusers pipeline              family    backbone
==========================================  ==============================  ========  ==========
:class:`SegQuantSD3Pipeline`                ``StableDiffusion3Pipeline``    ``sd3``   transformer
:class:`SegQuantFluxPipeline`               ``FluxPipeline``                ``flux``  transformer
:class:`SegQuantSDXLPipeline`               ``StableDiffusionXLPipeline``   ``sdxl``  unet
:class:`SegQuantSD3ControlNetPipeline`      ``StableDiffusion3ControlNet…`` ``sd3``   transformer
:class:`SegQuantFluxControlNetPipeline`     ``FluxControlNetPipeline``      ``flux``  transformer
==========================================  ==============================  ========  ==========

``pipe(prompt, ..., stepper=s)`` runs the parent's ``__call__`` with two temporary hooks (removed when
the call returns or raises), see :mod:`segquant_fx.stepper` for the contract:

* ``scheduler.step`` is wrapped: it counts denoising steps (``StepInfo.step_index`` = number of
  ``scheduler.step`` calls so far) and, for ``noise_target="all"``, hands the guided prediction to
  ``s.correct`` before the scheduler sees it;
* a forward hook on the noise backbone (``transformer`` / ``unet``, never the ControlNet) hands the
  unconditional or text half of the backbone's output to ``s.correct`` for ``"uncond"`` / ``"text"``.
  SD3 and SDXL batch the two CFG branches (``[uncond; text]`` along the batch, diffusers' order);
  FLUX runs them as two calls per step (first the text-conditioned one, then, with true CFG, the
  negative one). Only the first backbone call of a step is the prediction (or, for FLUX true CFG,
  the first two); later calls in the same step (SD3 skip-layer guidance) are left alone.

A quantized backbone (:class:`~segquant_fx.quantized.QuantizedModel`) drops in for ``transformer`` /
``unet`` / ``controlnet``: ``pipe.transformer = qmodel``. It keeps ``config``, ``dtype`` and
``device``; the one thing FLUX pipelines call that it lacks, ``transformer.cache_context(name)``, the
adapters provide for the duration of a call.

:func:`track_denoising` (the step counter) and :func:`backbone_of` also work on plain diffusers
pipelines; :func:`as_segquant_pipeline` turns one into its adapter, sharing the components.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from segquant_fx.errors import ConfigError, SegQuantError
from segquant_fx.stepper import NOISE_TARGETS, StepInfo, Stepper

__all__ = [
    "CALIB_LAYERS",
    "DenoiseTracker",
    "SegQuantFluxControlNetPipeline",  # noqa: F822 - built on first access (module __getattr__)
    "SegQuantFluxPipeline",  # noqa: F822 - built on first access (module __getattr__)
    "SegQuantSD3ControlNetPipeline",  # noqa: F822 - built on first access (module __getattr__)
    "SegQuantSD3Pipeline",  # noqa: F822 - built on first access (module __getattr__)
    "SegQuantSDXLPipeline",  # noqa: F822 - built on first access (module __getattr__)
    "adapter_class",
    "as_segquant_pipeline",
    "backbone_of",
    "check_stepper",
    "drop_in_compat",
    "family_of",
    "resolve_calib_layer",
    "track_denoising",
]

#: ``calib_layer`` names and the pipeline attribute each one selects (``"dit"`` is the seed's name).
CALIB_LAYERS: dict[str, str] = {
    "transformer": "transformer",
    "dit": "transformer",
    "unet": "unet",
    "controlnet": "controlnet",
}


# --------------------------------------------------------------------------------------------------
# component lookup
# --------------------------------------------------------------------------------------------------


def resolve_calib_layer(calib_layer: str) -> str:
    """The pipeline attribute a ``calib_layer`` name selects (``"dit"`` -> ``"transformer"``).

    Raises:
        ConfigError: Unknown name; the message lists the valid ones.
    """
    attr = CALIB_LAYERS.get(calib_layer) if isinstance(calib_layer, str) else None
    if attr is None:
        raise ConfigError(f"calib_layer={calib_layer!r} is not one of {sorted(CALIB_LAYERS)}")
    return attr


def backbone_of(pipe: Any, calib_layer: str = "transformer") -> nn.Module:
    """The pipeline component that ``calib_layer`` names (``pipe.transformer``, ``.unet``, ``.controlnet``).

    Raises:
        ConfigError: Unknown name, or the pipeline has no such component (the message lists those it has).
    """
    attr = resolve_calib_layer(calib_layer)
    module = getattr(pipe, attr, None)
    if not isinstance(module, nn.Module):
        have = [
            k for k in ("transformer", "unet", "controlnet") if isinstance(getattr(pipe, k, None), nn.Module)
        ]
        raise ConfigError(
            f"calib_layer={calib_layer!r}: {type(pipe).__name__} has no {attr!r} component; it has {have}"
        )
    return module


_FAMILY_BY_CLASS = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3ControlNetPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxControlNetPipeline": "flux",
    "StableDiffusionXLPipeline": "sdxl",
}


#: ControlNet pipelines and the single-ControlNet class they test for with isinstance.
_CONTROLNET_CLASS = {
    "StableDiffusion3ControlNetPipeline": "SD3ControlNetModel",
    "FluxControlNetPipeline": "FluxControlNetModel",
}


def family_of(pipe: Any) -> str:
    """``"sd3"``, ``"flux"`` or ``"sdxl"`` for an adapter or the diffusers pipeline it subclasses.

    Raises:
        ConfigError: The pipeline is none of the supported ones.
    """
    fam = getattr(type(pipe), "segquant_family", None)
    if fam:
        return fam
    for cls in type(pipe).__mro__:
        if cls.__name__ in _FAMILY_BY_CLASS:
            return _FAMILY_BY_CLASS[cls.__name__]
    raise ConfigError(
        f"{type(pipe).__name__} is not a supported pipeline; supported: {sorted(_FAMILY_BY_CLASS)} "
        "(and their segquant_fx adapters)"
    )


# --------------------------------------------------------------------------------------------------
# step tracking
# --------------------------------------------------------------------------------------------------


def _prediction(output: Any) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _replace_prediction(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    output.sample = new
    return output


BackboneHook = Callable[["DenoiseTracker", int, tuple, dict, Any], Any]
StepHook = Callable[["DenoiseTracker", torch.Tensor, Any], torch.Tensor]


class DenoiseTracker:
    """Counts the denoising steps of one pipeline call and the backbone calls within each step.

    Made by :func:`track_denoising`. ``step_index`` is the number of ``scheduler.step`` calls so far,
    so during step ``i`` (0 = the noisiest) every backbone call sees ``step_index == i``.

    Attributes:
        pipe: The pipeline being tracked.
        step_index: Index of the current denoising step.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.step_index = 0
        self._calls: dict[int, int] = {}
        self._before_step: list[StepHook] = []
        self._after_step: list[Callable[[DenoiseTracker], None]] = []
        self._handles: list[Any] = []

    @property
    def num_inference_steps(self) -> int:
        """Steps of this run (the pipeline's ``len(timesteps)``, known once its loop started)."""
        n = getattr(self.pipe, "_num_timesteps", None)
        if n is None:
            n = len(self.pipe.scheduler.timesteps)
        return int(n)

    def timestep(self) -> float:
        """The scheduler timestep of the current step (scheduler units)."""
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        if ts is not None and self.step_index < len(ts):
            return float(ts[self.step_index])
        return float("nan")

    def on_backbone_call(self, module: nn.Module, fn: BackboneHook, *, before: bool = False) -> None:
        """Call ``fn(tracker, call_index, args, kwargs, output)`` on every forward of ``module``.

        ``call_index`` counts the calls of ``module`` within the current step (0 = first). With
        ``before=True`` the hook runs before the forward (``output`` is None, its return is ignored);
        otherwise a non-None return value replaces the output.
        """
        key = len(self._handles)  # one counter per registration: two hooks on a module count once each

        def index() -> int:
            return self._calls.get(key, 0)

        if before:

            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                fn(self, index(), args, kwargs, None)

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            i = index()
            self._calls[key] = i + 1
            return None if before else fn(self, i, args, kwargs, output)

        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def before_scheduler_step(self, fn: StepHook) -> None:
        """``fn(tracker, model_output, timestep) -> model_output`` runs before every ``scheduler.step``."""
        self._before_step.append(fn)

    def after_scheduler_step(self, fn: Callable[[DenoiseTracker], None]) -> None:
        """``fn(tracker)`` runs after every ``scheduler.step`` (``step_index`` already advanced)."""
        self._after_step.append(fn)

    def _advance(self) -> None:
        self.step_index += 1
        self._calls.clear()
        for fn in self._after_step:
            fn(self)

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def track_denoising(pipe: Any) -> Iterator[DenoiseTracker]:
    """Count the denoising steps of pipeline calls made inside the block.

    Wraps ``pipe.scheduler.step`` (an instance attribute, removed afterwards, so nesting and other
    pipelines sharing the scheduler class are unaffected). Works with any diffusers pipeline whose
    loop calls ``self.scheduler.step`` once per step.

    Yields:
        A :class:`DenoiseTracker`; register hooks on it before calling the pipeline.
    """
    scheduler = pipe.scheduler
    tracker = DenoiseTracker(pipe)
    own = vars(scheduler)
    had_own = "step" in own
    previous = own.get("step")
    inner = scheduler.step

    def step(
        model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        for fn in tracker._before_step:
            model_output = fn(tracker, model_output, timestep)
        out = inner(model_output, timestep, sample, *args, **kwargs)
        tracker._advance()
        return out

    scheduler.step = step
    try:
        yield tracker
    finally:
        tracker._close()
        if had_own:
            scheduler.step = previous
        else:
            with contextlib.suppress(AttributeError):
                del scheduler.step


# --------------------------------------------------------------------------------------------------
# the stepper hook
# --------------------------------------------------------------------------------------------------


def check_stepper(stepper: Any) -> str:
    """Validate a stepper and return its ``noise_target``.

    Raises:
        ConfigError: It lacks ``correct`` / ``noise_target``, or the target is not one of
            ``"all"``, ``"uncond"``, ``"text"``.
    """
    if not isinstance(stepper, Stepper) or not callable(getattr(stepper, "correct", None)):
        raise ConfigError(
            f"stepper={type(stepper).__name__} does not implement the Stepper protocol: it needs a "
            "noise_target attribute and a correct(info, noise_pred) method (see segquant_fx.stepper)"
        )
    target = stepper.noise_target
    if target not in NOISE_TARGETS:
        raise ConfigError(f"stepper.noise_target={target!r} is not one of {NOISE_TARGETS}")
    return target


def _corrected(stepper: Any, info: StepInfo, pred: torch.Tensor) -> torch.Tensor:
    out = stepper.correct(info, pred)
    if not isinstance(out, torch.Tensor) or out.shape != pred.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SegQuantError(
            f"{type(stepper).__name__}.correct returned {got} for a prediction of shape {tuple(pred.shape)} "
            f"(step {info.step_index}, branch {info.branch!r}); it must return a tensor of the same shape"
        )
    return out.to(dtype=pred.dtype, device=pred.device)


class _RunInfo:
    """What a stepper needs to know about the run, filled by the adapter's ``__call__``."""

    def __init__(
        self,
        pipe: Any,
        family: str,
        *,
        do_cfg: Callable[[], bool],
        guidance: Callable[[], float],
        packed_hw: tuple[int, int] | None = None,
        cfg_batched: bool = True,
    ) -> None:
        self.pipe = pipe
        self.family = family
        self.do_cfg = do_cfg
        self.guidance = guidance
        self.packed_hw = packed_hw
        self.cfg_batched = cfg_batched

    def info(
        self, tracker: DenoiseTracker, pred: torch.Tensor, branch: str, timestep: Any = None
    ) -> StepInfo:
        if self.packed_hw is not None:
            layout, hw = "packed", self.packed_hw
        else:
            layout, hw = "bchw", (int(pred.shape[-2]), int(pred.shape[-1]))
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep
        return StepInfo(
            step_index=tracker.step_index,
            num_inference_steps=tracker.num_inference_steps,
            timestep=tracker.timestep() if t is None else float(t),
            family=self.family,
            latent_layout=layout,
            latent_hw=hw,
            do_cfg=bool(self.do_cfg()),
            guidance_scale=float(self.guidance()),
            branch=branch,
        )


def _install_stepper(
    tracker: DenoiseTracker, run: _RunInfo, stepper: Any, target: str, backbone: nn.Module
) -> None:
    if target == "all":

        def before_step(tr: DenoiseTracker, model_output: torch.Tensor, timestep: Any) -> torch.Tensor:
            return _corrected(stepper, run.info(tr, model_output, "all", timestep), model_output)

        tracker.before_scheduler_step(before_step)
        return

    def no_uncond() -> ConfigError:
        return ConfigError(
            f"stepper noise_target='uncond' but this {run.family} run has no unconditional branch "
            "(no classifier-free guidance); use noise_target='all' or 'text', or enable CFG"
        )

    def on_call(tr: DenoiseTracker, index: int, args: tuple, kwargs: dict, output: Any) -> Any:
        pred = _prediction(output)
        if pred is None:
            return None
        do_cfg = run.do_cfg()
        if run.cfg_batched:  # SD3 / SDXL: one call per step, [uncond; text] along the batch
            if index != 0:
                return None
            if not do_cfg:
                if target == "uncond":
                    raise no_uncond()
                return _replace_prediction(output, _corrected(stepper, run.info(tr, pred, "text"), pred))
            uncond, text = pred.chunk(2)
            if target == "uncond":
                uncond = _corrected(stepper, run.info(tr, uncond, "uncond"), uncond)
            else:
                text = _corrected(stepper, run.info(tr, text, "text"), text)
            return _replace_prediction(output, torch.cat([uncond, text]))
        # FLUX: the text-conditioned call first, then (true CFG only) the negative one
        branch = {0: "text", 1: "uncond"}.get(index)
        if branch == "text" and target == "uncond" and not do_cfg:
            raise no_uncond()
        if branch != target:
            return None
        return _replace_prediction(output, _corrected(stepper, run.info(tr, pred, branch), pred))

    tracker.on_backbone_call(backbone, on_call)


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------


_OBJECT_CLASS = object.__dict__["__class__"]  # the real ``obj.__class__`` getter/setter
_MASKS: dict[tuple[type, type], type] = {}


def _masked_class(real: type, shown: type) -> type:
    """A subclass of ``real`` whose instances report ``__class__ == shown`` (so isinstance passes)."""
    key = (real, shown)
    if key not in _MASKS:

        def get(self: Any) -> type:
            return shown

        def set_(self: Any, value: type) -> None:
            _OBJECT_CLASS.__set__(self, value)

        _MASKS[key] = type(
            real.__name__, (real,), {"__class__": property(get, set_), "__module__": real.__module__}
        )
    return _MASKS[key]


@contextlib.contextmanager
def drop_in_compat(pipe: Any) -> Iterator[None]:
    """For the duration of a call, give drop-in backbones what the pipeline expects of them.

    The adapters apply it to every call; wrap calls of a plain diffusers pipeline in it when a
    backbone is a quantized model.

    * FLUX pipelines call ``transformer.cache_context(name)``; a quantized model lacks it (a no-op
      context is attached).
    * ControlNet pipelines branch on ``isinstance(self.controlnet, SD3ControlNetModel)`` (or FLUX's);
      a quantized ControlNet whose ``model_class`` is that class reports it as its ``__class__``
      (isinstance consults ``__class__``), so the single-ControlNet path is taken.
    """
    patched, masked = [], []
    for name in ("transformer", "controlnet"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module) and not hasattr(module, "cache_context"):
            object.__setattr__(module, "cache_context", lambda _name: contextlib.nullcontext())
            patched.append(module)
    controlnet = getattr(pipe, "controlnet", None)
    expected = next(
        (_CONTROLNET_CLASS[c.__name__] for c in type(pipe).__mro__ if c.__name__ in _CONTROLNET_CLASS), None
    )
    if isinstance(controlnet, nn.Module) and expected is not None:
        import diffusers

        shown = getattr(diffusers, expected)
        model_class = str(getattr(controlnet, "model_class", ""))
        if not isinstance(controlnet, shown) and model_class.rsplit(".", 1)[-1] == expected:
            real = type(controlnet)
            _OBJECT_CLASS.__set__(controlnet, _masked_class(real, shown))
            masked.append((controlnet, real))
    try:
        yield
    finally:
        for module in patched:
            with contextlib.suppress(AttributeError):
                object.__delattr__(module, "cache_context")
        for module, real in masked:
            _OBJECT_CLASS.__set__(module, real)


def _call_default(pipe: Any, name: str) -> Any:
    for cls in type(pipe).__mro__[1:]:
        fn = cls.__dict__.get("__call__")
        if fn is not None:
            p = inspect.signature(fn).parameters.get(name)
            if p is not None:
                return p.default
    return None


class _SegQuantPipelineMixin:
    """``__call__(..., stepper=None)`` around the parent pipeline's unchanged ``__call__``."""

    segquant_family: ClassVar[str] = ""
    #: The component that predicts the noise (the stepper's hook point).
    segquant_backbone: ClassVar[str] = "transformer"

    def _segquant_run(self, kwargs: dict[str, Any]) -> _RunInfo:
        return _RunInfo(
            self,
            self.segquant_family,
            do_cfg=lambda: bool(self.do_classifier_free_guidance),
            guidance=lambda: float(self.guidance_scale),
        )

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """Save like diffusers' ``save_pretrained``, recording the diffusers pipeline class in ``model_index.json``.

        The directory is then an ordinary diffusers pipeline (``DiffusionPipeline.from_pretrained``
        loads it); :func:`~segquant_fx.models.pipeline_zoo.load_pipeline` makes it an adapter again.
        """
        out = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        index = Path(save_directory) / "model_index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["_class_name"] = _ADAPTER_SPECS[type(self).__name__][0]
            tmp = index.with_name(f".{index.name}.tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, index)
        return out

    def __call__(self, *args: Any, stepper: Any = None, **kwargs: Any) -> Any:
        """Run the diffusers pipeline; ``stepper`` corrects the noise prediction at every step.

        Args:
            *args: The parent pipeline's positional arguments (``prompt``, ...).
            stepper: ``None`` or a :class:`~segquant_fx.stepper.Stepper`.
            **kwargs: The parent pipeline's keyword arguments.

        Returns:
            What the parent pipeline returns.

        Raises:
            ConfigError: The stepper does not implement the protocol, or asks for a branch the run
                does not have.
        """
        parent_call = super().__call__  # type: ignore[misc]
        if stepper is None:
            with drop_in_compat(self):
                return parent_call(*args, **kwargs)
        target = check_stepper(stepper)
        backbone = getattr(self, self.segquant_backbone)
        run = self._segquant_run(kwargs)
        with track_denoising(self) as tracker, drop_in_compat(self):
            _install_stepper(tracker, run, stepper, target, backbone)
            return parent_call(*args, **kwargs)


class _FluxMixin(_SegQuantPipelineMixin):
    segquant_family: ClassVar[str] = "flux"

    def _segquant_run(self, kwargs: dict[str, Any]) -> _RunInfo:
        def get(name: str) -> Any:
            return kwargs[name] if name in kwargs else _call_default(self, name)

        has_neg = get("negative_prompt") is not None or (
            get("negative_prompt_embeds") is not None and get("negative_pooled_prompt_embeds") is not None
        )
        true_cfg = float(get("true_cfg_scale") or 1.0)
        do_cfg = true_cfg > 1 and has_neg
        guidance = true_cfg if do_cfg else float(get("guidance_scale"))
        vsf = int(self.vae_scale_factor)
        height = get("height") or self.default_sample_size * vsf
        width = get("width") or self.default_sample_size * vsf
        hw = (2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2)))
        return _RunInfo(
            self, "flux", do_cfg=lambda: do_cfg, guidance=lambda: guidance, packed_hw=hw, cfg_batched=False
        )


# The adapter classes are defined lazily (importing diffusers' pipelines takes seconds); module
# attribute access (``pipelines.SegQuantSD3Pipeline``) builds them on first use.
_ADAPTER_SPECS: dict[str, tuple[str, type, str, str]] = {
    # adapter name: (diffusers class, mixin, family, backbone)
    "SegQuantSD3Pipeline": ("StableDiffusion3Pipeline", _SegQuantPipelineMixin, "sd3", "transformer"),
    "SegQuantSD3ControlNetPipeline": (
        "StableDiffusion3ControlNetPipeline",
        _SegQuantPipelineMixin,
        "sd3",
        "transformer",
    ),
    "SegQuantFluxPipeline": ("FluxPipeline", _FluxMixin, "flux", "transformer"),
    "SegQuantFluxControlNetPipeline": ("FluxControlNetPipeline", _FluxMixin, "flux", "transformer"),
    "SegQuantSDXLPipeline": ("StableDiffusionXLPipeline", _SegQuantPipelineMixin, "sdxl", "unet"),
}
_ADAPTERS: dict[str, type] = {}


def _adapter(name: str) -> type:
    cls = _ADAPTERS.get(name)
    if cls is None:
        import diffusers

        base_name, mixin, family, backbone = _ADAPTER_SPECS[name]
        base = getattr(diffusers, base_name)
        doc = (
            f"``diffusers.{base_name}`` with ``stepper=`` in its call and quantized backbones welcome "
            f"(family ``{family}``, stepper hook on ``{backbone}``); see :mod:`segquant_fx.models.pipelines`."
        )
        cls = type(
            name,
            (mixin, base),
            {
                "segquant_family": family,
                "segquant_backbone": backbone,
                "__module__": __name__,
                "__doc__": doc,
            },
        )
        _ADAPTERS[name] = cls
    return cls


def adapter_class(pipeline_class: str | type) -> type:
    """The adapter for a diffusers pipeline class (or class name); adapters map to themselves.

    Raises:
        ConfigError: No adapter exists for that class.
    """
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if name in _ADAPTER_SPECS:
        return _adapter(name)
    for adapter, spec in _ADAPTER_SPECS.items():
        if spec[0] == name:
            return _adapter(adapter)
    if not isinstance(pipeline_class, str):
        for cls in pipeline_class.__mro__:
            for adapter, spec in _ADAPTER_SPECS.items():
                if spec[0] == cls.__name__:
                    return _adapter(adapter)
    supported = sorted(spec[0] for spec in _ADAPTER_SPECS.values())
    raise ConfigError(f"no segquant_fx adapter for pipeline class {name!r}; supported: {supported}")


def as_segquant_pipeline(pipe: Any) -> Any:
    """The adapter pipeline for ``pipe`` (a supported diffusers pipeline), sharing its components.

    An adapter is returned unchanged. The new pipeline keeps ``pipe``'s progress-bar settings.

    Raises:
        ConfigError: ``pipe`` is not a supported pipeline.
    """
    cls = adapter_class(type(pipe))
    if isinstance(pipe, cls):
        return pipe
    new = cls(**pipe.components)
    if hasattr(pipe, "_progress_bar_config"):
        new.set_progress_bar_config(**pipe._progress_bar_config)
    return new


def __getattr__(name: str) -> Any:
    if name in _ADAPTER_SPECS:
        return _adapter(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
