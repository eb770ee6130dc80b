"""Fixtures: synthetic COCO-2017 / MJHQ-30K / DCI copies in their published layouts, written per test."""

from __future__ import annotations

import pytest
from _dataset_fixtures import make_coco, make_dci, make_mjhq


@pytest.fixture
def coco_src(tmp_path):
    return make_coco(tmp_path / "coco")


@pytest.fixture
def mjhq_src(tmp_path):
    return make_mjhq(tmp_path / "mjhq")


@pytest.fixture
def dci_src(tmp_path):
    return make_dci(tmp_path / "dci")
