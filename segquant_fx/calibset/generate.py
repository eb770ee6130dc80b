"""``generate_calibrate_set``: run a pipeline over prompts and record its backbone's inputs.

For every prompt the pipeline runs once (``output_type="latent"``; it stops right after the last
selected step), and a forward pre-hook on the backbone (``calib_layer``) records the arguments of
every call made during the steps the sampler selects: the CFG-doubled latents, text embeddings,
pooled embeddings, timestep, ControlNet residuals and so on, bound to the forward's parameter names
(``{"hidden_states": ..., "timestep": ..., "return_dict": False}``), detached and copied to the CPU.
Steps are counted by ``scheduler.step`` calls (:func:`~segquant_fx.models.pipelines.track_denoising`).

Determinism: every prompt starts from the same initial noise (``seed``; the evaluation protocol
reuses one latent for all prompts), or from ``latents=`` if given. So a rerun records the same items,
which is what makes resuming exact: the manifest's cursor says which prompt to continue with and how
many of its items are already on disk; that prompt runs again and its first items are skipped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segquant_fx.calibset.samplers import BaseSampler
from segquant_fx.calibset.storage import (
    FORMAT,
    MANIFEST,
    VERSION,
    CalibrationSet,
    MemoryCalibrationSet,
    _atomic_write,
    encode_chunk,
    load_calibrate_set,
    read_manifest,
    write_manifest,
)
from segquant_fx.errors import CalibrationError, ConfigError

__all__ = ["generate_calibrate_set"]

#: Pipeline arguments that ``generate_calibrate_set`` sets itself.
_RESERVED = ("prompt", "output_type", "generator", "return_dict")


# --------------------------------------------------------------------------------------------------
# fingerprints and settings
# --------------------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(value: Any) -> Any:
    """A JSON-able description of a pipeline argument (tensors and images by shape and hash)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.to(torch.uint8) if t.dtype == torch.bool else t.reshape(-1).view(torch.uint8)
        return {
            "tensor": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": _digest(raw.numpy().tobytes()),
        }
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _fingerprint(v) for k, v in value.items()}
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # PIL image
        return {"image": list(value.size), "mode": value.mode, "sha256": _digest(value.tobytes())}
    return {"object": type(value).__name__}


