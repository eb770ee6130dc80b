"""Procedural scene generator: determinism, rendering, prompts, tokens, parsing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.data import (
    MAX_TOKENS,
    PALETTE,
    SHAPES,
    VOCAB,
    SceneConfig,
    detokenize,
    heldout_scenes,
    parse_prompts,
    render,
    sample_scenes,
    scene_prompts,
    scene_token_ids,
    shape_masks,
    tokenize,
)


def _scenes(n: int, seed: int, **cfg):
    return sample_scenes(n, torch.Generator().manual_seed(seed), config=SceneConfig(**cfg) if cfg else None)


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_same_seed_same_scenes_and_images():
    a, b = _scenes(300, 7), _scenes(300, 7)
    assert _equal(a, b)
    assert torch.equal(render(a), render(b))
    assert scene_prompts(a) == scene_prompts(b)


def test_different_seed_different_scenes():
    assert scene_prompts(_scenes(50, 1)) != scene_prompts(_scenes(50, 2))


def test_heldout_is_fixed():
    assert scene_prompts(heldout_scenes(20)) == scene_prompts(heldout_scenes(20, seed=1234))
    assert scene_prompts(heldout_scenes(20)) != scene_prompts(heldout_scenes(20, seed=1))


def test_scene_invariants():
    s = _scenes(2000, 3)
    used = s.object_mask
    assert set(s.n_objects.unique().tolist()) == {1, 2}
    two = s.n_objects == 2
    assert not (s.color[two, 0] == s.color[two, 1]).any()  # two objects never share a color
    assert not ((s.color == s.background[:, None]) & used).any()  # nor the background's
    assert not (s.position[two, 0] == s.position[two, 1]).any()
    assert (s.position[two] >= 1).all()  # two-object scenes use corners
    assert (s.color[used] != 2).all()  # gray is background-only
    assert s.jitter.abs().max() <= 1
    # every configured share is roughly right
    assert 0.35 < two.float().mean() < 0.45
    assert 0.75 < s.mention_size[used].float().mean() < 0.85


def test_render_uses_palette_and_every_object_is_visible():
    s = _scenes(500, 4)
    img = render(s)
    assert img.shape == (500, 3, 32, 32) and img.dtype == torch.float32
    flat = img.permute(0, 2, 3, 1).reshape(-1, 3)
    assert ((flat[:, None] - PALETTE[None]).abs().sum(-1) == 0).any(1).all()
    for i in range(len(s)):
        colors = {tuple(c) for c in img[i].reshape(3, -1).T.tolist()}
        want = {tuple(PALETTE[s.background[i]].tolist())} | {
            tuple(PALETTE[s.color[i, k]].tolist()) for k in range(int(s.n_objects[i]))
        }
        assert colors == want


def test_shape_masks_areas():
    """Pixel areas of the small (r=4) shapes: square 8x8, circle and cross with cut corners, triangle apex up."""
    r = torch.full((4,), 4.0)
    c = torch.full((4,), 16.0)
    m = shape_masks(torch.arange(4), r, c, c)
    areas = dict(zip(SHAPES, m.sum((1, 2)).tolist(), strict=True))
    assert areas == {"circle": 52, "square": 64, "triangle": 32, "cross": 48}
    tri = m[2]
    assert tri[12:20].sum(1).tolist() == [0, 2, 2, 4, 4, 6, 6, 8]  # widens downwards


def test_token_ids_match_tokenizing_the_prompts():
    s = _scenes(1000, 5)
    ids = scene_token_ids(s)
    assert ids.shape == (1000, MAX_TOKENS) and ids.dtype == torch.long
    assert torch.equal(ids, tokenize(scene_prompts(s)))
    assert detokenize(ids) == scene_prompts(s)


def test_parse_round_trip():
    s = _scenes(1000, 6)
    prompts = scene_prompts(s)
    parsed = parse_prompts(prompts)
    assert scene_prompts(parsed) == prompts
    for f in ("background", "n_objects", "color", "shape", "mention_size", "mention_position"):
        assert torch.equal(getattr(parsed, f), getattr(s, f)), f
    assert torch.equal(parsed.size[parsed.mention_size], s.size[s.mention_size])
    assert torch.equal(parsed.position[parsed.mention_position], s.position[s.mention_position])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p_two=st.floats(0, 1), p_size=st.floats(0, 1), p_pos=st.floats(0, 1))
def test_round_trip_property(seed, p_two, p_size, p_pos):
    s = _scenes(16, seed, p_two=p_two, p_mention_size=p_size, p_mention_position=p_pos)
    prompts = scene_prompts(s)
    assert scene_prompts(parse_prompts(prompts)) == prompts
    assert torch.equal(scene_token_ids(s), tokenize(prompts))


def test_prompt_examples():
    p = "a small red circle at the top left and a blue cross on a gray background"
    s = parse_prompts(p)
    assert s.n_objects.tolist() == [2]
    assert scene_prompts(s) == [p]
    assert s.mention_size.tolist() == [[True, False]] and s.mention_position.tolist() == [[True, False]]
    assert tokenize("").eq(0).all()  # the empty prompt is all padding


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        (
            "a purple circle on a blue background",
            "word 'purple' is not in the tiny text encoder's vocabulary",
        ),
        ("a red circle on a blue", "expected 'background'"),
        ("a red blob on a blue background", "not in the tiny text encoder"),
        ("red circle on a blue background", "expected 'a' at word 1"),
        ("a gray circle on a blue background", "expected an object color"),
        ("a red circle at the middle on a blue background", "expected 'in the center' or"),
        ("a red circle and a red square on a blue background", "both objects are red"),
        ("a red circle on a red background", "background color red"),
        (
            "a red circle at the top left and a blue square at the top left on a black background",
            "both objects are at the top left",
        ),
        ("a red circle in the center and a blue square on a black background", "not 'in the center'"),
        ("a red circle on a blue background and more", "expected the end of the prompt"),
    ],
)
def test_parse_errors_name_the_problem(prompt, match):
    """Malformed prompts raise ConfigError naming the word or the rule."""
    with pytest.raises(ConfigError, match=match):
        (tokenize if "vocabulary" in match or "tiny text" in match else parse_prompts)(prompt)


def test_tokenize_rejects_long_and_non_string_prompts():
    """Too many words, non-strings and the padding token as a word are refused."""
    with pytest.raises(ConfigError, match="reads at most 24"):
        tokenize(" ".join(["a"] * 25))
    with pytest.raises(ConfigError, match="not a string"):
        tokenize([3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="not in the tiny"):
        tokenize(VOCAB[0])


@pytest.mark.parametrize("kwargs", [{"p_two": 1.5}, {"p_mention_size": -0.1}, {"jitter": 2}])
def test_scene_config_validation(kwargs):
    """Probabilities outside [0, 1] and jitter that would let objects overlap are refused."""
    with pytest.raises(ConfigError):
        SceneConfig(**kwargs)


def test_sample_scenes_rejects_bad_counts():
    """A non-positive or non-int count raises ConfigError."""
    for n in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="positive int"):
            sample_scenes(n)  # type: ignore[arg-type]
