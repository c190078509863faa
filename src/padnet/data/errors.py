"""Errors raised by :mod:`padnet.data`."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for.

    The message always says where padnet looked and how to get the data.
    """


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or of the wrong format.

    The message names the offending file.
    """
