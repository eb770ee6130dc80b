"""AffinerConfig: both dict layouts, JSON round trips, and clear errors for bad keys and values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from segquant_fx.affiner.config import AffinerConfig, MSERelConfig, PTQDConfig, TACConfig
from segquant_fx.errors import ConfigError

REFERENCE_BLOCKWISE = {
    "type": "blockwise",
    "config": {
        "max_timestep": 50,
        "sample_size": 256,
        "enable_timesteps": None,
        "recurrent": True,
        "noise_target": "uncond",
        "enable_latent_affine": False,
        "solver_type": "mserel",
        "solver_config": {
            "blocksize": 8,
            "alpha": 0.5,
            "lambda1": 0.1,
            "lambda2": 0.1,
            "sample_mode": "interpolate",
            "percentile": 100,
            "greater": True,
            "scale": 1,
            "verbose": True,
        },
    },
    "extra_args": {"controlnet_conditioning_scale": 0, "guidance_scale": 7},
}


def test_reference_file_layout_parses_and_round_trips(tmp_path):
    """The reference's nested JSON parses; to_dict writes it back; JSON files load."""
    cfg = AffinerConfig.from_dict(REFERENCE_BLOCKWISE)
    assert cfg.type == "blockwise" and cfg.solver_type == "mserel" and cfg.noise_target == "uncond"
    assert isinstance(cfg.solver, MSERelConfig) and cfg.solver.percentile == 100.0
    assert cfg.extra_args["guidance_scale"] == 7
    assert AffinerConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "affine.json"
    path.write_text(json.dumps(REFERENCE_BLOCKWISE))
    assert AffinerConfig.from_json(path) == cfg
    assert AffinerConfig.coerce(str(path)) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_flat_layout_and_derived_pairs():
    """Flat keys work; type and solver_type derive from each other; ptqd's null config = defaults."""
    ptqd = AffinerConfig.from_dict({"type": "ptqd", "max_timestep": 4, "solver_config": None})
    assert ptqd.solver_type == "ptqd" and ptqd.solver == PTQDConfig()
    tac = AffinerConfig.from_dict({"solver_type": "tac", "enable_timesteps": [0, 2], "max_timestep": 3})
    assert tac.type == "tac" and tac.enable_timesteps == (0, 2) and isinstance(tac.solver, TACConfig)
    assert tac.enabled(2) and not tac.enabled(1)
    assert AffinerConfig.coerce(None).solver_type == "mserel"
    assert AffinerConfig.coerce(AffinerConfig(type="tac")).solver_type == "tac"


def test_frozen():
    """Configs are immutable."""
    cfg = AffinerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_timestep = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"max_timesteps": 3}, r"unknown key 'max_timesteps'; did you mean 'max_timestep'"),
        ({"type": "blockwise", "config": {"samples": 3}}, r"config: unknown key 'samples'"),
        ({"type": "blockwise", "config": {}, "other": 1}, r"unknown key 'other'"),
        ({"type": "affine"}, r"type = 'affine': unknown affiner type"),
        ({"solver_type": "adaround"}, r"solver_type = 'adaround': unknown solver"),
        ({"type": "ptqd", "solver_type": "mserel"}, r"does not go with solver_type"),
        ({"max_timestep": 0}, r"max_timestep = 0: must be >= 1"),
        ({"sample_size": 2.5}, r"sample_size = 2.5: expected an int"),
        ({"recurrent": "yes"}, r"recurrent = 'yes': expected a bool"),
        ({"noise_target": "cond"}, r"noise_target = 'cond': unknown target"),
        ({"enable_timesteps": [5], "max_timestep": 3}, r"step 5 is not an int in \[0, max_timestep=3\)"),
        ({"enable_timesteps": [1, 1]}, r"steps repeat"),
        ({"enable_timesteps": []}, r"non-empty"),
        ({"enable_latent_affine": True}, r"not implemented"),
        ({"extra_args": {"prompt": "x"}}, r"extra_args.prompt.*sets this pipeline argument itself"),
        ({"extra_args": [1]}, r"extra_args = \[1\]: expected a dict"),
        ({"solver_config": {"blocksize": 0}}, r"blocksize = 0: must be >= 1"),
        ({"solver_config": {"alpha": 1.5}}, r"alpha = 1.5: must be <= 1.0"),
        ({"solver_config": {"sample_mode": "nearest"}}, r"sample_mode = 'nearest': unknown mode"),
        ({"solver_config": {"blocksize": 8, "block": 2}}, r"solver_config \(mserel\): unknown key 'block'"),
        (
            {"type": "tac", "solver_config": {"blocksize": 8}},
            r"solver_config \(tac\): unknown key 'blocksize'",
        ),
        ({"type": "ptqd", "solver_config": {"variance_mode": "vsc"}}, r"variance_mode = 'vsc'"),
        ({"type": "tac", "solver_config": {"eps": 0}}, r"eps = 0.0: must be > 0"),
        ({"solver_config": {"scale": float("nan")}}, r"expected a finite number"),
        ([1, 2], r"expected an AffinerConfig, a dict or the path of a JSON file, not list"),
    ],
)
def test_bad_configs(data, match):
    """Every bad key or value raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=match):
        AffinerConfig.coerce(data) if not isinstance(data, dict) else AffinerConfig.from_dict(data)


def test_bad_sources(tmp_path):
    """Missing files, unparsable JSON and wrong types are ConfigErrors."""
    with pytest.raises(ConfigError, match="does not exist"):
        AffinerConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="could not be parsed"):
        AffinerConfig.coerce(bad)
    with pytest.raises(ConfigError, match="not int"):
        AffinerConfig.coerce(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a TACConfig"):
        AffinerConfig(type="tac", solver_config=MSERelConfig())
