"""Shared test setup: markers, seeding, CUDA skipping, and cached captures of the zoo models."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or "tests/gpu" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def captured_zoo(name: str, batch_size: int = 2):
    """(model, example, CapturedModel, PatternReport) for a zoo model, computed once per session."""
    from segquant_fx.capture import capture
    from segquant_fx.models import build_model
    from segquant_fx.report import find_patterns

    model, example = build_model(name, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = capture(model, example)
    report = find_patterns(cm, debug=True)
    return model, example, cm, report


@pytest.fixture(scope="session")
def zoo():
    return captured_zoo
