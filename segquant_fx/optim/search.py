"""Alpha search: score SmoothQuant candidates layer-locally, with resumable state.

The search never runs the model. During the one calibration pass every searched layer keeps a
uniform random reservoir of its input rows ``X`` (:class:`~segquant_fx.passes.observers.RowReservoir`);
a candidate ``a`` is then scored on those rows:

    s = smoothing_vector(max|x|, W, a)                 (per input channel)
    e_t(a) = || X_t W_t^T - Q(X_t / s_t) Q(W_t s_t)^T ||^2      for every input segment t

with the layer's own activation calibrator (amax over all data, or percentile/MSE), its weight
scale layout, and for ``svd`` the low-rank branch of ``W s`` (weights rounded to nearest during
the search). Segments are independent: input segments have their own activation scale and (when
searched) their own weight scale per output channel, so each input segment gets its own alpha; with
``svd`` the branch couples the segments and the layer gets one alpha. Output segments with their
own smoothing vector (``per_segment_smoothing``) are searched separately. Ties go to the candidate
closest to ``opt.alpha``.

State: :class:`SearchState` keeps, per layer and search unit, the error of every evaluated alpha.
With a file it is loaded first (points already there are not evaluated again) and written after
every layer (atomically), so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SearchState", "alpha_key", "pick_best"]

STATE_VERSION = 1


def alpha_key(alpha: float) -> str:
    """The JSON key of a candidate (``"0.3"``)."""
    return repr(round(float(alpha), 10))


class SearchState:
    """Per layer and unit, the errors of the alphas evaluated so far (optionally in a JSON file).

    File format::

        {"version": 1,
         "layers": {"<module>": {"shape": [N, K, "<setting>"],
                                 "units": {"g0.t0": {"0.0": 1.25e-3, "0.1": ...}, ...},
                                 "best": {"g0.t0": 0.4, ...}}}}

    ``shape`` identifies what was scored: the weight shape plus a string of the layer's quantization
    setting (formats, segments, calibrator, rank); an entry recorded for another one is discarded
    with a warning. The file does not identify the calibration set: resume with the same items.

    Args:
        path: JSON file to resume from and write to, or None (in memory only).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else None
        self.layers: dict[str, dict[str, Any]] = {}
        #: Points (layer, alpha) evaluated by this process (resumed ones not counted).
        self.evaluations = 0
        #: Points found in the file and skipped.
        self.skipped = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())  # type: ignore[union-attr]
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"alpha search state {self.path}: unreadable ({e}); starting afresh", stacklevel=3)
            return
        if (
            not isinstance(data, dict)
            or data.get("version") != STATE_VERSION
            or not isinstance(data.get("layers"), dict)
        ):
            warnings.warn(f"alpha search state {self.path}: unknown format; starting afresh", stacklevel=3)
            return
        self.layers = data["layers"]

    def layer(self, module: str, shape: Sequence[Any]) -> dict[str, Any]:
        """The entry of ``module``; an entry recorded for another shape/setting is discarded."""
        entry = self.layers.get(module)
        if entry is not None and list(entry.get("shape", [])) != list(shape):
            warnings.warn(
                f"alpha search state: {module} was recorded for weight shape/setting {entry.get('shape')}, not "
                f"{list(shape)}; re-evaluating it",
                stacklevel=3,
            )
            entry = None
        if entry is None:
            entry = {"shape": list(shape), "units": {}, "best": {}}
            self.layers[module] = entry
        return entry

    def missing(
        self, module: str, shape: Sequence[Any], units: Sequence[str], grid: Sequence[float]
    ) -> list[float]:
        """The candidates of ``grid`` not yet evaluated for every unit of ``module``."""
        entry = self.layer(module, shape)
        todo = []
        for a in grid:
            k = alpha_key(a)
            if all(k in entry["units"].get(u, {}) for u in units):
                self.skipped += 1
            else:
                todo.append(a)
        return todo

    def record(self, module: str, shape: Sequence[Any], alpha: float, errors: dict[str, float]) -> None:
        """Store the errors of one candidate (one evaluation)."""
        entry = self.layer(module, shape)
        k = alpha_key(alpha)
        for unit, err in errors.items():
            entry["units"].setdefault(unit, {})[k] = float(err)
        self.evaluations += 1

    def errors(self, module: str, unit: str) -> dict[float, float]:
        """Alpha -> error of one unit."""
        entry = self.layers.get(module, {})
        return {float(a): float(e) for a, e in entry.get("units", {}).get(unit, {}).items()}

    def set_best(self, module: str, unit: str, alpha: float) -> None:
        """Record the chosen alpha of a unit."""
        self.layers[module]["best"][unit] = float(alpha)

    def save(self) -> None:
        """Write the file (atomically); no-op without a path."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": STATE_VERSION, "layers": self.layers}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def pick_best(errors: dict[float, float], grid: Sequence[float], base: float) -> float:
    """The grid alpha with the smallest error; ties (and unevaluated grids) go to the one nearest ``base``."""
    cands = [a for a in grid if a in errors or any(abs(a - b) < 1e-9 for b in errors)]
    if not cands:
        return base

    def err(a: float) -> float:
        for b, e in errors.items():
            if abs(a - b) < 1e-9:
                return e
        return float("inf")

    return min(cands, key=lambda a: (err(a), abs(a - base)))
