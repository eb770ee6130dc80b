"""Deterministic subset selection by seed, optionally balanced per category.

Items are ranked by ``sha256(f"{seed}:{id}")`` and the lowest-ranked ones are kept. Compared with
shuffling a list with a seeded RNG this has three useful properties:

* it is the same on every platform and Python/NumPy version (no RNG stream involved);
* an item's rank does not depend on the other items, so adding or removing files in the source changes
  the subset only where those files rank;
* the subset of size ``n`` is a prefix of the subset of size ``m > n`` for the same seed (the output
  is in rank order), so "the first 32 prompts" of a 5000-item dataset are a proper random subset too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from segquant_fx.errors import ConfigError, DatasetError

__all__ = ["rank_key", "sample_ids", "sample_balanced"]

T = TypeVar("T")


def rank_key(seed: int, item_id: str) -> bytes:
    """The sort key of ``item_id`` under ``seed`` (a SHA-256 digest)."""
    return hashlib.sha256(f"{int(seed)}:{item_id}".encode()).digest()


def _check_n(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"sample size must be a positive integer or None (all), got {n!r}")


def sample_ids(items: Sequence[T], n: int | None, seed: int, *, key: Callable[[T], str] = str) -> list[T]:
    """Choose ``n`` items deterministically by ``seed`` (all of them, ranked, when ``n`` is None).

    Args:
        items: Candidates; ``key(item)`` must be unique.
        n: How many to keep, or ``None`` for all.
        seed: The seed; the same seed gives the same subset, in the same order.
        key: The item's identifier.

    Returns:
        The chosen items in rank order.

    Raises:
        ConfigError: If ``n`` is not a positive integer.
        DatasetError: If there are fewer than ``n`` items.

    Example:
        >>> sample_ids(["a", "b", "c", "d"], 2, seed=0) == sample_ids(["d", "c", "b", "a"], 2, seed=0)
        True
    """
    _check_n(n)
    if n is not None and n > len(items):
        raise DatasetError(f"asked for {n} items but the source has only {len(items)}; lower --sample-size")
    ranked = sorted(items, key=lambda it: rank_key(seed, key(it)))
    return ranked if n is None else ranked[:n]


def sample_balanced(
    items: Sequence[T],
    n_per_category: int | None,
    seed: int,
    *,
    category: Callable[[T], str],
    key: Callable[[T], str] = str,
) -> list[T]:
    """Choose ``n_per_category`` items from every category, deterministically by ``seed``.

    Each category is sampled like :func:`sample_ids`; the union is returned in rank order, so categories
    are interleaved (a prefix of the result is itself roughly balanced).

    Raises:
        ConfigError: If ``n_per_category`` is not a positive integer.
        DatasetError: If a category has fewer than ``n_per_category`` items (the message lists them).
    """
    _check_n(n_per_category)
    groups: dict[str, list[T]] = {}
    for it in items:
        groups.setdefault(category(it), []).append(it)
    if n_per_category is not None:
        short = {c: len(g) for c, g in sorted(groups.items()) if len(g) < n_per_category}
        if short:
            raise DatasetError(
                f"asked for {n_per_category} items per category but these categories have fewer: "
                f"{short}; lower --sample-size"
            )
    chosen = [it for g in groups.values() for it in sample_ids(g, n_per_category, seed, key=key)]
    return sorted(chosen, key=lambda it: rank_key(seed, key(it)))
