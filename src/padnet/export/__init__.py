"""Deploy forms and export."""

from .compact import compact_, compact_layer

__all__ = ["compact_", "compact_layer"]
