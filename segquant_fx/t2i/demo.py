"""``segquant-fx demo``: quantize a built-in text-to-image model and show what quantization did to its images.

With no arguments the demo loads the built-in SD3.5-style MMDiT (:func:`~segquant_fx.t2i.models.load_builtin`),
and then:

1. **calibration set**: generates images for :data:`CALIB_PROMPTS` held-out calibration prompts (scene seed
   :data:`CALIB_SCENE_SEED`, noise seeds from :data:`CALIB_SEED_BASE`, both disjoint from the evaluation
   prompts and seeds) with the float model and records the backbone's inputs at every sampling step;
2. **quantize** the backbone with the SegQuant W8A8 preset (``--config`` picks another preset or a config
   file);
3. generates the fixed :data:`DEMO_PROMPTS` with the float and the quantized backbone from the same noise
   (seeds ``EVAL_SEED_BASE + i``);
4. writes into ``--out`` (default ``segquant-demo/``):

   * ``grid.png``: one row per prompt: float | quantized | ``|float - quantized|`` x4;
   * ``metrics.md`` / ``metrics.json``: PSNR and SSIM of the quantized images against the float ones,
     prompt adherence (attribute read-out, :mod:`~segquant_fx.t2i.readout`) of both, the chance level,
     per-prompt values, timings;
   * ``report.md``: the quantized model's per-layer plan (patterns, segments, formats);
   * ``backbone-qdq.onnx``: the quantized backbone exported as standard ONNX Q/DQ, or ``onnx_error.txt``
     saying why the export failed (e.g. the ``onnx`` extra is not installed).

``--model`` takes another built-in (``mmdit``, ``flux``, ``unet``), a weights directory written by
:func:`~segquant_fx.t2i.models.save_bundle`, or a local diffusers backbone directory (``save_pretrained``
of one of the three classes; its text encoder and model card come from the same directory if it has them,
else from the built-in model of that class). Missing built-in weights raise the error of
:func:`~segquant_fx.t2i.models.load_builtin`, which says how to train and install them; ``--random-weights``
runs on untrained weights instead, as a loudly labelled smoke test (the images are noise).

Python: ``run_demo(DemoSettings(...))`` returns a :class:`DemoResult`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segquant_fx.errors import ConfigError, SerializationError
from segquant_fx.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "DEMO_PROMPTS",
    "DEMO_STEPS",
    "EVAL_PROMPTS",
    "CALIB_PROMPTS",
    "CALIB_SCENE_SEED",
    "CALIB_SEED_BASE",
    "EVAL_SEED_BASE",
    "CHANCE_SCENES",
    "DemoSettings",
    "DemoResult",
    "load_demo_model",
    "resolve_config",
    "calibration_prompts",
    "calibration_set",
    "eval_prompts",
    "chance_level",
    "comparison_grid",
    "export_backbone_onnx",
    "run_demo",
    "add_demo_parser",
    "main",
]

#: Fixed evaluation prompts (one or two objects, every size, position, shape and most colors).
DEMO_PROMPTS: tuple[str, ...] = (
    "a large red circle in the center on a blue background",
    "a small yellow square at the top left and a green triangle at the bottom right on a black background",
    "a large cyan cross at the bottom left on a white background",
    "a magenta triangle at the top right and a small white circle at the bottom left on a gray background",
    "a small blue square in the center on a yellow background",
    "a large green circle at the top right and a red cross at the bottom left on a white background",
    "a white triangle at the bottom right on a magenta background",
    "a small black cross at the top left and a large cyan square at the bottom right on a gray background",
)
#: Default number of evaluation prompts (the first ones of :data:`DEMO_PROMPTS`).
EVAL_PROMPTS = 4
#: Default sampling steps of the demo (None = the model card's). 10 Euler/DDIM steps keep the demo within
#: 3 minutes on a 2-core CPU; ``--steps 20`` is the setting the model card measured adherence at.
DEMO_STEPS: int | None = 10
#: Default number of calibration prompts.
CALIB_PROMPTS = 4
#: Scene seed of the calibration prompts (the training evaluation uses 1234).
CALIB_SCENE_SEED = 4321
#: Noise seeds: calibration ``CALIB_SEED_BASE + i``, evaluation ``EVAL_SEED_BASE + i`` (disjoint ranges).
CALIB_SEED_BASE = 1_000_000
EVAL_SEED_BASE = 0
#: Held-out scenes the chance level of prompt adherence is measured on.
CHANCE_SCENES = 256
_EXTRA_SCENE_SEED = 1234  # prompts beyond DEMO_PROMPTS come from the training's held-out set

ONNX_FILE = "backbone-qdq.onnx"
ONNX_ERROR_FILE = "onnx_error.txt"
SMOKE_BANNER = (
    "SMOKE TEST: RANDOM (UNTRAINED) WEIGHTS - the images are noise and the metrics say nothing about "
    "quantization quality"
)
_INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "joint_attention_dim",
    "pooled_projection_dim",
    "cross_attention_dim",
    "projection_class_embeddings_input_dim",
    "addition_time_embed_dim",
    "sample_size",
    "patch_size",
)


# --------------------------------------------------------------------------------------------------
# settings and inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What :func:`run_demo` does.

    Attributes:
        model: Built-in name (``mmdit``, ``flux``, ``unet``), a weights directory, or a diffusers backbone
            directory.
        config: Preset name or a config file (``.json``, ``.yaml``/``.yml``).
        out: Output directory.
        prompts: Evaluation prompts (default: the first :data:`EVAL_PROMPTS` of :data:`DEMO_PROMPTS`).
        calib_prompts: Number of calibration prompts.
        steps: Sampling steps (default :data:`DEMO_STEPS`).
        guidance: CFG scale (default: the model card's).
        random_weights: Untrained weights (smoke test; built-in names only).
        small: With ``random_weights``: the reduced test architecture (:func:`~segquant_fx.t2i.models.small_spec`).
        onnx: Export the quantized backbone to ONNX.
        progress: Progress bars and phase messages (stderr).
        device: Torch device.
    """

    model: str = "mmdit"
    config: str = "w8a8"
    out: str = "segquant-demo"
    prompts: tuple[str, ...] | None = None
    calib_prompts: int = CALIB_PROMPTS
    steps: int | None = None
    guidance: float | None = None
    random_weights: bool = False
    small: bool = False
    onnx: bool = True
    progress: bool = True
    device: str = "cpu"


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        out: The output directory.
        files: Artifact name -> path (``grid``, ``metrics_md``, ``metrics_json``, ``report``, and ``onnx`` or
            ``onnx_error``).
        metrics: The content of ``metrics.json``.
        float_images: ``[B, 3, 32, 32]`` float-model images.
        quantized_images: The quantized model's images from the same noise.
        qmodel: The quantized backbone.
    """

    out: Path
    files: dict[str, Path]
    metrics: dict[str, Any]
    float_images: torch.Tensor
    quantized_images: torch.Tensor
    qmodel: Any = field(repr=False)


def _builtin_for_class(class_name: str) -> str | None:
    from segquant_fx.t2i.models import MODEL_NAMES, get_spec

    return next((n for n in MODEL_NAMES if get_spec(n).model_class == class_name), None)


def _load_diffusers_dir(d: Path, device: str) -> Any:
    """A diffusers backbone directory + the text encoder/card of the same dir or of the built-in model."""
    from segquant_fx.t2i import models

    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {d}: config.json is not readable JSON ({e})") from e
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    name = _builtin_for_class(str(class_name))
    if name is None:
        classes = ", ".join(models.get_spec(n).model_class for n in models.MODEL_NAMES)
        raise ConfigError(
            f"--model {d}: a diffusers directory of class {class_name!r}; the demo runs {classes} "
            "(the tiny text-to-image architectures of segquant_fx.t2i)"
        )
    if (d / models.CARD_FILE).is_file() and (d / models.TEXT_ENCODER_FILE).is_file():
        try:
            card = json.loads((d / models.CARD_FILE).read_text())
            arch = card["architecture"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SerializationError(f"{d / models.CARD_FILE}: not a readable model card ({e!r})") from e
        spec = models.T2IModelSpec.from_dict(arch)
        text = models.build_bundle(spec).text_encoder
        models._load_state(text, d / models.TEXT_ENCODER_FILE)
        source = str(d)
    else:
        base = models.load_builtin(name)  # its error says how to train/install the weights
        spec, text, card, source = base.spec, base.text_encoder, base.card, f"built-in {name!r}"
    for key in _INTERFACE_KEYS:
        if key in spec.config and key in config and _norm(config[key]) != _norm(spec.config[key]):
            raise ConfigError(
                f"--model {d}: config.json has {key}={config[key]!r} but the text encoder / model card of "
                f"{source} expects {spec.config[key]!r}; the backbone must keep the tiny model's interface"
            )
    import diffusers

    cls = getattr(diffusers, str(class_name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = cls.from_pretrained(str(d), local_files_only=True, torch_dtype=torch.float32)
    card = {**card, "source": {"backbone": str(d), "text_encoder": source}}
    return models.T2IBundle(spec=spec, backbone=backbone.eval(), text_encoder=text.eval(), card=card).to(
        device
    )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def load_demo_model(
    model: str, *, random_weights: bool = False, small: bool = False, device: str = "cpu"
) -> Any:
    """Resolve ``--model`` to a :class:`~segquant_fx.t2i.models.T2IBundle`.

    Args:
        model: Built-in name, a :func:`~segquant_fx.t2i.models.save_bundle` directory, or a diffusers
            backbone directory (``config.json`` with ``_class_name``).
        random_weights: Build the built-in architecture with untrained weights (smoke tests).
        small: With ``random_weights``: the reduced test architecture.
        device: Torch device.

    Raises:
        SerializationError: Built-in weights are missing (says how to train and install them) or corrupt.
        ConfigError: Unknown name or directory layout, or ``random_weights``/``small`` where they do not apply.
    """
    from segquant_fx.t2i import models

    if small and not random_weights:
        raise ConfigError(
            "--small needs --random-weights: trained weights exist only for the full architectures"
        )
    if model in models.MODEL_NAMES:
        if random_weights:
            spec = models.small_spec(model) if small else models.get_spec(model)
            return models.build_bundle(spec).to(device)
        return models.load_builtin(model, device=device)
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(
            f"--model {model!r} is neither a built-in model ({', '.join(models.MODEL_NAMES)}) nor a directory"
        )
    if random_weights:
        raise ConfigError(
            f"--random-weights applies to built-in model names only; {model!r} is a weights directory"
        )
    if (path / models.CARD_FILE).is_file() and (path / models.BACKBONE_FILE).is_file():
        return models.load_bundle(path, device=device)
    if (path / "config.json").is_file():
        return _load_diffusers_dir(path, device)
    raise ConfigError(
        f"--model {model!r}: expected a weights directory ({models.CARD_FILE} + {models.BACKBONE_FILE}, "
        "from save_bundle) or a diffusers backbone directory (config.json, from save_pretrained)"
    )


def resolve_config(config: str) -> tuple[Any, str]:
    """``(QuantizeConfig, label)`` of ``--config``: a preset name or a ``.json``/``.yaml``/``.yml`` file.

    Raises:
        ConfigError: Unknown preset, unreadable file, unknown suffix or an invalid config.
    """
    from segquant_fx.config import QuantizeConfig

    if not isinstance(config, str) or not config:
        raise ConfigError(f"--config must be a preset name or a config file, got {config!r}")
    path = Path(config)
    looks_like_file = path.suffix.lower() in (".json", ".yaml", ".yml") or os.sep in config
    if path.is_file() or looks_like_file:
        if not path.is_file():
            raise ConfigError(f"--config {config!r}: no such file")
        suffix = path.suffix.lower()
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"--config {config!r}: cannot read it ({e})") from e
        if suffix == ".json":
            return QuantizeConfig.from_json(text), path.name
        if suffix in (".yaml", ".yml"):
            return QuantizeConfig.from_yaml(text), path.name
        raise ConfigError(f"--config {config!r}: config files must end in .json, .yaml or .yml")
    return QuantizeConfig.coerce(config), config


def eval_prompts(n: int) -> tuple[str, ...]:
    """The first ``n`` :data:`DEMO_PROMPTS`; beyond those, prompts of the training's held-out scenes."""
    from segquant_fx.t2i.data import heldout_scenes, scene_prompts

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of evaluation prompts must be a positive int, got {n!r}")
    extra = n - len(DEMO_PROMPTS)
    more = scene_prompts(heldout_scenes(extra, seed=_EXTRA_SCENE_SEED)) if extra > 0 else []
    return tuple(DEMO_PROMPTS[:n]) + tuple(more)


