"""The three tiny text-to-image models: specs, builders, the model bundle, and saving/loading weights.

Each model is a diffusers backbone in pixel space (32x32x3) plus a :class:`~segquant_fx.t2i.text.TinyTextEncoder`:

============  ==========================  =========  ============================================
name          diffusers class             objective  shape
============  ==========================  =========  ============================================
``mmdit``     ``SD3Transformer2DModel``   flow       SD3.5-style: 5 joint blocks, width 128, patch
                                                     2, dual attention in blocks 0-2, RMS qk-norm
``flux``      ``FluxTransformer2DModel``  flow       3 double + 5 single blocks, width 128, RoPE,
                                                     2x2-packed pixels (12 channels per token)
``unet``      ``UNet2DConditionModel``    ddpm       SDXL-style: 3 levels (32, 64, 96), cross
                                                     attention in levels 2-3, ``text_time`` added
                                                     conditioning, linear projections
============  ==========================  =========  ============================================

Weights are stored as float16 safetensors (each backbone < 8 MB). :class:`T2IBundle` holds a backbone and
its text encoder and knows the backbone's call signature (:meth:`T2IBundle.backbone_kwargs`): the same
kwargs dicts are what :func:`segquant_fx.quantize` calibrates on.

A weights directory holds ``backbone.safetensors``, ``text_encoder.safetensors`` and ``model_card.json``
(architecture, training data settings, steps, final loss, measured prompt adherence). Built-in weights
live in ``segquant_fx/t2i/weights/<name>/`` (package data) and load offline with :func:`load_builtin`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from segquant_fx.errors import ConfigError, SerializationError
from segquant_fx.t2i.data import IMAGE_SIZE, tokenize
from segquant_fx.t2i.text import TextEncoderConfig, TinyTextEncoder

__all__ = [
    "MODEL_NAMES",
    "T2IModelSpec",
    "T2IBundle",
    "SPECS",
    "get_spec",
    "small_spec",
    "build_backbone",
    "build_bundle",
    "save_bundle",
    "load_bundle",
    "load_builtin",
    "builtin_weights_dir",
    "WEIGHTS_ROOT",
    "pack_pixels",
    "unpack_pixels",
    "CARD_FILE",
    "BACKBONE_FILE",
    "TEXT_ENCODER_FILE",
    "CARD_FORMAT",
]

MODEL_NAMES = ("mmdit", "flux", "unet")
CARD_FILE = "model_card.json"
BACKBONE_FILE = "backbone.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
#: Version of the model card layout.
CARD_FORMAT = 1
_TEXT_DIM = 128


@dataclass(frozen=True, kw_only=True)
class T2IModelSpec:
    """How to build one of the tiny text-to-image models.

    Attributes:
        name: ``"mmdit"``, ``"flux"`` or ``"unet"``.
        family: Stepper family: ``"sd3"``, ``"flux"`` or ``"sdxl"``.
        model_class: diffusers class name.
        config: Keyword arguments of ``model_class``.
        objective: ``"flow"`` (rectified flow, velocity target, Euler sampler) or ``"ddpm"`` (epsilon
            target, linear betas, DDIM sampler).
        text: Text encoder shape.
        steps: Default sampling steps.
        guidance: Default classifier-free guidance scale (the model card may override it).
        description: One line.
    """

    name: str
    family: str
    model_class: str
    config: Mapping[str, Any] = field(hash=False)
    objective: str
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    steps: int = 20
    guidance: float = 4.0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the model card)."""
        return {
            "name": self.name,
            "family": self.family,
            "model_class": self.model_class,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()},
            "objective": self.objective,
            "text": self.text.to_dict(),
            "steps": self.steps,
            "guidance": self.guidance,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T2IModelSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            SerializationError: A key is missing or has the wrong type.
        """
        try:
            if d["model_class"] not in _CLASSES or d["objective"] not in ("flow", "ddpm"):
                raise SerializationError(
                    f"model card: model_class={d['model_class']!r} / objective={d['objective']!r} not supported "
                    f"(classes: {', '.join(_CLASSES)}; objectives: flow, ddpm)"
                )
            config = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d["config"]).items()}
            return cls(
                name=str(d["name"]),
                family=str(d["family"]),
                model_class=str(d["model_class"]),
                config=MappingProxyType(config),
                objective=str(d["objective"]),
                text=TextEncoderConfig(**dict(d["text"])),
                steps=int(d["steps"]),
                guidance=float(d["guidance"]),
                description=str(d.get("description", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SerializationError):
                raise
            raise SerializationError(
                f"model card has a missing or malformed architecture entry: {e!r}"
            ) from e


_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DConditionModel")

_MMDIT: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 5,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": _TEXT_DIM,
    "caption_projection_dim": 128,  # = heads * head_dim
    "pooled_projection_dim": _TEXT_DIM,
    "pos_embed_max_size": IMAGE_SIZE // 2,
    "dual_attention_layers": (0, 1, 2),  # SD3.5-medium: the first half of the blocks
    "qk_norm": "rms_norm",
}

_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 12,  # 3 pixel channels x 2x2 packing, as FluxPipeline packs latents
    "num_layers": 3,
    "num_single_layers": 5,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": _TEXT_DIM,
    "pooled_projection_dim": _TEXT_DIM,
    "guidance_embeds": False,  # trained with text dropout and sampled with real CFG, not distilled
    "axes_dims_rope": (8, 12, 12),  # sums to attention_head_dim
}

_UNET_TIME_EMBED = 16
_UNET: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 96),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    # SDXL style: the number of heads per level (head dim 32)
    "attention_head_dim": (1, 2, 3),
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": _TEXT_DIM,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _UNET_TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * _UNET_TIME_EMBED + _TEXT_DIM,
    "use_linear_projection": True,
    "norm_num_groups": 16,
}

#: The three models, keyed by name.
SPECS: Mapping[str, T2IModelSpec] = MappingProxyType(
    {
        "mmdit": T2IModelSpec(
            name="mmdit",
            family="sd3",
            model_class="SD3Transformer2DModel",
            config=MappingProxyType(_MMDIT),
            objective="flow",
            steps=20,
            guidance=4.0,
            description="SD3.5-style MMDiT (dual attention, qk-norm), rectified flow, 32x32 pixels",
        ),
        "flux": T2IModelSpec(
            name="flux",
            family="flux",
            model_class="FluxTransformer2DModel",
            config=MappingProxyType(_FLUX),
            objective="flow",
            steps=20,
            guidance=4.0,
            description="FLUX-style transformer (double + single stream blocks, RoPE), rectified flow, 32x32 pixels",
        ),
        "unet": T2IModelSpec(
            name="unet",
            family="sdxl",
            model_class="UNet2DConditionModel",
            config=MappingProxyType(_UNET),
            objective="ddpm",
            steps=25,
            guidance=3.0,
            description="SDXL-style UNet (text_time conditioning, cross attention), DDPM / DDIM, 32x32 pixels",
        ),
    }
)


def get_spec(name: str) -> T2IModelSpec:
    """The spec of model ``name``.

    Raises:
        ConfigError: Unknown name (the message lists the names).
    """
    spec = SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown text-to-image model {name!r}; built-in models: {', '.join(MODEL_NAMES)}")
    return spec


# "small" variants: the same classes and features (dual attention, qk-norm, double + single blocks,
# text_time conditioning, cross attention) at a fraction of the size, for fast CPU tests
_SMALL_OVERRIDES: dict[str, dict[str, Any]] = {
    "mmdit": {
        "num_layers": 2,
        "dual_attention_layers": (0,),
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "caption_projection_dim": 32,
    },
    "flux": {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "axes_dims_rope": (4, 6, 6),
    },
    "unet": {
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (1, 1),
        "transformer_layers_per_block": (1, 1),
        "norm_num_groups": 8,
    },
}


def small_spec(name: str) -> T2IModelSpec:
    """A reduced variant of model ``name`` (same diffusers class and features, ~50x fewer parameters).

    For tests and pipeline smoke runs (``benchmarks/train_t2i.py --arch small``); never shipped.
    """
    spec = get_spec(name)
    return replace(
        spec,
        config=MappingProxyType({**spec.config, **_SMALL_OVERRIDES[name]}),
        description=f"{spec.description} (small test variant)",
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_backbone(spec: T2IModelSpec | str, *, seed: int = 0) -> nn.Module:
    """The diffusers backbone of ``spec`` with deterministic random weights (CPU, float32, eval mode)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    import diffusers  # lazy: importing diffusers takes seconds

    cls = getattr(diffusers, spec.model_class)
    with _seeded(seed):
        model = cls(**dict(spec.config))
    return model.eval()


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, H/2 * W/2, 4C]``, as ``FluxPipeline._pack_latents`` packs latents."""
    b, c, h, w = x.shape
    return (
        x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack_pixels(x: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack_pixels`."""
    b, _, c4 = x.shape
    c = c4 // 4
    return (
        x.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
    )


