"""Quantization configs: frozen dataclasses, the seed's dict format, JSON/YAML and named presets.

``quantize(..., config=...)`` accepts three spellings of the same thing, all normalized by
:meth:`QuantizeConfig.coerce`:

* a **preset name** such as ``"w8a8"`` (see :data:`PRESETS`; ``None`` means :data:`DEFAULT_PRESET`),
  or one of the paper's baselines and settings in :data:`BASELINE_PRESETS` (``"baseline-w8a8"``,
  ``"ptq4dit-w8a8"``, ``"smooth-plus-w8a8"``, ``"svdquant-w4a8"``, ``"svdquant-w4a4"``,
  ``"segquant-a-w8a8"``, ``"segquant-g-w8a8"``);
* a **dict** in the seed's format: a required ``"default"`` entry plus ``fnmatch`` globs on fully
  qualified module names (``"transformer_blocks.*.ff.net.2"``);
* a :class:`QuantizeConfig`, built from the frozen, keyword-only dataclasses below.

Dict format (every key optional except ``"default"``; missing keys take the defaults shown)::

    {
        "default": {
            "enable": True,              # quantize matching linears at all
            "seglinear": True,           # per-segment scales for linears matched by a segmentation pattern
            "search_patterns": [...],    # pattern names, searched in this order (first match wins)
            "real_quant": False,         # True -> real low-bit kernels, False -> fake quant
            "dual_scale": True,          # DualScale for linears matched by "activation_to_linear"
            "opt": {"type": "smooth", "alpha": 0.5,
                    "search_alpha_config": {"enable": False, "min": 0.0, "max": 1.0, "step": 0.1,
                                            "rows": 2048, "cpu_storage": False, "state_file": None},
                    "per_segment_smoothing": False},
            "calib": {"type": "amax"},        # percentile | mse | gptq, options in CalibConfig
            "input_quant": {"type": "int8", "axis": None, "dynamic": False, "symmetric": True,
                            "group_size": None},
            "weight_quant": {"type": "int8", "axis": None, "dynamic": False, "symmetric": True,
                             "group_size": None},
        },
        "*proj_out*": {"enable": False},  # a glob entry overrides only the keys it names
    }

Differences from the reference implementation:

* A glob entry only overrides the keys it names; nested sections are deep-merged over the default.
  Entries apply in the order given, later matches win. When an entry changes a section's ``type``,
  options of the old type that do not apply to the new one are dropped (they reset to defaults).
* ``dual_scale`` is our addition: the ablation switch for DualScale (default ``True``).
* Unknown keys, unknown values and unsupported combinations raise
  :class:`~segquant_fx.errors.ConfigError` naming the full key path (``default.opt.type`` or
  ``"*proj_out*".input_quant.type``), the value and the allowed values.
* The top-level key ``"version"`` is reserved for the schema version (:data:`CONFIG_VERSION`); to
  match a module literally named ``version`` or ``default`` use a glob such as ``"[v]ersion"``.
* Globs are matched with :func:`fnmatch.fnmatchcase` (case-sensitive on every platform).

Canonical quantization types (``input_quant.type`` / ``weight_quant.type``): ``int8``, ``int4``,
``fpe4m3`` (FP8 E4M3; aliases ``fp8``, ``fp8_e4m3``, ``e4m3``), ``fp16`` and ``bf16``. ``fp16`` and
``bf16`` mean *not quantized* (the activation dtype then follows the model); they are only valid for
``input_quant``, which gives weight-only quantization. :data:`OP_QTYPES` maps the canonical names to
the qtype strings of ``segquant_fx.ops`` (``"int8"``, ``"int4"``, ``"fp8_e4m3"``, or ``None``).

Axis mapping (``axis``):

* activations (``input_quant``): ``None`` = per-tensor, ``-1`` = per-token. Per-token scales must
  be ``dynamic: true``; ``dynamic: true`` always means per-token, whatever the axis.
* weights (``weight_quant``, stored ``[out, in]``): ``None`` = per-tensor, ``0`` = per-output-channel.
  The reference writes per-output-channel as ``axis: 1``; :meth:`QuantizeConfig.from_dict` accepts
  that and converts it to the canonical ``0``.

Use :attr:`QuantSpec.granularity` instead of interpreting axis numbers.

Only symmetric quantization is supported. ``opt`` types: ``default`` (plain), ``smooth``
(SmoothQuant), ``svd`` (SVDQuant, needs ``low_rank``). ``calib`` types: ``amax``, ``percentile``,
``mse``, ``gptq`` (integer weights only). The dataclasses accept every type the format describes;
the quantize pipeline gates what it actually implements with :func:`check_supported`.

Example:
    >>> from segquant_fx.config import QuantizeConfig
    >>> cfg = QuantizeConfig.from_dict({
    ...     "default": {"input_quant": {"type": "fp8"}, "weight_quant": {"type": "fp8", "axis": 1}},
    ...     "*proj_out*": {"enable": False},
    ...     "*ff.net.2": {"opt": {"alpha": 0.8}},
    ... })
    >>> cfg.default.weight_quant.type, cfg.default.weight_quant.axis  # aliases normalized
    ('fpe4m3', 0)
    >>> cfg.layer_config("transformer_blocks.0.ff.net.2").opt.alpha  # partial override
    0.8
    >>> cfg.layer_config("transformer_blocks.0.ff.net.2").opt.type  # kept from default
    'smooth'
    >>> cfg.layer_config("proj_out").enable
    False
    >>> QuantizeConfig.from_json(cfg.to_json()) == cfg
    True
    >>> QuantizeConfig.coerce("w4a8").default.opt.low_rank
    32
    >>> QuantizeConfig.ablation("w8a8", dual_scale=False).default.dual_scale
    False
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any, ClassVar

from segquant_fx.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "BUILTIN_PATTERNS",
    "SEGMENTATION_PATTERNS",
    "DUAL_SCALE_PATTERN",
    "QUANT_TYPES",
    "QUANT_TYPE_ALIASES",
    "OP_QTYPES",
    "OPT_TYPES",
    "CALIB_TYPES",
    "FrozenDict",
    "QuantSpec",
    "SearchAlphaConfig",
    "OptConfig",
    "CalibConfig",
    "LayerConfig",
    "QuantizeConfig",
    "canonical_quant_type",
    "op_qtype",
    "validate_pattern_names",
    "check_supported",
    "get_preset",
    "DEFAULT_PRESET",
    "PRESETS",
    "BASELINE_PRESETS",
    "W8A8",
    "W8A8_FP8",
    "W8A8_DYNAMIC",
    "W4A8",
    "W4A4",
    "W4A16",
    "W8A16",
    "BASELINE_W8A8",
    "PTQ4DIT_W8A8",
    "SMOOTH_PLUS_W8A8",
    "SVDQUANT_W4A8",
    "SVDQUANT_W4A4",
    "SEGQUANT_A_W8A8",
    "SEGQUANT_G_W8A8",
]

CONFIG_VERSION = 1
"""Schema version written by :meth:`QuantizeConfig.to_json` / ``to_yaml``; newer versions are rejected."""

DUAL_SCALE_PATTERN = "activation_to_linear"
"""The pattern whose matches get DualScale (it flags layers, it does not segment them)."""

SEGMENTATION_PATTERNS: tuple[str, ...] = (
    "linear_to_chunk",
    "linear_to_split",
    "concat_to_linear",
    "stack_to_linear",
    "reshape_to_linear",
)
"""Built-in SegLinear patterns, in the reference's search order."""

BUILTIN_PATTERNS: tuple[str, ...] = (*SEGMENTATION_PATTERNS, DUAL_SCALE_PATTERN)
"""Every built-in pattern name (the default ``search_patterns``)."""

QUANT_TYPES: tuple[str, ...] = ("int8", "int4", "fpe4m3", "fp16", "bf16")
"""Canonical ``input_quant.type`` / ``weight_quant.type`` values."""

QUANT_TYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {"fp8": "fpe4m3", "fp8_e4m3": "fpe4m3", "e4m3": "fpe4m3"}
)
"""Accepted spellings of the canonical types (normalized by ``from_dict``)."""

OP_QTYPES: Mapping[str, str | None] = MappingProxyType(
    {"int8": "int8", "int4": "int4", "fpe4m3": "fp8_e4m3", "fp16": None, "bf16": None}
)
"""Canonical type -> qtype string of the ``segquant_fx.ops`` kernels (``None``: not quantized)."""

OPT_TYPES: tuple[str, ...] = ("default", "smooth", "svd")
"""Valid ``opt.type`` values."""

CALIB_TYPES: tuple[str, ...] = ("amax", "percentile", "mse", "gptq")
"""Valid ``calib.type`` values."""