def _backbone_settings(module: nn.Module) -> dict[str, Any]:
    cls = getattr(module, "model_class", "") or f"{type(module).__module__}.{type(module).__qualname__}"
    cfg = getattr(module, "config", None)
    # private keys are loading metadata; "_use_default_values" is a set made a list, in an order that
    # changes with Python's hash seed, i.e. from one process to the next (resuming would fail)
    public = (
        {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")} if hasattr(cfg, "keys") else None
    )
    cfg_json = json.dumps(public, sort_keys=True, default=str)
    dtype = getattr(module, "dtype", None)
    return {
        "class": str(cls),
        "config_sha256": _digest(cfg_json.encode()),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


_ABSENT = "<absent>"


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    a, b = _flatten(old), _flatten(new)
    for key in [*a, *(k for k in b if k not in a)]:
        if json.dumps(a.get(key, _ABSENT), sort_keys=True) != json.dumps(b.get(key, _ABSENT), sort_keys=True):
            return key, a.get(key, _ABSENT), b.get(key, _ABSENT)
    return None


def _first_difference_message(root: Path | None, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    diff = _first_difference(old, new)
    if diff is None:
        return None
    key, a, b = diff

    def show(value: Any) -> str:
        return f"{key} unset" if value == _ABSENT else f"{key}={value!r}"

    return (
        f"dump_path {root} holds a calibration set made with {show(a)}, but this run has "
        f"{show(b)}; use another dump_path, or the same settings to resume or reuse it"
    )


# --------------------------------------------------------------------------------------------------
# the store: chunks on disk (or a list in memory) plus the resume cursor
# --------------------------------------------------------------------------------------------------


class _Store:
    """Buffers items into chunks, writes them atomically, and keeps the manifest's cursor current."""

    def __init__(self, root: Path | None, settings: dict[str, Any], chunk_size: int, compress: int) -> None:
        self.root = root
        self.settings = settings
        self.chunk_size = chunk_size
        self.compress = compress
        self.chunks: list[dict[str, Any]] = []
        self.num_items = 0
        self.cursor = {"prompt": 0, "skip": 0}
        self.prompt_hashes: list[str] = []
        self.complete = False
        self.num_prompts: int | None = None
        self.buffer: list[tuple[dict[str, Any], dict[str, int]]] = []
        self.memory: list[tuple[dict[str, Any], dict[str, int]]] = []
        self.current = (0, 0)  # (prompt index, its items added so far, skipped ones included)
        #: A chunk never spans two prompts, and chunks record their prompt (distributed parts).
        self.per_prompt = False

    @classmethod
    def create(
        cls,
        root: Path | None,
        settings: dict[str, Any],
        *,
        chunk_size: int,
        compress: bool | int,
        resume: bool,
    ) -> _Store:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}")
        level = 3 if compress is True else int(compress or 0)
        if not 0 <= level <= 22:
            raise ConfigError(f"compress must be a bool or a zstandard level 1..22, got {compress!r}")
        settings = {**settings, "chunk_size": chunk_size, "compress": level}
        store = cls(root, settings, chunk_size, level)
        if root is None:
            return store
        if root.exists() and not root.is_dir():
            raise ConfigError(f"dump_path {root} exists and is not a directory")
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None:
            if root.is_dir() and any(root.iterdir()):
                parts = (root / "parts").is_dir()
                hint = " (parts of an interrupted distributed run: resume it with torchrun)" if parts else ""
                raise ConfigError(
                    f"dump_path {root} is a non-empty directory without {MANIFEST}{hint}; give an empty or new "
                    "directory (nothing in it is overwritten)"
                )
            root.mkdir(parents=True, exist_ok=True)
            store._write_manifest()
            return store
        if not resume:
            raise ConfigError(f"dump_path {root} already holds a calibration set; give a new directory")
        msg = _first_difference_message(root, manifest["settings"], settings)
        if msg is not None:
            raise ConfigError(msg)
        store.chunks = list(manifest["chunks"])
        store.num_items = int(manifest["num_items"])
        store.cursor = dict(manifest["cursor"])
        store.prompt_hashes = list(manifest["prompt_sha256"])
        store.complete = bool(manifest["complete"])
        store.num_prompts = manifest.get("num_prompts")
        store.current = (store.cursor["prompt"], store.cursor["skip"])
        return store

    def _write_manifest(self) -> None:
        assert self.root is not None
        write_manifest(
            self.root,
            {
                "format": FORMAT,
                "version": VERSION,
                "settings": self.settings,
                "complete": self.complete,
                "num_items": self.num_items,
                "num_prompts": self.num_prompts,
                "cursor": self.cursor,
                "prompt_sha256": self.prompt_hashes,
                "chunks": self.chunks,
            },
        )

    def check_prompt(self, index: int, digest: str) -> None:
        if index < len(self.prompt_hashes):
            if self.prompt_hashes[index] != digest:
                raise ConfigError(
                    f"dump_path {self.root}: prompt {index} differs from the one the calibration set was made "
                    "with (sample_dataloader changed); use another dump_path or the same prompts"
                )
        else:
            self.prompt_hashes.append(digest)

    def start_prompt(self, index: int, skip: int) -> None:
        self.current = (index, skip)

    def add(self, item: dict[str, Any], info: dict[str, int]) -> None:
        p, n = self.current
        self.current = (p, n + 1)
        if self.root is None:
            self.memory.append((item, info))
            self.num_items += 1
            return
        self.buffer.append((item, info))
        if len(self.buffer) >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer or self.root is None:
            return
        items = [b[0] for b in self.buffer]
        infos = [b[1] for b in self.buffer]
        data = encode_chunk(items, infos, self.compress)
        name = f"chunk_{len(self.chunks):05d}.safetensors" + (".zst" if self.compress else "")
        _atomic_write(self.root / name, data)
        entry = {"file": name, "items": len(items), "bytes": len(data), "sha256": _digest(data)}
        if self.per_prompt:
            entry["prompt_index"] = int(infos[0]["prompt_index"])
        self.chunks.append(entry)
        self.num_items += len(items)
        self.buffer.clear()
        p, n = self.current
        self.cursor = {"prompt": p, "skip": n}
        self._write_manifest()

    def prompt_done(self, index: int) -> None:
        if self.per_prompt:
            self._flush()
        self.current = (index + 1, 0)
        if self.root is not None and not self.buffer:
            self.cursor = {"prompt": index + 1, "skip": 0}
            self._write_manifest()

    def finish(self, num_prompts: int) -> None:
        self._flush()
        self.complete = True
        self.num_prompts = num_prompts
        self.cursor = {"prompt": num_prompts, "skip": 0}
        if self.root is not None:
            self._write_manifest()


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def _open_image(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"control image {path} does not exist")
        with Image.open(path) as im:
            return im.convert("RGB")
    return value


def _sample(obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, str):
        return {"prompt": obj}
    if isinstance(obj, dict):
        if not isinstance(obj.get("prompt"), str):
            raise ConfigError(f"{where}: a dict sample needs a string 'prompt', got keys {sorted(obj)}")
        out = {"prompt": obj["prompt"]}
        control = obj.get("control_image", obj.get("control"))
        if control is not None:
            out["control_image"] = _open_image(control)
        if obj.get("negative_prompt") is not None:
            out["negative_prompt"] = obj["negative_prompt"]
        return out
    if isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[0], str):  # (prompt, image, control)
        out = {"prompt": obj[0]}
        if obj[2] is not None:
            out["control_image"] = _open_image(obj[2])
        return out
    raise ConfigError(
        f"{where}: a sample is a prompt string, a dict with 'prompt' (and 'control'), or a (prompt, image, "
        f"control) tuple; got {type(obj).__name__}"
    )


def _samples(loader: Iterable[Any], keep: Any = None) -> Iterator[dict[str, Any] | None]:
    """Samples of a loader: single samples, or batches (lists, or tuples of non-samples) of them.

    ``keep(index)`` False: yield None for that sample instead of reading it (another process's prompt).
    """
    if isinstance(loader, (str, dict)):
        raise ConfigError("sample_dataloader must be an iterable of prompts or samples, not a single one")
    index = 0
    for n, obj in enumerate(loader):
        if isinstance(obj, list) or (
            isinstance(obj, tuple) and not (len(obj) == 3 and isinstance(obj[0], str))
        ):
            for i, sub in enumerate(obj):
                yield (
                    _sample(sub, f"sample_dataloader batch {n} item {i}")
                    if keep is None or keep(index)
                    else None
                )
                index += 1
        else:
            yield _sample(obj, f"sample_dataloader item {n}") if keep is None or keep(index) else None
            index += 1


def _binder(module: nn.Module) -> Any:
    sig = getattr(module, "_signature", None)
    if sig is None:
        try:
            sig = inspect.signature(module.forward)
        except (TypeError, ValueError):
            sig = None
    name = getattr(module, "model_class", "") or type(module).__name__

    def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
        if sig is None:
            if args:
                raise CalibrationError(
                    f"{name} was called with positional arguments and has no inspectable signature"
                )
            return dict(kwargs)
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise CalibrationError(
                f"the pipeline's call of {name} does not match {name}.forward{sig}: {e}"
            ) from None
        out: dict[str, Any] = {}
        for pname, value in bound.arguments.items():
            kind = sig.parameters[pname].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise CalibrationError(
                        f"{name}.forward takes *{pname}; positional extras cannot be keyed by name"
                    )
            else:
                out[pname] = value
        return out

    return bind


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        t = t.to("cpu") if t.device.type != "cpu" else t.clone()
        return t.contiguous()
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _default_steps(pipe: Any) -> int:
    for cls in type(pipe).__mro__:
        fn = cls.__dict__.get("__call__")
        if fn is not None:
            p = inspect.signature(fn).parameters.get("num_inference_steps")
            if p is not None and isinstance(p.default, int):
                return p.default
    raise ConfigError(f"{type(pipe).__name__}: pass num_inference_steps (max_timestep)")


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------


def generate_calibrate_set(
    model: Any,
    sampler: BaseSampler,
    sample_dataloader: Iterable[Any],
    calib_layer: str | nn.Module = "transformer",
    dump_path: str | os.PathLike[str] | None = None,
    chunk_size: int = 100,
    compress: bool | int = True,
    *,
    max_timestep: int | None = None,
    num_inference_steps: int | None = None,
    sample_size: int | None = None,
    timestep_per_sample: int | None = None,
    seed: int = 0,
    progress: bool = True,
    distributed: Any = None,
    **pipe_kwargs: Any,
) -> CalibrationSet:
    """Record a backbone's inputs while a pipeline denoises, at the steps a sampler selects.

    Args:
        model: The pipeline (a segquant_fx adapter or a plain diffusers SD3 / FLUX / SDXL /
            ControlNet pipeline).
        sampler: A :class:`~segquant_fx.calibset.BaseSampler` (``UniformSampler``, ``NormalSampler``...).
        sample_dataloader: Iterable of prompts (strings), dicts ``{"prompt", "control"}``,
            ``(prompt, image, control)`` tuples (``CaptionControlDataset``), or lists (batches) of those.
            A control may be a PIL image or an image path.
        calib_layer: ``"transformer"`` (alias ``"dit"``), ``"unet"``, ``"controlnet"``, or the module.
        dump_path: Directory for the set; None keeps it in memory. An existing set there is resumed
            (interrupted) or reused (complete) when the settings match; otherwise a ConfigError.
        chunk_size: Items per chunk file.
        compress: zstandard-compress chunks (True = level 3, an int = that level, False = none).
        max_timestep: Number of inference steps (the reference's name); alias of ``num_inference_steps``.
        num_inference_steps: Number of inference steps (default: the pipeline's default).
        sample_size: Use at most this many prompts (default: all).
        timestep_per_sample: Steps the sampler selects per prompt (default: all steps).
        seed: Seed of the initial noise, the same for every prompt (ignored when ``latents`` is given).
        progress: Show a progress bar over prompts (process 0 only when distributed).
        distributed: Share the prompts among the processes of a ``torch.distributed`` group: None
            (automatic: when it is initialized with several processes), True, False, or a
            ``ProcessGroup``. Prompt ``i`` is generated by process ``i % world_size`` with the seeds
            of a single-process run; each process writes its own chunks and process 0 the manifest;
            every process returns the whole set, equal to the single-process one
            (:mod:`segquant_fx.distributed`).
        **pipe_kwargs: Passed to every pipeline call (``guidance_scale``, ``height``, ``width``,
            ``controlnet_conditioning_scale``, ``latents``, ``max_sequence_length``...).

    Returns:
        A :class:`~segquant_fx.calibset.CalibrationSet`: in memory, or the
        :func:`~segquant_fx.calibset.load_calibrate_set` view of ``dump_path``. Items are kwargs dicts
        for the backbone's forward; ``info(i)`` tells prompt and step of item ``i``.

    Raises:
        ConfigError: Bad arguments, an unknown ``calib_layer``, or settings (or prompts) that differ
            from those of the set already at ``dump_path`` (the message names the first difference).
        CalibrationError: The pipeline never called the backbone at a selected step.

    Example:
        >>> from segquant_fx.models.pipeline_zoo import build_pipeline
        >>> pipe = build_pipeline("tiny-sd3")
        >>> calib = generate_calibrate_set(pipe, UniformSampler(), ["a red fox", "a blue car"], "transformer",
        ...     num_inference_steps=4, timestep_per_sample=2, height=32, width=32, progress=False)
        >>> len(calib), sorted(calib[0])[:2]
        (4, ['encoder_hidden_states', 'hidden_states'])
    """
    from segquant_fx.models.pipelines import backbone_of, family_of, resolve_calib_layer, track_denoising

    if not isinstance(sampler, BaseSampler):
        raise ConfigError(
            f"sampler must be a BaseSampler (UniformSampler, NormalSampler...), got {type(sampler).__name__}"
        )
    if isinstance(calib_layer, nn.Module):
        module, layer_name = calib_layer, "module"
    else:
        module, layer_name = backbone_of(model, calib_layer), resolve_calib_layer(calib_layer)
    reserved = sorted(k for k in pipe_kwargs if k in _RESERVED)
    if reserved:
        raise ConfigError(
            f"generate_calibrate_set sets {reserved} itself (prompts come from sample_dataloader, noise from "
            "seed= or latents=)"
        )
    if max_timestep is not None and num_inference_steps is not None and max_timestep != num_inference_steps:
        raise ConfigError(
            f"max_timestep={max_timestep} and num_inference_steps={num_inference_steps} disagree"
        )
    steps = num_inference_steps if num_inference_steps is not None else max_timestep
    steps = _default_steps(model) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"num_inference_steps must be a positive int, got {steps!r}")
    nums = steps if timestep_per_sample is None else timestep_per_sample
    sampler.select_steps(steps, nums)  # validates nums
    if sample_size is not None and (
        isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
    ):
        raise ConfigError(f"sample_size must be a positive int or None, got {sample_size!r}")

    settings = {
        "sampler": sampler.settings(),
        "calib_layer": layer_name,
        "num_inference_steps": steps,
        "timestep_per_sample": nums,
        "sample_size": sample_size,
        "seed": seed,
        "pipeline": {
            "family": family_of(model),
            "backbone": _backbone_settings(module),
            "kwargs": _fingerprint(dict(sorted(pipe_kwargs.items()))),
        },
    }
    root = Path(dump_path) if dump_path is not None else None
    from segquant_fx.distributed import CalibsetShard, resolve_distributed

    ctx = resolve_distributed(distributed)
    shard = None
    if ctx is None:
        store = _Store.create(root, settings, chunk_size=chunk_size, compress=compress, resume=True)
    else:
        shard = CalibsetShard.open(
            ctx, root, settings, chunk_size=chunk_size, compress=compress, sample_size=sample_size
        )
        store = shard.store
        progress = progress and ctx.is_root
    bind = _binder(module)

    from tqdm.auto import tqdm

    total = sample_size
    if total is None and hasattr(sample_dataloader, "__len__"):
        try:
            total = len(sample_dataloader)  # type: ignore[arg-type]
        except TypeError:
            total = None
    old_bar = getattr(model, "_progress_bar_config", None)
    if hasattr(model, "set_progress_bar_config"):
        model.set_progress_bar_config(disable=True)
    if shard is not None and total is not None:
        total = shard.owned(total)
    bar = tqdm(total=total, desc="calibration set", unit="prompt", disable=not progress)
    if not store.complete:
        bar.update(store.cursor["prompt"])  # prompts finished by an earlier, interrupted run
    count = 0
    try:
        for index, sample in enumerate(_samples(sample_dataloader, None if shard is None else shard.owns)):
            if sample_size is not None and index >= sample_size:
                break
            count = index + 1
            if sample is None:  # another process's prompt
                continue
            local = index if shard is None else shard.local(index)
            store.check_prompt(local, _digest(json.dumps(_fingerprint(sample), sort_keys=True).encode()))
            if store.complete or local < store.cursor["prompt"]:
                continue
            skip = store.cursor["skip"] if local == store.cursor["prompt"] else 0
            _run_prompt(
                model,
                module,
                sample,
                index,
                skip,
                steps,
                nums,
                sampler,
                store,
                bind,
                seed,
                pipe_kwargs,
                track_denoising,
                store_index=local,
            )
            store.prompt_done(local)
            bar.update(1)
            bar.set_postfix(items=store.num_items + len(store.buffer))
    except Exception as e:
        if shard is None:
            raise
        shard.fail(e)  # raised here and, naming this process, in every other one
    finally:
        bar.close()
        if old_bar is not None:
            model._progress_bar_config = old_bar
        elif hasattr(model, "_progress_bar_config"):
            del model._progress_bar_config
    if shard is not None:
        return shard.finish(count)
    if count == 0:
        raise ConfigError("sample_dataloader yielded no prompts")
    if store.complete:
        if count != store.num_prompts:
            raise ConfigError(
                f"dump_path {root} holds a calibration set of {store.num_prompts} prompts, but "
                f"sample_dataloader gave {count}; use another dump_path or the same prompts"
            )
    else:
        store.finish(count)
    if root is None:
        return MemoryCalibrationSet(
            [m[0] for m in store.memory], [m[1] for m in store.memory], store.settings
        )
    return load_calibrate_set(root)


