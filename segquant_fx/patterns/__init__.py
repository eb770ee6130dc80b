"""Pattern registry: built-in SegQuant patterns plus user patterns, by name.

Configs refer to patterns by name (``search_patterns``). A user adds one without touching the library::

    from segquant_fx.patterns import Pattern, PlanContribution, register_pattern
    register_pattern(Pattern(name="my_pattern", search=(fn,), example_inputs=lambda: (...),
                             check=lambda m, v: None, plan=lambda m, v: PlanContribution(...)))
"""

from __future__ import annotations

from segquant_fx.errors import PatternError
from segquant_fx.patterns.base import Match, Pattern, PlanContribution, Rejection
from segquant_fx.patterns.matcher import _compile, find_matches

__all__ = [
    "PATTERNS",
    "BUILTIN_PATTERNS",
    "Match",
    "Pattern",
    "PlanContribution",
    "Rejection",
    "find_matches",
    "get_pattern",
    "register_pattern",
    "unregister_pattern",
]

#: Every registered pattern, by name, in registration order.
PATTERNS: dict[str, Pattern] = {}


def register_pattern(pattern: Pattern, *, replace: bool = False) -> Pattern:
    """Add ``pattern`` to :data:`PATTERNS` and return it.

    Raises:
        PatternError: If the name is taken (pass ``replace=True`` to override), or the pattern is
            malformed.
    """
    if not isinstance(pattern, Pattern):
        raise PatternError(f"register_pattern() takes a Pattern, got {type(pattern).__name__}")
    if not pattern.name or not isinstance(pattern.name, str):
        raise PatternError(f"pattern name must be a non-empty string, got {pattern.name!r}")
    if not pattern.search:
        raise PatternError(f"pattern {pattern.name!r} has no search functions")
    if pattern.name in PATTERNS and not replace:
        raise PatternError(
            f"a pattern named {pattern.name!r} is already registered; pick another name or pass replace=True"
        )
    PATTERNS[pattern.name] = pattern
    _compile.cache_clear()
    return pattern


def unregister_pattern(name: str) -> None:
    """Remove a registered pattern (no error if absent)."""
    PATTERNS.pop(name, None)
    _compile.cache_clear()


def get_pattern(name: str) -> Pattern:
    """The registered pattern called ``name``.

    Raises:
        PatternError: If none is registered under that name; the message lists the known names.
    """
    try:
        return PATTERNS[name]
    except KeyError:
        raise PatternError(f"unknown pattern {name!r}; registered: {', '.join(PATTERNS)}") from None


from segquant_fx.patterns import builtin as _builtin  # noqa: E402  (registers the built-ins)

#: Names of the built-in patterns, in priority order.
BUILTIN_PATTERNS: tuple[str, ...] = _builtin.BUILTIN_NAMES