_INT_TYPES = frozenset({"int8", "int4"})
_FP8_TYPES = frozenset({"fpe4m3"})
_UNQUANTIZED_TYPES = frozenset({"fp16", "bf16"})
_RESERVED_KEYS = ("default", "version")


# --------------------------------------------------------------------------------------- key paths
# Validation runs in __post_init__, which does not know where in a dict the object came from. The
# builders push the path of the section they are building here, so errors name the full key path.

_PATH: ContextVar[tuple[str, ...]] = ContextVar("segquant_fx_config_path", default=())


@contextmanager
def _at(*parts: str) -> Iterator[None]:
    token = _PATH.set(_PATH.get() + parts)
    try:
        yield
    finally:
        _PATH.reset(token)


def _where(key: str | None = None) -> str:
    parts = _PATH.get() + ((key,) if key is not None else ())
    return ".".join(parts) if parts else "config"


def _quote(glob: str) -> str:
    return json.dumps(glob)


def _fmt_allowed(allowed: Iterable[Any]) -> str:
    return ", ".join(repr(a) for a in allowed)


def _error(key: str | None, value: Any, problem: str, allowed: Iterable[Any] | None = None) -> ConfigError:
    message = f"{_where(key)} = {value!r}: {problem}"
    if allowed is not None:
        message += f" (allowed: {_fmt_allowed(allowed)})"
    return ConfigError(message)


# ------------------------------------------------------------------------------ value validators


def _check_bool(key: str, value: Any) -> None:
    if type(value) is not bool:
        raise _error(key, value, "expected a bool", allowed=(True, False))


def _check_int(key: str, value: Any, *, minimum: int, allow_none: bool = False, extra: tuple = ()) -> None:
    if value is None and allow_none:
        return
    if value in extra and type(value) is int:
        return
    if type(value) is not int or value < minimum:
        what = f"expected an int >= {minimum}"
        if extra:
            what += f" or one of {_fmt_allowed(extra)}"
        if allow_none:
            what += " or None"
        raise _error(key, value, what)


