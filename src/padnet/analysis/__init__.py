"""Latency measurement helpers (benchmark suites). Counting and FLOPs live in :mod:`padnet.transforms`."""
