"""Helpers of the diffusion-workflow tests: small run settings and a recording stepper."""

from __future__ import annotations

import torch

#: Small, fast pipeline settings (32x32 images -> 16x16 latents; short T5 sequences).
RUN = {"height": 32, "width": 32}
T5 = {"max_sequence_length": 16}
PROMPTS = ["a fox", "red car", "blue sky", "a tree"]


def run_kwargs(name: str) -> dict:
    kw = dict(RUN)
    if "sdxl" not in name:
        kw.update(T5)
    if "controlnet" in name:
        from PIL import Image

        kw["control_image"] = Image.new("RGB", (32, 32), (200, 30, 30))
    return kw


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ScaleStepper:
    """A stepper that scales the prediction and records every call."""

    def __init__(self, noise_target: str = "all", scale: float = 1.5):
        self.noise_target = noise_target
        self.scale = scale
        self.calls = []

    def correct(self, info, noise_pred):
        self.calls.append((info, tuple(noise_pred.shape)))
        return noise_pred * self.scale
