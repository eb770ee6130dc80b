"""Control maps: Canny against OpenCV with known edges, blur, validation, the registry, depth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from _dataset_fixtures import rect_image
from PIL import Image

from segquant_fx.datasets.control import (
    CONTROL_MAKERS,
    CannyControl,
    DepthControl,
    make_control,
    register_control,
)
from segquant_fx.errors import ConfigError, SegQuantError

BOX = (8, 10, 24, 30)  # rows 8..23, cols 10..29 white


def _opencv(arr, low=100, high=200, blur=None):
    g = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    if blur:
        g = cv2.GaussianBlur(g, (blur, blur), 0)
    return cv2.Canny(g, low, high)


def test_canny_equals_opencv_and_edges_on_the_rectangle_border():
    arr = rect_image(box=BOX)
    out = CannyControl()(Image.fromarray(arr))
    assert out.mode == "L" and out.size == (40, 32)
    edges = np.asarray(out)
    np.testing.assert_array_equal(edges, _opencv(arr))
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    y0, x0, y1, x1 = BOX
    # every edge pixel is within one pixel of the rectangle's outline ...
    near_h = ((np.abs(ys - y0) <= 1) | (np.abs(ys - (y1 - 1)) <= 1)) & (xs >= x0 - 1) & (xs <= x1)
    near_v = ((np.abs(xs - x0) <= 1) | (np.abs(xs - (x1 - 1)) <= 1)) & (ys >= y0 - 1) & (ys <= y1)
    assert (near_h | near_v).all()
    # ... and every side is traced (not just a few pixels)
    assert (np.abs(ys - y0) <= 1).sum() >= (x1 - x0) - 2
    assert (np.abs(ys - (y1 - 1)) <= 1).sum() >= (x1 - x0) - 2
    assert (np.abs(xs - x0) <= 1).sum() >= (y1 - y0) - 2
    assert (np.abs(xs - (x1 - 1)) <= 1).sum() >= (y1 - y0) - 2
    # the inside and the far background stay black
    assert edges[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3].max() == 0 and edges[:, :5].max() == 0


def test_canny_thresholds_decide_weak_edges():
    """A 30-grey-level step (Sobel response 120, < 200 even at corners) is an edge at 20/40, not at 100/200."""
    arr = rect_image(box=BOX, value=30)
    assert np.asarray(CannyControl()(Image.fromarray(arr))).max() == 0
    weak = np.asarray(CannyControl(low=20, high=40)(Image.fromarray(arr)))
    np.testing.assert_array_equal(weak, _opencv(arr, 20, 40))
    assert weak.max() == 255


def test_canny_blur_matches_opencv_and_removes_noise():
    rng = np.random.default_rng(0)
    arr = rect_image(h=64, w=64, box=(16, 16, 48, 48))
    noisy = np.clip(arr.astype(int) + rng.integers(-90, 90, arr.shape[:2])[..., None], 0, 255).astype(
        np.uint8
    )
    plain = np.asarray(CannyControl()(Image.fromarray(noisy)))
    blurred = np.asarray(CannyControl(blur=5)(Image.fromarray(noisy)))
    np.testing.assert_array_equal(blurred, _opencv(noisy, blur=5))
    np.testing.assert_array_equal(
        np.asarray(CannyControl(blur=3)(Image.fromarray(noisy))), _opencv(noisy, blur=3)
    )
    assert (blurred > 0).sum() < (plain > 0).sum()


def test_canny_grey_and_rgba_inputs():
    arr = rect_image(box=BOX)
    grey = Image.fromarray(arr[..., 0])
    np.testing.assert_array_equal(np.asarray(CannyControl()(grey)), _opencv(arr))
    rgba = Image.fromarray(arr).convert("RGBA")
    np.testing.assert_array_equal(np.asarray(CannyControl()(rgba)), _opencv(arr))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blur": 4}, "odd positive integer"),
        ({"blur": 0}, "odd positive integer"),
        ({"blur": True}, "odd positive integer"),
        ({"low": 200, "high": 100}, "0 <= low <= high"),
        ({"low": -1}, "0 <= low <= high"),
    ],
)
def test_canny_bad_settings(kwargs, match):
    """Even kernels and inverted thresholds are rejected up front (OpenCV would fail deep inside)."""
    with pytest.raises(ConfigError, match=match):
        CannyControl(**kwargs)


def test_registry_and_make_control():
    assert {"canny", "depth"} <= set(CONTROL_MAKERS)
    m = make_control("canny", blur=3)
    assert m.settings() == {"name": "canny", "low": 100, "high": 200, "blur": 3}
    with pytest.raises(ConfigError, match=r"unknown control map 'hed'; registered: \["):
        make_control("hed")
    with pytest.raises(ConfigError, match="'canny' is already registered"):
        register_control("canny")(CannyControl)


def test_custom_control_maker():
    class Invert:
        def __call__(self, image):
            return Image.fromarray(255 - np.asarray(image.convert("L")))

        def settings(self):
            return {"name": "invert"}

    register_control("test-invert")(Invert)
    try:
        m = make_control("test-invert")
        out = m(Image.fromarray(rect_image(box=BOX)))
        assert np.asarray(out)[0, 0] == 255 and np.asarray(out)[BOX[0] + 1, BOX[1] + 1] == 0
        register_control("test-bad")(lambda: object())
        with pytest.raises(ConfigError, match=r"control map .test-bad.: got a object, not a ControlMapMaker"):
            make_control("test-bad")
    finally:
        CONTROL_MAKERS.pop("test-invert", None)
        CONTROL_MAKERS.pop("test-bad", None)


def test_depth_normalizes_and_resizes():
    img = Image.fromarray(rect_image(h=32, w=40))

    def model(im):  # a fake depth model: half-resolution tensor, horizontal ramp
        w, h = im.size
        return torch.linspace(2.0, 5.0, w // 2).expand(1, h // 2, w // 2)

    out = DepthControl(model, model_id="ramp")(img)
    a = np.asarray(out)
    assert out.mode == "L" and out.size == img.size
    assert a[:, 0].max() <= 10 and a[:, -1].min() >= 245 and (np.diff(a[5].astype(int)) >= -1).all()
    assert DepthControl(model, model_id="ramp").settings() == {"name": "depth", "model": "ramp"}
    flat = DepthControl(lambda im: np.full((32, 40), 3.0))(img)
    assert np.asarray(flat).max() == 0


def test_depth_bad_model_outputs():
    """Non-callable models, wrong shapes and NaNs give clear errors."""
    img = Image.fromarray(rect_image())
    with pytest.raises(ConfigError, match="needs a callable model"):
        DepthControl("dpt-large")
    with pytest.raises(SegQuantError, match=r"shape \(2, 32, 40\)"):
        DepthControl(lambda im: np.zeros((2, 32, 40)))(img)
    with pytest.raises(SegQuantError, match="non-finite"):
        DepthControl(lambda im: np.full((32, 40), np.nan))(img)
