"""Shared fixtures. Tests are fast, deterministic and offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time

import framecast  # noqa: E402,F401  (preloads OpenBLAS before mlx is imported anywhere)


@pytest.fixture(autouse=True)
def _seed():
    import mlx.core as mx
    import numpy as np

    mx.random.seed(0)
    np.random.seed(0)
    yield
