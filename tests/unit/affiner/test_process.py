"""process_affiner / evaluate_affiner on a minimal diffusers scheduler loop (tests/unit/affiner/_toy.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import segquant_fx
from segquant_fx.affiner import Affiner, AffinerConfig, evaluate_affiner, load_affiner, process_affiner
from segquant_fx.errors import CalibrationError, ConfigError

from ._toy import PROMPTS, ToyDenoiser, ToyPipeline, make

CALIB, HELD_OUT = PROMPTS[:6], PROMPTS[6:]


def _cfg(**kw):
    base = {
        "type": "blockwise",
        "max_timestep": 3,
        "sample_size": 6,
        "batch_size": 3,
        "extra_args": {"guidance_scale": 3.0},
        "solver_config": {"blocksize": 4, "sample_mode": "block", "alpha": 1.0, "verbose": False},
    }
    base.update(kw)
    return base


@pytest.mark.parametrize("solver", ["mserel", "ptqd", "tac"])
@pytest.mark.parametrize(
    ("packed", "recurrent"), [(False, True), (True, False)], ids=["bchw-rec", "packed-teacher"]
)
def test_affiner_reduces_per_step_mse(packed, solver, recurrent):
    """Every solver, both trajectory modes, both layouts: calibration per-step MSE goes down."""
    pipe, quant = make(packed=packed)
    solver_config = (
        {"blocksize": 4, "sample_mode": "block", "alpha": 1.0, "verbose": False}
        if solver == "mserel"
        else None
    )
    if solver == "tac":
        # lambda1 = 0: the plain squared error (the relative term trades MSE for relative accuracy)
        solver_config = {"threshold": 1.0, "lambda1": 0.0, "verbose": False}
    # batch_size = sample_size: the recurrent run fits each step on all prompts before correcting
    cfg = _cfg(type=None, solver_type=solver, recurrent=recurrent, solver_config=solver_config, batch_size=6)
    aff = process_affiner(cfg, CALIB, pipe, quant, shuffle=False, progress=False)
    assert isinstance(aff, segquant_fx.stepper.Stepper)
    assert aff.steps == (0, 1, 2) and aff.meta["latent_layout"] == ("packed" if packed else "bchw")
    assert aff.meta["channels"] == 4 and aff.meta["latent_hw"] == [8, 8]
    ev = evaluate_affiner(aff, CALIB, pipe, quant, progress=False)
    assert ev.samples == 6 and ev.steps == (0, 1, 2)
    assert ev.mode == ("recurrent" if recurrent else "teacher")
    # the evaluation replays the training trajectory, so every step's pairs are the training pairs
    assert all(c < q for c, q in zip(ev.mse_corrected, ev.mse_quant, strict=True)), ev.summary()
    if recurrent:
        online = [aff.meta["calib_mse_corrected_online"][str(s)] for s in range(3)]
        assert online == pytest.approx(list(ev.mse_corrected), rel=1e-5)


def test_held_out_and_trajectory_report(tmp_path):
    """Held-out prompts: the per-step and final-latent figures are computed, printed and plotted."""
    pipe, quant = make()
    aff = process_affiner(_cfg(), CALIB, pipe, quant, shuffle=False, progress=False)
    calib = evaluate_affiner(aff, CALIB, pipe, quant, progress=False)
    held = evaluate_affiner(aff, HELD_OUT, pipe, quant, trajectory=True, progress=False)
    print(f"toy affiner calibration: {calib.summary()}")
    print(f"toy affiner held-out:    {held.summary()}")
    assert held.final_mse_quant is not None and held.final_mse_quant > 0
    assert held.final_mse_corrected is not None
    assert calib.mean_mse_corrected < calib.mean_mse_quant
    assert set(held.to_dict()) >= {"steps", "mse_quant", "mse_corrected", "final_mse_quant"}
    assert "reduction" in held.summary()
    if importlib.util.find_spec("matplotlib") is not None:  # optional dependency
        png = held.save_plot(tmp_path / "mse.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teacher = evaluate_affiner(aff, HELD_OUT[:2], pipe, quant, mode="teacher", sample_size=2, progress=False)
    assert teacher.mode == "teacher" and teacher.samples == 2
    with pytest.raises(ConfigError, match="mode = 'both'"):
        evaluate_affiner(aff, HELD_OUT, pipe, quant, mode="both", progress=False)


def test_packed_equals_bchw_learning():
    """The same model in packed and 4-D layout learns the same per-channel PTQD solution."""
    sols = []
    for packed in (False, True):
        real = ToyDenoiser(packed=False).eval()
        from ._toy import FakeQuant

        quant = FakeQuant(real).eval()

        class Packed(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, hidden_states, **kw):
                from segquant_fx.affiner.layout import pack, unpack

                return (pack(self.inner(unpack(hidden_states, (8, 8)), **kw)[0]),)

        r_bb, q_bb = (Packed(real), Packed(quant)) if packed else (real, quant)
        pipe = ToyPipeline(r_bb, packed=packed)
        aff = process_affiner(
            _cfg(type="ptqd", solver_config=None), CALIB, pipe, q_bb, shuffle=False, progress=False
        )
        sols.append(aff.solution(1))
    for k in sols[0]:
        torch.testing.assert_close(sols[0][k], sols[1][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["uncond", "text"])
def test_branch_targets(target):
    """noise_target uncond/text learns on the CFG halves and the affiner corrects that half."""
    pipe, quant = make()
    aff = process_affiner(_cfg(noise_target=target), CALIB, pipe, quant, shuffle=False, progress=False)
    assert aff.noise_target == target
    ev = evaluate_affiner(aff, CALIB, pipe, quant, progress=False)
    assert ev.mean_mse_corrected < ev.mean_mse_quant


def test_enable_timesteps_and_save_roundtrip(tmp_path):
    """Only enabled steps are learned; dump_path saves; the loaded affiner corrects identically."""
    pipe, quant = make()
    aff = process_affiner(
        _cfg(enable_timesteps=[1, 2]), CALIB, pipe, quant, progress=False, dump_path=tmp_path / "aff"
    )
    assert aff.steps == (1, 2)
    loaded = load_affiner(tmp_path / "aff")
    assert loaded.config == aff.config and loaded.steps == (1, 2)
    pipe.transformer, real = quant, pipe.transformer
    try:
        a = pipe(
            CALIB[:2],
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(1)] * 2,
            stepper=aff,
        )
        b = pipe(
            CALIB[:2],
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(1)] * 2,
            stepper=loaded,
        )
    finally:
        pipe.transformer = real
    assert torch.equal(a.images, b.images)


def test_latents_argument_and_shuffle():
    """Explicit latents (shared or per prompt) are used; shuffle draws a seeded subset."""
    pipe, quant = make()
    shared = torch.randn(1, 4, 8, 8)
    a1 = process_affiner(
        _cfg(recurrent=False), CALIB, pipe, quant, latents=shared, shuffle=False, progress=False
    )
    a2 = process_affiner(
        _cfg(recurrent=False),
        CALIB,
        pipe,
        quant,
        latents=shared.expand(6, 4, 8, 8),
        shuffle=False,
        progress=False,
    )
    torch.testing.assert_close(a1.solution(0)["K"], a2.solution(0)["K"])
    with pytest.raises(ConfigError, match="expected 1 .* or 6"):
        process_affiner(_cfg(), CALIB, pipe, quant, latents=torch.randn(2, 4, 8, 8), progress=False)
    s1 = process_affiner(_cfg(sample_size=3, seed=1), PROMPTS, pipe, quant, progress=False)
    s2 = process_affiner(_cfg(sample_size=3, seed=1), PROMPTS, pipe, quant, progress=False)
    torch.testing.assert_close(s1.solution(2)["K"], s2.solution(2)["K"])


def test_teacher_forcing_is_batching_independent():
    """Teacher forcing gives the same solution whatever the batch size (per-prompt noise)."""
    pipe, quant = make()
    a = process_affiner(
        _cfg(recurrent=False, batch_size=1), CALIB, pipe, quant, shuffle=False, progress=False
    )
    b = process_affiner(
        _cfg(recurrent=False, batch_size=6), CALIB, pipe, quant, shuffle=False, progress=False
    )
    for s in a.steps:
        torch.testing.assert_close(a.solution(s)["K"], b.solution(s)["K"], rtol=1e-4, atol=1e-5)


class MeanShift:
    """A third-party affiner: subtracts the mean quantization error per step and channel."""

    def __init__(self):
        self.sums = {}
        self.fit_calls = 0

    def fit_step(self, info, quant, real):
        self.fit_calls += 1
        d = (quant - real).mean((0, 2, 3))
        self.sums[info.step_index] = (
            d if info.step_index not in self.sums else (self.sums[info.step_index] + d) / 2
        )

    def apply_step(self, info, quant):
        return quant - self.sums[info.step_index].view(1, -1, 1, 1)

    def state_dict(self):
        return {f"shift{k}": v for k, v in self.sums.items()}

    def load_state_dict(self, state):
        self.sums = {int(k.removeprefix("shift")): v for k, v in state.items()}


def test_thirdparty_affiner(tmp_path):
    """A third-party affiner is driven with the same pairs, wrapped, saved and reloaded."""
    pipe, quant = make()
    tp = MeanShift()
    aff = process_affiner(_cfg(), CALIB, pipe, quant, shuffle=False, thirdparty_affiner=tp, progress=False)
    assert aff.solver_type == "thirdparty" and tp.fit_calls == 2 * 3  # 2 calls x 3 steps
    aff.save(tmp_path / "tp")
    with pytest.raises(segquant_fx.errors.SerializationError, match="pass a fresh instance"):
        load_affiner(tmp_path / "tp")
    back = load_affiner(tmp_path / "tp", thirdparty=MeanShift())
    for s in range(3):
        torch.testing.assert_close(back.thirdparty.sums[s], tp.sums[s])
    with pytest.raises(ConfigError, match="lacks fit_step"):
        process_affiner(_cfg(), CALIB, pipe, quant, thirdparty_affiner=object(), progress=False)


def test_bad_inputs():
    """Clear errors for wrong models, pipelines without stepper=, bad datasets and configs."""
    pipe, quant = make()
    with pytest.raises(ConfigError, match="float model's own"):
        process_affiner(_cfg(), CALIB, pipe, pipe.transformer, progress=False)
    with pytest.raises(ConfigError, match="does not accept stepper"):
        process_affiner(_cfg(), CALIB, lambda prompt: None, quant, progress=False)
    with pytest.raises(ConfigError, match="not a prompt"):
        process_affiner(_cfg(), [1, 2], pipe, quant, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        process_affiner(_cfg(), [], pipe, quant, progress=False)
    with pytest.raises(ConfigError, match="single str"):
        process_affiner(_cfg(), "a prompt", pipe, quant, progress=False)
    with pytest.raises(ConfigError, match="controlnet"):
        process_affiner(_cfg(), CALIB, pipe, quant, calib_layer="controlnet", progress=False)
    with pytest.raises(ConfigError, match="unknown key 'max_timesteps'"):
        process_affiner({"max_timesteps": 3}, CALIB, pipe, quant, progress=False)
    with pytest.raises(ConfigError, match="needs classifier-free guidance|without CFG"):
        process_affiner(_cfg(noise_target="uncond", extra_args={}), CALIB, pipe, quant, progress=False)
    with pytest.warns(UserWarning, match="using all of them"):
        process_affiner(_cfg(sample_size=20), CALIB[:2], pipe, quant, progress=False)


def test_pipeline_that_ignores_stepper():
    """A pipeline taking **kwargs but never calling the stepper is detected."""
    pipe, quant = make()

    class Ignores(ToyPipeline):
        def __call__(self, prompt, stepper=None, **kw):
            return super().__call__(prompt, **kw)

    with pytest.raises(CalibrationError, match="never called the stepper"):
        process_affiner(_cfg(), CALIB, Ignores(pipe.transformer), quant, progress=False)


def test_nonstandard_cfg_combine_is_detected():
    """A pipeline whose guided prediction is not uncond + g (text - uncond) is an error, not bad data."""
    pipe, quant = make()

    class Rescaled(ToyPipeline):
        def __call__(self, *a, stepper=None, **kw):
            if stepper is not None:
                inner = stepper

                class Wrap:
                    noise_target = inner.noise_target

                    def correct(self, info, x):
                        return inner.correct(info, 0.7 * x)

                stepper = Wrap()
            return super().__call__(*a, stepper=stepper, **kw)

    with pytest.raises(CalibrationError, match="not the standard combination"):
        process_affiner(_cfg(), CALIB, Rescaled(pipe.transformer), quant, progress=False)


def test_two_backbone_calls_per_step_rejected():
    """Pipelines calling the backbone twice per step (e.g. skip-layer guidance) are rejected."""
    pipe, quant = make()

    class Twice(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    class TwicePipe(ToyPipeline):
        def __call__(self, *a, stepper=None, **kw):
            if stepper is not None:
                inner = stepper
                tr = self.transformer

                class Wrap:
                    noise_target = inner.noise_target

                    def correct(self, info, x):
                        tr(
                            hidden_states=torch.zeros(1, 4, 8, 8),
                            timestep=torch.zeros(1),
                            encoder_hidden_states=torch.zeros(1, 3, 8),
                        )
                        return inner.correct(info, x)

                stepper = Wrap()
            return super().__call__(*a, stepper=stepper, **kw)

    with pytest.raises(CalibrationError, match="called 2 times"):
        process_affiner(_cfg(), CALIB, TwicePipe(pipe.transformer), quant, progress=False)


def test_affiner_checks_step_count_and_branch():
    """Using an affiner with another number of steps or branch is a clear ConfigError."""
    pipe, quant = make()
    aff = process_affiner(_cfg(sample_size=3), CALIB[:3], pipe, quant, progress=False)
    assert isinstance(aff, Affiner)
    with pytest.raises(ConfigError, match="num_inference_steps=3"):
        pipe("x", num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator(), stepper=aff)
    assert aff.config == AffinerConfig.from_dict(_cfg(sample_size=3))
