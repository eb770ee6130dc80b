"""Pipeline adapters: the stepper hook (branches, StepInfo, cleanup, errors), builders, load_pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segquant_fx.errors import ConfigError, SegQuantError
from segquant_fx.models.pipeline_zoo import PIPELINES, build_pipeline, list_pipelines, load_pipeline
from segquant_fx.models.pipelines import adapter_class, as_segquant_pipeline, backbone_of, track_denoising
from segquant_fx.stepper import IdentityStepper, StepInfo

from ._helpers import ScaleStepper, gen, run_kwargs

N = 3  # denoising steps


def _latents(pipe, name, **kw):
    return pipe(
        "a fox", num_inference_steps=N, generator=gen(), output_type="latent", **run_kwargs(name), **kw
    ).images


def _hooks_gone(pipe, module):
    assert "step" not in vars(pipe.scheduler)
    assert not module._forward_hooks and not module._forward_pre_hooks


def _check_infos(pipe, infos, *, family, branch, do_cfg, guidance, layout="bchw"):
    assert [i.step_index for i in infos] == list(range(N))
    assert all(isinstance(i, StepInfo) for i in infos)
    assert [i.timestep for i in infos] == [float(t) for t in pipe.scheduler.timesteps]
    for i in infos:
        assert (i.num_inference_steps, i.family, i.branch, i.do_cfg) == (N, family, branch, do_cfg)
        assert (i.latent_layout, i.latent_hw, i.guidance_scale) == (layout, (16, 16), guidance)


@pytest.mark.parametrize(
    ("name", "family", "guidance"), [("tiny-sd3", "sd3", 7.0), ("tiny-sdxl", "sdxl", 5.0)]
)
def test_cfg_batched_branches(make_pipe, name, family, guidance):
    pipe = make_pipe(name)
    backbone = backbone_of(pipe, "unet" if family == "sdxl" else "transformer")
    base = _latents(pipe, name)
    ident = IdentityStepper("uncond")
    assert torch.equal(_latents(pipe, name, stepper=ident), base)  # identity changes nothing
    assert len(ident.calls) == N
    outs = {}
    for target in ("all", "uncond", "text"):
        s = ScaleStepper(target)
        outs[target] = _latents(pipe, name, stepper=s)
        _check_infos(
            pipe, [c[0] for c in s.calls], family=family, branch=target, do_cfg=True, guidance=guidance
        )
        assert [c[1] for c in s.calls] == [
            (1, 4, 16, 16)
        ] * N  # one branch (half of the CFG batch) or the guided one
        assert not torch.allclose(outs[target], base)
        _hooks_gone(pipe, backbone)
    assert not torch.allclose(outs["uncond"], outs["text"])


def test_uncond_correction_math(make_pipe):
    """Correcting the uncond half by c changes the guided prediction by (1 - g) * (c - 1) * uncond."""
    pipe = make_pipe("tiny-sd3")
    preds = {}

    class Spy:
        def __init__(self, target, scale):
            self.noise_target, self.scale = target, scale

        def correct(self, info, p):
            if self.noise_target == "all":
                preds.setdefault("all", []).append(p.clone())
            return p * self.scale

    pipe(
        "a fox",
        num_inference_steps=1,
        generator=gen(),
        output_type="latent",
        stepper=Spy("all", 1.0),
        **run_kwargs("tiny-sd3"),
    )
    unc = []
    h = pipe.transformer.register_forward_hook(lambda m, a, o: unc.append(o[0].chunk(2)[0].clone()))
    pipe(
        "a fox",
        num_inference_steps=1,
        generator=gen(),
        output_type="latent",
        stepper=Spy("uncond", 1.0),
        **run_kwargs("tiny-sd3"),
    )
    h.remove()
    # scheduler input with uncond scaled by 2: guided' = guided + (1 - 7) * uncond
    seen = []
    pipe.scheduler.step = _spy_step(pipe.scheduler.step, seen)
    try:
        pipe(
            "a fox",
            num_inference_steps=1,
            generator=gen(),
            output_type="latent",
            stepper=Spy("uncond", 2.0),
            **run_kwargs("tiny-sd3"),
        )
    finally:
        del pipe.scheduler.step
    torch.testing.assert_close(seen[0], preds["all"][0] + (1 - 7.0) * unc[0], rtol=1e-4, atol=1e-4)


def _spy_step(inner, seen):
    def step(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return inner(model_output, *args, **kwargs)

    return step


def test_no_cfg_branches(make_pipe):
    pipe = make_pipe("tiny-sd3")
    s = ScaleStepper("text")
    _latents(pipe, "tiny-sd3", stepper=s, guidance_scale=1.0)
    _check_infos(pipe, [c[0] for c in s.calls], family="sd3", branch="text", do_cfg=False, guidance=1.0)
    with pytest.raises(
        ConfigError, match="noise_target='uncond' but this sd3 run has no unconditional branch"
    ):
        _latents(pipe, "tiny-sd3", stepper=ScaleStepper("uncond"), guidance_scale=1.0)
    _hooks_gone(pipe, pipe.transformer)


def test_flux_branches_packed(make_pipe):
    pipe = make_pipe("tiny-flux")
    base = _latents(pipe, "tiny-flux")
    for target in ("all", "text"):
        s = ScaleStepper(target)
        out = _latents(pipe, "tiny-flux", stepper=s)
        _check_infos(
            pipe,
            [c[0] for c in s.calls],
            family="flux",
            branch=target,
            do_cfg=False,
            guidance=3.5,
            layout="packed",
        )
        assert [c[1] for c in s.calls] == [(1, 64, 16)] * N  # [B, (16/2)*(16/2) tokens, 4*4 channels]
        assert not torch.allclose(out, base)
    with pytest.raises(ConfigError, match="no unconditional branch"):
        _latents(pipe, "tiny-flux", stepper=ScaleStepper("uncond"))
    # true CFG: two transformer calls per step, text first, then the negative prompt
    true_cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    for target in ("uncond", "text", "all"):
        s = ScaleStepper(target)
        _latents(pipe, "tiny-flux", stepper=s, **true_cfg)
        _check_infos(
            pipe,
            [c[0] for c in s.calls],
            family="flux",
            branch=target,
            do_cfg=True,
            guidance=2.0,
            layout="packed",
        )
    _hooks_gone(pipe, pipe.transformer)


def test_sd3_skip_layer_guidance_extra_call_untouched(make_pipe):
    pipe = make_pipe("tiny-sd3")
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    s = ScaleStepper("text")
    _latents(
        pipe,
        "tiny-sd3",
        stepper=s,
        skip_guidance_layers=[0],
        skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.99,
    )
    h.remove()
    assert len(calls) == N + 2  # steps 1 and 2 run a second (skip-layer) call
    assert [c[0].step_index for c in s.calls] == [0, 1, 2]


def test_stepper_errors_and_cleanup(make_pipe):
    pipe = make_pipe("tiny-sd3")

    class NoCorrect:
        noise_target = "all"

    with pytest.raises(ConfigError, match="does not implement the Stepper protocol"):
        _latents(pipe, "tiny-sd3", stepper=NoCorrect())
    bad = ScaleStepper("all")
    bad.noise_target = "cond"
    with pytest.raises(ConfigError, match=r"noise_target='cond' is not one of \('all', 'uncond', 'text'\)"):
        _latents(pipe, "tiny-sd3", stepper=bad)

    class WrongShape(ScaleStepper):
        def correct(self, info, p):
            return p[:1, :1]

    for target in ("all", "uncond"):
        with pytest.raises(
            SegQuantError,
            match=r"WrongShape.correct returned \(1, 1, 16, 16\) for a prediction of shape \(1, 4, 16, 16\)",
        ):
            _latents(pipe, "tiny-sd3", stepper=WrongShape(target))
        _hooks_gone(pipe, pipe.transformer)
    # the pipeline still works normally afterwards
    assert _latents(pipe, "tiny-sd3").shape == (1, 4, 16, 16)


def test_track_denoising_on_plain_pipeline(make_pipe):
    import diffusers

    adapter = make_pipe("tiny-sd3")
    plain = diffusers.StableDiffusion3Pipeline(**adapter.components)
    plain.set_progress_bar_config(disable=True)
    seen, before = [], []
    with track_denoising(plain) as tracker:
        tracker.on_backbone_call(plain.transformer, lambda tr, i, a, k, o: seen.append((tr.step_index, i)))
        # a second registration on the same module counts its calls on its own
        tracker.on_backbone_call(plain.transformer, lambda tr, i, a, k, o: before.append(i), before=True)
        plain("a fox", num_inference_steps=N, output_type="latent", **run_kwargs("tiny-sd3"))
        assert tracker.step_index == N and tracker.num_inference_steps == N
    assert seen == [(0, 0), (1, 0), (2, 0)] and before == [0, 0, 0]
    assert "step" not in vars(plain.scheduler)
    wrapped = as_segquant_pipeline(plain)
    assert type(wrapped).__name__ == "SegQuantSD3Pipeline" and wrapped.transformer is plain.transformer
    assert as_segquant_pipeline(wrapped) is wrapped
    assert adapter_class("FluxPipeline").__name__ == "SegQuantFluxPipeline"
    assert adapter_class(diffusers.StableDiffusionXLPipeline).segquant_backbone == "unet"
    with pytest.raises(
        ConfigError, match="no segquant_fx adapter for pipeline class 'StableDiffusionPipeline'"
    ):
        adapter_class("StableDiffusionPipeline")


def test_builders_and_registry():
    assert list_pipelines(full=False) == [n for n, s in PIPELINES.items() if not s.full]
    assert set(list_pipelines(full=True)) == {"sd35-medium", "flux-dev", "sdxl-base"}
    assert PIPELINES["tiny-sd3-controlnet"].calib_layers == ("transformer", "controlnet")
    with pytest.raises(ConfigError, match="unknown pipeline 'tiny-sd4'"):
        build_pipeline("tiny-sd4")
    with pytest.raises(ConfigError, match=r"unknown component\(s\) \['unet'\]"):
        build_pipeline("tiny-sd3", unet=None)
    a, b = build_pipeline("tiny-sd3"), build_pipeline("tiny-sd3")
    for k in ("transformer", "text_encoder_3", "vae"):
        sa, sb = a.components[k].state_dict(), b.components[k].state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa)  # deterministic weights
    no_t5 = build_pipeline("tiny-sd3", text_encoder_3=None, tokenizer_3=None)
    assert no_t5.text_encoder_3 is None
    assert _latents(no_t5, "tiny-sd3").shape == (1, 4, 16, 16)


def test_full_size_pipelines_on_meta():
    """Published configs: parameter counts of every component (random weights, nothing allocated)."""
    expected = {
        "sdxl-base": {
            "unet": 2_567_463_684,
            "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840,
            "vae": 83_653_863,
        },
        "flux-dev": {
            "transformer": 11_901_408_320,
            "text_encoder": 123_060_480,
            "text_encoder_2": 4_762_310_656,
            "vae": 83_819_683,
        },
    }
    for name, counts in expected.items():
        pipe = build_pipeline(name, device="meta")
        got = {
            k: sum(p.numel() for p in v.parameters())
            for k, v in pipe.components.items()
            if isinstance(v, torch.nn.Module)
        }
        assert got == counts
        assert pipe.vae_scale_factor == 8


def test_load_pipeline_round_trip(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd3-controlnet")
    pipe.save_pretrained(tmp_path / "sd3")
    pipe.controlnet.save_pretrained(tmp_path / "cn")
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3ControlNetPipeline"  # an ordinary diffusers directory
    loaded = load_pipeline(tmp_path / "sd3")
    assert type(loaded).__name__ == "SegQuantSD3ControlNetPipeline"
    loaded.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # the ControlNet pipeline samples the control image's latent with the global RNG
    a = pipe(
        "a fox", num_inference_steps=2, generator=gen(), output_type="np", **run_kwargs("tiny-sd3-controlnet")
    ).images
    torch.manual_seed(0)
    b = loaded(
        "a fox", num_inference_steps=2, generator=gen(), output_type="np", **run_kwargs("tiny-sd3-controlnet")
    ).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    s = IdentityStepper()
    loaded(
        "a fox", num_inference_steps=2, output_type="latent", stepper=s, **run_kwargs("tiny-sd3-controlnet")
    )
    assert len(s.calls) == 2
    with_cn = load_pipeline(tmp_path / "sd3", controlnet=tmp_path / "cn", torch_dtype=torch.float16)
    assert (
        type(with_cn).__name__ == "SegQuantSD3ControlNetPipeline"
        and with_cn.controlnet.dtype == torch.float16
    )


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory; give a local diffusers pipeline directory"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_pipeline("stabilityai/stable-diffusion-3.5-medium")  # a hub id is never fetched
    with pytest.raises(ConfigError, match="has no model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConfigError, match="no segquant_fx adapter"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ConfigError, match="controlnet path .* is not a diffusers model directory"):
        load_pipeline(tmp_path, controlnet=tmp_path / "nocn")


def test_drop_in_compat_on_plain_controlnet_pipeline(make_pipe):
    """A stand-in ControlNet (what a quantized one looks like to diffusers) works in a plain pipeline."""
    import diffusers

    from segquant_fx.models.pipelines import drop_in_compat

    adapter = make_pipe("tiny-flux-controlnet")
    real = adapter.controlnet

    class StandIn(torch.nn.Module):  # no cache_context, not a FluxControlNetModel, same call
        model_class = "diffusers.models.controlnets.controlnet_flux.FluxControlNetModel"
        input_hint_block = None

        def __init__(self):
            super().__init__()
            self.inner = real
            self.config = real.config

        device = property(lambda self: real.device)
        dtype = property(lambda self: real.dtype)

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    stand_in = StandIn()
    plain = diffusers.FluxControlNetPipeline(**{**adapter.components, "controlnet": stand_in})
    plain.set_progress_bar_config(disable=True)

    def kw():
        return dict(
            num_inference_steps=2, output_type="latent", generator=gen(), **run_kwargs("tiny-flux-controlnet")
        )

    with pytest.raises(TypeError):  # diffusers takes the multi-ControlNet path for a non-FluxControlNetModel
        plain("a fox", **kw())
    with drop_in_compat(plain):
        assert isinstance(stand_in, diffusers.FluxControlNetModel) and isinstance(stand_in, StandIn)
        torch.manual_seed(0)
        out = plain("a fox", **kw()).images
    assert type(stand_in) is StandIn and not isinstance(stand_in, diffusers.FluxControlNetModel)
    adapter.controlnet = stand_in  # the adapter applies drop_in_compat itself
    torch.manual_seed(0)
    assert torch.equal(adapter("a fox", **kw()).images, out)
    adapter.controlnet = real
    torch.manual_seed(0)
    assert torch.equal(adapter("a fox", **kw()).images, out)  # the stand-in computed what the ControlNet does
