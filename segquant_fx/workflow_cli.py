"""The diffusion-workflow commands of ``segquant-fx``: ``calibrate``, ``quantize`` (pipeline mode), ``generate``.

::

    segquant-fx calibrate --pipeline tiny-sd3 --prompts prompts.txt --out calib/ --steps 28 --timesteps-per-sample 7
    segquant-fx quantize  --pipeline tiny-sd3 --calib-set calib/ --preset w8a8 --out q-transformer/
    segquant-fx generate  --pipeline tiny-sd3 --quantized q-transformer/ --prompts prompts.txt --out images/

``--pipeline`` is a built-in pipeline name (``tiny-sd3``, ``tiny-flux``, ``tiny-sdxl``, ... see
:mod:`segquant_fx.models.pipeline_zoo`) or a local diffusers pipeline directory (with
``--controlnet DIR`` for the ControlNet variant). ``--prompts`` is a ``.txt`` (one prompt per line), a
``.jsonl`` (``{"prompt": ...}`` per line) or a dataset directory (``metadata.json``; ControlNet
pipelines take their control images from it), read by :func:`segquant_fx.datasets.read_prompts`.

``quantize`` keeps its original behaviour (a built-in backbone calibrated on random inputs) unless
one of ``--pipeline``, ``--calib-set``, ``--config``, ``--static-shapes`` is given or ``--model`` is a
directory: then the backbone comes from the pipeline (``--calib-layer``) or the model directory /
built-in name, the items from the calibration set, and the config from ``--config FILE`` (JSON or
YAML dict) or ``--preset``.

``generate --stepper FILE`` loads a stepper with :func:`segquant_fx.affiner.load_affiner`;
``--stepper identity`` (or ``identity:uncond`` / ``identity:text``) uses an
:class:`~segquant_fx.stepper.IdentityStepper`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segquant_fx.errors import ConfigError

__all__ = ["add_commands", "extend_quantize"]

_DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _add_pipeline_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--pipeline",
        required=required,
        help="built-in pipeline (tiny-sd3, tiny-flux, tiny-sdxl, ...) or a local dir",
    )
    p.add_argument(
        "--controlnet", help="local ControlNet directory (makes the SD3/FLUX pipeline a ControlNet one)"
    )
    p.add_argument("--dtype", choices=_DTYPES, help="dtype of the pipeline's models (default float32)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help=".txt / .jsonl prompt file or dataset directory")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (SD3/FLUX; default: the pipeline's)")
    p.add_argument(
        "--controlnet-scale", type=float, help="controlnet_conditioning_scale (ControlNet pipelines)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _pipeline(args: argparse.Namespace) -> Any:
    from segquant_fx.models.pipeline_zoo import PIPELINES, build_pipeline, load_pipeline

    dtype = _dtype(args.dtype)
    if args.pipeline in PIPELINES:
        if args.controlnet:
            raise ConfigError(
                f"--controlnet is for local pipelines; built-in ControlNet pipelines are named, e.g. "
                f"{[n for n in PIPELINES if 'controlnet' in n]}"
            )
        return build_pipeline(args.pipeline, device=args.device, dtype=dtype, progress=not args.quiet)
    if not Path(args.pipeline).is_dir():
        raise ConfigError(
            f"--pipeline {args.pipeline!r} is neither a built-in pipeline ({', '.join(PIPELINES)}) nor a directory"
        )
    pipe = load_pipeline(args.pipeline, controlnet=args.controlnet, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe


def _is_controlnet(pipe: Any) -> bool:
    return getattr(pipe, "controlnet", None) is not None


def _samples(args: argparse.Namespace, pipe: Any) -> list[Any]:
    """Prompts (or ``(prompt, image, control)`` for ControlNet pipelines), at most ``--num-prompts``."""
    from segquant_fx.datasets import read_prompts

    if args.num_prompts is not None and args.num_prompts < 1:
        raise ConfigError(f"--num-prompts must be positive, got {args.num_prompts}")
    n = args.num_prompts
    if _is_controlnet(pipe):
        src = Path(args.prompts)
        if not (src.is_dir() and (src / "metadata.json").is_file()):
            raise ConfigError(
                f"--prompts {src}: a ControlNet pipeline needs control images; give a dataset directory whose "
                "metadata.json has 'control' entries (segquant-fx dataset prepare makes one)"
            )
        from segquant_fx.datasets import CaptionControlDataset

        ds = CaptionControlDataset(src)
        out = []
        for i in range(len(ds) if n is None else min(n, len(ds))):
            prompt, _image, control = ds[i]
            if control is None:
                raise ConfigError(f"--prompts {src}: entry {i} has no control image")
            out.append((prompt, None, control))
        return out
    prompts = read_prompts(args.prompts)
    return prompts if n is None else prompts[:n]


def _pipe_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for name, key in (
        ("guidance_scale", "guidance_scale"),
        ("height", "height"),
        ("width", "width"),
        ("max_sequence_length", "max_sequence_length"),
        ("controlnet_scale", "controlnet_conditioning_scale"),
    ):
        value = getattr(args, name, None)
        if value is not None:
            kw[key] = value
    if "max_sequence_length" in kw:
        from segquant_fx.models.pipelines import family_of

        if family_of(pipe) == "sdxl":
            raise ConfigError("--max-sequence-length applies to SD3 and FLUX pipelines (T5), not SDXL")
    if "controlnet_conditioning_scale" in kw and not _is_controlnet(pipe):
        raise ConfigError("--controlnet-scale needs a ControlNet pipeline")
    return kw


def _default_layer(pipe: Any) -> str:
    from segquant_fx.models.pipelines import family_of

    return "unet" if family_of(pipe) == "sdxl" else "transformer"


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------


def _sampler(args: argparse.Namespace) -> Any:
    from segquant_fx.calibset import BaseSampler, NormalSampler, UniformSampler

    if args.sampler == "uniform":
        return UniformSampler()
    if args.sampler == "base":
        return BaseSampler()
    return NormalSampler(mean=args.mean, seed=args.seed)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from segquant_fx.calibset import generate_calibrate_set

    if args.mean is not None and args.sampler != "normal":
        raise ConfigError("--mean is a setting of --sampler normal")
    pipe = _pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    samples = _samples(args, pipe)
    layer = args.calib_layer or _default_layer(pipe)
    t0 = time.perf_counter()
    calib = generate_calibrate_set(
        pipe,
        _sampler(args),
        samples,
        layer,
        dump_path=args.out,
        chunk_size=args.chunk_size,
        compress=not args.no_compress,
        num_inference_steps=args.steps,
        timestep_per_sample=args.timesteps_per_sample,
        seed=args.seed,
        progress=not args.quiet,
        **_pipe_kwargs(args, pipe),
    )
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(
        f"{args.pipeline}: {len(calib)} calibration items of {layer!r} from {len(samples)} prompts "
        f"({args.steps} steps, {args.timesteps_per_sample or args.steps} sampled per prompt, {args.sampler}) "
        f"in {dt:.1f} s; {len(calib.chunks)} chunks, {size / 2**20:.1f} MiB in {args.out}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# quantize (pipeline mode)
# --------------------------------------------------------------------------------------------------


def _wants_workflow(args: argparse.Namespace) -> bool:
    return bool(
        args.pipeline
        or getattr(args, "prompts", None)
        or args.calib_set
        or args.config
        or args.static_shapes
        or (args.model and Path(args.model).is_dir())
    )


def _load_config(path: str) -> Any:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"--config {path}: no such file (give a .json or .yaml quantization config)")
    text = f.read_text()
    if f.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("--config: reading YAML needs pyyaml (pip install pyyaml)") from None
        data = yaml.safe_load(text)
    elif f.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: invalid JSON ({e})") from None
    else:
        raise ConfigError(f"--config {path}: unknown extension {f.suffix!r}; use .json or .yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the file must hold a dict (the quantize config format)")
    return data


def _model_dir(path: Path, dtype: Any, device: str) -> Any:
    import diffusers

    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"--model {path}: a model directory needs config.json (a diffusers model folder)")
    name = json.loads(cfg.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ConfigError(f"--model {path}: config.json names {name!r}, not a diffusers model class")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    return cls.from_pretrained(path, **kw).to(device).eval()


def _cmd_quantize_workflow(args: argparse.Namespace) -> int:
    import torch
    from torch.utils import _pytree as pytree

    from segquant_fx.api import quantize

    if args.pipeline:
        pipe = _pipeline(args)
        layer = args.calib_layer or _default_layer(pipe)
        from segquant_fx.models.pipelines import backbone_of

        model, source = backbone_of(pipe, layer), f"{args.pipeline} {layer}"
    elif args.model and Path(args.model).is_dir():
        model, source = _model_dir(Path(args.model), _dtype(args.dtype), args.device), args.model
    else:
        from segquant_fx.cli import load_model_arg

        model, _ = load_model_arg(args.model, args.batch_size)
        model, source = model.to(args.device), args.model
    if getattr(args, "prompts", None) and args.calib_set:
        raise ConfigError("give either --prompts (calibrate now) or --calib-set (a recorded set), not both")
    if getattr(args, "prompts", None):
        if not args.pipeline:
            raise ConfigError("--prompts records calibration items by running a pipeline: add --pipeline")
        from segquant_fx.calibset import UniformSampler, generate_calibrate_set

        pipe.set_progress_bar_config(disable=True)
        samples = _samples(args, pipe)
        items = generate_calibrate_set(
            pipe,
            UniformSampler(),
            samples,
            layer,
            dump_path=None,
            num_inference_steps=args.steps,
            timestep_per_sample=args.timesteps_per_sample,
            seed=args.seed,
            progress=not args.quiet,
            **_pipe_kwargs(args, pipe),
        )
        first = items[0]
    elif args.calib_set:
        from segquant_fx.calibset import load_calibrate_set
        from segquant_fx.calibset.generate import _backbone_settings

        items: Any = load_calibrate_set(args.calib_set, device=args.device)
        recorded = items.settings.get("pipeline", {}).get("backbone", {}).get("config_sha256")
        mine = _backbone_settings(model)["config_sha256"]
        if recorded is not None and recorded != mine:
            raise ConfigError(
                f"--calib-set {args.calib_set} was recorded from a backbone with another config than {source}; "
                "record it from the same pipeline/model"
            )
        first = items[0]
    else:
        if args.model.endswith(".py") or ":" in args.model or Path(args.model).is_dir() or args.pipeline:
            raise ConfigError(
                "quantizing a pipeline backbone or a model directory needs --prompts (with --pipeline) or "
                "--calib-set (segquant-fx calibrate)"
            )
        from segquant_fx.models import calibration_items

        items = calibration_items(args.model, args.calib_items, args.batch_size)
        first = items[0]
    config = _load_config(args.config) if args.config else args.preset
    t0 = time.perf_counter()
    qmodel = quantize(
        model,
        items,
        config,
        progress=not args.quiet,
        max_items=args.max_items,
        dynamic=not args.static_shapes,
    )
    dt = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(**first)
        out = qmodel(**first)
    r, o = pytree.tree_leaves(ref)[0].float(), pytree.tree_leaves(out)[0].float()
    rel = float((o - r).norm() / r.norm().clamp_min(1e-12))
    print(qmodel.report())
    n_items = qmodel.meta.get("calibration_items", "?")
    print(
        f"{source}: {len(qmodel.plan)} layers quantized with {args.config or args.preset} on {n_items} items in "
        f"{dt:.1f} s; output relative error vs float on the first item {rel:.4f}"
    )
    if args.out:
        qmodel.save(args.out)
        print(f"saved to {args.out}")
    return 0


def extend_quantize(q: argparse.ArgumentParser, original: Callable[[argparse.Namespace], int]) -> None:
    """Add the pipeline-mode options to ``segquant-fx quantize``; without them ``original`` runs."""
    q.add_argument(
        "--pipeline", help="take the backbone from this built-in pipeline or local pipeline directory"
    )
    q.add_argument("--controlnet", help="local ControlNet directory (with a local --pipeline)")
    q.add_argument(
        "--calib-layer", help="backbone of --pipeline: transformer (alias dit), unet or controlnet"
    )
    q.add_argument("--calib-set", help="calibration set directory (segquant-fx calibrate)")
    q.add_argument("--config", help="quantization config file (.json / .yaml dict); overrides --preset")
    q.add_argument("--max-items", type=int, help="use at most this many calibration items")
    q.add_argument(
        "--static-shapes",
        action="store_true",
        help="capture with the calibration items' shapes only (faster; other batch sizes/resolutions then fail)",
    )
    q.add_argument("--dtype", choices=_DTYPES, help="dtype of the model (pipeline mode)")
    q.add_argument("--device", default="cpu", help="device (pipeline mode; default cpu)")
    # one step instead of `calibrate` + `quantize --calib-set`: record an in-memory calibration set first
    q.add_argument(
        "--prompts", help="with --pipeline: .txt / .jsonl prompt file or dataset directory to calibrate on"
    )
    q.add_argument("--num-prompts", type=int, help="--prompts: use only the first N prompts")
    q.add_argument("--steps", type=int, default=28, help="--prompts: denoising steps (default 28)")
    q.add_argument(
        "--timesteps-per-sample", type=int, help="--prompts: steps recorded per prompt (default: all)"
    )
    q.add_argument("--guidance-scale", type=float, help="--prompts: guidance scale (default: the pipeline's)")
    q.add_argument("--height", type=int, help="--prompts: image height (default: the pipeline's)")
    q.add_argument("--width", type=int, help="--prompts: image width (default: the pipeline's)")
    q.add_argument("--seed", type=int, default=0, help="--prompts: seed of the initial noise (default 0)")

    def dispatch(args: argparse.Namespace) -> int:
        if _wants_workflow(args):
            return _cmd_quantize_workflow(args)
        return original(args)

    q.set_defaults(func=dispatch)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def _stepper(spec: str | None) -> Any:
    if spec is None:
        return None
    if spec.split(":")[0] == "identity":
        from segquant_fx.stepper import IdentityStepper

        target = spec.split(":", 1)[1] if ":" in spec else "all"
        return IdentityStepper(target)
    if not Path(spec).exists():
        raise ConfigError(
            f"--stepper {spec}: no such file (give a saved affiner, or identity[:uncond|:text])"
        )
    try:
        from segquant_fx.affiner import load_affiner
    except ImportError:
        raise ConfigError(
            "--stepper FILE needs segquant_fx.affiner.load_affiner, which this installation does not have"
        ) from None
    return load_affiner(spec)


def _save_png(image: Any, path: Path) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _grid(images: list[Any]) -> Any:
    import math

    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    pipe = _pipeline(args)
    stepper = _stepper(args.stepper)
    if args.quantized:
        import segquant_fx

        layer = args.calib_layer or _default_layer(pipe)
        from segquant_fx.models.pipelines import backbone_of

        backbone_of(pipe, layer)  # validates the name against this pipeline
        qmodel = segquant_fx.load(args.quantized, device=args.device)
        if args.dtype:
            qmodel = qmodel.to(_dtype(args.dtype))
        from segquant_fx.models.pipelines import resolve_calib_layer

        setattr(pipe, resolve_calib_layer(layer), qmodel)
    samples = _samples(args, pipe)
    kw = _pipe_kwargs(args, pipe)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images, index = [], []
    for i, sample in enumerate(tqdm(samples, desc="generate", unit="image", disable=args.quiet)):
        call = dict(kw)
        if isinstance(sample, tuple):
            call["prompt"], call["control_image"] = sample[0], sample[2]
        else:
            call["prompt"] = sample
        call["generator"] = torch.Generator("cpu").manual_seed(args.seed + i)
        if stepper is not None:
            call["stepper"] = stepper
        image = pipe(num_inference_steps=args.steps, **call).images[0]
        name = f"{i:05d}.png"
        _save_png(image, out / name)
        images.append(image)
        index.append({"file": name, "prompt": call["prompt"], "seed": args.seed + i})
    tmp = out / ".images.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in index))
    os.replace(tmp, out / "images.jsonl")
    if not args.no_grid and images:
        _save_png(_grid(images[:64]), out / "grid.png")
    what = f" with {type(stepper).__name__}" if stepper is not None else ""
    qwhat = f", quantized backbone from {args.quantized}" if args.quantized else ""
    print(f"{args.pipeline}{qwhat}: {len(images)} images{what} written to {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Register ``calibrate`` and ``generate`` on the ``segquant-fx`` subparsers."""
    c = sub.add_parser("calibrate", help="record a calibration set from a pipeline over prompts")
    _add_pipeline_args(c)
    _add_run_args(c)
    c.add_argument("--out", required=True, help="calibration-set directory (resumed if it exists)")
    c.add_argument(
        "--calib-layer", help="transformer (alias dit), unet or controlnet (default: the backbone)"
    )
    c.add_argument(
        "--sampler", choices=["uniform", "base", "normal"], default="uniform", help="timestep sampler"
    )
    c.add_argument("--mean", type=float, help="--sampler normal: mean in steps remaining (default: centre)")
    c.add_argument("--timesteps-per-sample", type=int, help="steps recorded per prompt (default: all)")
    c.add_argument("--chunk-size", type=int, default=100, help="items per chunk file (default 100)")
    c.add_argument("--no-compress", action="store_true", help="do not zstandard-compress chunks")
    c.set_defaults(func=_cmd_calibrate)

    g = sub.add_parser("generate", help="generate images from prompts (optionally quantized, with a stepper)")
    _add_pipeline_args(g)
    _add_run_args(g)
    g.add_argument("--out", required=True, help="output directory for PNG images")
    g.add_argument("--quantized", help="saved quantized backbone directory (segquant-fx quantize --out)")
    g.add_argument("--calib-layer", help="which component --quantized replaces (default: the backbone)")
    g.add_argument("--stepper", help="saved affiner file, or identity[:uncond|:text]")
    g.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    g.set_defaults(func=_cmd_generate)
