"""A minimal diffusers-scheduler pipeline implementing the stepper contract, for affiner tests.

It follows what the adapter pipelines do at each step: one backbone call on the CFG batch
``[uncond; text]``, the stepper applied to the branch named by ``stepper.noise_target`` (before the
guidance combine for ``uncond``/``text``, after it for ``all``), then the scheduler step. Latents are
``[B, C, H, W]`` or FLUX-packed ``[B, N, C*4]``.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from segquant_fx.affiner.layout import pack
from segquant_fx.errors import ConfigError
from segquant_fx.stepper import StepInfo

TEXT_DIM = 8
TEXT_LEN = 3


class ToyDenoiser(nn.Module):
    """A per-position MLP over latent features, conditioned on timestep and text (packed or not)."""

    def __init__(self, channels: int = 4, hidden: int = 32, packed: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        feat = channels * 4 if packed else channels
        self.packed = packed
        self.inp = nn.Linear(feat, hidden)
        self.txt = nn.Linear(TEXT_DIM, hidden)
        self.time = nn.Linear(1, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, feat)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        x = hidden_states
        tokens = x if self.packed else x.flatten(2).transpose(1, 2)
        t = (timestep.float() / 1000.0).view(-1, 1, 1)
        h = self.inp(tokens) + self.txt(encoder_hidden_states.mean(1, keepdim=True)) + self.time(t)
        h = self.mid(torch.nn.functional.silu(h))
        out = self.out(torch.nn.functional.silu(h)) + 0.5 * tokens
        if not self.packed:
            out = out.transpose(1, 2).reshape(x.shape)
        return (out,)


class FakeQuant(nn.Module):
    """The same denoiser with weights rounded to ``bits`` (per output row): a systematic error."""

    def __init__(self, model: ToyDenoiser, bits: int = 4) -> None:
        super().__init__()
        import copy

        self.model = copy.deepcopy(model)
        qmax = 2 ** (bits - 1) - 1
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    s = m.weight.abs().amax(1, keepdim=True) / qmax
                    m.weight.copy_((m.weight / s).round().clamp(-qmax, qmax) * s)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def embed(prompt: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return torch.randn(TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


class ToyPipeline:
    """``pipe(prompt, num_inference_steps, guidance_scale, latents, generator, output_type, stepper)``."""

    def __init__(
        self, transformer: nn.Module, *, channels: int = 4, hw: tuple[int, int] = (8, 8), packed: bool = False
    ):
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.channels = channels
        self.hw = hw
        self.packed = packed
        self.calls = 0

    def __call__(
        self,
        prompt,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        latents=None,
        generator=None,
        output_type: str = "latent",
        stepper=None,
    ):
        self.calls += 1
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        emb = torch.stack([embed(p) for p in prompts])
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            emb = torch.cat([torch.stack([embed("")] * b), emb])
        c, (h, w) = self.channels, self.hw
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * b
            latents = torch.stack([torch.randn(c, h, w, generator=g) for g in gens])
            if self.packed:
                latents = pack(latents)
        self.scheduler.set_timesteps(num_inference_steps)
        target = getattr(stepper, "noise_target", "all")
        for i, t in enumerate(self.scheduler.timesteps):
            x_in = torch.cat([latents] * 2) if do_cfg else latents
            out = self.transformer(
                hidden_states=x_in,
                timestep=t.expand(x_in.shape[0]),
                encoder_hidden_states=emb,
                return_dict=False,
            )[0]
            info = StepInfo(
                step_index=i,
                num_inference_steps=num_inference_steps,
                timestep=float(t),
                family="flux" if self.packed else "sd3",
                latent_layout="packed" if self.packed else "bchw",
                latent_hw=(h, w),
                do_cfg=do_cfg,
                guidance_scale=guidance_scale,
                branch=target,
            )
            if do_cfg:
                uncond, text = out.chunk(2)
                if stepper is not None and target == "uncond":
                    uncond = stepper.correct(info, uncond)
                if stepper is not None and target == "text":
                    text = stepper.correct(info, text)
                noise = uncond + guidance_scale * (text - uncond)
            else:
                if stepper is not None and target == "uncond":
                    raise ConfigError("noise_target='uncond' without CFG")
                noise = out
            if stepper is not None and target == "all":
                noise = stepper.correct(info, noise)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return SimpleNamespace(images=latents)


def make(packed: bool = False, bits: int = 4, hw=(8, 8)):
    real = ToyDenoiser(packed=packed).eval()
    quant = FakeQuant(real, bits=bits).eval()
    return ToyPipeline(real, packed=packed, hw=hw), quant


PROMPTS = [f"prompt number {i}" for i in range(12)]