def calibration_prompts(n: int, seed: int = CALIB_SCENE_SEED) -> list[str]:
    """``n`` calibration prompts: held-out scenes of ``seed`` (not the evaluation prompts)."""
    from segquant_fx.t2i.data import heldout_scenes, scene_prompts

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of calibration prompts must be a positive int, got {n!r}")
    return scene_prompts(heldout_scenes(n, seed=seed))


class _Ticking:
    """Calls ``module`` and advances a progress bar once per backbone call (= one sampling step)."""

    def __init__(self, module: Any, bar: Any) -> None:
        self.module = module
        self.bar = bar

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        self.bar.update(1)
        return out


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def _generate(
    bundle: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    *,
    backbone: Any = None,
    record: list[dict[str, Any]] | None = None,
    desc: str,
    progress: bool,
    batch_size: int = 64,
) -> torch.Tensor:
    from segquant_fx.t2i.diffusion import generate

    calls = steps * math.ceil(len(prompts) / batch_size)
    with _bar(calls, desc, progress) as bar:
        return generate(
            bundle,
            list(prompts),
            list(seeds),
            steps,
            guidance,
            backbone=_Ticking(backbone if backbone is not None else bundle.backbone, bar),
            record=record,
            batch_size=batch_size,
        )


def calibration_set(
    bundle: Any,
    n_prompts: int,
    *,
    steps: int,
    guidance: float,
    progress: bool = False,
    scene_seed: int = CALIB_SCENE_SEED,
    seed_base: int = CALIB_SEED_BASE,
) -> list[dict[str, Any]]:
    """Backbone kwargs at every sampling step of ``n_prompts`` calibration prompts (float model).

    One item per step (per batch of 64 prompts); with CFG each item holds the unconditional and the text
    batch, as the quantized model will see them.
    """
    prompts = calibration_prompts(n_prompts, scene_seed)
    items: list[dict[str, Any]] = []
    _generate(
        bundle,
        prompts,
        [seed_base + i for i in range(len(prompts))],
        steps,
        guidance,
        record=items,
        desc="calibration set",
        progress=progress,
    )
    return items