def _run_prompt(
    pipe: Any,
    module: nn.Module,
    sample: dict[str, Any],
    index: int,
    skip: int,
    steps: int,
    nums: int,
    sampler: BaseSampler,
    store: _Store,
    bind: Any,
    seed: int,
    pipe_kwargs: dict[str, Any],
    track_denoising: Any,
    store_index: int | None = None,
) -> None:
    selected = set(sampler.select_steps(steps, nums, index))
    store.start_prompt(index if store_index is None else store_index, skip)
    if not selected:
        return
    last = max(selected)
    seen = 0
    recorded_steps: set[int] = set()

    def record(tracker: Any, call_index: int, args: tuple, kwargs: dict, _out: Any) -> None:
        nonlocal seen
        step = tracker.step_index
        if step not in selected:
            return
        recorded_steps.add(step)
        seen += 1
        if seen <= skip:
            return
        store.add(
            _detach(bind(args, kwargs)), {"prompt_index": index, "step_index": step, "call_index": call_index}
        )

    def stop_after_last(tracker: Any) -> None:
        if tracker.step_index > last:
            pipe._interrupt = True  # the loop skips the remaining steps (diffusers' interrupt flag)

    call = dict(pipe_kwargs)
    call.update(sample)
    call["num_inference_steps"] = steps
    call["output_type"] = "latent"
    if call.get("latents") is None:
        call["generator"] = torch.Generator("cpu").manual_seed(seed)
    from segquant_fx.models.pipelines import drop_in_compat  # quantized backbones in plain pipelines

    with track_denoising(pipe) as tracker, drop_in_compat(pipe):
        tracker.on_backbone_call(module, record, before=True)
        tracker.after_scheduler_step(stop_after_last)
        with torch.no_grad():
            pipe(**call)
    missing = selected - recorded_steps
    if missing:
        raise CalibrationError(
            f"prompt {index}: the pipeline did not call the calibrated module at step(s) {sorted(missing)} "
            f"of {steps}; is calib_layer the module the pipeline runs?"
        )
