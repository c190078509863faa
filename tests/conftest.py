"""Shared test fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
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


@pytest.fixture
def at_one_and_two_threads():
    """``run(fn) -> (fn() with 1 intra-op thread, fn() with 2)``, the thread count restored after: for
    results that must not depend on it."""
    def run(fn):
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = fn()
            torch.set_num_threads(2)
            two = fn()
        finally:
            torch.set_num_threads(threads)
        return one, two

    return run


# The suite checks numbers, not speed: backend="auto" uses the deterministic cost rule unless a test turns
# autotuning on, and any autotune cache file goes to a throw-away directory, never the user's ~/.cache.
# The compiled fused kernel is the exception: it is keyed by torch, CPU and source, and rebuilding it for every
# session would cost a minute, so it stays in the user's extension cache.
os.environ["PADNET_AUTOTUNE"] = "0"
# Likewise the fused C++ kernel is off unless a test turns it on (tests/test_fused.py): whether a machine has a
# cached build must not change which backends the other tests' autotuner times.
os.environ["PADNET_FUSED"] = "0"
os.environ.setdefault("PADNET_EXTENSIONS_DIR", os.path.join(
    os.environ.get("PADNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "padnet"),
    "extensions"))
os.environ["PADNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="padnet-test-cache-")
atexit.register(shutil.rmtree, os.environ["PADNET_CACHE_DIR"], ignore_errors=True)