def chance_level(n: int = CHANCE_SCENES) -> dict[str, float]:
    """Prompt adherence of a model that draws clean images but ignores its prompt (held-out scenes)."""
    from segquant_fx.t2i.data import heldout_scenes
    from segquant_fx.t2i.readout import chance_adherence

    return chance_adherence(heldout_scenes(n, seed=_EXTRA_SCENE_SEED))


# --------------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    """Non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"`` (JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def comparison_grid(
    float_images: torch.Tensor,
    quantized_images: torch.Tensor,
    *,
    scale: int = 4,
    diff_gain: float = 4.0,
    pad: int = 2,
) -> torch.Tensor:
    """``[3, H', W']`` grid, one row per image pair: float | quantized | ``|float - quantized| * diff_gain``."""
    from segquant_fx.t2i.grid import make_grid

    if float_images.shape != quantized_images.shape:
        raise ConfigError(
            f"float and quantized images differ in shape: {tuple(float_images.shape)} vs {tuple(quantized_images.shape)}"
        )
    diff = ((float_images - quantized_images).abs() * diff_gain).clamp(0, 1)
    rows = torch.stack([float_images, quantized_images, diff], 1).flatten(0, 1)
    return make_grid(rows, ncol=3, pad=pad, scale=scale)


_COLUMNS = ("float", "quantized", "|diff| x4")


