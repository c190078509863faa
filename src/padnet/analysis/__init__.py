"""Counting, FLOPs, latency, reports."""

from .counting import ParameterCount, count_parameters, layer_counts

__all__ = ["ParameterCount", "count_parameters", "layer_counts"]
