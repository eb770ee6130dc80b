"""Timestep samplers: the exact step selection of spec section 4, seeding, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.calibset import BaseSampler, DNTCSampler, NormalSampler, QDiffusionSampler, UniformSampler
from segquant_fx.errors import ConfigError


def test_aliases():
    assert QDiffusionSampler is UniformSampler
    assert DNTCSampler is NormalSampler


def test_base_first_steps():
    assert BaseSampler().sample_timesteps(29, 5) == [29, 28, 27, 26, 25]
    assert BaseSampler().select_steps(30, 5) == [0, 1, 2, 3, 4]
    # more steps than the run has: counters below 0 select nothing (reference behaviour)
    assert BaseSampler().select_steps(3, 10) == [0, 1, 2]


def test_uniform_linspace_floor():
    # numpy.linspace(29, 0, 10, dtype=int): 29, 25.78 -> 25, 22.56 -> 22, ...
    assert UniformSampler().sample_timesteps(29, 10) == [29, 25, 22, 19, 16, 12, 9, 6, 3, 0]
    assert UniformSampler().select_steps(30, 10) == [0, 4, 7, 10, 13, 17, 20, 23, 26, 29]
    assert UniformSampler().select_steps(50, 50) == list(range(50))
    assert UniformSampler().select_steps(4, 1) == [
        0
    ]  # linspace with one point is its start: counter 3 = step 0
    assert UniformSampler().sample_timesteps(3, 1) == [3]


@given(t=st.integers(1, 200), n=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_uniform_matches_numpy(t, n):
    expected = sorted({t - 1 - int(c) for c in np.linspace(t - 1, 0, n, dtype=int)})
    assert UniformSampler().select_steps(t, n) == expected
    steps = UniformSampler().select_steps(t, n)
    assert steps[0] == 0 or n == 1  # the noisiest step is always selected (linspace starts at T-1)
    assert len(steps) <= min(n, t)


def test_normal_reference_semantics():
    """Draw N(mean, (T-1)/2) with the seeded generator, clamp, round, de-duplicate."""
    s = NormalSampler(mean=5.0, seed=3)
    got = s.sample_timesteps(29, 12, sample_index=7)
    state = np.random.SeedSequence([3, 7]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    draws = torch.normal(mean=5.0, std=14.5, size=(12,), generator=g, dtype=torch.float64).clamp(0, 29)
    assert got == sorted({int(round(v)) for v in draws.tolist()})
    assert s.select_steps(30, 12, 7) == sorted(29 - c for c in got)


@given(t=st.integers(1, 100), n=st.integers(1, 40), seed=st.integers(0, 2**31), idx=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_normal_properties(t, n, seed, idx):
    s = NormalSampler(seed=seed)
    steps = s.select_steps(t, n, idx)
    assert steps == sorted(set(steps))
    assert 1 <= len(steps) <= min(n, t)
    assert all(0 <= x < t for x in steps)
    assert steps == NormalSampler(seed=seed).select_steps(t, n, idx)  # seeded: reproducible


def test_normal_seeded_per_sample():
    s = NormalSampler(mean=10, seed=0)
    draws = [tuple(s.select_steps(50, 8, i)) for i in range(20)]
    assert len(set(draws)) > 1  # each prompt gets its own draw
    assert draws == [tuple(NormalSampler(mean=10, seed=0).select_steps(50, 8, i)) for i in range(20)]
    assert draws != [tuple(NormalSampler(mean=10, seed=1).select_steps(50, 8, i)) for i in range(20)]


def test_normal_mean_shifts_selection():
    # mean in steps remaining: near 0 = the last (least noisy) steps, i.e. high step indices
    late = [x for i in range(50) for x in NormalSampler(mean=0, seed=1).select_steps(41, 6, i)]
    early = [x for i in range(50) for x in NormalSampler(mean=40, seed=1).select_steps(41, 6, i)]
    assert np.mean(late) > 25 > 15 > np.mean(early)


def test_single_step_run():
    for s in (BaseSampler(), UniformSampler(), NormalSampler()):
        assert s.select_steps(1, 3) == [0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: BaseSampler().select_steps(0, 1), "num_inference_steps"),
        (lambda: BaseSampler().select_steps(10, 0), "timestep_per_sample"),
        (lambda: UniformSampler().select_steps(10, 2.5), "timestep_per_sample"),
        (lambda: UniformSampler().sample_timesteps(-1, 2), "max_timestep"),
        (lambda: NormalSampler(mean=float("nan")), "mean"),
        (lambda: NormalSampler(mean="5"), "mean"),
        (lambda: NormalSampler(seed=1.5), "seed"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_settings_and_repr():
    assert BaseSampler().settings() == {"type": "BaseSampler"}
    assert NormalSampler(2.0, seed=4).settings() == {"type": "NormalSampler", "mean": 2.0, "seed": 4}
    assert repr(NormalSampler(2.0, seed=4)) == "NormalSampler(mean=2.0, seed=4)"
