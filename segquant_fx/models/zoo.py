"""Built-in model zoo: diffusers denoisers with random weights, plus matching example inputs.

Every entry is a :class:`ModelSpec`. Nothing here touches a model hub: models are instantiated from
their config with deterministic random weights (a fixed seed), so two builds of the same name give
identical state dicts, and example inputs come from a seeded :class:`torch.Generator`.

Two kinds of entries exist:

* tiny models (``tiny-*`` and ``flux-dev-narrow``) build and run a forward pass on CPU in well
  under a second (``flux-dev-narrow`` keeps FLUX.1-dev's full depth at a narrow width, for
  capture-speed benchmarks);
* full-size published configs (``full=True``: ``sd35-medium``, ``flux-dev``, ``sdxl-unet``) whose
  build allocates gigabytes. Their examples match the published 1024px generation setting.

``diffusers`` is imported lazily inside the build functions, so importing this module is cheap.

Example::

    model, kwargs = build_model("tiny-flux", batch_size=2)
    with torch.no_grad():
        (out,) = model(**kwargs, return_dict=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from segquant_fx.errors import ConfigError

__all__ = [
    "ModelSpec",
    "MODELS",
    "get_model_spec",
    "build_model",
    "calibration_items",
    "list_models",
    "count_linear",
]

#: Seed of every builder. Models of the same family and dims therefore share their initial weights
#: (``tiny-flux`` and ``tiny-flux-fused`` compute the same function).
DEFAULT_SEED = 0

Builder = Callable[..., nn.Module]
ExampleFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and how to feed it.

    Attributes:
        name: Registry key, e.g. ``"tiny-flux"``.
        description: One line saying what the model is.
        build: ``build(*, device=None, dtype=None) -> nn.Module``; returns the model in eval mode
            with deterministic random weights. ``device="meta"`` builds without allocating.
        example: ``example(batch_size=1, *, device=None, dtype=None) -> dict``; keyword arguments
            for ``model.forward`` (keyed by the forward's parameter names, ``return_dict`` not
            included), deterministic random tensors. Floating tensors are cast to ``dtype``.
        family: ``"sd3"``, ``"flux"``, ``"sdxl"`` or ``"controlnet"``.
        expected: Facts tests can check, e.g. ``num_linear`` (count of ``nn.Linear`` modules) and
            ``output_shape`` (per-sample shape of the first output, batch dim excluded).
        full: True for full-size published configs; building one allocates gigabytes.
        model_class: Name of the diffusers class that ``build`` instantiates.
        config: Keyword arguments ``build`` passes to ``model_class`` (readable without building).
        seed: Seed of the weight initialisation.
    """

    name: str
    description: str
    build: Builder
    example: ExampleFn
    family: str
    expected: Mapping[str, Any] = field(default_factory=dict, hash=False)
    full: bool = False
    model_class: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    seed: int = DEFAULT_SEED