def _check_float(key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and type(value) is not bool and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _error(key, value, f"expected a number in {interval}")


def _check_choice(
    key: str, value: Any, allowed: tuple[str, ...], aliases: Mapping[str, str] | None = None
) -> None:
    if isinstance(value, str) and value in allowed:
        return
    problem = f"unknown {key}"
    if isinstance(value, str) and aliases and value.lower() in aliases:
        problem = (
            f"{value!r} is an alias of {aliases[value.lower()]!r}; the dataclasses take canonical names "
            "(from_dict normalizes aliases)"
        )
    raise _error(key, value, problem, allowed=allowed)


def _require_mapping(key: str | None, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise _error(key, value, "expected a mapping")


def _reject_unknown(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key, value in data.items():
        if key not in allowed:
            raise _error(str(key), value, "unknown key", allowed=allowed)


def canonical_quant_type(name: str) -> str:
    """Return the canonical spelling of a quantization type.

    Args:
        name: A canonical type (``"int8"``, ``"int4"``, ``"fpe4m3"``, ``"fp16"``, ``"bf16"``) or an
            alias (``"fp8"``, ``"fp8_e4m3"``, ``"e4m3"``); case-insensitive.

    Returns:
        The canonical name, one of :data:`QUANT_TYPES`.

    Raises:
        ConfigError: ``name`` is not a known type or alias.
    """
    if isinstance(name, str):
        lowered = name.lower()
        lowered = QUANT_TYPE_ALIASES.get(lowered, lowered)
        if lowered in QUANT_TYPES:
            return lowered
    raise _error("type", name, "unknown quantization type", allowed=(*QUANT_TYPES, *QUANT_TYPE_ALIASES))


def op_qtype(name: str) -> str | None:
    """Map a quantization type (canonical or alias) to the qtype string of ``segquant_fx.ops``.

    Args:
        name: A quantization type, e.g. ``"fpe4m3"`` or ``"fp8"``.

    Returns:
        ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, or ``None`` for ``fp16``/``bf16`` (not quantized).

    Raises:
        ConfigError: ``name`` is not a known type.
    """
    return OP_QTYPES[canonical_quant_type(name)]


def _known_names(known: Iterable[str] | Callable[[], Iterable[str]]) -> frozenset[str]:
    if callable(known):
        known = known()
    return frozenset(known)


def validate_pattern_names(
    names: Iterable[str],
    known: Iterable[str] | Callable[[], Iterable[str]],
    *,
    key: str = "search_patterns",
) -> tuple[str, ...]:
    """Check that every pattern name is registered.

    Callers that know the pattern registry (``segquant_fx.patterns.PATTERNS``) pass its names, so
    user-registered patterns are accepted while typos are not.

    Args:
        names: The pattern names of a config (a list or tuple of strings).
        known: The registered names, or a zero-argument callable returning them.
        key: Key used in error messages (prefixed with the current key path).

    Returns:
        ``names`` as a tuple.

    Raises:
        ConfigError: ``names`` is not a list/tuple of strings, or a name is not in ``known``.
    """
    if not isinstance(names, list | tuple):
        raise _error(key, names, "expected a list of pattern names")
    registered = _known_names(known)
    for name in names:
        if not isinstance(name, str) or name not in registered:
            raise _error(
                key,
                name,
                "unknown pattern name; register custom patterns first and pass their names as known_patterns",
                allowed=sorted(registered),
            )
    return tuple(names)


# ----------------------------------------------------------------------------------- FrozenDict


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value if isinstance(value, FrozenDict) else FrozenDict(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, FrozenDict):
        return value.thaw()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class FrozenDict(Mapping[str, Any]):
    """An immutable, hashable mapping; holds the partial settings of a glob entry.

    Nested mappings become :class:`FrozenDict` and lists become tuples, so the whole structure is
    hashable and can key caches. :meth:`thaw` gives back plain dicts and lists.

    Args:
        data: A mapping (or iterable of key/value pairs) to freeze.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /) -> None:
        self._data = {k: _freeze(v) for k, v in dict(data).items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Never pickle the cached hash: string hashes differ between processes.
        return (FrozenDict, (self._data,))

    def thaw(self) -> dict[str, Any]:
        """Return a plain, mutable deep copy (dicts and lists)."""
        return {k: _thaw(v) for k, v in self._data.items()}


# ------------------------------------------------------------------------------------- sections


class _Section:
    """Shared machinery of the dict sections (``opt``, ``calib``, ``*_quant``, ``search_alpha_config``).

    A section with a ``type`` declares which options apply to which type (``_OPTIONS``). Options that
    do not apply must keep their default value; ``to_dict`` writes ``type`` plus the options that apply.
    """

    _TYPES: ClassVar[tuple[str, ...]] = ()
    _OPTIONS: ClassVar[Mapping[str, frozenset[str]]] = MappingProxyType({})
    _ALIASES: ClassVar[Mapping[str, str]] = MappingProxyType({})
    _NESTED: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    # Options that ``to_dict`` leaves out while they hold their default value, per type (key ``None``
    # for sections without a type). Options added after the first release are listed here, so that
    # the dict of a config that does not use them reads exactly as before.
    _OMIT_DEFAULT: ClassVar[Mapping[str | None, frozenset[str]]] = MappingProxyType({})

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)  # type: ignore[arg-type]

    @classmethod
    def _applicable(cls, type_: str | None) -> frozenset[str]:
        if not cls._TYPES:
            return frozenset(cls._keys())
        return cls._OPTIONS.get(type_, frozenset()) if type_ is not None else frozenset()

    def _check_applicable(self) -> None:
        type_ = getattr(self, "type", None)
        applicable = self._applicable(type_)
        for f in fields(self):  # type: ignore[arg-type]
            if not f.init or f.name == "type" or f.name in applicable:
                continue
            value = getattr(self, f.name)
            if value != f.default:
                users = [t for t in self._TYPES if f.name in self._OPTIONS.get(t, ())]
                raise _error(
                    f.name,
                    value,
                    f"only applies when type is {' or '.join(repr(t) for t in users)}, not {type_!r}; "
                    "remove it or change the type",
                )

    def to_dict(self) -> dict[str, Any]:
        """Return the section in the seed's dict format (``type`` plus the options that apply)."""
        type_ = getattr(self, "type", None)
        applicable = self._applicable(type_)
        omit = self._OMIT_DEFAULT.get(type_, frozenset())
        defaults = {f.name: f.default for f in fields(self)}  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        for name in self._keys():
            if name == "type" or name in applicable:
                value = getattr(self, name)
                if name in omit and value == defaults[name]:
                    continue
                out[name] = value.to_dict() if isinstance(value, _Section) else value
        return out

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        """Normalize spellings (case, aliases) in a raw mapping; tolerant of invalid input."""
        if not isinstance(data, Mapping) or not cls._TYPES:
            return data
        type_ = data.get("type")
        if not isinstance(type_, str):
            return data
        lowered = type_.lower()
        out = dict(data)
        out["type"] = cls._ALIASES.get(lowered, lowered)
        return out

    @classmethod
    def _build(cls, data: Any) -> Any:
        """Construct from an already-normalized mapping; errors carry the current key path."""
        _require_mapping(None, data)
        _reject_unknown(data, cls._keys())
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            nested = cls._NESTED.get(key)
            if nested is not None:
                with _at(key):
                    value = nested._build(value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def _merge(cls, base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
        """Deep-merge ``over`` into ``base``; a type change drops options that do not apply any more."""
        out = dict(base)
        for key, value in over.items():
            nested = cls._NESTED.get(key)
            if nested is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = nested._merge(out[key], value)
            else:
                out[key] = value
        new_type = out.get("type")
        if cls._TYPES and new_type != base.get("type") and new_type in cls._OPTIONS:
            keep = cls._OPTIONS[new_type] | {"type"} | set(over)
            out = {k: v for k, v in out.items() if k in keep}
        return out


_QUANT_OPTIONS = frozenset({"axis", "dynamic", "symmetric", "group_size"})


@dataclass(frozen=True, kw_only=True)
class QuantSpec(_Section):
    """How one tensor (a linear's input or weight) is quantized.

    The role-specific rules (which axes suit activations or weights, weight-only layers, mixed
    formats) are checked by :class:`LayerConfig`, which knows the role.

    Attributes:
        type: Canonical type, one of :data:`QUANT_TYPES`; ``fp16``/``bf16`` mean not quantized.
        axis: ``None`` per-tensor; ``-1`` per-token (activations); ``0`` per-output-channel (weights).
        dynamic: Recompute scales from the live tensor on every call (activations; implies per-token).
        symmetric: Must be ``True``; asymmetric quantization is not supported.
        group_size: Weights only: quantize groups of this many input channels with their own scale.
    """

    type: str = "int8"
    axis: int | None = None
    dynamic: bool = False
    symmetric: bool = True
    group_size: int | None = None

    _TYPES = QUANT_TYPES
    _OPTIONS = MappingProxyType(
        {
            "int8": _QUANT_OPTIONS,
            "int4": _QUANT_OPTIONS,
            "fpe4m3": _QUANT_OPTIONS,
            "fp16": frozenset(),
            "bf16": frozenset(),
        }
    )
    _ALIASES = QUANT_TYPE_ALIASES

    def __post_init__(self) -> None:
        _check_choice("type", self.type, QUANT_TYPES, QUANT_TYPE_ALIASES)
        if self.axis not in (None, -1, 0, 1) or type(self.axis) is bool:
            raise _error("axis", self.axis, "unknown axis", allowed=(None, -1, 0, 1))
        _check_bool("dynamic", self.dynamic)
        _check_bool("symmetric", self.symmetric)
        if not self.symmetric:
            raise _error(
                "symmetric", self.symmetric, "asymmetric quantization is not supported; use symmetric: true"
            )
        _check_int("group_size", self.group_size, minimum=1, allow_none=True)
        self._check_applicable()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Build from a dict such as ``{"type": "fp8", "axis": None}`` (aliases are normalized).

        Args:
            data: The ``input_quant`` or ``weight_quant`` mapping.

        Returns:
            The validated spec.

        Raises:
            ConfigError: Unknown key, bad value or unsupported combination.
        """
        return cls._build(cls._normalize(data))

    @property
    def is_quantized(self) -> bool:
        """Whether this spec quantizes at all (``fp16``/``bf16`` do not)."""
        return self.type not in _UNQUANTIZED_TYPES

    @property
    def op_qtype(self) -> str | None:
        """The ``segquant_fx.ops`` qtype string (``"int8"``, ``"int4"``, ``"fp8_e4m3"``) or ``None``."""
        return OP_QTYPES[self.type]

    @property
    def granularity(self) -> str:
        """``"none"``, ``"per_tensor"``, ``"per_token"``, ``"per_channel"`` or ``"per_group"``."""
        if not self.is_quantized:
            return "none"
        if self.group_size is not None:
            return "per_group"
        if self.dynamic or self.axis == -1:
            return "per_token"
        if self.axis is None:
            return "per_tensor"
        return "per_channel"


@dataclass(frozen=True, kw_only=True)
class SearchAlphaConfig(_Section):
    """Grid search of the SmoothQuant migration strength ``alpha`` (per layer / segment).

    The grid is ``min, min + step, ...`` up to and **including** ``max`` (the reference skips its
    last value). Every candidate is scored layer-locally on a random sample of the layer's own
    calibration inputs (a row reservoir filled during the single calibration pass), so the model runs
    once per calibration item whatever the grid size. The score of a segment is the squared error of
    its output contribution ``X_t W_t^T`` after quantization (weights rounded to nearest during the
    search, even when GPTQ rounds the final weights). Ties go to the value closest to ``opt.alpha``.

    Attributes:
        enable: Run the search; otherwise ``OptConfig.alpha`` is used as is.
        min: Lowest alpha tried, in [0, 1].
        max: Highest alpha tried, in [0, 1] and >= ``min``. Unlike the reference, it is evaluated.
        step: Grid step, > 0.
        rows: Size of the per-layer input-row reservoir the candidates are scored on (>= 1).
        cpu_storage: Keep the reservoirs in CPU memory instead of on the model's device.
        state_file: JSON file holding the errors evaluated so far; a search finds it and skips the
            points already evaluated, and writes it after every layer (``quantize(search_state=...)``
            overrides it). ``None``: no file.
    """

    enable: bool = False
    min: float = 0.0
    max: float = 1.0
    step: float = 0.1
    rows: int = 2048
    cpu_storage: bool = False
    state_file: str | None = None

    _OMIT_DEFAULT = MappingProxyType({None: frozenset({"rows", "cpu_storage", "state_file"})})

    def __post_init__(self) -> None:
        _check_bool("enable", self.enable)
        _check_float("min", self.min, 0.0, 1.0)
        _check_float("max", self.max, 0.0, 1.0)
        if self.min > self.max:
            raise _error("min", self.min, f"must not exceed max = {self.max!r}")
        _check_float("step", self.step, 0.0, 1.0, low_open=True)
        _check_int("rows", self.rows, minimum=1)
        _check_bool("cpu_storage", self.cpu_storage)
        if self.state_file is not None and (not isinstance(self.state_file, str) or not self.state_file):
            raise _error("state_file", self.state_file, "expected a non-empty path string or None")

    @property
    def grid(self) -> tuple[float, ...]:
        """The candidate alphas, ``min`` to ``max`` inclusive (``max`` is always the last value).

        Example:
            >>> SearchAlphaConfig(min=0.0, max=1.0, step=0.25).grid
            (0.0, 0.25, 0.5, 0.75, 1.0)
            >>> SearchAlphaConfig(min=0.2, max=0.5, step=0.2).grid
            (0.2, 0.4, 0.5)
        """
        n = int(math.floor((self.max - self.min) / self.step + 1e-9))
        values = [round(self.min + i * self.step, 10) for i in range(n + 1)]
        values = [v for v in values if v <= self.max + 1e-12]
        if abs(values[-1] - self.max) > 1e-9:
            values.append(float(self.max))
        return tuple(float(v) for v in values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchAlphaConfig:
        """Build from ``{"enable": ..., "min": ..., "max": ..., "step": ...}``.

        Args:
            data: The ``search_alpha_config`` mapping.

        Returns:
            The validated config.

        Raises:
            ConfigError: Unknown key or bad value.
        """
        return cls._build(data)


@dataclass(frozen=True, kw_only=True)
class OptConfig(_Section):
    """The weight/activation transform applied before quantization (``opt`` section).

    Attributes:
        type: ``"default"`` (none), ``"smooth"`` (SmoothQuant) or ``"svd"`` (SVDQuant: smoothing plus a
            low-rank branch kept in high precision).
        alpha: SmoothQuant migration strength in [0, 1] (``smooth``/``svd``).
        search_alpha_config: Optional alpha grid search (``smooth``/``svd``).
        low_rank: Rank of the SVD branch, > 0; required for ``svd``. The rank is per smoothing
            domain: one SVD of the whole smoothed weight (input segments share it: per-input-segment
            SVDs of rank ``r`` would cost ``nseg * r``), or one per output segment with
            ``per_segment_smoothing``.
        precision: ``"float32"`` or ``"float64"``: dtype of the SVD (``svd``).
        per_segment_smoothing: Output-segmented (SegLinear ``linear_to_chunk``/``split``) layers get
            one smoothing vector (over all input channels, with its own alpha) per output segment, as
            in the reference; ``x / s_i`` then differs per segment, so the layer runs one
            quantize + qlinear per output segment and concatenates. ``False``: one smoothing vector per
            layer. Input segments always get their own alpha when alpha is searched
            (``smooth``/``svd``).
    """

    type: str = "smooth"
    alpha: float = 0.5
    search_alpha_config: SearchAlphaConfig = SearchAlphaConfig()
    low_rank: int | None = None
    precision: str = "float64"
    per_segment_smoothing: bool = False

    _TYPES = OPT_TYPES
    _OPTIONS = MappingProxyType(
        {
            "default": frozenset(),
            "smooth": frozenset({"alpha", "search_alpha_config", "per_segment_smoothing"}),
            "svd": frozenset(
                {"alpha", "search_alpha_config", "low_rank", "precision", "per_segment_smoothing"}
            ),
        }
    )
    _NESTED = MappingProxyType({"search_alpha_config": SearchAlphaConfig})
    _OMIT_DEFAULT = MappingProxyType(
        {"smooth": frozenset({"per_segment_smoothing"}), "svd": frozenset({"per_segment_smoothing"})}
    )

    def __post_init__(self) -> None:
        _check_choice("type", self.type, OPT_TYPES)
        _check_float("alpha", self.alpha, 0.0, 1.0)
        if not isinstance(self.search_alpha_config, SearchAlphaConfig):
            raise _error("search_alpha_config", self.search_alpha_config, "expected a SearchAlphaConfig")
        _check_int("low_rank", self.low_rank, minimum=1, allow_none=True)
        _check_choice("precision", self.precision, ("float32", "float64"))
        _check_bool("per_segment_smoothing", self.per_segment_smoothing)
        if self.type == "svd" and self.low_rank is None:
            raise _error("low_rank", None, "opt.type 'svd' requires low_rank (an int > 0, e.g. 32)")
        self._check_applicable()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptConfig:
        """Build from a dict such as ``{"type": "svd", "low_rank": 32}``.

        Args:
            data: The ``opt`` mapping.

        Returns:
            The validated config.

        Raises:
            ConfigError: Unknown key, bad value or an option that does not apply to the type.
        """
        return cls._build(cls._normalize(data))


@dataclass(frozen=True, kw_only=True)
class CalibConfig(_Section):
    """How scales are calibrated (``calib`` section).

    ``amax``, ``percentile`` and ``mse`` calibrate static activation scales (weights always use their
    own max); ``gptq`` rounds integer weights with GPTQ and uses amax for activations. Every
    calibrator works per activation segment and, with DualScale, per sign half (the positive half
    from the positive values, the negative half from the negative ones). Dynamic (per-token)
    activations have no static scale, so ``percentile``/``mse`` do not apply to them.

    Bounded-memory estimates for ``percentile``/``mse``: an unsmoothed layer keeps a streaming
    histogram per segment and sign (``bins`` bins over ``[0, r)``, ``r`` a power of two that doubles
    when a larger value arrives, merging bin pairs exactly), over every calibration value. A
    smoothed layer quantizes ``x / s``, and ``s`` depends on the whole calibration set (and on the
    alpha search), so it keeps a uniform random reservoir of ``rows`` input rows instead and bins
    ``x / s`` once ``s`` is known.

    Attributes:
        type: ``"amax"``, ``"percentile"``, ``"mse"`` or ``"gptq"``.
        percentile: Percentile of ``|x|`` used as the range, in (0, 100] (``percentile``).
        num_candidates: Number of clipping ranges tried (``mse``), > 0: ``amax * i / n``, ``i = 1..n``.
        blocksize: GPTQ column block size, > 0 (``gptq``).
        percdamp: GPTQ Hessian damping as a fraction of the mean diagonal, in (0, 1] (``gptq``).
            A Cholesky failure retries with 10x the damping, up to 10 times, then falls back to
            round-to-nearest with a warning.
        groupsize: GPTQ group size; ``-1`` follows ``weight_quant.group_size`` (``gptq``). A size
            given while ``weight_quant.group_size`` is unset stores the weights group-wise with it.
        actorder: GPTQ: process columns by decreasing Hessian diagonal (``gptq``). With groups,
            act-order uses static group scales (columns keep their original groups).
        static_groups: GPTQ: fix group scales from the weight before the column loop; otherwise
            each group's scale is taken from the updated weights when the loop reaches the group
            (``gptq``). Per-channel and per-tensor scales are always fixed before the loop.
        cpu_storage: Keep calibration statistics in CPU memory: GPTQ Hessians (``gptq``) or the row
            reservoirs of smoothed layers (``percentile``/``mse``).
        rows: Row-reservoir size per smoothed layer (``percentile``/``mse``), >= 1.
        bins: Histogram bins per segment and sign half (``percentile``/``mse``), an even number >= 8.
        hessian_dtype: ``"float32"`` or ``"float64"``: accumulation dtype of the GPTQ Hessians
            ``H = 2/n sum x x^T`` (``gptq``).
    """

    type: str = "amax"
    percentile: float = 99.99
    num_candidates: int = 100
    blocksize: int = 128
    percdamp: float = 0.01
    groupsize: int = -1
    actorder: bool = False
    static_groups: bool = False
    cpu_storage: bool = False
    rows: int = 4096
    bins: int = 2048
    hessian_dtype: str = "float32"

    _TYPES = CALIB_TYPES
    _OPTIONS = MappingProxyType(
        {
            "amax": frozenset(),
            "percentile": frozenset({"percentile", "cpu_storage", "rows", "bins"}),
            "mse": frozenset({"num_candidates", "cpu_storage", "rows", "bins"}),
            "gptq": frozenset(
                {
                    "blocksize",
                    "percdamp",
                    "groupsize",
                    "actorder",
                    "static_groups",
                    "cpu_storage",
                    "hessian_dtype",
                }
            ),
        }
    )
    _OMIT_DEFAULT = MappingProxyType(
        {
            "percentile": frozenset({"cpu_storage", "rows", "bins"}),
            "mse": frozenset({"cpu_storage", "rows", "bins"}),
            "gptq": frozenset({"hessian_dtype"}),
        }
    )

    def __post_init__(self) -> None:
        _check_choice("type", self.type, CALIB_TYPES)
        _check_float("percentile", self.percentile, 0.0, 100.0, low_open=True)
        _check_int("num_candidates", self.num_candidates, minimum=1)
        _check_int("blocksize", self.blocksize, minimum=1)
        _check_float("percdamp", self.percdamp, 0.0, 1.0, low_open=True)
        _check_int("groupsize", self.groupsize, minimum=1, extra=(-1,))
        for name in ("actorder", "static_groups", "cpu_storage"):
            _check_bool(name, getattr(self, name))
        _check_int("rows", self.rows, minimum=1)
        _check_int("bins", self.bins, minimum=8)
        if self.bins % 2:
            raise _error("bins", self.bins, "expected an even number of bins")
        _check_choice("hessian_dtype", self.hessian_dtype, ("float32", "float64"))
        self._check_applicable()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibConfig:
        """Build from a dict such as ``{"type": "gptq", "blocksize": 128}``.

        Args:
            data: The ``calib`` mapping.

        Returns:
            The validated config.

        Raises:
            ConfigError: Unknown key, bad value or an option that does not apply to the type.
        """
        return cls._build(cls._normalize(data))


# ------------------------------------------------------------------------------------ LayerConfig

# Section key -> section class: drives building, normalizing and merging (no isinstance ladders).
_LAYER_SECTIONS: Mapping[str, Any] = MappingProxyType(
    {"opt": OptConfig, "calib": CalibConfig, "input_quant": QuantSpec, "weight_quant": QuantSpec}
)


def _family(spec: QuantSpec) -> str:
    if spec.type in _INT_TYPES:
        return "int"
    if spec.type in _FP8_TYPES:
        return "fp8"
    return "none"


@dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """Resolved settings of one linear layer (the ``"default"`` entry, or default plus globs).

    Field defaults follow the reference's ``quantize()`` defaults (INT8 per-tensor, SmoothQuant
    alpha 0.5, AMax, all patterns, fake quant) plus ``dual_scale=True``.

    ``seglinear`` and ``dual_scale`` act on the matches of ``search_patterns``: segmentation patterns
    give per-segment scales only when ``seglinear`` is on; ``activation_to_linear`` matches get
    DualScale only when ``dual_scale`` is on. DualScale on a weight-only layer has no effect.

    Attributes:
        enable: Quantize the layer at all.
        seglinear: Apply SegLinear to layers matched by a segmentation pattern.
        search_patterns: Pattern names, searched in order (first match wins); no duplicates.
        real_quant: Real low-bit kernels (``True``) or fake quantization (``False``).
        dual_scale: Apply DualScale to layers matched by ``activation_to_linear``.
        opt: The :class:`OptConfig`.
        calib: The :class:`CalibConfig`.
        input_quant: Activation :class:`QuantSpec`; ``fp16``/``bf16`` give weight-only quantization.
        weight_quant: Weight :class:`QuantSpec`; must be quantized when ``enable`` is true.
    """

    enable: bool = True
    seglinear: bool = True
    search_patterns: tuple[str, ...] = BUILTIN_PATTERNS
    real_quant: bool = False
    dual_scale: bool = True
    opt: OptConfig = OptConfig()
    calib: CalibConfig = CalibConfig()
    input_quant: QuantSpec = QuantSpec()
    weight_quant: QuantSpec = QuantSpec()

    def __post_init__(self) -> None:
        for name in ("enable", "seglinear", "real_quant", "dual_scale"):
            _check_bool(name, getattr(self, name))
        self._check_patterns()
        for name, cls in _LAYER_SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise _error(name, getattr(self, name), f"expected a {cls.__name__}")
        with _at("input_quant"):
            self._check_activation_spec()
        with _at("weight_quant"):
            self._check_weight_spec()
        self._check_combination()

    def _check_patterns(self) -> None:
        names = self.search_patterns
        if not isinstance(names, tuple):
            raise _error(
                "search_patterns", names, "expected a tuple of pattern names (from_dict accepts lists)"
            )
        for name in names:
            if not isinstance(name, str) or not name:
                raise _error("search_patterns", name, "pattern names must be non-empty strings")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _error("search_patterns", list(names), f"duplicate pattern names {duplicates}")

    def _check_activation_spec(self) -> None:
        spec = self.input_quant
        if not spec.is_quantized:
            return
        if spec.axis not in (None, -1):
            raise _error(
                "axis",
                spec.axis,
                "activations are quantized per-tensor (None) or per-token (-1)",
                allowed=(None, -1),
            )
        if spec.axis == -1 and not spec.dynamic:
            raise _error(
                "axis",
                spec.axis,
                "static per-token activation scales are not supported: they would be shaped by the "
                "calibration batch (a reference bug); use dynamic: true for per-token or axis: null for "
                "per-tensor static",
            )
        if spec.group_size is not None:
            raise _error("group_size", spec.group_size, "group_size applies to weights only; use null")

    def _check_weight_spec(self) -> None:
        spec = self.weight_quant
        if not spec.is_quantized:
            if self.enable:
                raise _error(
                    "type",
                    spec.type,
                    "weights must be quantized when the layer is enabled; fp16/bf16 are only valid for "
                    "input_quant (weight-only quantization); set enable: false to skip the layer",
                    allowed=sorted(_INT_TYPES | _FP8_TYPES),
                )
            return
        if spec.axis == 1:
            raise _error(
                "axis",
                1,
                "per-output-channel weights are axis 0 (weights are [out, in]); from_dict converts the "
                "reference's axis: 1 to 0",
                allowed=(None, 0),
            )
        if spec.axis == -1:
            raise _error(
                "axis", -1, "weights are quantized per-tensor (None) or per-output-channel (0)", (None, 0)
            )
        if spec.dynamic:
            raise _error(
                "dynamic", True, "weights are quantized once, offline; dynamic applies to input_quant only"
            )

    def _check_combination(self) -> None:
        act, weight = _family(self.input_quant), _family(self.weight_quant)
        if "none" not in (act, weight) and act != weight:
            allowed = sorted(_INT_TYPES if act == "int" else _FP8_TYPES)
            raise _error(
                "weight_quant.type",
                self.weight_quant.type,
                f"cannot be combined with input_quant.type = {self.input_quant.type!r}: mixing integer "
                "and fp8 formats in one layer is not supported",
                allowed=allowed,
            )
        if self.calib.type == "gptq" and weight == "fp8":
            raise _error(
                "calib.type",
                "gptq",
                f"GPTQ supports integer weights only, but weight_quant.type = {self.weight_quant.type!r}",
                allowed=tuple(t for t in CALIB_TYPES if t != "gptq"),
            )
        group = self.weight_quant.group_size
        if (
            self.calib.type == "gptq"
            and self.calib.groupsize != -1
            and group not in (None, self.calib.groupsize)
        ):
            raise _error(
                "calib.groupsize",
                self.calib.groupsize,
                f"conflicts with weight_quant.group_size = {group!r}; "
                "use -1 to follow weight_quant.group_size",
            )

    # -- dict round trip -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the layer settings in the seed's dict format (every key present)."""
        return {
            "enable": self.enable,
            "seglinear": self.seglinear,
            "search_patterns": list(self.search_patterns),
            "real_quant": self.real_quant,
            "dual_scale": self.dual_scale,
            **{name: getattr(self, name).to_dict() for name in _LAYER_SECTIONS},
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> LayerConfig:
        """Build from a (possibly partial) layer dict; missing keys take the field defaults.

        Args:
            data: A layer mapping as in the ``"default"`` entry.
            known_patterns: Registered pattern names (or a callable returning them);
                ``None`` means :data:`BUILTIN_PATTERNS`.

        Returns:
            The validated layer config.

        Raises:
            ConfigError: Unknown key, bad value, unknown pattern name or unsupported combination.
        """
        data = _normalize_layer(data)
        if isinstance(data, Mapping) and "search_patterns" in data:
            validate_pattern_names(data["search_patterns"], _default_known(known_patterns))
        return _build_layer(data)

    # -- derived views -------------------------------------------------------------------------

    @property
    def weight_only(self) -> bool:
        """Whether activations stay unquantized (``input_quant`` is ``fp16``/``bf16``)."""
        return not self.input_quant.is_quantized

    @property
    def segmentation_patterns(self) -> tuple[str, ...]:
        """Patterns that segment a layer, in search order; empty when ``seglinear`` is off."""
        if not self.seglinear:
            return ()
        return tuple(p for p in self.search_patterns if p != DUAL_SCALE_PATTERN)

    @property
    def uses_dual_scale(self) -> bool:
        """Whether DualScale can apply: enabled, searched for, and activations quantized."""
        return (
            self.enable
            and self.dual_scale
            and DUAL_SCALE_PATTERN in self.search_patterns
            and not self.weight_only
        )


_LAYER_KEYS: tuple[str, ...] = tuple(f.name for f in fields(LayerConfig))


def _default_known(known: Iterable[str] | Callable[[], Iterable[str]] | None) -> Any:
    return BUILTIN_PATTERNS if known is None else known


def _normalize_layer(data: Any) -> Any:
    """Normalize spellings in a raw layer mapping (types, aliases, weight axis 1 -> 0); tolerant."""
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    for key, section in _LAYER_SECTIONS.items():
        if key in out:
            out[key] = section._normalize(out[key])
    weight = out.get("weight_quant")
    if isinstance(weight, Mapping) and type(weight.get("axis")) is int and weight["axis"] == 1:
        out["weight_quant"] = {**weight, "axis": 0}
    return out


def _build_layer(data: Any) -> LayerConfig:
    """Construct a LayerConfig from a normalized mapping; errors carry the current key path."""
    _require_mapping(None, data)
    _reject_unknown(data, _LAYER_KEYS)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        section = _LAYER_SECTIONS.get(key)
        if section is not None:
            with _at(key):
                value = section._build(value)
        elif key == "search_patterns" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return LayerConfig(**kwargs)


def _merge_layer(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge a glob entry's partial settings over a layer mapping."""
    out = dict(base)
    for key, value in partial.items():
        section = _LAYER_SECTIONS.get(key)
        if section is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = section._merge(out[key], value)
        else:
            out[key] = value
    return out


def _canonical_partial(value: Any, known: Any) -> FrozenDict:
    """Normalize and freeze one glob entry read from a dict."""
    if not isinstance(value, Mapping):
        raise _error(None, value, "expected a mapping of layer settings")
    data = _normalize_layer(value)
    if "search_patterns" in data:
        validate_pattern_names(data["search_patterns"], known)
    return FrozenDict(data)


# ---------------------------------------------------------------------------------- QuantizeConfig


Override = tuple[str, FrozenDict]


def _check_version(version: Any) -> None:
    if type(version) is not int or not 1 <= version <= CONFIG_VERSION:
        raise _error(
            "version",
            version,
            f"unsupported config version; this segquant_fx reads versions 1..{CONFIG_VERSION} "
            "(a newer version needs a newer segquant_fx)",
        )


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """A whole quantization config: a default :class:`LayerConfig` plus ordered glob overrides.

    Build one with :meth:`from_dict`, :meth:`coerce` or a preset (:data:`PRESETS`), then refine it
    with :meth:`with_overrides` or :meth:`ablation`. ``from_dict(c.to_dict()) == c`` always holds.

    Every glob entry must give a valid layer config when applied to the default alone; a module
    matched by several globs is validated when it is resolved by :meth:`layer_config`.

    Attributes:
        default: Settings for every linear not matched by a glob.
        overrides: ``(glob, partial settings)`` pairs in application order; build them with
            :meth:`from_dict` or :meth:`with_overrides`.
        version: Schema version, at most :data:`CONFIG_VERSION`.
    """

    default: LayerConfig = LayerConfig()
    overrides: tuple[Override, ...] = ()
    version: int = CONFIG_VERSION
    _cache: dict[str, LayerConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _check_version(self.version)
        if not isinstance(self.default, LayerConfig):
            raise _error("default", self.default, "expected a LayerConfig")
        if not isinstance(self.overrides, tuple):
            raise _error("overrides", self.overrides, "expected a tuple of (glob, FrozenDict) pairs")
        base = self.default.to_dict()
        seen: set[str] = set()
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise _error("overrides", item, "expected a (glob, FrozenDict) pair")
            glob, partial = item
            if not glob or glob in _RESERVED_KEYS:
                raise _error(
                    "overrides",
                    glob,
                    "invalid glob: it must be non-empty and not a reserved key ('default', 'version'); "
                    "to match a module named like a reserved key use a glob such as '[d]efault'",
                )
            if glob in seen:
                raise _error("overrides", glob, "duplicate glob; merge its settings into one entry")
            seen.add(glob)
            with _at(_quote(glob)):
                if not isinstance(partial, FrozenDict):
                    raise _error(
                        None,
                        partial,
                        "expected a FrozenDict; build overrides with QuantizeConfig.from_dict "
                        "or with_overrides",
                    )
                _build_layer(_merge_layer(base, partial))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> QuantizeConfig:
        """Build from the seed's dict format.

        Normalizes aliases (``fp8`` -> ``fpe4m3``, case), the reference's weight ``axis: 1`` (-> ``0``)
        and lists (-> tuples); missing keys of ``"default"`` take the :class:`LayerConfig` defaults.

        Args:
            data: ``{"default": {...}, "<glob>": {...}, ...}``, optionally with ``"version": 1``.
            known_patterns: Registered pattern names (or a callable returning them) that
                ``search_patterns`` may use; ``None`` means :data:`BUILTIN_PATTERNS`.

        Returns:
            The validated config.

        Raises:
            ConfigError: Missing ``"default"``, unknown key, bad value, unknown pattern name, unsupported
                combination or version; the message names the key path.
        """
        if not isinstance(data, Mapping):
            raise _error(None, data, "expected a mapping with a 'default' entry")
        version = data.get("version", CONFIG_VERSION)
        if isinstance(version, Mapping):
            raise _error(
                "version", version, "'version' is reserved for the schema version; use the glob '[v]ersion'"
            )
        _check_version(version)
        if "default" not in data:
            raise ConfigError(
                f"config: missing required key 'default' (settings for every linear not matched by a glob); "
                f"got keys {list(data)}"
            )
        known = _default_known(known_patterns)
        with _at("default"):
            default = LayerConfig.from_dict(data["default"], known_patterns=known)
        overrides: list[Override] = []
        for glob, value in data.items():
            if glob in _RESERVED_KEYS:
                continue
            if not isinstance(glob, str) or not glob:
                raise _error(None, glob, "glob keys must be non-empty strings")
            with _at(_quote(glob)):
                overrides.append((glob, _canonical_partial(value, known)))
        return cls(default=default, overrides=tuple(overrides), version=version)

    @classmethod
    def from_json(
        cls,
        text: str | bytes,
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> QuantizeConfig:
        """Parse a JSON document written by :meth:`to_json` (or by hand in the same format).

        Args:
            text: The JSON text.
            known_patterns: As for :meth:`from_dict`.

        Returns:
            The validated config.

        Raises:
            ConfigError: Invalid JSON or an invalid config.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config JSON could not be parsed: {e}") from e
        return cls.from_dict(data, known_patterns=known_patterns)

    @classmethod
    def from_yaml(
        cls,
        text: str,
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> QuantizeConfig:
        """Parse a YAML document (needs PyYAML).

        Args:
            text: The YAML text.
            known_patterns: As for :meth:`from_dict`.

        Returns:
            The validated config.

        Raises:
            ConfigError: PyYAML missing, invalid YAML or an invalid config.
        """
        yaml = _import_yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config YAML could not be parsed: {e}") from e
        return cls.from_dict(data, known_patterns=known_patterns)

    @classmethod
    def coerce(
        cls,
        obj: QuantizeConfig | LayerConfig | Mapping[str, Any] | str | None,
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> QuantizeConfig:
        """Turn anything ``quantize(config=...)`` accepts into a :class:`QuantizeConfig`.

        Args:
            obj: A :class:`QuantizeConfig` (returned as is), a :class:`LayerConfig` (used as the default),
                a dict in the seed's format, a preset name, or ``None`` (:data:`DEFAULT_PRESET`).
            known_patterns: As for :meth:`from_dict` (used for dicts).

        Returns:
            The config.

        Raises:
            ConfigError: Unsupported object type, unknown preset or invalid dict.
        """
        return _coerce(obj, known_patterns)

    @classmethod
    def ablation(
        cls,
        preset: QuantizeConfig | Mapping[str, Any] | str | None,
        *,
        seglinear: bool = True,
        dual_scale: bool = True,
    ) -> QuantizeConfig:
        """Return ``preset`` with SegLinear and/or DualScale switched off (the paper's ablations).

        ``False`` turns the component off: its flag becomes ``False`` in the default and in every glob
        entry that sets it, and its patterns are removed from every ``search_patterns``
        (``activation_to_linear`` for DualScale, all other patterns for SegLinear). ``True`` keeps the
        preset's setting; it never turns a component on.

        Args:
            preset: Anything :meth:`coerce` accepts.
            seglinear: Keep SegLinear.
            dual_scale: Keep DualScale.

        Returns:
            The ablated config.

        Raises:
            ConfigError: ``preset`` cannot be coerced, or a flag is not a bool.
        """
        _check_bool("seglinear", seglinear)
        _check_bool("dual_scale", dual_scale)
        config = cls.coerce(preset)

        def keep(pattern: str) -> bool:
            return dual_scale if pattern == DUAL_SCALE_PATTERN else seglinear

        def ablate(layer: dict[str, Any]) -> dict[str, Any]:
            if "seglinear" in layer:
                layer["seglinear"] = layer["seglinear"] and seglinear
            if "dual_scale" in layer:
                layer["dual_scale"] = layer["dual_scale"] and dual_scale
            if isinstance(layer.get("search_patterns"), list):
                layer["search_patterns"] = [p for p in layer["search_patterns"] if keep(p)]
            return layer

        default = _build_layer(ablate(config.default.to_dict()))
        overrides = tuple((glob, FrozenDict(ablate(partial.thaw()))) for glob, partial in config.overrides)
        return dataclasses.replace(config, default=default, overrides=overrides)

    def without_segquant(self) -> QuantizeConfig:
        """Return this config with both SegLinear and DualScale off (the plain-PTQ baseline)."""
        return QuantizeConfig.ablation(self, seglinear=False, dual_scale=False)

    def with_overrides(
        self,
        overrides: Mapping[str, Mapping[str, Any]],
        *,
        known_patterns: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> QuantizeConfig:
        """Return a copy with more glob entries (or changes to ``"default"``).

        A new glob is appended (so it wins over earlier ones); a glob that already exists has the new
        settings deep-merged into its entry, which keeps its position. The key ``"default"`` deep-merges
        into the default layer settings.

        Args:
            overrides: ``{"<glob>": {partial settings}, ...}`` in the seed's format.
            known_patterns: As for :meth:`from_dict`.

        Returns:
            The new config.

        Raises:
            ConfigError: An entry is invalid.
        """
        _require_mapping("overrides", overrides)
        known = _default_known(known_patterns)
        default = self.default
        entries = dict(self.overrides)
        for glob, value in overrides.items():
            if glob == "version":
                raise _error(
                    "version", value, "'version' is reserved for the schema version; use the glob '[v]ersion'"
                )
            if not isinstance(glob, str) or not glob:
                raise _error(None, glob, "glob keys must be non-empty strings")
            if glob == "default":
                with _at("default"):
                    partial = _canonical_partial(value, known)
                    default = _build_layer(_merge_layer(default.to_dict(), partial))
                continue
            with _at(_quote(glob)):
                partial = _canonical_partial(value, known)
            if glob in entries:
                partial = FrozenDict(_merge_layer(entries[glob], partial))
            entries[glob] = partial
        return dataclasses.replace(self, default=default, overrides=tuple(entries.items()))

    # -- serialization --------------------------------------------------------------------------

    def to_dict(self, *, include_version: bool = False) -> dict[str, Any]:
        """Return the config in the seed's dict format (plain dicts, lists and scalars).

        Args:
            include_version: Add the reserved ``"version"`` key first (JSON/YAML always do).

        Returns:
            ``{"default": {...}, "<glob>": {...}, ...}``.
        """
        out: dict[str, Any] = {"version": self.version} if include_version else {}
        out["default"] = self.default.to_dict()
        for glob, partial in self.overrides:
            out[glob] = partial.thaw()
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Serialize to JSON (with ``"version"``), keeping the glob order.

        Args:
            indent: Passed to :func:`json.dumps`.

        Returns:
            The JSON text.
        """
        return json.dumps(self.to_dict(include_version=True), indent=indent)

    def to_yaml(self) -> str:
        """Serialize to YAML (with ``"version"``), keeping the glob order; needs PyYAML.

        Returns:
            The YAML text.

        Raises:
            ConfigError: PyYAML is not installed.
        """
        yaml = _import_yaml()
        return yaml.safe_dump(self.to_dict(include_version=True), sort_keys=False, default_flow_style=False)

    # -- resolution -----------------------------------------------------------------------------

    def matching_globs(self, module_name: str) -> tuple[str, ...]:
        """Return the globs that match ``module_name``, in application order.

        Args:
            module_name: Fully qualified ``nn.Module`` name, e.g. ``"transformer_blocks.0.norm1.linear"``.

        Returns:
            The matching globs.
        """
        return tuple(glob for glob, _ in self.overrides if fnmatchcase(module_name, glob))

    def layer_config(self, module_name: str) -> LayerConfig:
        """Resolve the settings of one module: default plus every matching glob, in order (cached).

        Args:
            module_name: Fully qualified ``nn.Module`` name, e.g. ``"transformer_blocks.0.norm1.linear"``.

        Returns:
            The resolved :class:`LayerConfig` (``self.default`` itself when no glob matches).

        Raises:
            ConfigError: ``module_name`` is not a string, or the matching globs combine into an invalid
                layer config.
        """
        if not isinstance(module_name, str):
            raise _error("module_name", module_name, "expected a str")
        cached = self._cache.get(module_name)
        if cached is not None:
            return cached
        matched = [(glob, partial) for glob, partial in self.overrides if fnmatchcase(module_name, glob)]
        if not matched:
            resolved = self.default
        else:
            merged = self.default.to_dict()
            for _, partial in matched:
                merged = _merge_layer(merged, partial)
            label = " + ".join(_quote(glob) for glob, _ in matched)
            try:
                with _at(label):
                    resolved = _build_layer(merged)
            except ConfigError as e:
                raise ConfigError(
                    f"module {module_name!r}: its glob entries combine into an invalid config: {e}"
                ) from e
        self._cache[module_name] = resolved
        return resolved


# ------------------------------------------------------------------------------------- YAML, coerce


def _import_yaml() -> Any:
    try:
        import yaml
    except ImportError as e:
        raise ConfigError(
            "YAML configs need PyYAML, which is not installed: pip install pyyaml "
            "(or pip install 'segquant-fx[yaml]'); JSON and dicts work without it"
        ) from e
    return yaml


@functools.singledispatch
def _coerce(obj: Any, known: Any) -> QuantizeConfig:
    raise _error(
        None,
        obj,
        f"cannot use a {type(obj).__name__} as a quantization config; pass a QuantizeConfig, a dict, "
        f"a preset name ({_fmt_allowed(PRESETS)}) or None",
    )


@_coerce.register(QuantizeConfig)
def _coerce_config(obj: QuantizeConfig, known: Any) -> QuantizeConfig:
    return obj


@_coerce.register(LayerConfig)
def _coerce_layer(obj: LayerConfig, known: Any) -> QuantizeConfig:
    return QuantizeConfig(default=obj)


@_coerce.register(Mapping)
def _coerce_mapping(obj: Mapping[str, Any], known: Any) -> QuantizeConfig:
    return QuantizeConfig.from_dict(obj, known_patterns=known)


@_coerce.register(str)
def _coerce_name(obj: str, known: Any) -> QuantizeConfig:
    return get_preset(obj)


@_coerce.register(type(None))
def _coerce_none(obj: None, known: Any) -> QuantizeConfig:
    return PRESETS[DEFAULT_PRESET]


# ---------------------------------------------------------------------------------- pipeline gate


def check_supported(
    config: QuantizeConfig | Mapping[str, Any] | str | None,
    supported_opt: Iterable[str],
    supported_calib: Iterable[str],
) -> None:
    """Raise if ``config`` uses an ``opt`` or ``calib`` type the pipeline does not implement yet.

    The dataclasses accept every type of the format; the quantize pipeline calls this with what it
    implements (initially opt ``default`` (and perhaps ``smooth``) and calib ``amax``). The check is
    conservative: every type named in the default or in any glob entry must be supported, whether
    or not a module matches it.

    Args:
        config: Anything :meth:`QuantizeConfig.coerce` accepts.
        supported_opt: Implemented ``opt.type`` values.
        supported_calib: Implemented ``calib.type`` values.

    Raises:
        ConfigError: A used type is not yet available; the message names the key path.
    """
    cfg = QuantizeConfig.coerce(config)
    supported = {"opt": frozenset(supported_opt), "calib": frozenset(supported_calib)}
    entries = [("default", cfg.default.to_dict())] + [(_quote(g), p) for g, p in cfg.overrides]
    for label, layer in entries:
        for section, available in supported.items():
            value = layer.get(section)
            type_ = value.get("type") if isinstance(value, Mapping) else None
            if type_ is not None and type_ not in available:
                raise ConfigError(
                    f"{label}.{section}.type = {type_!r} is not yet available in the quantize pipeline "
                    f"(available: {_fmt_allowed(sorted(available))}); pick one of those or another preset"
                )


# ---------------------------------------------------------------------------------------- presets


def _preset(
    *,
    input_quant: QuantSpec,
    weight_quant: QuantSpec,
    opt: OptConfig,
    calib: CalibConfig = CalibConfig(),
) -> QuantizeConfig:
    layer = LayerConfig(
        enable=True,
        seglinear=True,
        search_patterns=BUILTIN_PATTERNS,
        real_quant=True,
        dual_scale=True,
        opt=opt,
        calib=calib,
        input_quant=input_quant,
        weight_quant=weight_quant,
    )
    return QuantizeConfig(default=layer)


_INT8_PER_CHANNEL = QuantSpec(type="int8", axis=0)
_INT4_PER_CHANNEL = QuantSpec(type="int4", axis=0)
_SMOOTH = OptConfig(type="smooth", alpha=0.5)
_PLAIN = OptConfig(type="default")
_SVD32 = OptConfig(type="svd", alpha=0.5, low_rank=32)
_GPTQ = CalibConfig(type="gptq")

# W8A8 INT8, the paper's main setting and the default preset: static per-tensor activations
# (amax), per-output-channel weights, SmoothQuant alpha 0.5; SegLinear + DualScale.
W8A8 = _preset(input_quant=QuantSpec(type="int8"), weight_quant=_INT8_PER_CHANNEL, opt=_SMOOTH)
"""``w8a8``: INT8 static per-tensor activations, INT8 per-channel weights, SmoothQuant 0.5, AMax."""

# FP8 W8A8 for GPUs with FP8 tensor cores (Hopper/Ada): e4m3 needs no smoothing.
W8A8_FP8 = _preset(
    input_quant=QuantSpec(type="fpe4m3"), weight_quant=QuantSpec(type="fpe4m3", axis=0), opt=_PLAIN
)
"""``w8a8-fp8``: FP8 E4M3 per-tensor static activations and per-channel weights, no smoothing, AMax."""

# Dynamic INT8 W8A8: no activation calibration needed for the scales; robust to outlier tokens
# and to calibration sets that do not cover every timestep.
W8A8_DYNAMIC = _preset(
    input_quant=QuantSpec(type="int8", axis=-1, dynamic=True), weight_quant=_INT8_PER_CHANNEL, opt=_SMOOTH
)
"""``w8a8-dynamic``: INT8 per-token dynamic activations, INT8 per-channel weights, SmoothQuant 0.5."""

# W4A8: 4-bit weights halve weight memory; SVD low-rank branch and GPTQ recover the accuracy.
W4A8 = _preset(
    input_quant=QuantSpec(type="int8", axis=-1, dynamic=True),
    weight_quant=_INT4_PER_CHANNEL,
    opt=_SVD32,
    calib=_GPTQ,
)
"""``w4a8``: INT4 per-channel weights, INT8 per-token dynamic activations, SVD rank 32, GPTQ."""

# W4A4: the most aggressive setting (lossy); SVDQuant-style low-rank branch plus GPTQ.
W4A4 = _preset(
    input_quant=QuantSpec(type="int4", axis=-1, dynamic=True),
    weight_quant=_INT4_PER_CHANNEL,
    opt=_SVD32,
    calib=_GPTQ,
)
"""``w4a4``: INT4 per-channel weights, INT4 per-token dynamic activations, SVD rank 32, GPTQ."""

# Weight-only INT4 with groups of 64: memory-bound inference on small batches. Activations stay
# in the model's own dtype ("fp16" here means "not quantized", whatever the model runs in).
W4A16 = _preset(
    input_quant=QuantSpec(type="fp16"), weight_quant=QuantSpec(type="int4", axis=0, group_size=64), opt=_PLAIN
)
"""``w4a16``: weight-only INT4, per-channel groups of 64; activations follow the model dtype."""

# Weight-only INT8: near-lossless memory savings; activations follow the model's dtype.
W8A16 = _preset(input_quant=QuantSpec(type="fp16"), weight_quant=_INT8_PER_CHANNEL, opt=_PLAIN)
"""``w8a16``: weight-only INT8 per-channel; activations follow the model dtype."""

# ------------------------------------------------------------- baselines and paper settings
# The fidelity benchmark compares SegQuant with the baselines the paper reports. Each is a plain
# config: switching SegLinear/DualScale off is ``seglinear=False, dual_scale=False`` and no patterns
# searched. The 8-bit settings follow the paper's protocol (per-tensor activations AND weights; the
# ``w8a8`` preset above uses per-channel weights instead), the 4-bit ones per-channel INT4 weights
# and per-token dynamic activations.

_INT8_PER_TENSOR = QuantSpec(type="int8")
_INT8_PER_TOKEN = QuantSpec(type="int8", axis=-1, dynamic=True)
_INT4_PER_TOKEN = QuantSpec(type="int4", axis=-1, dynamic=True)
_ALPHA_SEARCH = SearchAlphaConfig(enable=True, min=0.0, max=1.0, step=0.1)


def _paper_preset(
    *,
    input_quant: QuantSpec,
    weight_quant: QuantSpec,
    opt: OptConfig,
    calib: CalibConfig = CalibConfig(),
    segquant: bool,
) -> QuantizeConfig:
    layer = LayerConfig(
        enable=True,
        seglinear=segquant,
        search_patterns=BUILTIN_PATTERNS if segquant else (),
        real_quant=True,
        dual_scale=segquant,
        opt=opt,
        calib=calib,
        input_quant=input_quant,
        weight_quant=weight_quant,
    )
    return QuantizeConfig(default=layer)


BASELINE_W8A8 = _paper_preset(
    input_quant=_INT8_PER_TENSOR, weight_quant=_INT8_PER_TENSOR, opt=_PLAIN, segquant=False
)
"""``baseline-w8a8``: plain per-tensor INT8 W8A8 (static activations, AMax), no smoothing, no
SegLinear, no DualScale: the paper's "Baseline" row and the reference's ``baseline`` preset."""

PTQ4DIT_W8A8 = _paper_preset(
    input_quant=_INT8_PER_TENSOR, weight_quant=_INT8_PER_TENSOR, opt=_SMOOTH, segquant=False
)
"""``ptq4dit-w8a8``: "PTQ4DiT" as the reference runs it: SmoothQuant with fixed alpha 0.5, per-tensor
INT8 W8A8, AMax, no SegLinear, no DualScale (PTQ4DiT's salience balancing is not part of it)."""

SMOOTH_PLUS_W8A8 = _paper_preset(
    input_quant=_INT8_PER_TENSOR,
    weight_quant=_INT8_PER_TENSOR,
    opt=OptConfig(type="smooth", alpha=0.5, search_alpha_config=_ALPHA_SEARCH),
    segquant=False,
)
"""``smooth-plus-w8a8``: "Smooth+": SmoothQuant with a per-layer alpha grid search (0 to 1 step 0.1,
both ends included), per-tensor INT8 W8A8, AMax, no SegLinear, no DualScale."""

SVDQUANT_W4A8 = _paper_preset(
    input_quant=_INT8_PER_TOKEN,
    weight_quant=_INT4_PER_CHANNEL,
    opt=OptConfig(type="svd", alpha=0.5, low_rank=64, search_alpha_config=_ALPHA_SEARCH),
    calib=_GPTQ,
    segquant=False,
)
"""``svdquant-w4a8``: SVDQuant: smoothing (alpha searched) plus a rank-64 16-bit low-rank branch, the
residual in INT4 per-channel with GPTQ, INT8 per-token dynamic activations; no SegLinear/DualScale
(the reference's SD3 W4A8 ``svdquant`` preset)."""

SVDQUANT_W4A4 = _paper_preset(
    input_quant=_INT4_PER_TOKEN,
    weight_quant=_INT4_PER_CHANNEL,
    opt=OptConfig(type="svd", alpha=0.5, low_rank=32),
    calib=_GPTQ,
    segquant=False,
)
"""``svdquant-w4a4``: SVDQuant W4A4: smoothing alpha 0.5, rank-32 low-rank branch, INT4 per-channel
GPTQ residual, INT4 per-token dynamic activations; no SegLinear/DualScale (reference SD3 W4A4)."""

SEGQUANT_A_W8A8 = _paper_preset(
    input_quant=_INT8_PER_TENSOR,
    weight_quant=_INT8_PER_TENSOR,
    opt=OptConfig(type="smooth", alpha=0.5, search_alpha_config=_ALPHA_SEARCH, per_segment_smoothing=True),
    segquant=True,
)
"""``segquant-a-w8a8``: SegQuant-A: SegLinear + DualScale, SmoothQuant with per-segment alpha search
and one smoothing vector per output segment, AMax, per-tensor INT8 W8A8 (the paper's setting)."""

SEGQUANT_G_W8A8 = _paper_preset(
    input_quant=_INT8_PER_TENSOR,
    weight_quant=_INT8_PER_TENSOR,
    opt=OptConfig(type="smooth", alpha=0.5, search_alpha_config=_ALPHA_SEARCH, per_segment_smoothing=True),
    calib=_GPTQ,
    segquant=True,
)
"""``segquant-g-w8a8``: SegQuant-G: as ``segquant-a-w8a8`` with GPTQ weight rounding (Hessians of the
smoothed inputs, shared by the output segments of a layer), AMax activations."""

DEFAULT_PRESET = "w8a8"
"""The preset used when ``quantize`` gets ``config=None``."""

PRESETS: Mapping[str, QuantizeConfig] = MappingProxyType(
    {
        "w8a8": W8A8,
        "w8a8-fp8": W8A8_FP8,
        "w8a8-dynamic": W8A8_DYNAMIC,
        "w4a8": W4A8,
        "w4a4": W4A4,
        "w4a16": W4A16,
        "w8a16": W8A16,
    }
)
"""Preset name -> config (read-only)."""

BASELINE_PRESETS: Mapping[str, QuantizeConfig] = MappingProxyType(
    {
        "baseline-w8a8": BASELINE_W8A8,
        "ptq4dit-w8a8": PTQ4DIT_W8A8,
        "smooth-plus-w8a8": SMOOTH_PLUS_W8A8,
        "svdquant-w4a8": SVDQUANT_W4A8,
        "svdquant-w4a4": SVDQUANT_W4A4,
        "segquant-a-w8a8": SEGQUANT_A_W8A8,
        "segquant-g-w8a8": SEGQUANT_G_W8A8,
    }
)
"""Named baselines and paper settings (read-only): ``get_preset``/``quantize`` accept these names too."""


def get_preset(name: str) -> QuantizeConfig:
    """Return a preset by name; case and ``_`` vs ``-`` are ignored (``"W8A8_FP8"`` works).

    Args:
        name: One of the keys of :data:`PRESETS` or :data:`BASELINE_PRESETS`.

    Returns:
        The preset config.

    Raises:
        ConfigError: Unknown name; the message lists the valid names.
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    try:
        return PRESETS[key]
    except (KeyError, TypeError):
        pass
    try:
        return BASELINE_PRESETS[key]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown preset {name!r}; valid presets: {_fmt_allowed([*PRESETS, *BASELINE_PRESETS])}"
        ) from None
