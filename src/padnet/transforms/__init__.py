"""Model transforms: mode transitions (more modules arrive with the architecture reshape)."""
