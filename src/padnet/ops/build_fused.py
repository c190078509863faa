"""``python -m padnet.ops.build_fused``: compile the fused C++ kernels for this machine into the cache.

``scripts/setup.sh`` runs it. The entry point lives apart from :mod:`.fused`,
which the package imports, so that running it does not load that module twice.
Exit status 0 when the library is built (or already cached), 1 when it could
not be (no compiler, a build error: the pure-PyTorch backends then serve).
"""

from __future__ import annotations

import argparse
import sys

from .fused import build_fused, library_path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Build (or find cached) the kernel library; print where it is or why it was not built."""
    parser = argparse.ArgumentParser(prog="python -m padnet.ops.build_fused",
                                     description="Compile the fused C++ kernels for this machine into the cache.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        build_fused(verbose=args.verbose)
    except Exception as exc:  # any build failure: report it, padnet falls back to PyTorch
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"padnet: the fused kernel was not built ({type(exc).__name__}: {first_line}); "
              "the pure-PyTorch backends serve", file=sys.stderr)
        return 1
    print(f"padnet: fused dynamic-conv kernel built: {library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
