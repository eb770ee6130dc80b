"""Training of the tiny text-to-image models (called by ``benchmarks/train_t2i.py``).

One :func:`train` call trains one model on data generated on the fly on the training device
(:mod:`segquant_fx.t2i.data`: every step draws a fresh batch of scenes, renders and tokenizes them with
tensor ops), with bf16 autocast on GPU, AdamW, gradient clipping, an EMA of the weights, and text dropout
(empty prompt) for classifier-free guidance. It stops after ``steps`` steps or ``time_budget_s`` seconds of
training, whichever comes first, and then:

1. saves the EMA weights (float16 safetensors) and a model card into ``out/<name>/``;
2. reloads them from disk (float32) and measures prompt adherence on a fixed held-out prompt set
   (:func:`~segquant_fx.t2i.data.heldout_scenes`) at several guidance scales, next to the chance level
   (:func:`~segquant_fx.t2i.readout.chance_adherence`) and a Frechet distance to real generator images;
3. writes the card again with the measurements and a PNG grid of samples (``samples.png``);
4. with ``pack="tar"``, tars ``out/<name>/`` into ``out/t2i-<name>.tar``, removes the directory and copies
   the grid to ``out/<name>-samples.png`` (few flat files: easy to bring back from a remote machine).

If evaluation fails, the weights are still saved and the card records the error.

Reproducibility: ``seed`` fixes the initialisation and the data stream; with ``time_budget_s=None`` two runs
on the same device and software take the same steps (up to GPU kernel non-determinism).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.data import (
    IMAGE_SIZE,
    MAX_TOKENS,
    PAD_ID,
    VOCAB,
    SceneConfig,
    heldout_scenes,
    render,
    sample_scenes,
    scene_prompts,
    scene_token_ids,
)
from segquant_fx.t2i.diffusion import ddpm_alphas_cumprod, diffusion_loss, generate
from segquant_fx.t2i.grid import make_grid, save_png
from segquant_fx.t2i.models import CARD_FILE, build_bundle, get_spec, load_bundle, save_bundle, small_spec
from segquant_fx.t2i.readout import chance_adherence, frechet_distance, image_features, judge, score_adherence

__all__ = [
    "TrainConfig",
    "DEFAULT_LR",
    "PER_PROMPT_RECORD",
    "train",
    "evaluate",
    "config_for",
    "write_card",
    "pack_dir",
]

#: Held-out prompts whose per-prompt verdicts the card records (``first_overall``, a 0/1 string).
PER_PROMPT_RECORD = 64

#: Peak learning rate per model.
DEFAULT_LR = {"mmdit": 1e-3, "flux": 1e-3, "unet": 5e-4}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of one training run (recorded in the model card).

    Attributes:
        model: ``"mmdit"``, ``"flux"`` or ``"unet"``.
        steps: Maximum optimizer steps.
        time_budget_s: Stop training after this many seconds (``None``: only ``steps``).
        batch_size: Images per step.
        lr: Peak learning rate (``None``: :data:`DEFAULT_LR`).
        warmup_steps: Linear warm-up steps.
        decay_start: Fraction of the run (by steps or time, whichever is further) after which the
            learning rate decays linearly to 5% at the end.
        weight_decay: AdamW weight decay.
        ema_decay: EMA decay (ramped up as ``(1 + step) / (10 + step)`` early on).
        p_uncond: Probability of replacing a prompt by the empty prompt (CFG training).
        grad_clip: Gradient norm clip.
        seed: Seed of the initialisation and the data stream.
        amp: bf16 autocast (default: on for CUDA).
        log_every: Print the mean loss every this many steps.
        eval_prompts: Held-out prompts for the adherence measurement (0 skips evaluation).
        eval_seed: Seed of the held-out prompt set and of the sampling seeds.
        eval_steps: Sampling steps (``None``: the model's default).
        eval_guidances: Guidance scales measured; the best becomes the card's default.
        eval_batch_size: Prompts per sampling batch.
        grid_prompts: Samples in the PNG grid.
        scene: Data settings.
        device: Training device.
        arch: ``"full"`` (the shipped architecture) or ``"small"``
            (:func:`~segquant_fx.t2i.models.small_spec`, for smoke tests).
    """

    model: str
    steps: int = 100_000
    time_budget_s: float | None = None
    batch_size: int = 512
    lr: float | None = None
    warmup_steps: int = 300
    decay_start: float = 0.7
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool | None = None
    log_every: int = 100
    eval_prompts: int = 512
    eval_seed: int = 1234
    eval_steps: int | None = None
    eval_guidances: tuple[float, ...] = (1.0, 2.0, 3.5, 5.0)
    eval_batch_size: int = 256
    grid_prompts: int = 32
    scene: SceneConfig = field(default_factory=SceneConfig)
    device: str = "cpu"
    arch: str = "full"

    def __post_init__(self) -> None:
        get_spec(self.model)
        if self.arch not in ("full", "small"):
            raise ConfigError(f"TrainConfig.arch={self.arch!r} must be 'full' or 'small'")
        for k in ("steps", "batch_size", "log_every", "eval_batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"TrainConfig.{k}={v!r} must be a positive int")
        for k in ("warmup_steps", "eval_prompts", "grid_prompts"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"TrainConfig.{k}={v!r} must be an int >= 0")
        if self.eval_prompts == 1:
            raise ConfigError(
                "TrainConfig.eval_prompts must be 0 (skip) or >= 2 (chance level needs two scenes)"
            )
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"TrainConfig.time_budget_s={self.time_budget_s!r} must be > 0 or None")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr={self.lr!r} must be > 0")
        if (
            not 0.0 <= self.p_uncond < 1.0
            or not 0.0 < self.ema_decay < 1.0
            or not 0.0 < self.decay_start <= 1.0
        ):
            raise ConfigError(
                f"TrainConfig: p_uncond={self.p_uncond} must be in [0, 1), ema_decay={self.ema_decay} in (0, 1), "
                f"decay_start={self.decay_start} in (0, 1]"
            )
        if not self.eval_guidances or any(not g >= 0 for g in self.eval_guidances):
            raise ConfigError(
                f"TrainConfig.eval_guidances={self.eval_guidances!r} must be non-empty scales >= 0"
            )

    @property
    def peak_lr(self) -> float:
        """The learning rate actually used."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    def use_amp(self) -> bool:
        """Whether bf16 autocast is on."""
        return self.amp if self.amp is not None else torch.device(self.device).type == "cuda"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["scene"] = self.scene.to_dict()
        d["eval_guidances"] = list(self.eval_guidances)
        d["lr"] = self.peak_lr
        d["amp"] = self.use_amp()
        return d


def _lr_factor(cfg: TrainConfig, step: int, elapsed: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    progress = step / cfg.steps
    if cfg.time_budget_s is not None:
        progress = max(progress, elapsed / cfg.time_budget_s)
    if progress <= cfg.decay_start or cfg.decay_start >= 1.0:
        return warm
    return warm * max(0.05, (1.0 - progress) / (1.0 - cfg.decay_start))


def write_card(directory: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write ``model_card.json`` into ``directory`` atomically."""
    path = Path(directory) / CARD_FILE
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def pack_dir(directory: Path, tar_path: Path) -> Path:
    """Tar ``directory`` (members ``<dirname>/<file>``) into ``tar_path`` atomically."""
    tmp = tar_path.with_name(f".tmp-{tar_path.name}")
    with tarfile.open(tmp, "w") as tf:
        for f in sorted(directory.iterdir()):
            if f.is_file():
                tf.add(f, arcname=f"{directory.name}/{f.name}")
    os.replace(tmp, tar_path)
    return tar_path


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    return out


