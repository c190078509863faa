"""Integrations with other training frameworks (apps layer; optional dependencies imported lazily)."""
