"""Whole diffusion pipelines, built offline: tiny random ones for tests, full-size ones for benchmarks.

:func:`build_pipeline` assembles an adapter pipeline (:mod:`segquant_fx.models.pipelines`) from
configs alone: the backbone comes from the model zoo (:mod:`segquant_fx.models.zoo`), text encoders
(``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``T5EncoderModel``) and the VAE from configs,
tokenizers are built in memory (a character-level CLIP-style BPE and a T5-style Unigram over the same
alphabet). Nothing touches a model hub; weights are deterministic for a given ``seed``.

=========================  ==========  ===============================================================
name                       family      what
=========================  ==========  ===============================================================
``tiny-sd3``               sd3         tiny-sd3 MMDiT, 2 CLIP + T5 encoders (width 16/32), tiny VAE
``tiny-sd35``              sd3         the same with tiny-sd35 (dual attention, RMS qk-norm)
``tiny-flux``              flux        tiny-flux transformer, CLIP + T5, tiny VAE
``tiny-sdxl``              sdxl        tiny-sdxl UNet, 2 CLIP encoders, tiny VAE
``tiny-sd3-controlnet``    sd3         tiny-sd3 + tiny-sd3-controlnet
``tiny-flux-controlnet``   flux        tiny-flux + tiny-flux-controlnet
``sd35-medium``            sd3         SD3.5 Medium (published configs, random weights)
``flux-dev``               flux        FLUX.1-dev (published configs, random weights)
``sdxl-base``              sdxl        SDXL base 1.0 (published configs, random weights)
=========================  ==========  ===============================================================

The tiny pipelines render 32x32 images (16x16 latents) in well under a second per step on a CPU. The
full-size ones allocate tens of gigabytes (T5-XXL alone has 4.7 B parameters): build them on the GPU
(``device="cuda", dtype=torch.float16``) or on ``device="meta"`` to inspect them; their tokenizers are
the small built-in ones (ids are valid for the published vocabularies; with random weights the text
does not matter anyway).

:func:`load_pipeline` loads a real pipeline from a local diffusers directory (``local_files_only``).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segquant_fx.errors import ConfigError
from segquant_fx.models.pipelines import adapter_class
from segquant_fx.models.zoo import DEFAULT_SEED, _seeded, get_model_spec

__all__ = [
    "PIPELINES",
    "PipelineSpec",
    "build_pipeline",
    "list_pipelines",
    "load_pipeline",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]

# --------------------------------------------------------------------------------------------------
# tokenizers (in memory)
# --------------------------------------------------------------------------------------------------

_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()&/")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A character-level CLIP-style BPE tokenizer (lower-cased, ``</w>`` word ends, BOS/EOS).

    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also padding and unknown), then one id per
    character inside a word and one per character ending a word (``2 + 2 * 50 = 102`` ids).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {CLIP_BOS: 0, CLIP_EOS: 1}
    for suffix in ("", "</w>"):
        for c in _ALPHABET:
            vocab[c + suffix] = len(vocab)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            unk_token=CLIP_EOS,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, 0), (CLIP_EOS, 1)],
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5-style Unigram tokenizer over single characters (ids: 0 pad, 1 ``</s>``, 2 unk, then pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _ALPHABET] + [("\u2581" + c, -2.5) for c in _ALPHABET]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


_CLIP_VOCAB = 2 + 2 * len(_ALPHABET)
_T5_VOCAB = 4 + 2 * len(_ALPHABET)

# --------------------------------------------------------------------------------------------------
# component configs
# --------------------------------------------------------------------------------------------------


def _tiny_clip(projection_dim: int) -> dict[str, Any]:
    return {
        "vocab_size": _CLIP_VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "projection_dim": projection_dim,
        "hidden_act": "quick_gelu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


_TINY_T5: dict[str, Any] = {
    "vocab_size": _T5_VOCAB,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def _tiny_vae(
    latent_channels: int, *, shift: float | None, scaling: float, quant_conv: bool
) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 4,
        "sample_size": 32,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": quant_conv,
        "use_post_quant_conv": quant_conv,
    }


# published configs (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev,
# stabilityai/stable-diffusion-xl-base-1.0: text_encoder*/config.json, vae/config.json)
_CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_CLIP_G: dict[str, Any] = {
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def _full_vae(
    latent_channels: int, *, shift: float | None, scaling: float, quant_conv: bool
) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": quant_conv,
        "use_post_quant_conv": quant_conv,
        "force_upcast": True,
    }


_SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
_FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSpec:
    """A built-in pipeline: which diffusers pipeline and which component configs.

    Attributes:
        name: Registry key, e.g. ``"tiny-sd3"``.
        description: One line.
        family: ``"sd3"``, ``"flux"`` or ``"sdxl"``.
        pipeline_class: The diffusers pipeline class name (the adapter subclasses it).
        backbone: Model-zoo name of the transformer / UNet.
        controlnet: Model-zoo name of the ControlNet, or None.
        text_encoders: Component name -> (transformers class name, config).
        vae: AutoencoderKL config.
        scheduler: (scheduler class name, config).
        clip_max_length: ``model_max_length`` of the CLIP tokenizers.
        full: True for the published (multi-GB) configs.
        image_size: Default height = width of generated images.
    """

    name: str
    description: str
    family: str
    pipeline_class: str
    backbone: str
    text_encoders: Mapping[str, tuple[str, Mapping[str, Any]]]
    vae: Mapping[str, Any]
    scheduler: tuple[str, Mapping[str, Any]]
    controlnet: str | None = None
    clip_max_length: int = 77
    full: bool = False
    image_size: int = 32
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def calib_layers(self) -> tuple[str, ...]:
        """The ``calib_layer`` names this pipeline has."""
        first = "unet" if self.family == "sdxl" else "transformer"
        return (first, "controlnet") if self.controlnet else (first,)


def _sd3_encoders(
    clip_l: Mapping[str, Any], clip_g: Mapping[str, Any], t5: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "text_encoder": ("CLIPTextModelWithProjection", clip_l),
        "text_encoder_2": ("CLIPTextModelWithProjection", clip_g),
        "text_encoder_3": ("T5EncoderModel", t5),
    }


def _registry() -> dict[str, PipelineSpec]:
    tiny_sd3_enc = _sd3_encoders(_tiny_clip(8), _tiny_clip(8), _TINY_T5)
    tiny_flux_enc = {
        "text_encoder": ("CLIPTextModel", _tiny_clip(16)),
        "text_encoder_2": ("T5EncoderModel", _TINY_T5),
    }
    tiny_sdxl_enc = {
        "text_encoder": ("CLIPTextModel", _tiny_clip(16)),
        "text_encoder_2": ("CLIPTextModelWithProjection", _tiny_clip(16)),
    }
    sd3_vae = _tiny_vae(4, shift=0.0609, scaling=1.5305, quant_conv=False)
    flux_vae = _tiny_vae(4, shift=0.1159, scaling=0.3611, quant_conv=False)
    sdxl_vae = _tiny_vae(4, shift=None, scaling=0.13025, quant_conv=True)
    sd3_sched = ("FlowMatchEulerDiscreteScheduler", _SD3_SCHEDULER)
    flux_sched = ("FlowMatchEulerDiscreteScheduler", _FLUX_SCHEDULER)
    sdxl_sched = ("EulerDiscreteScheduler", _SDXL_SCHEDULER)
    specs = [
        PipelineSpec(
            name="tiny-sd3",
            description="StableDiffusion3Pipeline around tiny-sd3, tiny CLIP-L/CLIP-G/T5 and VAE (32x32 images)",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            backbone="tiny-sd3",
            text_encoders=tiny_sd3_enc,
            vae=sd3_vae,
            scheduler=sd3_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="tiny-sd35",
            description="StableDiffusion3Pipeline around tiny-sd35 (dual attention, RMS qk-norm)",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            backbone="tiny-sd35",
            text_encoders=tiny_sd3_enc,
            vae=sd3_vae,
            scheduler=sd3_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="tiny-flux",
            description="FluxPipeline around tiny-flux, tiny CLIP-L/T5 and VAE (32x32 images)",
            family="flux",
            pipeline_class="FluxPipeline",
            backbone="tiny-flux",
            text_encoders=tiny_flux_enc,
            vae=flux_vae,
            scheduler=flux_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="tiny-sdxl",
            description="StableDiffusionXLPipeline around tiny-sdxl, two tiny CLIP encoders and VAE (32x32 images)",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            backbone="tiny-sdxl",
            text_encoders=tiny_sdxl_enc,
            vae=sdxl_vae,
            scheduler=sdxl_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="tiny-sd3-controlnet",
            description="StableDiffusion3ControlNetPipeline: tiny-sd3 + tiny-sd3-controlnet",
            family="sd3",
            pipeline_class="StableDiffusion3ControlNetPipeline",
            backbone="tiny-sd3",
            controlnet="tiny-sd3-controlnet",
            text_encoders=tiny_sd3_enc,
            vae=sd3_vae,
            scheduler=sd3_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="tiny-flux-controlnet",
            description="FluxControlNetPipeline: tiny-flux + tiny-flux-controlnet",
            family="flux",
            pipeline_class="FluxControlNetPipeline",
            backbone="tiny-flux",
            controlnet="tiny-flux-controlnet",
            text_encoders=tiny_flux_enc,
            vae=flux_vae,
            scheduler=flux_sched,
            clip_max_length=16,
        ),
        PipelineSpec(
            name="sd35-medium",
            description="Stable Diffusion 3.5 Medium pipeline (published configs, random weights)",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            backbone="sd35-medium",
            text_encoders=_sd3_encoders(_CLIP_L, _CLIP_G, _T5_XXL),
            vae=_full_vae(16, shift=0.0609, scaling=1.5305, quant_conv=False),
            scheduler=sd3_sched,
            full=True,
            image_size=1024,
        ),
        PipelineSpec(
            name="flux-dev",
            description="FLUX.1-dev pipeline (published configs, random weights)",
            family="flux",
            pipeline_class="FluxPipeline",
            backbone="flux-dev",
            text_encoders={
                "text_encoder": ("CLIPTextModel", _CLIP_L),
                "text_encoder_2": ("T5EncoderModel", _T5_XXL),
            },
            vae=_full_vae(16, shift=0.1159, scaling=0.3611, quant_conv=False),
            scheduler=flux_sched,
            full=True,
            image_size=1024,
        ),
        PipelineSpec(
            name="sdxl-base",
            description="Stable Diffusion XL base 1.0 pipeline (published configs, random weights)",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            backbone="sdxl-unet",
            text_encoders={
                "text_encoder": ("CLIPTextModel", _CLIP_L),
                "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G),
            },
            vae=_full_vae(4, shift=None, scaling=0.13025, quant_conv=True),
            scheduler=sdxl_sched,
            full=True,
            image_size=1024,
        ),
    ]
    return {s.name: s for s in specs}


#: Every built-in pipeline, keyed by name.
PIPELINES: dict[str, PipelineSpec] = _registry()


def list_pipelines(*, full: bool | None = None) -> list[str]:
    """Names of the built-in pipelines (``full=False``: tiny ones only, ``True``: published configs only)."""
    return [n for n, s in PIPELINES.items() if full is None or s.full == full]


def _get_spec(name: str) -> PipelineSpec:
    spec = PIPELINES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown pipeline {name!r}; built-in pipelines: {', '.join(PIPELINES)}")
    return spec


# --------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------


def _build_component(
    build: Callable[[], nn.Module], seed: int, device: torch.device, dtype: torch.dtype | None
) -> nn.Module:
    with _seeded(seed, device), device:
        module = build()
    module.eval()
    module.requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
    return module


def build_pipeline(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
    **components: Any,
) -> Any:
    """Build built-in pipeline ``name`` (see the module docstring) as a segquant_fx adapter.

    Args:
        name: A key of :data:`PIPELINES`.
        device: Where to build (``"meta"`` allocates nothing; full-size pipelines belong on a GPU).
        dtype: Floating dtype of every model component (``None``: float32).
        seed: Seed of all random weights (the backbone keeps the zoo's seed so it matches
            ``build_model(spec.backbone)``; other components derive theirs from ``seed``).
        progress: Show the pipeline's per-step progress bar when it runs.
        **components: Components to use instead of building them (``transformer=qmodel``,
            ``text_encoder_3=None`` to drop T5 from an SD3 pipeline, ...).

    Returns:
        The adapter pipeline (e.g. ``SegQuantSD3Pipeline``), in eval mode.

    Raises:
        ConfigError: Unknown ``name`` or component name.

    Example:
        >>> pipe = build_pipeline("tiny-sd3")
        >>> image = pipe("a red fox", height=32, width=32, num_inference_steps=2).images[0]
    """
    import diffusers
    import transformers

    spec = _get_spec(name)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cls = adapter_class(spec.pipeline_class)
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(components) - known)
    if unknown:
        raise ConfigError(
            f"build_pipeline({name!r}): unknown component(s) {unknown}; components: {sorted(known)}"
        )
    parts: dict[str, Any] = {}
    backbone_attr = "unet" if spec.family == "sdxl" else "transformer"
    if backbone_attr not in components:
        parts[backbone_attr] = get_model_spec(spec.backbone).build(device=dev, dtype=dtype)
    if spec.controlnet and "controlnet" not in components:
        parts["controlnet"] = get_model_spec(spec.controlnet).build(device=dev, dtype=dtype)
    for i, (attr, (cls_name, cfg)) in enumerate(spec.text_encoders.items()):
        if attr in components:
            continue
        model_cls = getattr(transformers, cls_name)
        config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
        config = config_cls(**dict(cfg))
        parts[attr] = _build_component(lambda c=config, m=model_cls: m(c), seed + 101 + i, dev, dtype)
        tok_attr = attr.replace("text_encoder", "tokenizer")
        if cls_name.startswith("T5"):
            parts[tok_attr] = tiny_t5_tokenizer()
        else:
            parts[tok_attr] = tiny_clip_tokenizer(spec.clip_max_length)
    if "vae" not in components:
        vae_cfg = dict(spec.vae)
        parts["vae"] = _build_component(lambda: diffusers.AutoencoderKL(**vae_cfg), seed + 201, dev, dtype)
    sched_name, sched_cfg = spec.scheduler
    if "scheduler" not in components:
        parts["scheduler"] = getattr(diffusers, sched_name)(**dict(sched_cfg))
    for optional in ("image_encoder", "feature_extractor"):
        if optional in known and optional not in components:
            parts[optional] = None
    parts.update(components)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    controlnet: str | os.PathLike[str] | nn.Module | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a pipeline from a local diffusers directory as a segquant_fx adapter (never a hub).

    Args:
        path: Directory with ``model_index.json`` (e.g. a clone of ``stable-diffusion-3.5-medium``).
        controlnet: A local ControlNet directory (or model): the SD3 / FLUX pipeline becomes the
            ControlNet variant.
        torch_dtype: Dtype to load the weights in.
        device: Move the pipeline there after loading.
        **kwargs: Passed to ``from_pretrained`` (components to replace, ``variant``, ...).

    Returns:
        The adapter pipeline (:func:`~segquant_fx.models.pipelines.adapter_class` of the directory's
        pipeline class).

    Raises:
        ConfigError: ``path`` is not a directory, has no ``model_index.json``, names an unsupported
            pipeline class, or ``controlnet`` is not a directory.
    """
    import diffusers

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"pipeline path {str(path)!r} is not a directory; give a local diffusers pipeline directory "
            "(with model_index.json) or a built-in name: " + ", ".join(PIPELINES)
        )
    index = root / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{root} has no model_index.json; it is not a diffusers pipeline directory")
    class_name = json.loads(index.read_text()).get("_class_name", "")
    kwargs = {"local_files_only": True, **kwargs}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if controlnet is not None:
        if not isinstance(controlnet, nn.Module):
            cn_root = Path(controlnet)
            if not cn_root.is_dir() or not (cn_root / "config.json").is_file():
                raise ConfigError(f"controlnet path {str(controlnet)!r} is not a diffusers model directory")
            cn_class = json.loads((cn_root / "config.json").read_text()).get("_class_name", "")
            cn_cls = getattr(diffusers, cn_class, None)
            if cn_cls is None:
                raise ConfigError(f"{cn_root}/config.json names unknown class {cn_class!r}")
            cn_kwargs = {"local_files_only": True}
            if torch_dtype is not None:
                cn_kwargs["torch_dtype"] = torch_dtype
            controlnet = cn_cls.from_pretrained(cn_root, **cn_kwargs)
            if torch_dtype is not None:  # diffusers 0.42 loads some ControlNets in float32 regardless
                controlnet = controlnet.to(torch_dtype)
        family = adapter_class(class_name).segquant_family
        class_name = {"sd3": "StableDiffusion3ControlNetPipeline", "flux": "FluxControlNetPipeline"}.get(
            family, ""
        )
        if not class_name:
            raise ConfigError(f"controlnet=... is supported for SD3 and FLUX pipelines, not {family}")
        kwargs["controlnet"] = controlnet
    cls = adapter_class(class_name)
    pipe = cls.from_pretrained(root, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe
