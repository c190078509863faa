"""Model transforms (see docs/design.md): learned mode gates live in :mod:`padnet.transforms.gates`."""
