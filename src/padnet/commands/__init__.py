"""CLI verbs, one module each (see padnet.cli)."""
