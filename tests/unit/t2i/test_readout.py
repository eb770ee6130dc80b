"""Attribute read-out: exact on clean images, robust to mild noise, fails where the prompt is not met."""

from __future__ import annotations

import pytest
import torch

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.data import (
    PALETTE,
    SHAPES,
    SceneConfig,
    Scenes,
    object_geometry,
    render,
    sample_scenes,
    shape_masks,
)
from segquant_fx.t2i.readout import (
    ATTRIBUTES,
    FEATURE_DIM,
    chance_adherence,
    frechet_distance,
    image_features,
    read_attributes,
    score_adherence,
    template_bank,
)


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(1000, torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def images(scenes):
    return render(scenes)


def test_template_bank_is_unambiguous():
    masks, attrs = template_bank()
    assert masks.shape == (4 * 2 * 5 * 9, 32 * 32) and attrs.shape == (360, 5)
    assert torch.unique(masks, dim=0).shape[0] == 360  # no two templates draw the same mask
    assert (masks.sum(1) > 0).all()


def test_readout_is_exact_on_clean_images(scenes, images):
    """>= 99% required; the rule-based read-out gets every attribute of every clean image right."""
    s = score_adherence(images, scenes)
    assert s["n"] == 1000
    for key in ("overall", *ATTRIBUTES):
        assert s[key] >= 0.99, (key, s[key])
    assert s["overall"] == 1.0
    ro = read_attributes(images)
    used = scenes.object_mask
    assert torch.equal(ro.background, scenes.background)
    assert torch.equal(ro.n_objects, scenes.n_objects)
    col = scenes.color
    assert torch.equal(ro.shape.gather(1, col)[used], scenes.shape[used])
    assert torch.equal(ro.size.gather(1, col)[used], scenes.size[used])
    assert torch.equal(ro.position.gather(1, col)[used], scenes.position[used])
    assert torch.allclose(ro.iou.gather(1, col)[used], torch.ones(int(used.sum())))


def test_readout_survives_mild_noise(scenes, images):
    scenes, images = scenes[:300], images[:300]
    noisy = (images + 0.12 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    assert score_adherence(noisy, scenes)["overall"] >= 0.99


def _replace(s: Scenes, **kw) -> Scenes:
    return Scenes(**{f: kw.get(f, getattr(s, f)) for f in s.__dataclass_fields__})


def test_wrong_attributes_are_caught(scenes, images):
    """Scoring against scenes with one attribute changed drops exactly that attribute (and overall) to 0."""
    scenes, images = scenes[:300], images[:300]
    used = scenes.object_mask
    wrong_shape = _replace(scenes, shape=(scenes.shape + 1) % len(SHAPES))
    s = score_adherence(images, wrong_shape)
    assert s["shape"] == 0.0 and s["overall"] == 0.0 and s["color"] == 1.0 and s["background"] == 1.0
    wrong_size = _replace(scenes, size=1 - scenes.size, mention_size=used)
    s = score_adherence(images, wrong_size)
    assert s["size"] == 0.0 and s["overall"] == 0.0 and s["shape"] == 1.0
    # sizes the prompt does not name are not scored
    unnamed = _replace(scenes, size=1 - scenes.size, mention_size=torch.zeros_like(used))
    assert score_adherence(images, unnamed)["overall"] == 1.0
    wrong_bg = _replace(scenes, background=(scenes.background + 1) % 9)
    s = score_adherence(images, wrong_bg)
    assert s["background"] == 0.0 and s["overall"] == 0.0


def test_blank_image_fails_every_object():
    s = sample_scenes(50, torch.Generator().manual_seed(2))
    blank = torch.zeros(50, 3, 32, 32)
    r = score_adherence(blank, s)
    assert r["color"] == 0.0 and r["shape"] == 0.0 and r["count"] == 0.0 and r["overall"] == 0.0


def test_chance_level_is_low(scenes):
    c = chance_adherence(scenes)
    assert c["overall"] < 0.01
    assert c["background"] < 0.2 and c["color"] < 0.3 and c["shape"] < 0.1


def test_features_and_frechet_distance(images):
    f = image_features(images)
    assert f.shape == (1000, FEATURE_DIM) and torch.isfinite(f).all()
    assert frechet_distance(f[:500], f[:500]) < 1e-6
    same = frechet_distance(f[:500], f[500:])
    other = image_features(
        render(sample_scenes(500, torch.Generator().manual_seed(3), config=SceneConfig(p_two=0.0)))
    )
    shifted = frechet_distance(f[:500], other)
    blurred = torch.nn.functional.avg_pool2d(images[:500], 3, 1, 1)
    assert shifted > 10 * same
    assert frechet_distance(f[:500], image_features(blurred)) > 5 * same


def test_bad_inputs_raise_config_error(images, scenes):
    """Wrong image shapes, count mismatches and degenerate feature sets are refused with ConfigError."""
    with pytest.raises(ConfigError, match=r"expected images \[B, 3, 32, 32\]"):
        read_attributes(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="1000 images but 10 scenes"):
        score_adherence(images, scenes[:10])
    with pytest.raises(ConfigError, match="at least 2 samples"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match=r"\[N, D\] and \[M, D\]"):
        frechet_distance(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ConfigError, match="at least 2 scenes"):
        chance_adherence(scenes[:1])


def test_blended_edges_are_not_objects():
    """A 2 px ring of a third color around an object (blended edges of a generated image) is no object.

    A square ring 2 px thick has 4 interior pixels (its inner corners); objects need 6.
    """
    s = sample_scenes(40, torch.Generator().manual_seed(9), config=SceneConfig(p_two=0.0))
    img = render(s)
    radius = 5.0 + 3.0 * s.size[:, 0].float()  # one pixel beyond the object's own extent
    _, cx, cy = object_geometry(s)
    ring = shape_masks(torch.ones(40, dtype=torch.long), radius + 1, cx[:, 0], cy[:, 0]) & ~shape_masks(
        torch.ones(40, dtype=torch.long), radius - 1.0, cx[:, 0], cy[:, 0]
    )
    obj = img.ne(PALETTE[s.background][:, :, None, None]).any(1)
    ring = ring & ~obj
    third = torch.where(s.background == 2, 1, 2)  # gray ring (white on gray backgrounds)
    img = torch.where(ring[:, None], PALETTE[third][:, :, None, None], img)
    ro = read_attributes(img)
    assert (ro.counts.gather(1, third[:, None]) >= 12).all()  # enough pixels to pass the size test...
    assert ro.n_objects.tolist() == [1] * 40  # ...but no interior
    assert score_adherence(img, s)["count"] == 1.0
