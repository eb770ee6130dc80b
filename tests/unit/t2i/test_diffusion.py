"""Samplers (checked against exact oracles), generate() with steppers and recording, quantize on the backbones."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from segquant_fx.errors import ConfigError
from segquant_fx.stepper import IdentityStepper
from segquant_fx.t2i.data import render, sample_scenes
from segquant_fx.t2i.diffusion import (
    ddim_timesteps,
    ddpm_alphas_cumprod,
    diffusion_loss,
    flow_sigmas,
    generate,
    initial_noise,
)
from segquant_fx.t2i.models import MODEL_NAMES, T2IBundle, pack_pixels, unpack_pixels

PROMPTS = [
    "a small red circle at the top left on a blue background",
    "a green cross and a white square on a black background",
]


class Oracle(torch.nn.Module):
    """The exact denoiser of a one-image data set: velocity / epsilon that lead every noise to ``target``."""

    def __init__(self, family: str, objective: str, target: torch.Tensor) -> None:
        super().__init__()
        self.family, self.objective = family, objective
        self.x0 = target * 2 - 1  # model range
        self.ac = ddpm_alphas_cumprod()

    def forward(self, return_dict=True, **kw):
        x = kw.get("hidden_states", kw.get("sample"))
        x0 = self.x0.expand(x.shape[0], -1, -1, -1)
        if self.family == "flux":
            x0 = pack_pixels(x0)
        t = kw["timestep"]
        if self.objective == "flow":
            s = t / 1000.0 if self.family == "sd3" else t
            s = s.reshape(-1, *([1] * (x.dim() - 1)))
            out = (x - x0) / s  # v = noise - x0 with noise = (x - (1 - s) x0) / s
        else:
            a = self.ac[t.long()].reshape(-1, 1, 1, 1)
            out = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (out,)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_reaches_the_oracle_target(name, steps, bundle_of):
    """With the exact denoiser, Euler (flow) and DDIM (ddpm) land on the data image, with and without CFG."""
    b = bundle_of(name, small=True)
    target = render(sample_scenes(1, torch.Generator().manual_seed(5)))
    oracle = Oracle(b.spec.family, b.spec.objective, target)
    for guidance in (1.0, 3.0):
        img = generate(b, PROMPTS[:1], [0], steps=steps, guidance=guidance, backbone=oracle)
        assert (img - target).abs().max() < 1e-4, (name, steps, guidance)


def test_schedules():
    s = flow_sigmas(4)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert flow_sigmas(4, shift=3.0)[1] > 0.75
    assert ddim_timesteps(4) == [999, 749, 499, 249]
    ac = ddpm_alphas_cumprod()
    assert ac.shape == (1000,) and ac[0] > 0.9998 and ac[-1] < 1e-4
    with pytest.raises(ConfigError, match="exceeds the 1000"):
        ddim_timesteps(1001)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_diffusion_loss_is_zero_for_the_oracle(name, bundle_of):
    b = bundle_of(name, small=True)
    target = render(sample_scenes(1, torch.Generator().manual_seed(5)))
    ob = T2IBundle(
        spec=b.spec, backbone=Oracle(b.spec.family, b.spec.objective, target), text_encoder=b.text_encoder
    )
    from segquant_fx.t2i.data import tokenize

    loss = diffusion_loss(
        ob, (target * 2 - 1).expand(4, -1, -1, -1), tokenize(PROMPTS * 2), torch.Generator().manual_seed(0)
    )
    assert float(loss.detach()) < 1e-8
    real = diffusion_loss(
        b, (target * 2 - 1).expand(4, -1, -1, -1), tokenize(PROMPTS * 2), torch.Generator().manual_seed(0)
    )
    assert math.isfinite(float(real.detach())) and float(real.detach()) > 0.01


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generate_is_deterministic_per_seed(name, bundle_of):
    """An image depends on its prompt and seed only, not on the batch it runs in."""
    b = bundle_of(name, small=True)
    both = generate(b, PROMPTS, [3, 4], steps=2, guidance=2.0)
    assert both.shape == (2, 3, 32, 32) and both.min() >= 0 and both.max() <= 1
    alone = generate(b, PROMPTS[1:], [4], steps=2, guidance=2.0, batch_size=1)
    assert torch.allclose(
        both[1], alone[0], atol=1e-3
    )  # batch-size dependent kernels differ in rounding only
    other_seed = generate(b, PROMPTS[1:], [5], steps=2, guidance=2.0)
    assert not torch.allclose(both[1], other_seed[0], atol=1e-3)
    assert torch.equal(initial_noise([4])[0], initial_noise([3, 4])[1])


@pytest.mark.parametrize(
    ("name", "target"),
    [("mmdit", "all"), ("mmdit", "uncond"), ("mmdit", "text"), ("flux", "uncond"), ("unet", "text")],
)
def test_identity_stepper_sees_every_step(name, target, bundle_of):
    b = bundle_of(name, small=True)
    ref = generate(b, PROMPTS, [0, 1], steps=3, guidance=2.0)
    st = IdentityStepper(target)
    out = generate(b, PROMPTS, [0, 1], steps=3, guidance=2.0, stepper=st)
    assert torch.equal(out, ref)
    assert [c.step_index for c in st.calls] == [0, 1, 2]
    info = st.calls[0]
    assert (
        info.branch == target and info.do_cfg and info.guidance_scale == 2.0 and info.num_inference_steps == 3
    )
    assert info.family == b.spec.family and info.latent_hw == (32, 32)
    assert info.latent_layout == ("packed" if name == "flux" else "bchw")
    assert info.timestep == (1000.0 if b.spec.objective == "flow" else 999.0)


class ScaleStepper:
    noise_target = "text"

    def __init__(self):
        self.shapes = []

    def correct(self, info, noise_pred):
        self.shapes.append(tuple(noise_pred.shape))
        return noise_pred * 0.0


def test_stepper_corrections_take_effect(bundle_of):
    b = bundle_of("flux", small=True)
    st = ScaleStepper()
    ref = generate(b, PROMPTS, [0, 1], steps=2, guidance=1.0)
    out = generate(
        b, PROMPTS, [0, 1], steps=2, guidance=1.0, stepper=st
    )  # no CFG: "text" = the only prediction
    assert st.shapes == [(2, 256, 12)] * 2  # FLUX predictions come packed
    noise = unpack_pixels(pack_pixels(initial_noise([0, 1])))
    assert torch.allclose(out, ((noise + 1) / 2).clamp(0, 1), atol=1e-6)  # zero velocity: the noise stays
    assert not torch.allclose(out, ref)


def test_bad_generate_arguments(bundle_of):
    """Mismatched seeds, bad steps/guidance, strings as prompt lists and bad steppers raise ConfigError."""
    b = bundle_of("mmdit", small=True)
    with pytest.raises(ConfigError, match="2 prompts but 1 seeds"):
        generate(b, PROMPTS, [0], steps=2)
    with pytest.raises(ConfigError, match="list of strings"):
        generate(b, PROMPTS[0], [0], steps=2)
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        generate(b, PROMPTS, [0, 1], steps=0)
    with pytest.raises(ConfigError, match="guidance must be a finite number"):
        generate(b, PROMPTS, [0, 1], steps=1, guidance=float("nan"))
    with pytest.raises(ConfigError, match="no unconditional branch; use noise_target='all'"):
        generate(b, PROMPTS, [0, 1], steps=1, guidance=1.0, stepper=IdentityStepper("uncond"))
    with pytest.raises(ConfigError, match="noise_target in"):
        generate(b, PROMPTS, [0, 1], steps=1, stepper=object())
    with pytest.raises(ConfigError, match="not in the tiny text encoder"):
        generate(b, ["a purple circle on a blue background"], [0], steps=1)

    class Bad:
        noise_target = "all"

        def correct(self, info, pred):
            return pred[:1]

    with pytest.raises(ConfigError, match=r"Bad.correct returned .* \(1, 3, 32, 32\)"):
        generate(b, PROMPTS, [0, 1], steps=1, guidance=2.0, stepper=Bad())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantize_captures_and_runs_each_backbone(name, bundle_of):
    """Calibration items recorded by generate() are kwargs dicts segquant_fx.quantize captures and calibrates on."""
    import segquant_fx

    b = bundle_of(name, small=True)
    items: list[dict] = []
    ref = generate(b, PROMPTS, [0, 1], steps=1, guidance=2.0, record=items)
    assert len(items) == 1 and all(
        v.shape[0] == 4 for v in items[0].values() if isinstance(v, torch.Tensor) and v.dim() > 2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = segquant_fx.quantize(b.backbone, items, "w8a8", progress=False)
    out = generate(b, PROMPTS, [0, 1], steps=1, guidance=2.0, backbone=q)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < (out - ref).abs().mean() < 0.1  # quantized, but close to the float model
