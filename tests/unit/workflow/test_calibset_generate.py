"""generate_calibrate_set on tiny pipelines: items, step selection, resume, settings checks, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from segquant_fx.calibset import (
    BaseSampler,
    NormalSampler,
    UniformSampler,
    generate_calibrate_set,
    load_calibrate_set,
)
from segquant_fx.errors import CalibrationError, ConfigError

from ._helpers import PROMPTS, run_kwargs

SD3_KEYS = {
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "pooled_projections",
    "joint_attention_kwargs",
    "return_dict",
}


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_items_steps_and_memory_vs_disk(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd3")
    kw = run_kwargs("tiny-sd3")
    mem = generate_calibrate_set(
        pipe,
        UniformSampler(),
        PROMPTS[:2],
        "dit",
        num_inference_steps=4,
        timestep_per_sample=3,
        progress=False,
        **kw,
    )
    # linspace(3, 0, 3) -> counters 3, 1, 0 -> steps 0, 2, 3; one (CFG-batched) call per step
    assert len(mem) == 6
    assert [mem.info(i)["step_index"] for i in range(6)] == [0, 2, 3, 0, 2, 3]
    assert [mem.info(i)["prompt_index"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    item = mem[1]
    assert set(item) == SD3_KEYS
    assert item["hidden_states"].shape == (2, 4, 16, 16)  # CFG-doubled latents
    assert item["encoder_hidden_states"].shape == (2, 16 + 16, 32)  # CLIP tokens + T5 tokens
    assert item["return_dict"] is False and item["joint_attention_kwargs"] is None
    pipe.scheduler.set_timesteps(4)
    assert torch.equal(item["timestep"], pipe.scheduler.timesteps[2].expand(2))
    assert item["hidden_states"].device.type == "cpu" and not item["hidden_states"].requires_grad
    # the same run written to disk gives the same items
    disk = generate_calibrate_set(
        pipe,
        UniformSampler(),
        PROMPTS[:2],
        "transformer",
        dump_path=tmp_path / "c",
        chunk_size=4,
        num_inference_steps=4,
        timestep_per_sample=3,
        progress=False,
        **kw,
    )
    assert len(disk) == 6 and [c["items"] for c in disk.chunks] == [4, 2]
    for i in range(6):
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            assert torch.equal(disk[i][k], mem[i][k])
    assert disk.settings["calib_layer"] == "transformer" and disk.settings["sampler"] == {
        "type": "UniformSampler"
    }


def test_stops_after_last_selected_step(make_pipe):
    pipe = make_pipe("tiny-sd3")
    calls, handle = _count_calls(pipe.transformer)
    calib = generate_calibrate_set(
        pipe,
        BaseSampler(),
        PROMPTS[:2],
        num_inference_steps=5,
        timestep_per_sample=2,
        progress=False,
        **run_kwargs("tiny-sd3"),
    )
    handle.remove()
    assert len(calib) == 4 and len(calls) == 4  # steps 0 and 1 of 5 run, the rest are skipped
    assert not hasattr(pipe.scheduler, "__dict__") or "step" not in vars(pipe.scheduler)  # hook removed


def test_normal_sampler_per_prompt(make_pipe):
    pipe = make_pipe("tiny-sd3")
    sampler = NormalSampler(seed=5)
    calib = generate_calibrate_set(
        pipe,
        sampler,
        PROMPTS,
        num_inference_steps=6,
        timestep_per_sample=3,
        progress=False,
        **run_kwargs("tiny-sd3"),
    )
    for p in range(4):
        got = [calib.info(i)["step_index"] for i in range(len(calib)) if calib.info(i)["prompt_index"] == p]
        assert got == sampler.select_steps(6, 3, p)


class _Crash(RuntimeError):
    pass


def test_resume_after_interruption_equals_uninterrupted(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd3")
    # 3 steps, 2 recorded (steps 0 and 2): 2 items per prompt, 8 in all, chunks of 3
    kw = dict(
        num_inference_steps=3, timestep_per_sample=2, chunk_size=3, progress=False, **run_kwargs("tiny-sd3")
    )
    full = generate_calibrate_set(pipe, UniformSampler(), PROMPTS, dump_path=tmp_path / "full", **kw)
    assert len(full) == 8

    calls = []

    def crash(module, args):
        calls.append(1)
        if len(calls) == 8:  # prompt 2, step 1: 5 items recorded, 3 of them flushed in chunk 0
            raise _Crash("power cut")

    handle = pipe.transformer.register_forward_pre_hook(crash)
    with pytest.raises(_Crash):
        generate_calibrate_set(pipe, UniformSampler(), PROMPTS, dump_path=tmp_path / "part", **kw)
    handle.remove()
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["num_items"] == 3
    assert manifest["cursor"] == {"prompt": 1, "skip": 1}
    with pytest.raises(CalibrationError, match="incomplete"):
        load_calibrate_set(tmp_path / "part")

    counted, handle = _count_calls(pipe.transformer)
    resumed = generate_calibrate_set(pipe, UniformSampler(), PROMPTS, dump_path=tmp_path / "part", **kw)
    handle.remove()
    assert len(counted) == 3 * 3  # prompts 1, 2, 3 run again; prompt 0 is skipped
    assert len(resumed) == len(full)
    for i in range(len(full)):
        assert resumed.info(i) == full.info(i)
        for k, v in full[i].items():
            assert torch.equal(resumed[i][k], v) if isinstance(v, torch.Tensor) else resumed[i][k] == v
    assert [c["sha256"] for c in resumed.chunks] == [c["sha256"] for c in full.chunks]

    # a complete set is reused: nothing runs
    counted, handle = _count_calls(pipe.transformer)
    again = generate_calibrate_set(pipe, UniformSampler(), PROMPTS, dump_path=tmp_path / "full", **kw)
    handle.remove()
    assert counted == [] and len(again) == 8


MISMATCH_KW = dict(
    num_inference_steps=2, timestep_per_sample=2, chunk_size=3, progress=False, **run_kwargs("tiny-sd3")
)


@pytest.fixture(scope="module")
def mismatch_base(tmp_path_factory):
    from segquant_fx.models.pipeline_zoo import build_pipeline

    path = tmp_path_factory.mktemp("mismatch") / "c"
    generate_calibrate_set(
        build_pipeline("tiny-sd3"), UniformSampler(), PROMPTS[:2], dump_path=path, **MISMATCH_KW
    )
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"guidance_scale": 3.0},
            r"made with pipeline\.kwargs\.guidance_scale unset, but this run has pipeline\.kwargs\.guidance_scale=3\.0",
        ),
        ({"sampler": BaseSampler()}, r"sampler\.type='UniformSampler'.*'BaseSampler'"),
        ({"timestep_per_sample": 3}, r"timestep_per_sample=2.*timestep_per_sample=3"),
        ({"chunk_size": 5}, r"chunk_size=3"),
        ({"seed": 1}, r"made with seed=0, but this run has seed=1"),
        ({"prompts": ["a fox", "other"]}, "prompt 1 differs"),
        ({"prompts": PROMPTS[:1]}, "holds a calibration set of 2 prompts, but sample_dataloader gave 1"),
    ],
)
def test_settings_mismatch_is_named(make_pipe, mismatch_base, tmp_path, change, match):
    pipe = make_pipe("tiny-sd3")
    shutil.copytree(mismatch_base, tmp_path / "c")
    kw = dict(MISMATCH_KW)
    before = (tmp_path / "c" / "manifest.json").read_text()
    kw.update({k: v for k, v in change.items() if k not in ("sampler", "prompts")})
    with pytest.raises(ConfigError, match=match):
        generate_calibrate_set(
            pipe,
            change.get("sampler", UniformSampler()),
            change.get("prompts", PROMPTS[:2]),
            dump_path=tmp_path / "c",
            **kw,
        )
    assert (tmp_path / "c" / "manifest.json").read_text() == before  # nothing mixed in


def test_other_backbone_weights_config_mismatch(make_pipe, tmp_path):
    kw = dict(num_inference_steps=2, timestep_per_sample=1, progress=False, **run_kwargs("tiny-sd3"))
    generate_calibrate_set(make_pipe("tiny-sd3"), BaseSampler(), PROMPTS[:1], dump_path=tmp_path / "c", **kw)
    with pytest.raises(ConfigError, match=r"pipeline\.backbone\.config_sha256"):
        generate_calibrate_set(
            make_pipe("tiny-sd35"), BaseSampler(), PROMPTS[:1], dump_path=tmp_path / "c", **kw
        )


def test_controlnet_layer_and_dataset_tuples(make_pipe):
    pipe = make_pipe("tiny-sd3-controlnet")
    kw = run_kwargs("tiny-sd3")
    control = run_kwargs("tiny-sd3-controlnet")["control_image"]
    samples = [("a fox", None, control), {"prompt": "red car", "control": control}]
    calib = generate_calibrate_set(
        pipe,
        BaseSampler(),
        [samples],
        "controlnet",
        num_inference_steps=2,
        timestep_per_sample=1,
        progress=False,
        **kw,
    )
    assert len(calib) == 2
    assert {"controlnet_cond", "conditioning_scale", "hidden_states"} <= set(calib[0])
    assert calib[0]["controlnet_cond"].shape == (2, 4, 16, 16)  # VAE-encoded control image, CFG-doubled
    tr = generate_calibrate_set(
        pipe,
        BaseSampler(),
        samples,
        "transformer",
        num_inference_steps=2,
        timestep_per_sample=1,
        progress=False,
        **kw,
    )
    residuals = tr[0]["block_controlnet_hidden_states"]
    assert isinstance(residuals, (list, tuple)) and len(residuals) == 2 and residuals[0].shape == (2, 64, 32)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (
            ("unet",),
            {},
            r"calib_layer='unet': SegQuantSD3Pipeline has no 'unet' component; it has \['transformer'\]",
        ),
        (("encoder",), {}, "calib_layer='encoder' is not one of"),
        ((), {"generator": None}, r"sets \['generator'\] itself"),
        ((), {"prompt": "x"}, r"sets \['prompt'\] itself"),
        ((), {"num_inference_steps": 0}, "num_inference_steps must be a positive int"),
        ((), {"max_timestep": 3, "num_inference_steps": 4}, "disagree"),
        ((), {"timestep_per_sample": 0}, "timestep_per_sample"),
        ((), {"sample_size": 0}, "sample_size"),
        ((), {"chunk_size": 0, "dump_path": "x"}, "chunk_size"),
        ((), {"compress": 40, "dump_path": "x"}, "compress"),
    ],
)
def test_bad_arguments(make_pipe, tmp_path, monkeypatch, args, kwargs, match):
    monkeypatch.chdir(tmp_path)
    pipe = make_pipe("tiny-sd3")
    with pytest.raises(ConfigError, match=match):
        generate_calibrate_set(pipe, UniformSampler(), PROMPTS[:1], *args, progress=False, **kwargs)


def test_bad_samples_and_sampler(make_pipe):
    pipe = make_pipe("tiny-sd3")
    with pytest.raises(ConfigError, match="must be a BaseSampler"):
        generate_calibrate_set(pipe, "uniform", PROMPTS)
    with pytest.raises(ConfigError, match="not a single one"):
        generate_calibrate_set(pipe, UniformSampler(), "a fox")
    with pytest.raises(ConfigError, match="sample_dataloader item 0: a sample is a prompt string"):
        generate_calibrate_set(pipe, UniformSampler(), [3], num_inference_steps=2)
    with pytest.raises(ConfigError, match="needs a string 'prompt'"):
        generate_calibrate_set(pipe, UniformSampler(), [{"text": "x"}], num_inference_steps=2)
    with pytest.raises(ConfigError, match="yielded no prompts"):
        generate_calibrate_set(pipe, UniformSampler(), [], num_inference_steps=2, progress=False)
    with pytest.raises(ConfigError, match="control image .* does not exist"):
        generate_calibrate_set(pipe, UniformSampler(), [{"prompt": "x", "control": "/no/such.png"}])
