"""Fixtures of the diffusion-workflow tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_pipe():
    """Build a fresh tiny pipeline (tests mutate components)."""
    from segquant_fx.models.pipeline_zoo import build_pipeline

    def make(name: str):
        return build_pipeline(name)

    return make
