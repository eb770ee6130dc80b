"""Helpers shared by test modules (imported as ``_utils``: ``tests/`` is on the path through its conftest)."""

__all__: list[str] = []
