"""Registers the built-in SegQuant patterns (names are the reference's, configs use them)."""

from __future__ import annotations

from segquant_fx.patterns.act_linear import ACTIVATION_TO_LINEAR
from segquant_fx.patterns.cat_linear import CONCAT_TO_CONV, CONCAT_TO_LINEAR, STACK_TO_LINEAR
from segquant_fx.patterns.linear_chunk import LINEAR_TO_CHUNK, LINEAR_TO_SPLIT
from segquant_fx.patterns.reshape_linear import RESHAPE_TO_LINEAR

__all__ = ["BUILTIN_NAMES"]

_BUILTINS = (
    LINEAR_TO_CHUNK,
    LINEAR_TO_SPLIT,
    CONCAT_TO_LINEAR,
    STACK_TO_LINEAR,
    RESHAPE_TO_LINEAR,
    ACTIVATION_TO_LINEAR,
    CONCAT_TO_CONV,
)


def _register() -> tuple[str, ...]:
    from segquant_fx.patterns import register_pattern

    for p in _BUILTINS:
        register_pattern(p, replace=True)
    return tuple(p.name for p in _BUILTINS)


BUILTIN_NAMES = _register()
