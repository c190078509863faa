"""Transitional alias: layers/moe.py (owned by the MoE branch) still imports ``is_exporting`` from here.

Everything else moved to :mod:`padnet.ops`; delete this module once moe.py imports
:func:`padnet.ops.exporting.is_exporting`.
"""

from ..ops.exporting import is_exporting

__all__ = ["is_exporting"]
