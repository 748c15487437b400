"""Shared fixtures: locally built tokenizers and one pool of gloo worker processes per session."""

import pytest  # noqa: E402
from dist_pool import WorkerPool  # noqa: E402
from tokenizer_fixtures import *  # noqa: F401,F403


@pytest.fixture(scope="session")
def pool4():
    """Four gloo processes for the whole session: TP groups of 1, 2 and 4 inside."""
    pool = WorkerPool(4)
    yield pool
    pool.close()