def _flux_ids(text_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    h = w = IMAGE_SIZE // 2
    img = torch.zeros(h, w, 3, device=device)
    img[..., 1] = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    img[..., 2] = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text_tokens, 3, device=device)


@dataclass
class T2IBundle:
    """A backbone, its text encoder and how to call them.

    Attributes:
        spec: Architecture and objective.
        backbone: The diffusers module (or anything called like it, e.g. a ``QuantizedModel``).
        text_encoder: The :class:`TinyTextEncoder` trained with it.
        card: The model card (empty for untrained models).
    """

    spec: T2IModelSpec
    backbone: nn.Module
    text_encoder: TinyTextEncoder
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Model name."""
        return self.spec.name

    @property
    def device(self) -> torch.device:
        """Device of the text encoder (and, normally, the backbone)."""
        return next(self.text_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (the text encoder's parameter dtype)."""
        return next(self.text_encoder.parameters()).dtype

    @property
    def default_steps(self) -> int:
        """Sampling steps to use when none are given (card, else spec)."""
        return int(self.card.get("sampling", {}).get("steps", self.spec.steps))

    @property
    def default_guidance(self) -> float:
        """Guidance scale to use when none is given (the best measured one in the card, else the spec's)."""
        return float(self.card.get("sampling", {}).get("guidance", self.spec.guidance))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T2IBundle:
        """Move both modules in place; returns ``self``."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.backbone.to(**kwargs)
            self.text_encoder.to(**kwargs)
        return self

    def eval(self) -> T2IBundle:
        """Both modules in eval mode; returns ``self``."""
        self.backbone.eval()
        self.text_encoder.eval()
        return self

    def encode(self, prompts: list[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, T, D], pooled [B, P])`` of prompts (strings or ``[B, T]`` token ids)."""
        ids = prompts if isinstance(prompts, torch.Tensor) else tokenize(prompts, self.spec.text.max_tokens)
        return self.text_encoder(ids.to(self.device))

    def backbone_kwargs(
        self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor
    ) -> dict[str, Any]:
        """Forward kwargs of the backbone (the calibration-item format of :func:`segquant_fx.quantize`).

        Args:
            x: Noisy input in the family's layout: ``[B, 3, 32, 32]``, or packed ``[B, 256, 12]`` for FLUX.
            t: ``[B]`` sigma in ``[0, 1]`` (flow) or the discrete DDPM timestep (ddpm).
            tokens: ``[B, T, D]`` text encoder tokens.
            pooled: ``[B, P]`` pooled text embedding.
        """
        fam = self.spec.family
        if fam == "sd3":
            # SD3 pipelines pass sigma * 1000
            return {
                "hidden_states": x,
                "encoder_hidden_states": tokens,
                "pooled_projections": pooled,
                "timestep": t * 1000.0,
            }
        if fam == "flux":
            img_ids, txt_ids = _flux_ids(tokens.shape[1], x.device)
            # FLUX pipelines pass sigma; the model multiplies by 1000 itself
            return {
                "hidden_states": x,
                "encoder_hidden_states": tokens,
                "pooled_projections": pooled,
                "timestep": t,
                "img_ids": img_ids,
                "txt_ids": txt_ids,
            }
        size = float(IMAGE_SIZE)
        # (original size, crop top-left, target size), built on the device: no host-to-device copy
        time_ids = torch.full((x.shape[0], 6), size, device=x.device, dtype=x.dtype)
        time_ids[:, 2:4] = 0.0
        return {
            "sample": x,
            "timestep": t,
            "encoder_hidden_states": tokens,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor,
        *,
        backbone: nn.Module | None = None,
        record: list[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Backbone output (velocity or epsilon) in the layout of ``x``; ``record`` collects the kwargs."""
        kwargs = self.backbone_kwargs(x, t, tokens, pooled)
        if record is not None:
            record.append(_detached(kwargs))
        out = (backbone or self.backbone)(**kwargs, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def build_bundle(name: str | T2IModelSpec, *, seed: int = 0) -> T2IBundle:
    """An untrained bundle (deterministic random weights, CPU, float32, eval mode)."""
    spec = get_spec(name) if isinstance(name, str) else name
    backbone = build_backbone(spec, seed=seed)
    with _seeded(seed + 1):
        text = TinyTextEncoder(spec.text).eval()
    return T2IBundle(spec=spec, backbone=backbone, text_encoder=text)


# --------------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files ship as package data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in module.state_dict().items()
    }


def save_bundle(
    bundle: T2IBundle,
    directory: str | os.PathLike[str],
    *,
    card: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``backbone.safetensors``, ``text_encoder.safetensors`` and ``model_card.json`` into ``directory``.

    Each file is written to a temporary name and renamed, the card last, so a directory with a card is complete.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "segquant_fx.t2i", "model": bundle.spec.name}
    _atomic_write(out / BACKBONE_FILE, lambda p: save_file(_state(bundle.backbone, dtype), p, metadata=meta))
    _atomic_write(
        out / TEXT_ENCODER_FILE, lambda p: save_file(_state(bundle.text_encoder, dtype), p, metadata=meta)
    )
    full_card = {
        "format": CARD_FORMAT,
        **dict(card if card is not None else bundle.card),
        "architecture": bundle.spec.to_dict(),
    }
    full_card["weights_dtype"] = str(dtype).removeprefix("torch.")
    text = json.dumps(full_card, indent=2, sort_keys=False)
    _atomic_write(out / CARD_FILE, lambda p: Path(p).write_text(text + "\n"))
    bundle.card = full_card
    return out


def _load_state(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SerializationError(
            f"{path}: not a readable safetensors file ({e}); re-save or re-install the weights"
        ) from e
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise SerializationError(
            f"{path} does not match the architecture in the model card: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]} ({len(missing)}/{len(unexpected)}/{len(bad_shape)} keys)"
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_bundle(
    directory: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> T2IBundle:
    """Load a bundle saved by :func:`save_bundle` (offline; the architecture comes from the card).

    Raises:
        SerializationError: A file is missing, unreadable, or does not match the card's architecture.
    """
    d = Path(directory)
    card_path = d / CARD_FILE
    for f in (card_path, d / BACKBONE_FILE, d / TEXT_ENCODER_FILE):
        if not f.is_file():
            raise SerializationError(
                f"{f} is missing: a text-to-image weights directory holds {CARD_FILE}, {BACKBONE_FILE} and {TEXT_ENCODER_FILE}"
            )
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise SerializationError(f"{card_path}: not valid JSON ({e})") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or "architecture" not in card:
        raise SerializationError(
            f"{card_path}: not a format-{CARD_FORMAT} model card (keys 'format', 'architecture')"
        )
    spec = T2IModelSpec.from_dict(card["architecture"])
    bundle = build_bundle(spec)
    _load_state(bundle.backbone, d / BACKBONE_FILE)
    _load_state(bundle.text_encoder, d / TEXT_ENCODER_FILE)
    bundle.card = card
    if dtype != torch.float32:
        bundle.to(dtype=dtype)
    return bundle.to(device=device).eval()


#: Where built-in weights live (package data); tests point it elsewhere.
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"


def builtin_weights_dir(name: str) -> Path:
    """``WEIGHTS_ROOT/<name>/``, by default ``segquant_fx/t2i/weights/<name>/`` (may not exist)."""
    get_spec(name)
    return WEIGHTS_ROOT / name


def load_builtin(
    name: str, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> T2IBundle:
    """Load built-in trained model ``name`` (``"mmdit"``, ``"flux"`` or ``"unet"``) from the package, offline.

    Raises:
        ConfigError: Unknown ``name``.
        SerializationError: The package has no trained weights for ``name`` (the message says how to
            train and install them) or they are corrupt.
    """
    d = builtin_weights_dir(name)
    if not (d / CARD_FILE).is_file() or not (d / BACKBONE_FILE).is_file():
        raise SerializationError(
            f"built-in text-to-image model {name!r} has no trained weights in {d}; train them with "
            f"`python3 benchmarks/train_t2i.py --model {name} --out DIR --pack tar` (GPU, ~3 min) and install with "
            f"`python3 -m segquant_fx.t2i install DIR/t2i-{name}.tar`"
        )
    return load_bundle(d, device=device, dtype=dtype)
