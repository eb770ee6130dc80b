"""Affiner container (the Stepper), FLUX packing, paired backbone hooks, and safe saving/loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline

from segquant_fx.affiner import Affiner, AffinerConfig, BackboneRecorder, load_affiner, record_backbone_calls
from segquant_fx.affiner.layout import pack, to_bchw, unpack
from segquant_fx.affiner.solvers import MSERelSolver, PTQDSolver, TACSolver
from segquant_fx.affiner.trajectory import output_tensor, select_target
from segquant_fx.errors import CalibrationError, ConfigError, SerializationError
from segquant_fx.stepper import StepInfo, Stepper


def _info(step=0, layout="bchw", hw=(8, 8), branch="all", n=2, do_cfg=True, g=4.0, family="sd3"):
    return StepInfo(
        step_index=step,
        num_inference_steps=n,
        timestep=500.0,
        family=family,
        latent_layout=layout,
        latent_hw=hw,
        do_cfg=do_cfg,
        guidance_scale=g,
        branch=branch,
    )


def _mserel_affiner(**cfg_kw):
    cfg = AffinerConfig.from_dict(
        {
            "max_timestep": 2,
            "solver_config": {"blocksize": 2, "sample_mode": "block", "verbose": False},
            **cfg_kw,
        }
    )
    sols = {}
    for step in (0, 1):
        if not cfg.enabled(step):
            continue
        s = MSERelSolver(cfg.solver)
        r = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(step))
        s.update(1.1 * r + 0.05, r)
        sols[step] = s.solve()
    return Affiner(cfg, sols)


# ---------------------------------------------------------------------------------------- layout


def test_pack_matches_diffusers_flux_packing():
    """pack/unpack agree with FluxPipeline._pack_latents/_unpack_latents and invert each other."""
    x = torch.randn(2, 16, 8, 6)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 6)
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, (8, 6)), x)
    # diffusers' unpack takes the pixel size and the VAE scale factor (latent = pixels / 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 48, 8), x)


def test_layout_errors():
    """Odd sizes, wrong token counts and wrong ranks are ConfigErrors."""
    with pytest.raises(ConfigError, match="even"):
        unpack(torch.zeros(1, 4, 8), (3, 4))
    with pytest.raises(ConfigError, match="does not fit latent_hw"):
        unpack(torch.zeros(1, 5, 8), (4, 4))
    with pytest.raises(ConfigError, match=r"\[B, tokens, C\*4\]"):
        unpack(torch.zeros(1, 4, 2, 8), (4, 4))
    with pytest.raises(ConfigError, match="4-D"):
        to_bchw(torch.zeros(1, 4, 8), _info())


# --------------------------------------------------------------------------------------- affiner


def test_affiner_is_a_stepper_and_corrects():
    """correct() applies the step's solution, keeps dtype/shape, passes other steps through."""
    aff = _mserel_affiner(enable_timesteps=[1])
    assert isinstance(aff, Stepper) and aff.steps == (1,) and aff.noise_target == "all"
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    assert aff.correct(_info(step=0), x) is x
    y = aff.correct(_info(step=1), x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ref = MSERelSolver.apply(aff.solution(1), x.float(), aff.config.solver)
    torch.testing.assert_close(y, ref.to(torch.bfloat16))
    assert "mserel" in repr(aff)


def test_packed_correction_equals_bchw_correction():
    """A FLUX-packed prediction is corrected exactly like its unpacked form."""
    aff = _mserel_affiner()
    x = torch.randn(2, 4, 8, 8)
    got = aff.correct(_info(step=1, layout="packed", family="flux"), pack(x))
    torch.testing.assert_close(unpack(got, (8, 8)), aff.correct(_info(step=1), x))


def test_affiner_checks():
    """Wrong step counts, branches or channels are clear errors; bad solutions are rejected."""
    aff = _mserel_affiner()
    with pytest.raises(ConfigError, match="max_timestep=2 .* num_inference_steps=5"):
        aff.correct(_info(n=5), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="honour stepper.noise_target"):
        aff.correct(_info(branch="text"), torch.zeros(1, 4, 8, 8))
    with pytest.raises(CalibrationError, match="learned for 4 latent channels"):
        aff.correct(_info(step=1), torch.zeros(1, 16, 8, 8))
    cfg = AffinerConfig(max_timestep=2)
    with pytest.raises(ConfigError, match="not in \\[0, max_timestep=2\\)"):
        Affiner(cfg, {7: aff.solution(0)})
    with pytest.raises(SerializationError, match="do not match"):
        Affiner(cfg, {0: {"K": torch.ones(1, 1, 1)}})
    with pytest.raises(ConfigError, match="residual_variance needs a ptqd"):
        aff.residual_variance(0)
    with pytest.raises(KeyError, match="no solution for step 5"):
        aff.solution(5)


# ------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("solver", ["mserel", "ptqd", "tac"])
def test_save_load_roundtrip(tmp_path, solver):
    """Every solver saves to JSON + safetensors and loads back bit-identically."""
    cfg = AffinerConfig.from_dict({"solver_type": solver, "max_timestep": 3, "noise_target": "text"})
    cls = {"mserel": MSERelSolver, "ptqd": PTQDSolver, "tac": TACSolver}[solver]
    s = cls(cfg.solver)
    r = torch.randn(2, 4, 16, 16)
    s.update(1.2 * r + 0.1 + 0.05 * torch.randn_like(r), r)
    aff = Affiner(cfg, {0: s.solve(), 2: s.solve()}, meta={"note": "x", "numbers": [1, 2]})
    path = aff.save(tmp_path / "aff")
    assert sorted(p.name for p in path.iterdir()) == ["affiner.json", "affiner.safetensors"]
    back = load_affiner(path)
    assert back.config == aff.config and back.steps == (0, 2) and back.meta == aff.meta
    for step in (0, 2):
        for k, v in aff.solution(step).items():
            assert torch.equal(back.solution(step)[k], v)
    if solver == "ptqd":
        assert back.residual_variance(0).shape == (4,)
    # saving again over a previous save replaces it
    Affiner(cfg, {1: s.solve()}).save(path)
    assert load_affiner(path).steps == (1,)
    assert Affiner.load(path).steps == (1,)


def test_load_rejects_damaged_or_foreign_files(tmp_path):
    """Edited JSON, changed tensors, missing files and foreign directories are SerializationErrors."""
    aff = _mserel_affiner()
    path = aff.save(tmp_path / "aff")
    doc = json.loads((path / "affiner.json").read_text())
    doc["config"]["config"]["max_timestep"] = 9
    (path / "affiner.json").write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match="edited or damaged"):
        load_affiner(path)
    path = aff.save(tmp_path / "aff2")
    data = bytearray((path / "affiner.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "affiner.safetensors").write_bytes(bytes(data))
    with pytest.raises(SerializationError, match="checksum"):
        load_affiner(path)
    (path / "affiner.safetensors").unlink()
    with pytest.raises(SerializationError, match="missing"):
        load_affiner(path)
    with pytest.raises(SerializationError, match="not an affiner save"):
        load_affiner(tmp_path / "nothing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SerializationError, match="not an affiner save"):
        aff.save(other)
    assert (other / "keep.txt").read_text() == "mine"
    (other / "affiner.json").write_text('{"format": "something-else"}')
    with pytest.raises(SerializationError, match="format marker"):
        load_affiner(other)


def test_failed_save_leaves_previous_save_intact(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous save untouched and no temp directory behind."""
    aff = _mserel_affiner()
    path = aff.save(tmp_path / "aff")
    before = (path / "affiner.safetensors").read_bytes()
    import segquant_fx.affiner.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _mserel_affiner(enable_timesteps=[0]).save(path)
    assert (path / "affiner.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["aff"]


# ----------------------------------------------------------------------------------- trajectory


class _Net(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, *, t=0.0, return_dict=False):
        return (self.scale * x + t,)


def test_backbone_recorder_pairs_and_drives():
    """The partner sees the same args/kwargs; drive='partner' replaces the output the caller gets."""
    real, quant = _Net(1.0), _Net(2.0)
    x = torch.ones(2, 3)
    with BackboneRecorder(real, quant, drive="module") as rec:
        out = real(x, t=1.0)[0]
    assert torch.equal(out, 2 * torch.ones(2, 3))
    (call,) = rec.pop()
    assert torch.equal(call["partner"], 3 * torch.ones(2, 3))
    with BackboneRecorder(real, quant, drive="partner") as rec:
        out = real(x, t=1.0)[0]
    assert torch.equal(out, 3 * torch.ones(2, 3))
    assert torch.equal(real(x)[0], x)  # hook removed on exit
    calls = record_backbone_calls(real, lambda: [real(x, t=float(i)) for i in range(3)])
    assert [c["kwargs"]["t"] for c in calls] == [0.0, 1.0, 2.0] and torch.equal(calls[0]["args"][0], x)
    with pytest.raises(ConfigError, match="float backbone itself"):
        BackboneRecorder(real, real)
    with pytest.raises(ConfigError, match="needs a partner"):
        BackboneRecorder(real, None, drive="partner")


def test_recorder_shape_mismatch():
    """A partner returning another shape is a CalibrationError."""

    class Bad(torch.nn.Module):
        def forward(self, x, **kw):
            return (x[:1],)

    net = _Net(1.0)
    with BackboneRecorder(net, Bad()), pytest.raises(CalibrationError, match="returned shape"):
        net(torch.ones(2, 3))


def test_select_target_and_output_tensor():
    """CFG halves and the guided combination; outputs as tensor, tuple or .sample."""
    raw = torch.cat([torch.zeros(1, 2), torch.ones(1, 2)])
    info = _info(g=3.0)
    assert torch.equal(select_target(raw, info, "uncond"), torch.zeros(1, 2))
    assert torch.equal(select_target(raw, info, "text"), torch.ones(1, 2))
    assert torch.equal(select_target(raw, info, "all"), 3 * torch.ones(1, 2))
    assert select_target(raw, _info(do_cfg=False), "all") is raw
    with pytest.raises(ConfigError, match="needs classifier-free guidance"):
        select_target(raw, _info(do_cfg=False), "uncond")
    with pytest.raises(CalibrationError, match="even size"):
        select_target(torch.zeros(3, 2), info, "all")

    class Out:
        sample = raw

    assert output_tensor(Out()) is raw and output_tensor((raw,)) is raw and output_tensor(raw) is raw
    with pytest.raises(CalibrationError, match="cannot find the prediction"):
        output_tensor({"x": raw})
