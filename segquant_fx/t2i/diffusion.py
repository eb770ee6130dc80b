"""Diffusion objectives, samplers and the generation loop of the tiny text-to-image models.

* ``flow`` (``mmdit``, ``flux``): rectified flow as in SD3: ``x_s = (1 - s) x0 + s n``, the backbone
  predicts the velocity ``n - x0``; training draws ``s`` from a logit-normal; sampling integrates with
  Euler from ``s = 1`` to ``0`` on evenly spaced sigmas (optionally shifted like SD3's scheduler).
* ``ddpm`` (``unet``): DDPM with 1000 linear betas (1e-4 to 0.02), epsilon prediction, uniform training
  timesteps; sampling with deterministic DDIM (eta 0, equal to Euler on the probability-flow ODE) on
  "trailing" timesteps (the first step is t = 999), predicted x0 clipped to [-1, 1].

Pixels live in [-1, 1] inside the model; :func:`generate` returns images in [0, 1].

:func:`generate` runs classifier-free guidance (uncond batch first, then text, as diffusers pipelines do)
when ``guidance > 1`` and calls a :class:`~segquant_fx.stepper.Stepper` on the prediction its
``noise_target`` selects. Initial noise comes from one CPU generator per seed, so an image depends only on
its prompt, seed, steps, guidance and the backbone, never on the batch it ran in or the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from segquant_fx.errors import ConfigError
from segquant_fx.stepper import NOISE_TARGETS, StepInfo
from segquant_fx.t2i.data import IMAGE_SIZE, PAD_ID, tokenize
from segquant_fx.t2i.models import T2IBundle, pack_pixels, unpack_pixels

__all__ = [
    "DDPM_TRAIN_STEPS",
    "ddpm_alphas_cumprod",
    "flow_sigmas",
    "ddim_timesteps",
    "diffusion_loss",
    "initial_noise",
    "generate",
]

DDPM_TRAIN_STEPS = 1000


def ddpm_alphas_cumprod(device: torch.device | str | None = None) -> torch.Tensor:
    """``[1000]`` cumulative alphas of the linear beta schedule (computed in float64, returned float32)."""
    betas = torch.linspace(1e-4, 0.02, DDPM_TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float().to(device)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``[steps + 1]`` sigmas from 1 to 0, shifted as ``shift s / (1 + (shift - 1) s)``."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def ddim_timesteps(steps: int) -> list[int]:
    """``steps`` DDPM timesteps, trailing spacing: 999 first, evenly spaced down."""
    if steps > DDPM_TRAIN_STEPS:
        raise ConfigError(f"steps={steps} exceeds the {DDPM_TRAIN_STEPS} DDPM training timesteps")
    return [int(round(DDPM_TRAIN_STEPS - i * DDPM_TRAIN_STEPS / steps)) - 1 for i in range(steps)]


def diffusion_loss(
    bundle: T2IBundle,
    images: torch.Tensor,
    token_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training loss (MSE, float32) of ``bundle`` on clean ``images`` (``[B, 3, 32, 32]`` in [-1, 1]).

    Args:
        bundle: Backbone and text encoder (in train mode).
        images: Clean images in [-1, 1].
        token_ids: ``[B, T]`` prompt tokens (all padding = the empty prompt).
        generator: Random generator on the images' device.
        alphas_cumprod: Cached :func:`ddpm_alphas_cumprod` on the device (ddpm only).
    """
    b = images.shape[0]
    dev = images.device
    tokens, pooled = bundle.text_encoder(token_ids)
    noise = torch.randn(images.shape, generator=generator, device=dev)
    if bundle.spec.objective == "flow":
        s = torch.sigmoid(torch.randn(b, generator=generator, device=dev))  # logit-normal(0, 1)
        x = (1.0 - s[:, None, None, None]) * images + s[:, None, None, None] * noise
        target = noise - images
        t = s
    else:
        ac = alphas_cumprod if alphas_cumprod is not None else ddpm_alphas_cumprod(dev)
        t_idx = torch.randint(0, DDPM_TRAIN_STEPS, (b,), generator=generator, device=dev)
        a = ac[t_idx][:, None, None, None]
        x = a.sqrt() * images + (1.0 - a).sqrt() * noise
        target = noise
        t = t_idx.float()
    if bundle.spec.family == "flux":
        x, target = pack_pixels(x), pack_pixels(target)
    pred = bundle.predict(x, t, tokens, pooled)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def initial_noise(seeds: Sequence[int]) -> torch.Tensor:
    """``[B, 3, 32, 32]`` standard normal noise, one CPU generator per seed."""
    return torch.stack(
        [
            torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
    )


def _check_generate_args(prompts: Any, seeds: Any, steps: int, guidance: float, stepper: Any) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a list of strings (wrap a single prompt in a list)")
    if len(prompts) == 0:
        raise ConfigError("prompts is empty: pass at least one prompt")
    if len(seeds) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be ints, got {list(seeds)[:5]}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if stepper is not None:
        target = getattr(stepper, "noise_target", None)
        if target not in NOISE_TARGETS or not callable(getattr(stepper, "correct", None)):
            raise ConfigError(
                f"stepper {type(stepper).__name__} must have noise_target in {NOISE_TARGETS} (got {target!r}) "
                "and a correct(info, noise_pred) method"
            )
        if target == "uncond" and guidance <= 1.0:
            raise ConfigError(
                f"stepper noise_target='uncond' but guidance={guidance} runs without CFG, so there is no "
                "unconditional branch; use noise_target='all' or guidance > 1"
            )


def _corrected(stepper: Any, info: StepInfo, pred: torch.Tensor) -> torch.Tensor:
    out = stepper.correct(info, pred)
    if (
        not isinstance(out, torch.Tensor)
        or out.shape != pred.shape
        or out.dtype != pred.dtype
        or out.device != pred.device
    ):
        desc = (
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
            if isinstance(out, torch.Tensor)
            else type(out).__name__
        )
        raise ConfigError(
            f"stepper {type(stepper).__name__}.correct returned {desc}; it must return a tensor of the "
            f"prediction's shape {tuple(pred.shape)}, dtype {pred.dtype} and device {pred.device}"
        )
    return out


@torch.no_grad()
def _sample(
    bundle: T2IBundle,
    prompts: list[str],
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    stepper: Any,
    backbone: nn.Module | None,
    record: list[dict[str, Any]] | None,
    shift: float,
) -> torch.Tensor:
    dev, dtype = bundle.device, bundle.dtype
    spec = bundle.spec
    do_cfg = guidance > 1.0
    ids = tokenize(prompts, spec.text.max_tokens)
    if do_cfg:
        ids = torch.cat([torch.full_like(ids, PAD_ID), ids])
    tokens, pooled = bundle.text_encoder(ids.to(dev))
    x = noise.to(device=dev, dtype=dtype)
    packed = spec.family == "flux"
    if packed:
        x = pack_pixels(x)
    b = noise.shape[0]
    target = getattr(stepper, "noise_target", None)
    if spec.objective == "flow":
        sigmas = flow_sigmas(steps, shift).tolist()
        schedule = [(sigmas[i], sigmas[i] * 1000.0) for i in range(steps)]
    else:
        ac = ddpm_alphas_cumprod().tolist()
        schedule = [(float(t), float(t)) for t in ddim_timesteps(steps)]
    for i, (t, t_sched) in enumerate(schedule):
        tvec = torch.full((2 * b if do_cfg else b,), t, device=dev, dtype=dtype)
        xin = torch.cat([x, x]) if do_cfg else x
        pred = bundle.predict(xin, tvec, tokens, pooled, backbone=backbone, record=record).to(x.dtype)

        def info(branch: str, i: int = i, t_sched: float = t_sched) -> StepInfo:
            return StepInfo(
                step_index=i,
                num_inference_steps=steps,
                timestep=t_sched,
                family=spec.family,
                latent_layout="packed" if packed else "bchw",
                latent_hw=(IMAGE_SIZE, IMAGE_SIZE),
                do_cfg=do_cfg,
                guidance_scale=float(guidance),
                branch=branch,
            )

        if do_cfg:
            uncond, cond = pred.chunk(2)
            if target == "uncond":
                uncond = _corrected(stepper, info("uncond"), uncond)
            elif target == "text":
                cond = _corrected(stepper, info("text"), cond)
            pred = uncond + guidance * (cond - uncond)
        elif target == "text":
            pred = _corrected(stepper, info("text"), pred)
        if target == "all":
            pred = _corrected(stepper, info("all"), pred)

        if spec.objective == "flow":
            x = x + (sigmas[i + 1] - sigmas[i]) * pred
        else:
            a_t = ac[int(t)]
            a_prev = ac[int(schedule[i + 1][0])] if i + 1 < steps else 1.0
            x0 = ((x - math.sqrt(1.0 - a_t) * pred) / math.sqrt(a_t)).clamp(-1.0, 1.0)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * pred
    if packed:
        x = unpack_pixels(x)
    return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0).cpu()


