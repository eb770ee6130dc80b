"""Fixtures of the optimizer tests: one intra-op thread, cached captures.

The optimizer tests run many small tensor ops; on a loaded 2-core machine two intra-op threads make
each op ~10x slower than one, so this directory runs single-threaded (restored afterwards).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from segquant_fx import api
from segquant_fx.capture import capture as _real_capture

from ._helpers import _CACHED, _CAPTURES


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="package")
def _captured_once() -> Iterator[None]:
    """Capture models registered with :func:`cache_capture` once per session (configs differ, graphs not)."""
    mp = pytest.MonkeyPatch()

    def capture(model, example, dynamic=True, dynamic_shapes=None):
        if id(model) in _CACHED and dynamic_shapes is None and dynamic:
            if id(model) not in _CAPTURES:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _CAPTURES[id(model)] = _real_capture(model, example, dynamic)
            return _CAPTURES[id(model)]
        return _real_capture(model, example, dynamic, dynamic_shapes)

    mp.setattr(api, "capture", capture)
    try:
        yield
    finally:
        mp.undo()
