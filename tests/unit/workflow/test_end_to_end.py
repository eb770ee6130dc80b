"""The three-step workflow on tiny pipelines: generate_calibrate_set -> quantize -> generate (with a stepper).

One test per family (a quantized ControlNet: test_workflow_cli.py): the calibration set's items feed
``segquant_fx.quantize`` directly, the quantized backbone drops into the pipeline, which then runs
unchanged, with and without a stepper.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segquant_fx
from segquant_fx.calibset import UniformSampler, generate_calibrate_set
from segquant_fx.quantized import QuantizedModel
from segquant_fx.stepper import IdentityStepper

from ._helpers import PROMPTS, ScaleStepper, gen, run_kwargs

N = 3

CASES = [
    # name, calib_layer, forward keys that must be recorded, stepper target checked
    (
        "tiny-sd3",
        "transformer",
        {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"},
        "uncond",
    ),
    ("tiny-flux", "transformer", {"hidden_states", "img_ids", "txt_ids", "guidance", "timestep"}, "text"),
    ("tiny-sdxl", "unet", {"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs"}, "uncond"),
]


def _images(pipe, name, **kw):
    torch.manual_seed(0)  # ControlNet pipelines sample the control latent with the global RNG
    return pipe(
        "a small fox", num_inference_steps=N, generator=gen(1), output_type="np", **run_kwargs(name), **kw
    ).images


@pytest.mark.parametrize(("name", "layer", "keys", "target"), CASES, ids=[c[0] for c in CASES])
def test_calibrate_quantize_generate(make_pipe, tmp_path, name, layer, keys, target):
    pipe = make_pipe(name)
    calib = generate_calibrate_set(
        pipe,
        UniformSampler(),
        PROMPTS[:2],
        layer,
        dump_path=tmp_path / "calib",
        chunk_size=3,
        num_inference_steps=N,
        timestep_per_sample=2,
        progress=False,
        **run_kwargs(name),
    )
    assert len(calib) == 4 and keys <= set(calib[0]) and calib[0]["return_dict"] is False
    if name == "tiny-sdxl":  # the UNet is called as unet(latents, t, ...): positional args are keyed by name
        assert calib[0]["sample"].shape == (2, 4, 16, 16) and calib[0]["timestep"].dim() == 0
    backbone = getattr(pipe, layer)
    float_images = _images(pipe, name)

    items = calib if name != "tiny-flux" else calib.get_dataloader(batch_size=1)  # a DataLoader works too
    # static shapes: 2-3x cheaper to capture, and the resolution is fixed here (the README example
    # test quantizes with the default dynamic shapes)
    qmodel = segquant_fx.quantize(backbone, items, "w8a8", progress=False, dynamic=False)
    assert qmodel.meta["calibration_items"] == 4 and len(qmodel.plan) > 10
    setattr(pipe, layer, qmodel)  # drop in; the pipeline itself is unchanged
    assert getattr(pipe, layer) is qmodel and isinstance(qmodel, QuantizedModel)

    q_images = _images(pipe, name)
    assert q_images.shape == float_images.shape == (1, 32, 32, 3)
    err = float(np.abs(q_images - float_images).mean())
    assert 0 < err < 0.1, err  # quantized, and still close to the float pipeline's images

    # with a stepper: identity is a no-op, a changing stepper changes the image and runs once per step
    ident = IdentityStepper(target)
    assert np.array_equal(_images(pipe, name, stepper=ident), q_images)
    assert [i.step_index for i in ident.calls] == list(range(N)) and {i.branch for i in ident.calls} == {
        target
    }
    scale = ScaleStepper(target, 1.2)
    s_images = _images(pipe, name, stepper=scale)
    assert not np.allclose(s_images, q_images, atol=1e-3)
    infos = [c[0] for c in scale.calls]
    assert [i.step_index for i in infos] == list(range(N))
    assert all(i.num_inference_steps == N and i.latent_hw == (16, 16) and i.branch == target for i in infos)
    assert [i.timestep for i in infos] == [float(t) for t in pipe.scheduler.timesteps]

    if name != "tiny-sd3":
        return
    # the saved quantized backbone reloads and drops in the same way
    qmodel.save(str(tmp_path / "q"))
    setattr(pipe, layer, segquant_fx.load(str(tmp_path / "q")))
    np.testing.assert_allclose(_images(pipe, name), q_images, atol=1e-6)