def generate(
    model_bundle: T2IBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    stepper: Any = None,
    *,
    backbone: nn.Module | None = None,
    batch_size: int = 64,
    record: list[dict[str, Any]] | None = None,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt.

    Args:
        model_bundle: The model (e.g. :func:`~segquant_fx.t2i.models.load_builtin`).
        prompts: Prompts in the generator's grammar (see :mod:`segquant_fx.t2i.data`).
        seeds: One int seed per prompt (initial noise).
        steps: Sampling steps (default: the model card's).
        guidance: CFG scale; ``<= 1`` runs the text branch only (default: the model card's best).
        stepper: Optional :class:`~segquant_fx.stepper.Stepper`; ``correct(info, pred)`` is called every
            step on the prediction its ``noise_target`` selects (velocity for flow models, epsilon for
            the UNet; FLUX's comes packed ``[B, 256, 12]``).
        backbone: Use this module instead of ``model_bundle.backbone`` (e.g. a ``QuantizedModel``).
        batch_size: Prompts per backbone batch (CFG doubles the batch).
        record: If given, every backbone call's kwargs (detached copies) are appended: calibration items
            for :func:`segquant_fx.quantize`.
        shift: Sigma shift of the flow sampler (1 = none).
        progress: Show a tqdm bar over batches.

    Returns:
        ``[B, 3, 32, 32]`` float32 images in [0, 1], on the CPU.

    Raises:
        ConfigError: Bad prompts, seeds, steps, guidance or stepper (e.g. ``noise_target='uncond'`` without CFG).
    """
    steps = model_bundle.default_steps if steps is None else steps
    guidance = model_bundle.default_guidance if guidance is None else guidance
    if isinstance(prompts, str):
        raise ConfigError("prompts must be a list of strings (wrap a single prompt in a list)")
    prompts, seeds = list(prompts), list(seeds)
    _check_generate_args(prompts, seeds, steps, guidance, stepper)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    noise = initial_noise(seeds)
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"generate {model_bundle.name}", unit="batch")
    out = [
        _sample(
            model_bundle,
            prompts[s : s + batch_size],
            noise[s : s + batch_size],
            steps,
            float(guidance),
            stepper,
            backbone,
            record,
            shift,
        )
        for s in starts
    ]
    return torch.cat(out)