def count_linear(model: nn.Module) -> int:
    """Number of ``nn.Linear`` modules in ``model`` (the quantization targets)."""
    return sum(isinstance(m, nn.Linear) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG(s) for the duration of the block, restoring the caller's state after."""
    rng_devices: list[int] = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        yield


def _make_builder(
    class_name: str,
    config: Mapping[str, Any],
    seed: int,
    post: Callable[[nn.Module], None] | None = None,
) -> Builder:
    def build(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        import diffusers  # lazy: importing diffusers takes seconds

        cls = getattr(diffusers, class_name)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with _seeded(seed, dev), dev:
            model = cls(**dict(config))
            if post is not None:
                post(model)
        model.eval()
        if dtype is not None:
            model.to(dtype=dtype)
        return model

    build.__name__ = f"build_{class_name}"
    build.__qualname__ = build.__name__
    return build


def _reinit_zero_modules(*attrs: str) -> Callable[[nn.Module], None]:
    """Post-build hook: re-initialise ControlNet modules that diffusers zero-initialises.

    Real ControlNet checkpoints have trained, non-zero output projections; all-zero weights would
    make the outputs identically zero and calibration statistics degenerate.
    """

    def post(model: nn.Module) -> None:
        for attr in attrs:
            for module in getattr(model, attr).modules():
                reset = getattr(module, "reset_parameters", None)
                if reset is not None and isinstance(module, nn.Linear | nn.Conv2d):
                    reset()

    return post


_SEPARATE_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@torch.no_grad()
def _fuse_qkv(model: nn.Module) -> None:
    """Post-build hook: fuse the QKV projections of every attention module.

    diffusers 0.42 exposes this as ``ModelMixin.fuse_qkv_projections()`` (from ``AttentionMixin``),
    which calls ``AttentionModuleMixin.fuse_projections()`` on each ``FluxAttention``: it adds
    ``to_qkv`` (and ``to_added_qkv`` in double-stream blocks) and sets ``fused_projections``, after
    which the processor reads only the fused layers. diffusers keeps the now-dead ``to_q``/``to_k``/
    ``to_v``/``add_*_proj`` modules; we delete them so the module tree, the state dict and the
    captured graph hold only the linears that run.
    """
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is not None:
        fuse()
    else:  # older diffusers: fuse attention module by attention module
        for module in model.modules():
            if hasattr(module, "fuse_projections") and hasattr(module, "to_q"):
                module.fuse_projections()
    for module in model.modules():
        if getattr(module, "fused_projections", False) and hasattr(module, "to_qkv"):
            for attr in _SEPARATE_PROJECTIONS:
                if attr.startswith("add_") and not hasattr(module, "to_added_qkv"):
                    continue
                if isinstance(getattr(module, attr, None), nn.Module):
                    delattr(module, attr)


# --------------------------------------------------------------------------------------------------
# example inputs
# --------------------------------------------------------------------------------------------------


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _place(
    kwargs: dict[str, Any], device: torch.device | str | None, dtype: torch.dtype | None
) -> dict[str, Any]:
    """Move every tensor (also inside nested dicts) to ``device``; cast floating ones to ``dtype``."""

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device) if device is not None else value
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return {k: move(v) for k, v in kwargs.items()}


def _flux_img_ids(height: int, width: int) -> torch.Tensor:
    """Position ids of packed FLUX latents, as ``FluxPipeline._prepare_latent_image_ids`` makes them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 3)


def _sd3_example(
    *,
    latent_channels: int,
    latent_size: int,
    text_tokens: int,
    joint_dim: int,
    pooled_dim: int,
    seed: int,
    controlnet: bool = False,
) -> ExampleFn:
    def example(
        batch_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sample_seed: int | None = None,
    ) -> dict[str, Any]:
        b = _check_batch(batch_size)
        g = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        latent = (b, latent_channels, latent_size, latent_size)
        kwargs: dict[str, Any] = {"hidden_states": torch.randn(*latent, generator=g)}
        if controlnet:
            # latent-space control image (VAE-encoded), as StableDiffusion3ControlNetPipeline passes it
            kwargs["controlnet_cond"] = torch.randn(*latent, generator=g)
            kwargs["conditioning_scale"] = 1.0
        kwargs["encoder_hidden_states"] = torch.randn(b, text_tokens, joint_dim, generator=g)
        kwargs["pooled_projections"] = torch.randn(b, pooled_dim, generator=g)
        # SD3 pipelines pass sigma * 1000 (a float in [0, 1000]) for every sample
        kwargs["timestep"] = torch.rand(b, generator=g) * 1000.0
        return _place(kwargs, device, dtype)

    return example


def _flux_example(
    *,
    in_channels: int,
    latent_hw: tuple[int, int],
    text_tokens: int,
    joint_dim: int,
    pooled_dim: int,
    seed: int,
    guidance: float | None = 3.5,
    controlnet: bool = False,
) -> ExampleFn:
    h, w = latent_hw
    image_tokens = h * w

    def example(
        batch_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sample_seed: int | None = None,
    ) -> dict[str, Any]:
        b = _check_batch(batch_size)
        g = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        kwargs: dict[str, Any] = {"hidden_states": torch.randn(b, image_tokens, in_channels, generator=g)}
        if controlnet:
            # packed latent-space control image, as FluxControlNetPipeline passes it
            kwargs["controlnet_cond"] = torch.randn(b, image_tokens, in_channels, generator=g)
            kwargs["conditioning_scale"] = 1.0
        kwargs["encoder_hidden_states"] = torch.randn(b, text_tokens, joint_dim, generator=g)
        kwargs["pooled_projections"] = torch.randn(b, pooled_dim, generator=g)
        # FLUX pipelines pass timestep / 1000 (a float in [0, 1]); the model scales it back by 1000
        kwargs["timestep"] = torch.rand(b, generator=g)
        kwargs["img_ids"] = _flux_img_ids(h, w)
        kwargs["txt_ids"] = torch.zeros(text_tokens, 3)
        if guidance is not None:
            kwargs["guidance"] = torch.full((b,), guidance)
        return _place(kwargs, device, dtype)

    return example


def _sdxl_example(
    *,
    latent_size: int,
    text_tokens: int,
    cross_dim: int,
    pooled_dim: int,
    seed: int,
) -> ExampleFn:
    pixels = float(latent_size * 8)  # the SDXL VAE downsamples by 8

    def example(
        batch_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sample_seed: int | None = None,
    ) -> dict[str, Any]:
        b = _check_batch(batch_size)
        g = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        kwargs: dict[str, Any] = {
            "sample": torch.randn(b, 4, latent_size, latent_size, generator=g),
            # discrete scheduler timesteps in [0, 1000)
            "timestep": torch.randint(0, 1000, (b,), generator=g).float(),
            "encoder_hidden_states": torch.randn(b, text_tokens, cross_dim, generator=g),
        }
        # time_ids = original_size + crop_top_left + target_size, as StableDiffusionXLPipeline builds them
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels]).repeat(b, 1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, pooled_dim, generator=g),
            "time_ids": time_ids,
        }
        return _place(kwargs, device, dtype)

    return example


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------

_TINY_SD3: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,  # must equal heads * head_dim (the joint attention width)
    "pooled_projection_dim": 16,
    "out_channels": 4,
    "pos_embed_max_size": 16,
    # no dual attention, no qk norm; diffusers itself makes the last block context_pre_only
}

_TINY_SD35: dict[str, Any] = {**_TINY_SD3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}

_TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),  # must sum to attention_head_dim
}

_TINY_SDXL: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    # SDXL style: despite the name, this is the number of heads per block (diffusers issue 2011)
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 8 * 6 + 16,  # 6 time ids * 8 + pooled text_embeds dim
    "use_linear_projection": True,
    "norm_num_groups": 8,
}

_TINY_SD3_CONTROLNET: dict[str, Any] = {**_TINY_SD3, "extra_conditioning_channels": 0}

_TINY_FLUX_CONTROLNET: dict[str, Any] = {**_TINY_FLUX, "num_layers": 1, "num_single_layers": 1}

_FLUX_DEV_NARROW: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # packed 2x2 patches of 16 latent channels, as FLUX.1-dev
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),  # sums to 16; every axis dim must be even
}

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
_SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),  # 0..12
    "qk_norm": "rms_norm",
}

# black-forest-labs/FLUX.1-dev, transformer/config.json
_FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (values that differ from the
# UNet2DConditionModel defaults; everything else, e.g. act_fn "silu", norm_eps 1e-5, flip_sin_to_cos
# True, mid_block_type "UNetMidBlock2DCrossAttn", is the default in the published config too).
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),  # heads per block: 640/10 = 1280/20 = 64 channels per head
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280) hidden states
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280 pooled text_embeds
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "upcast_attention": None,  # published as null
}


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _spec(
    *,
    name: str,
    description: str,
    family: str,
    model_class: str,
    config: Mapping[str, Any],
    example: ExampleFn,
    expected: Mapping[str, Any],
    full: bool = False,
    post: Callable[[nn.Module], None] | None = None,
    seed: int = DEFAULT_SEED,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        description=description,
        build=_make_builder(model_class, config, seed, post),
        example=example,
        family=family,
        expected=MappingProxyType(dict(expected)),
        full=full,
        model_class=model_class,
        config=MappingProxyType(dict(config)),
        seed=seed,
    )


def _registry() -> dict[str, ModelSpec]:
    seed = DEFAULT_SEED
    tiny_sd3_example = _sd3_example(
        latent_channels=4, latent_size=16, text_tokens=8, joint_dim=32, pooled_dim=16, seed=seed
    )
    tiny_flux_example = _flux_example(
        in_channels=16, latent_hw=(4, 4), text_tokens=8, joint_dim=32, pooled_dim=16, seed=seed
    )
    specs = [
        _spec(
            name="tiny-sd3",
            description="SD3-medium-shaped MMDiT (2 joint blocks, width 32); last block context_pre_only",
            family="sd3",
            model_class="SD3Transformer2DModel",
            config=_TINY_SD3,
            example=tiny_sd3_example,
            expected={"num_linear": 32, "output_shape": (4, 16, 16), "num_blocks": 2},
        ),
        _spec(
            name="tiny-sd35",
            description="SD3.5-medium-shaped MMDiT: dual attention in block 0, RMSNorm qk-norm",
            family="sd3",
            model_class="SD3Transformer2DModel",
            config=_TINY_SD35,
            example=tiny_sd3_example,
            expected={"num_linear": 36, "output_shape": (4, 16, 16), "num_blocks": 2},
        ),
        _spec(
            name="tiny-flux",
            description="FLUX.1-dev-shaped transformer (2 double + 2 single blocks, width 32, guidance)",
            family="flux",
            model_class="FluxTransformer2DModel",
            config=_TINY_FLUX,
            example=tiny_flux_example,
            expected={"num_linear": 50, "output_shape": (16, 16), "num_blocks": 2, "num_single_blocks": 2},
        ),
        _spec(
            name="tiny-flux-fused",
            description="tiny-flux with fused QKV projections (to_qkv / to_added_qkv), same weights",
            family="flux",
            model_class="FluxTransformer2DModel",
            config=_TINY_FLUX,
            example=tiny_flux_example,
            post=_fuse_qkv,
            expected={
                "num_linear": 38,
                "output_shape": (16, 16),
                "num_blocks": 2,
                "num_single_blocks": 2,
                "num_to_qkv": 4,
                "num_to_added_qkv": 2,
            },
        ),
        _spec(
            name="tiny-sdxl",
            description="SDXL-shaped UNet (2 levels, text_time added conditioning, linear projections)",
            family="sdxl",
            model_class="UNet2DConditionModel",
            config=_TINY_SDXL,
            example=_sdxl_example(latent_size=16, text_tokens=7, cross_dim=32, pooled_dim=16, seed=seed),
            expected={"num_linear": 100, "output_shape": (4, 16, 16)},
        ),
        _spec(
            name="tiny-sd3-controlnet",
            description="SD3 ControlNet matching tiny-sd3 (2 joint blocks), non-zero output projections",
            family="controlnet",
            model_class="SD3ControlNetModel",
            config=_TINY_SD3_CONTROLNET,
            example=_sd3_example(
                latent_channels=4,
                latent_size=16,
                text_tokens=8,
                joint_dim=32,
                pooled_dim=16,
                seed=seed,
                controlnet=True,
            ),
            post=_reinit_zero_modules("controlnet_blocks", "pos_embed_input"),
            # output: ([per-block residual] * num_blocks,), each [B, 64 tokens, 32]
            expected={"num_linear": 35, "num_block_samples": 2, "block_sample_shape": (64, 32)},
        ),
        _spec(
            name="tiny-flux-controlnet",
            description="FLUX ControlNet matching tiny-flux (1 double + 1 single block), non-zero outputs",
            family="controlnet",
            model_class="FluxControlNetModel",
            config=_TINY_FLUX_CONTROLNET,
            example=_flux_example(
                in_channels=16,
                latent_hw=(4, 4),
                text_tokens=8,
                joint_dim=32,
                pooled_dim=16,
                seed=seed,
                controlnet=True,
            ),
            post=_reinit_zero_modules(
                "controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder"
            ),
            # output: (double-block residuals, single-block residuals), each [B, 16 tokens, 32]
            expected={
                "num_linear": 31,
                "num_block_samples": 1,
                "num_single_block_samples": 1,
                "block_sample_shape": (16, 32),
            },
        ),
        _spec(
            name="flux-dev-narrow",
            description="FLUX.1-dev depth (19 double + 38 single blocks) at width 32, for capture benchmarks",
            family="flux",
            model_class="FluxTransformer2DModel",
            config=_FLUX_DEV_NARROW,
            example=_flux_example(
                in_channels=64, latent_hw=(4, 4), text_tokens=8, joint_dim=64, pooled_dim=32, seed=seed
            ),
            expected={
                "num_linear": 504,
                "output_shape": (16, 64),
                "num_blocks": 19,
                "num_single_blocks": 38,
            },
        ),
        _spec(
            name="sd35-medium",
            description="Stable Diffusion 3.5 Medium transformer (published config, random weights)",
            family="sd3",
            model_class="SD3Transformer2DModel",
            config=_SD35_MEDIUM,
            # 1024px: 128x128 latents; 77 CLIP + 256 T5 tokens; pooled CLIP-L (768) + CLIP-G (1280)
            example=_sd3_example(
                latent_channels=16,
                latent_size=128,
                text_tokens=333,
                joint_dim=4096,
                pooled_dim=2048,
                seed=seed,
            ),
            expected={
                "num_linear": 392,
                "num_params": 2_243_171_520,
                "output_shape": (16, 128, 128),
                "num_blocks": 24,
            },
            full=True,
        ),
        _spec(
            name="flux-dev",
            description="FLUX.1-dev transformer (published config, random weights)",
            family="flux",
            model_class="FluxTransformer2DModel",
            config=_FLUX_DEV,
            # 1024px: 128x128x16 latents packed 2x2 -> 64x64 = 4096 tokens of 64; 512 T5 tokens
            example=_flux_example(
                in_channels=64, latent_hw=(64, 64), text_tokens=512, joint_dim=4096, pooled_dim=768, seed=seed
            ),
            expected={
                "num_linear": 504,
                "num_params": 11_901_408_320,
                "output_shape": (4096, 64),
                "num_blocks": 19,
                "num_single_blocks": 38,
            },
            full=True,
        ),
        _spec(
            name="sdxl-unet",
            description="Stable Diffusion XL base 1.0 UNet (published config, random weights)",
            family="sdxl",
            model_class="UNet2DConditionModel",
            config=_SDXL_UNET,
            # 1024px: 128x128 latents; 77 tokens of 2048; pooled OpenCLIP-bigG text_embeds 1280
            example=_sdxl_example(
                latent_size=128, text_tokens=77, cross_dim=2048, pooled_dim=1280, seed=seed
            ),
            expected={"num_linear": 743, "num_params": 2_567_463_684, "output_shape": (4, 128, 128)},
            full=True,
        ),
    ]
    return {s.name: s for s in specs}


#: Every registered model, keyed by name.
MODELS: dict[str, ModelSpec] = _registry()


def list_models(*, full: bool | None = None) -> list[str]:
    """Names of the registered models; ``full=False`` keeps the tiny ones, ``full=True`` the big ones."""
    return [name for name, spec in MODELS.items() if full is None or spec.full == full]


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the registered names.
    """
    spec = MODELS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return spec


def build_model(
    name: str,
    batch_size: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build model ``name`` and example forward kwargs for ``batch_size`` samples.

    ``seed`` draws other example values (same shapes); weights never depend on it.

    Returns:
        ``(model, kwargs)``; ``model(**kwargs, return_dict=False)`` runs a forward pass.

    Raises:
        ConfigError: unknown ``name`` or a bad ``batch_size``.
    """
    spec = get_model_spec(name)
    _check_batch(batch_size)
    model = spec.build(device=device, dtype=dtype)
    return model, spec.example(batch_size, device=device, dtype=dtype, sample_seed=seed)


def calibration_items(name: str, n: int, batch_size: int = 2, *, first_seed: int = 1000) -> list[dict[str, Any]]:
    """``n`` example inputs of model ``name`` drawn with seeds ``first_seed..first_seed+n-1``.

    Random inputs, for calibrating the randomly initialised built-in models (real pipelines record
    calibration items with ``generate_calibrate_set`` instead).
    """
    spec = get_model_spec(name)
    return [spec.example(batch_size, sample_seed=first_seed + i) for i in range(n)]