def _annotated_png(
    grid: torch.Tensor, labels: Sequence[str], *, cell: int, pad: int, title: str = "", warning: str = ""
) -> bytes | None:
    """PNG bytes of ``grid`` with a title, column titles and a label per row (Pillow), or None without Pillow."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return None
    arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).contiguous()
    h, w, _ = arr.shape
    img = Image.frombytes("RGB", (w, h), bytes(arr.reshape(-1).tolist()))
    font = ImageFont.load_default()
    top = 12 * (bool(title) + bool(warning))
    head, side = 16 + top, 360
    canvas = Image.new("RGB", (w + side, h + head), (255, 255, 255))
    canvas.paste(img, (0, head))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill=(0, 0, 0), font=font)
    if warning:
        draw.text((2, 1 + 12 * bool(title)), warning, fill=(220, 0, 0), font=font)
    for j, column in enumerate(_COLUMNS):
        draw.text((pad + j * (cell + pad) + 2, top + 2), column, fill=(0, 0, 0), font=font)
    for i, label in enumerate(labels):
        y = head + pad + i * (cell + pad)
        words, line, lines = label.split(), "", []
        for word in words:  # wrap at ~56 characters
            if len(line) + len(word) + 1 > 56 and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines[: cell // 12]):
            draw.text((w + 6, y + 2 + 12 * k), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def export_backbone_onnx(qmodel: Any, path: Path) -> dict[str, Any]:
    """Export ``qmodel`` as ONNX Q/DQ to ``path``; never raises.

    Returns:
        ``{"ok": True, "path", "bytes", "seconds"}`` or ``{"ok": False, "error", "seconds"}`` (the error
        also goes to ``onnx_error.txt`` next to ``path``). A stale file of the other outcome is removed.
    """
    import segquant_fx

    err_path = path.parent / ONNX_ERROR_FILE
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        # the exporter prints its progress to stdout; keep the demo's output readable
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
                written = Path(segquant_fx.export_onnx(qmodel, Path(tmp) / path.name, format="qdq"))
                if any(p != written for p in Path(tmp).iterdir()):
                    raise SerializationError(
                        f"the ONNX export wrote external data files next to {path.name}; expected one file"
                    )
                os.replace(written, path)
    except Exception as e:  # noqa: BLE001 - the demo records any export failure instead of stopping
        path.unlink(missing_ok=True)
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, ImportError):
            msg += "\n(install the ONNX extra: pip install -e '.[onnx]')"
        atomic_write_text(err_path, msg + "\n", make_parents=True)
        return {"ok": False, "error": msg, "seconds": round(time.perf_counter() - t0, 2)}
    err_path.unlink(missing_ok=True)
    return {
        "ok": True,
        "path": path.name,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}"
    return str(v)


def _metrics_markdown(m: dict[str, Any]) -> str:
    adh = m["adherence"]
    lines = [f"# segquant-fx demo: {m['model']} quantized with {m['config']}", ""]
    if m["random_weights"]:
        lines += [f"**{SMOKE_BANNER}**", ""]
    s = m["settings"]
    lines += [
        f"{s['n_prompts']} prompts, {s['steps']} steps, guidance {s['guidance']:g}, same noise for both "
        f"models; calibrated on {s['calib_prompts']} other prompts x {s['steps']} steps "
        f"({m['calibration_items']} items); {m['quantized_layers']} linear layers quantized.",
        "",
        "| metric | float | quantized |",
        "|---|---|---|",
        f"| PSNR vs float (dB) | - | {_fmt(m['psnr'])} |",
        f"| SSIM vs float | - | {_fmt(m['ssim'], 4)} |",
        "",
        f"Prompt adherence (exact attribute read-out; chance = a model that ignores its prompt, measured on "
        f"{CHANCE_SCENES} held-out scenes):",
        "",
        "| attribute | float | quantized | chance |",
        "|---|---|---|---|",
    ]
    for key in ("overall", "background", "count", "color", "shape", "size", "position"):
        name = "all attributes right" if key == "overall" else key
        lines.append(
            f"| {name} | {_fmt(adh['float'][key], 3)} | {_fmt(adh['quantized'][key], 3)} | "
            f"{_fmt(adh['chance'][key], 3)} |"
        )
    card = adh.get("model_card")
    if card is not None:
        lines += [
            "",
            f"The model card measured {_fmt(card, 3)} (all attributes right) for the float model on its held-out set.",
        ]
    lines += ["", "| # | prompt | PSNR (dB) | SSIM | float ok | quantized ok |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(m["per_prompt"]):
        lines.append(
            f"| {i} | {row['prompt']} | {_fmt(row['psnr'])} | {_fmt(row['ssim'], 4)} | "
            f"{'yes' if row['float_ok'] else 'no'} | {'yes' if row['quantized_ok'] else 'no'} |"
        )
    onnx = m["onnx"]
    if onnx is None:
        lines += ["", "ONNX export: skipped (--no-onnx)."]
    elif onnx["ok"]:
        lines += [
            "",
            f"ONNX export (Q/DQ): `{onnx['path']}` ({onnx['bytes'] / 1e6:.1f} MB, {onnx['seconds']} s).",
        ]
    else:
        lines += ["", f"ONNX export failed: `{onnx['error'].splitlines()[0]}` (see {ONNX_ERROR_FILE})."]
    t, c = m["timings"], m.get("cpu_seconds", {})
    lines += [
        "",
        "Timings (s, wall / process CPU): "
        + ", ".join(f"{k} {v:.1f} / {c.get(k, float('nan')):.1f}" for k, v in t.items()),
        "",
        "`grid.png`: one row per prompt: float | quantized | |float - quantized| x4. "
        "`report.md`: per-layer quantization plan.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------


def run_demo(settings: DemoSettings | None = None, *, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo (see the module docstring) and write its artifacts into ``settings.out``.

    Args:
        settings: What to run (default :class:`DemoSettings`).
        log: Where phase messages go (default: stderr when ``settings.progress``).

    Returns:
        The artifacts, metrics, images and the quantized model.

    Raises:
        SerializationError: Built-in weights missing (the message says how to train/install them).
        ConfigError: Bad model, config, prompts or settings.
    """
    import segquant_fx
    from segquant_fx.t2i.data import parse_prompts
    from segquant_fx.t2i.metrics import summarize
    from segquant_fx.t2i.readout import judge, score_adherence

    s = settings or DemoSettings()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if s.progress else (lambda msg: None)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (all threads): the load-independent cost

    @contextlib.contextmanager
    def phase(name: str) -> Any:
        t, c = time.perf_counter(), time.process_time()
        yield
        timings[name] = time.perf_counter() - t
        cpu[name] = time.process_time() - c

    prompts = tuple(s.prompts) if s.prompts is not None else eval_prompts(EVAL_PROMPTS)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a non-empty list of strings")
    scenes = parse_prompts(list(prompts))  # bad prompts fail here, before anything slow
    qconfig, config_label = resolve_config(s.config)
    out = Path(s.out)

    with phase("load"):
        bundle = load_demo_model(s.model, random_weights=s.random_weights, small=s.small, device=s.device)
    if s.random_weights:
        log(f"*** {SMOKE_BANNER} ***")
        warnings.warn(SMOKE_BANNER, UserWarning, stacklevel=2)
    steps = (DEMO_STEPS or bundle.default_steps) if s.steps is None else s.steps
    guidance = bundle.default_guidance if s.guidance is None else s.guidance
    log(
        f"demo: {bundle.name} ({bundle.spec.model_class}), config {config_label}, {len(prompts)} prompts, "
        f"{steps} steps, guidance {guidance:g}, {s.calib_prompts} calibration prompts -> {out}/"
    )

    with phase("calibration set"):
        items = calibration_set(bundle, s.calib_prompts, steps=steps, guidance=guidance, progress=s.progress)
    log(f"quantizing the backbone with {config_label} on {len(items)} calibration items")
    with phase("quantize"):
        qmodel = segquant_fx.quantize(bundle.backbone, items, qconfig, progress=s.progress)
    del items

    seeds = [EVAL_SEED_BASE + i for i in range(len(prompts))]
    with phase("float images"):
        float_images = _generate(
            bundle, prompts, seeds, steps, guidance, desc="float images", progress=s.progress
        )
    with phase("quantized images"):
        q_images = _generate(
            bundle,
            prompts,
            seeds,
            steps,
            guidance,
            backbone=qmodel,
            desc="quantized images",
            progress=s.progress,
        )

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    onnx_info = None
    if s.onnx:
        log("exporting the quantized backbone to ONNX (Q/DQ)")
        with phase("onnx export"):
            onnx_info = export_backbone_onnx(qmodel, out / ONNX_FILE)
        files["onnx" if onnx_info["ok"] else "onnx_error"] = out / (
            ONNX_FILE if onnx_info["ok"] else ONNX_ERROR_FILE
        )
        if not onnx_info["ok"]:
            log(
                f"ONNX export failed (recorded in {out / ONNX_ERROR_FILE}): {onnx_info['error'].splitlines()[0]}"
            )

    fid = summarize(float_images, q_images)
    v_float = judge(float_images, scenes)["overall"]
    v_quant = judge(q_images, scenes)["overall"]
    card_adherence = bundle.card.get("evaluation", {}).get("adherence", {}).get("overall")
    timings["total"] = time.perf_counter() - t_start
    cpu["total"] = time.process_time() - cpu_start
    metrics: dict[str, Any] = {
        "model": bundle.name,
        "model_source": s.model,
        "model_class": bundle.spec.model_class,
        "config": config_label,
        "random_weights": bool(s.random_weights),
        "settings": {
            "n_prompts": len(prompts),
            "steps": steps,
            "guidance": float(guidance),
            "calib_prompts": s.calib_prompts,
            "calib_scene_seed": CALIB_SCENE_SEED,
            "calib_seeds": f"{CALIB_SEED_BASE} + i",
            "eval_seeds": f"{EVAL_SEED_BASE} + i",
            "device": s.device,
            "small_arch": bool(s.small),
        },
        "calibration_items": int(qmodel.meta.get("calibration_items", 0)),
        "quantized_layers": len(qmodel.plan),
        "psnr": fid["psnr"],
        "ssim": fid["ssim"],
        "adherence": {
            "float": score_adherence(float_images, scenes),
            "quantized": score_adherence(q_images, scenes),
            "chance": chance_level(),
            "model_card": card_adherence,
        },
        "per_prompt": [
            {
                "prompt": p,
                "seed": seeds[i],
                "psnr": fid["psnr_per_image"][i],
                "ssim": fid["ssim_per_image"][i],
                "float_ok": bool(v_float[i]),
                "quantized_ok": bool(v_quant[i]),
            }
            for i, p in enumerate(prompts)
        ],
        "onnx": onnx_info,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "quantize_timings": qmodel.meta.get("timings", {}),
    }

    grid = comparison_grid(float_images, q_images)
    cell = 4 * float_images.shape[-1]
    labels = [
        f"{i}: {p}  [PSNR {_fmt(fid['psnr_per_image'][i], 1)} dB, SSIM {fid['ssim_per_image'][i]:.3f}]"
        for i, p in enumerate(prompts)
    ]
    title = (
        f"{bundle.name}, {config_label}: PSNR {_fmt(fid['psnr'], 1)} dB, SSIM {fid['ssim']:.3f}, adherence "
        f"float {metrics['adherence']['float']['overall']:.2f} / quantized {metrics['adherence']['quantized']['overall']:.2f}"
    )
    warning = "SMOKE TEST: random (untrained) weights" if s.random_weights else ""
    png = _annotated_png(grid, labels, cell=cell, pad=2, title=title, warning=warning)
    if png is None:
        from segquant_fx.t2i.grid import encode_png

        png = encode_png(grid)
    files["grid"] = atomic_write_bytes(out / "grid.png", png, make_parents=True)
    header = f"# Quantization plan: {bundle.name} ({bundle.spec.model_class}), config {config_label}\n\n"
    if s.random_weights:
        header += f"**{SMOKE_BANNER}**\n\n"
    files["report"] = atomic_write_text(out / "report.md", header + qmodel.report(), make_parents=True)
    files["metrics_json"] = atomic_write_text(
        out / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n", make_parents=True
    )
    files["metrics_md"] = atomic_write_text(out / "metrics.md", _metrics_markdown(metrics), make_parents=True)
    return DemoResult(
        out=out,
        files=files,
        metrics=metrics,
        float_images=float_images,
        quantized_images=q_images,
        qmodel=qmodel,
    )


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_demo_parser(sub: Any) -> Any:
    """Add the ``demo`` subcommand to ``segquant-fx``'s subparsers; returns the parser."""
    d = sub.add_parser(
        "demo",
        help="quantize the built-in MMDiT with SegQuant W8A8; write a float-vs-quantized image grid and metrics",
        description=__doc__.split("\n\n")[0],
    )
    d.add_argument(
        "--model",
        default="mmdit",
        help="built-in model (mmdit, flux, unet), a weights directory (save_bundle) or a diffusers backbone dir",
    )
    d.add_argument(
        "--config", default="w8a8", help="preset name (default w8a8) or a config file (.json/.yaml)"
    )
    d.add_argument("--out", default="segquant-demo", help="output directory (default segquant-demo/)")
    d.add_argument(
        "--prompts",
        type=int,
        default=EVAL_PROMPTS,
        help=f"number of fixed evaluation prompts (default {EVAL_PROMPTS})",
    )
    d.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="your own evaluation prompt in the generator's grammar (repeatable; replaces --prompts)",
    )
    d.add_argument(
        "--calib-prompts",
        type=int,
        default=CALIB_PROMPTS,
        help=f"calibration prompts (default {CALIB_PROMPTS})",
    )
    d.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default {DEMO_STEPS}; the model cards use 20-25)",
    )
    d.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model card's)")
    d.add_argument("--device", default="cpu")
    d.add_argument(
        "--random-weights",
        action="store_true",
        help="SMOKE TEST: untrained weights (built-in names only); the images are noise",
    )
    d.add_argument(
        "--small", action="store_true", help="with --random-weights: the reduced test architecture"
    )
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    d.add_argument("--quiet", action="store_true", help="no progress bars or phase messages")
    d.set_defaults(func=main)
    return d


def main(args: Any) -> int:
    """Run the demo from parsed arguments; prints the metrics table and the artifact paths."""
    settings = DemoSettings(
        model=args.model,
        config=args.config,
        out=args.out,
        prompts=tuple(args.prompt) if args.prompt else eval_prompts(args.prompts),
        calib_prompts=args.calib_prompts,
        steps=args.steps,
        guidance=args.guidance,
        random_weights=args.random_weights,
        small=args.small,
        onnx=not args.no_onnx,
        progress=not args.quiet,
        device=args.device,
    )
    res = run_demo(settings)
    print(_metrics_markdown(res.metrics))
    for name, path in res.files.items():
        print(f"{name:13s} {path}")
    print(f"done in {res.metrics['timings']['total']:.1f} s")
    if settings.random_weights:
        print(f"*** {SMOKE_BANNER} ***")
    return 0
