from __future__ import annotations

import pytest

import prune_lab as pl


@pytest.fixture
def lab(demo_session):
    return pl.Lab(demo_session)
