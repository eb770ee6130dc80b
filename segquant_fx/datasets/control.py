"""Control maps for ControlNet conditioning: a registry of makers, Canny (OpenCV) and depth built in.

A control-map maker is any object with ``__call__(image: PIL.Image) -> PIL.Image`` (same width and
height as the input) and ``settings() -> dict`` (JSON values that fully describe its output; ``segquant-fx
dataset prepare`` compares them when it resumes). Register a factory under a name to make it available
to :func:`make_control` and to ``--control NAME``::

    from segquant_fx.datasets.control import register_control

    @register_control("invert")
    def _invert(**kwargs):
        return MyInvertMaker(**kwargs)

Built in:

* ``canny``: :class:`CannyControl`, OpenCV Canny with thresholds 100/200 and an optional Gaussian blur,
  as in SegQuant's preprocessing (white edges on black, one channel);
* ``depth``: :class:`DepthControl`, wraps a depth model *you* provide (a callable image -> depth array,
  e.g. a DPT pipeline built from local weights), normalized to 0..255; nothing is downloaded.

OpenCV is imported only when a Canny map is made (``pip install "segquant-fx[datasets]"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from segquant_fx.errors import ConfigError, SegQuantError

__all__ = [
    "ControlMapMaker",
    "CannyControl",
    "DepthControl",
    "CONTROL_MAKERS",
    "register_control",
    "make_control",
    "check_control",
    "canny_edges",
]


@runtime_checkable
class ControlMapMaker(Protocol):
    """What a control-map maker provides."""

    def __call__(self, image: Any) -> Any:
        """Map an RGB PIL image to a control map (a PIL image of the same size)."""

    def settings(self) -> dict[str, Any]:
        """JSON-serializable settings that determine the output (compared on resume)."""


CONTROL_MAKERS: dict[str, Callable[..., ControlMapMaker]] = {}


def register_control(name: str) -> Callable[[Callable[..., ControlMapMaker]], Callable[..., ControlMapMaker]]:
    """Decorator registering a control-map maker factory under ``name``.

    Raises:
        ConfigError: If ``name`` is already registered.
    """

    def deco(factory: Callable[..., ControlMapMaker]) -> Callable[..., ControlMapMaker]:
        if name in CONTROL_MAKERS:
            raise ConfigError(f"control map {name!r} is already registered")
        CONTROL_MAKERS[name] = factory
        return factory

    return deco


def make_control(name: str, **kwargs: Any) -> ControlMapMaker:
    """Build the registered control-map maker ``name`` with ``kwargs``.

    Raises:
        ConfigError: If ``name`` is unknown, or the maker rejects its arguments.
    """
    factory = CONTROL_MAKERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown control map {name!r}; registered: {sorted(CONTROL_MAKERS)}")
    return check_control(factory(**kwargs), f"control map {name!r}")


def check_control(maker: Any, what: str = "control map maker") -> ControlMapMaker:
    """Return ``maker`` if it is a :class:`ControlMapMaker` with JSON-serializable settings.

    Raises:
        ConfigError: Otherwise, naming ``what``.
    """
    if not isinstance(maker, ControlMapMaker):
        raise ConfigError(
            f"{what}: got a {type(maker).__name__}, not a ControlMapMaker (an object with __call__(image) and settings())"
        )
    try:
        json.dumps(maker.settings())
    except TypeError as e:
        raise ConfigError(f"{what}: settings() must be JSON-serializable ({e})") from e
    return maker


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SegQuantError(
            'Canny control maps need OpenCV: pip install "segquant-fx[datasets]" (opencv-python-headless)'
        ) from e
    return cv2


def canny_edges(rgb: np.ndarray, low: float = 100, high: float = 200, blur: int | None = None) -> np.ndarray:
    """Canny edges of an RGB ``uint8`` array ``[H, W, 3]``: ``uint8 [H, W]`` with 255 on edges, 0 elsewhere.

    The image is converted to grey (``COLOR_RGB2GRAY``), optionally blurred with a ``blur`` x ``blur``
    Gaussian (sigma from the kernel size), then passed to ``cv2.Canny(gray, low, high)``.
    """
    cv2 = _cv2()
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if blur:
        gray = cv2.GaussianBlur(gray, (blur, blur), 0)
    return cv2.Canny(gray, low, high)


@dataclass(frozen=True, kw_only=True)
class CannyControl:
    """OpenCV Canny edge map (white edges on black, mode ``L``), optionally after a Gaussian blur.

    Attributes:
        low: Lower hysteresis threshold (SegQuant: 100).
        high: Upper hysteresis threshold (SegQuant: 200).
        blur: Odd Gaussian kernel size applied first (SegQuant's ``--enable_blur`` uses 3), or ``None``.
    """

    low: float = 100
    high: float = 200
    blur: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.low <= self.high):
            raise ConfigError(f"Canny thresholds need 0 <= low <= high, got low={self.low}, high={self.high}")
        if self.blur is not None and (
            isinstance(self.blur, bool)
            or not isinstance(self.blur, int)
            or self.blur < 1
            or self.blur % 2 == 0
        ):
            raise ConfigError(
                f"Canny blur kernel must be an odd positive integer (e.g. 3), got {self.blur!r}"
            )

    def settings(self) -> dict[str, Any]:
        """Thresholds and blur."""
        return {"name": "canny", "low": self.low, "high": self.high, "blur": self.blur}

    def __call__(self, image: Any) -> Any:
        """The edge map of a PIL image."""
        from PIL import Image

        edges = canny_edges(np.asarray(image.convert("RGB")), self.low, self.high, self.blur)
        return Image.fromarray(edges)  # a 2-D uint8 array is mode "L"


class DepthControl:
    """Depth map from a user-provided model, min-max normalized to a ``uint8`` grey image (mode ``L``).

    ``model(image)`` takes an RGB PIL image and returns the depth as a 2-D array, a tensor (``[H, W]``,
    ``[1, H, W]`` or ``[1, 1, H, W]``), or a PIL image. It is resized (bicubic) to the input size if needed.
    Nothing is downloaded: build the model from local weights, e.g.
    ``transformers.pipeline("depth-estimation", model="/models/dpt-large")`` wrapped as
    ``lambda im: pipe(im)["predicted_depth"]``.
    """

    def __init__(self, model: Callable[[Any], Any], *, model_id: str | None = None) -> None:
        """Wrap a depth model.

        Args:
            model: Callable image -> depth.
            model_id: A name for the model recorded in the dataset's settings (so a resumed run with another
                model is refused); default: the callable's qualified name.

        Raises:
            ConfigError: If ``model`` is not callable.
        """
        if not callable(model):
            raise ConfigError(
                f"depth control needs a callable model (image -> depth), got {type(model).__name__}"
            )
        self.model = model
        self.model_id = model_id or getattr(model, "__qualname__", type(model).__qualname__)

    def settings(self) -> dict[str, Any]:
        """The model id."""
        return {"name": "depth", "model": self.model_id}

    def __call__(self, image: Any) -> Any:
        """The normalized depth map of a PIL image."""
        from PIL import Image

        out = self.model(image)
        if isinstance(out, Image.Image):
            out = np.asarray(out.convert("F"))
        elif hasattr(out, "detach"):
            out = out.detach().float().cpu().numpy()
        arr = np.asarray(out, dtype=np.float64)
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise SegQuantError(f"depth model returned shape {np.shape(out)}; expected [H, W] (or [1, H, W])")
        if not np.isfinite(arr).all():
            raise SegQuantError("depth model returned non-finite values")
        lo, hi = float(arr.min()), float(arr.max())
        norm = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        im = Image.fromarray(np.round(norm * 255).astype(np.uint8))
        if im.size != image.size:
            im = im.resize(image.size, Image.Resampling.BICUBIC)
        return im


register_control("canny")(CannyControl)
register_control("depth")(DepthControl)