def evaluate(bundle: Any, cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Prompt adherence of ``bundle`` on the held-out set at each guidance scale, chance level, FD."""
    scenes = heldout_scenes(cfg.eval_prompts, seed=cfg.eval_seed, config=cfg.scene)
    prompts = scene_prompts(scenes)
    seeds = [cfg.eval_seed * 100_000 + i for i in range(len(prompts))]
    steps = cfg.eval_steps or bundle.spec.steps
    real = image_features(render(scenes))
    results: dict[str, Any] = {}
    best_g, best = None, -1.0
    for g in cfg.eval_guidances:
        t0 = time.perf_counter()
        imgs = generate(bundle, prompts, seeds, steps=steps, guidance=g, batch_size=cfg.eval_batch_size)
        scores: dict[str, Any] = score_adherence(imgs, scenes)
        scores["fd_to_data"] = frechet_distance(image_features(imgs), real)
        # per-prompt verdicts of the first prompts, so a CPU test can re-generate and compare them
        n_first = min(PER_PROMPT_RECORD, len(prompts))
        first = judge(imgs[:n_first], scenes[:n_first])["overall"]
        scores["first_overall"] = "".join("1" if ok else "0" for ok in first.tolist())
        results[f"{g:g}"] = scores
        log(
            f"[{cfg.model}] eval guidance {g:g}: overall {scores['overall']:.3f} "
            + " ".join(
                f"{k} {scores[k]:.3f}" for k in ("background", "count", "color", "shape", "size", "position")
            )
            + f" fd {scores['fd_to_data']:.4f} ({time.perf_counter() - t0:.1f} s)"
        )
        if scores["overall"] > best:
            best_g, best = g, scores["overall"]
    chance = chance_adherence(scenes)
    log(
        f"[{cfg.model}] chance level: overall {chance['overall']:.4f} color {chance['color']:.3f} shape {chance['shape']:.3f}"
    )
    return {
        "heldout": {
            "n_prompts": len(prompts),
            "seed": cfg.eval_seed,
            "seeds": f"{cfg.eval_seed} * 100000 + i",
        },
        "steps": steps,
        "by_guidance": results,
        "best_guidance": best_g,
        "adherence": results[f"{best_g:g}"],
        "chance": chance,
        "note": (
            "adherence = read-out (segquant_fx.t2i.readout) of float32 samples from the saved float16 weights; "
            "chance = perfect images scored against the prompts of other scenes"
        ),
    }


def train(
    cfg: TrainConfig, out: str | os.PathLike[str], *, pack: str = "dir", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train ``cfg.model`` and write weights, card and samples under ``out`` (see the module docstring).

    Returns:
        The model card.
    """
    if pack not in ("dir", "tar"):
        raise ConfigError(f"pack={pack!r} must be 'dir' or 'tar'")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but CUDA is not available; use --device cpu")
    out_root = Path(out)
    model_dir = out_root / cfg.model
    model_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def say(msg: str) -> None:
        log_lines.append(msg)
        log(msg)

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = get_spec(cfg.model) if cfg.arch == "full" else small_spec(cfg.model)
    bundle = build_bundle(spec, seed=cfg.seed)
    bundle.to(dev)
    bundle.backbone.train()
    bundle.text_encoder.train()
    params = [p for m in (bundle.backbone, bundle.text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    n_backbone = sum(p.numel() for p in bundle.backbone.parameters())
    n_text = sum(p.numel() for p in bundle.text_encoder.parameters())
    opt = torch.optim.AdamW(
        params, lr=cfg.peak_lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay, fused=dev.type == "cuda"
    )
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 17)
    ac = ddpm_alphas_cumprod(dev)
    amp = cfg.use_amp()
    say(
        f"[{cfg.model}] {bundle.spec.model_class}: {n_backbone:,} backbone + {n_text:,} text params; device {dev}"
        f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}; batch {cfg.batch_size}; "
        f"lr {cfg.peak_lr:g}; amp {amp}; budget {cfg.time_budget_s} s / {cfg.steps} steps"
    )

    loss_acc = torch.zeros((), device=dev)
    n_acc = 0
    curve: list[tuple[int, float]] = []
    recent: list[float] = []
    t_train = time.perf_counter()
    step = 0
    stop_reason = "steps"
    while step < cfg.steps:
        elapsed = time.perf_counter() - t_train
        if cfg.time_budget_s is not None and step > 0 and elapsed >= cfg.time_budget_s:
            stop_reason = "time budget"
            break
        for group in opt.param_groups:
            group["lr"] = cfg.peak_lr * _lr_factor(cfg, step, elapsed)
        scenes = sample_scenes(cfg.batch_size, gen, config=cfg.scene)
        images = render(scenes) * 2.0 - 1.0
        ids = scene_token_ids(scenes, MAX_TOKENS)
        drop = torch.rand(cfg.batch_size, generator=gen, device=dev) < cfg.p_uncond
        ids = torch.where(drop[:, None], torch.full_like(ids, PAD_ID), ids)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion_loss(bundle, images, ids, gen, alphas_cumprod=ac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        opt.step()
        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        loss_acc += loss.detach()
        n_acc += 1
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = float(loss_acc) / n_acc  # one device sync per log interval
            if not math.isfinite(mean):
                raise FloatingPointError(f"[{cfg.model}] loss became {mean} at step {step}; lower --lr")
            curve.append((step, mean))
            recent.append(mean)
            loss_acc.zero_()
            n_acc = 0
            el = time.perf_counter() - t_train
            say(
                f"[{cfg.model}] step {step} loss {mean:.4f} lr {opt.param_groups[0]['lr']:.2e} {step / el:.2f} steps/s {el:.0f} s"
            )
    if n_acc:
        mean = float(loss_acc) / n_acc
        curve.append((step, mean))
        recent.append(mean)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_s = time.perf_counter() - t_train
    # the mean loss of roughly the last 10% of logged steps
    tail = recent[-max(1, len(recent) // 10) :]
    final_loss = sum(tail) / len(tail) if tail else float("nan")
    say(
        f"[{cfg.model}] stopped ({stop_reason}) after {step} steps in {train_s:.1f} s; final loss {final_loss:.4f}"
    )

    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    bundle.eval()
    card: dict[str, Any] = {
        "name": cfg.model,
        "description": bundle.spec.description,
        "num_params": {"backbone": n_backbone, "text_encoder": n_text},
        "data": {
            "generator": "segquant_fx.t2i.data (procedural colored shapes, generated on the fly)",
            "image_size": IMAGE_SIZE,
            "scene": cfg.scene.to_dict(),
            "vocab_size": len(VOCAB),
            "max_tokens": MAX_TOKENS,
        },
        "training": {
            **cfg.to_dict(),
            "steps_done": step,
            "stop_reason": stop_reason,
            "samples_seen": step * cfg.batch_size,
            "train_seconds": round(train_s, 1),
            "steps_per_second": round(step / train_s, 3) if train_s > 0 else None,
            "final_loss": final_loss,
            "loss_curve": [[s, round(v, 5)] for s, v in curve],
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or "cpu",
            "versions": _versions(),
            "weights": "EMA",
        },
        "sampling": {"steps": bundle.spec.steps, "guidance": bundle.spec.guidance},
    }
    save_bundle(bundle, model_dir, card=card)
    say(f"[{cfg.model}] saved weights to {model_dir}")
    del bundle, opt, ema, params
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    card = json.loads((model_dir / CARD_FILE).read_text())
    if cfg.eval_prompts:
        try:
            # measure exactly what ships: the float16 file, loaded back in float32 (no TF32)
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            loaded = load_bundle(model_dir, device=dev)
            ev = evaluate(loaded, cfg, say)
            card["evaluation"] = ev
            card["sampling"] = {"steps": ev["steps"], "guidance": ev["best_guidance"]}
            n_grid = min(cfg.grid_prompts, cfg.eval_prompts)
            if n_grid:
                scenes = heldout_scenes(cfg.eval_prompts, seed=cfg.eval_seed, config=cfg.scene)[:n_grid]
                prompts = scene_prompts(scenes)
                seeds = [cfg.eval_seed * 100_000 + i for i in range(n_grid)]
                imgs = generate(loaded, prompts, seeds, steps=ev["steps"], guidance=ev["best_guidance"])
                # left: the real generator image of the prompt; right: the model's sample
                pairs = torch.stack([render(scenes), imgs], 1).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
                save_png(make_grid(pairs, ncol=8, scale=3), model_dir / "samples.png")
                card["samples"] = {
                    "file": "samples.png",
                    "layout": "pairs (generator image, model sample), 4 pairs per row",
                    "guidance": ev["best_guidance"],
                    "prompts": prompts,
                }
        except Exception as e:  # noqa: BLE001 - keep the trained weights whatever evaluation does
            card["evaluation_error"] = f"{type(e).__name__}: {e}"
            say(f"[{cfg.model}] EVALUATION FAILED (weights kept): {traceback.format_exc()}")
    card["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_card(model_dir, card)
    (model_dir / "train_log.txt").write_text("\n".join(log_lines) + "\n")
    if pack == "tar":
        tar = pack_dir(model_dir, out_root / f"t2i-{cfg.model}.tar")
        if (model_dir / "samples.png").is_file():
            shutil.copyfile(model_dir / "samples.png", out_root / f"{cfg.model}-samples.png")
        shutil.rmtree(model_dir)
        say(f"[{cfg.model}] packed into {tar} ({tar.stat().st_size / 1e6:.2f} MB)")
    return card


def config_for(model: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` for ``model`` with ``overrides`` (unknown keys raise ConfigError)."""
    known = {f for f in TrainConfig.__dataclass_fields__}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown training settings {bad}; known: {sorted(known)}")
    return replace(TrainConfig(model=model), **overrides)
