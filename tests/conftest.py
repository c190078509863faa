"""Shared test fixtures."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny tensors run faster and a busy shared CPU
    does not slow them down. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The suite checks numbers, not speed: backend="auto" uses the deterministic cost rule unless a test turns
# autotuning on, and any autotune cache file goes to a throw-away directory, never the user's ~/.cache.
os.environ["PADNET_AUTOTUNE"] = "0"
os.environ["PADNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="padnet-test-cache-")
