"""Model transforms: mode transitions, learned mode gates (more modules arrive with the architecture reshape)."""
