"""Shared fixtures of the t2i tests: built bundles are cached per session (building imports diffusers)."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def _bundle(name: str, small: bool):
    from segquant_fx.t2i.models import build_bundle, get_spec, small_spec

    return build_bundle(small_spec(name) if small else get_spec(name))


@pytest.fixture(scope="session")
def bundle_of():
    """``bundle_of(name, small=False)``: a cached untrained bundle (do not mutate it)."""
    return lambda name, small=False: _bundle(name, small)
