"""``padnet`` console script: one sub-command per verb.

Each verb lives in its own module exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (``args -> int`` exit code). Errors a user can fix
(bad input, missing data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

# verb -> module implementing it (imported lazily so `padnet --help` stays fast).
COMMANDS = {
    "count": "padnet.commands.count",
    "partition": "padnet.commands.partition",
    "demo": "padnet.commands.demo",
    "train": "padnet.commands.train",
    "evaluate": "padnet.commands.evaluate",
    "compare": "padnet.commands.compare",
    "bench": "padnet.commands.bench",
    "export": "padnet.commands.export",
    "predict": "padnet.commands.predict",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padnet", description="Partially dynamic networks (PAD-Net) for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"padnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError, FloatingPointError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"padnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or unwritable output, ...
        if getattr(args, "debug", False):
            raise
        print(f"padnet {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: what, where, and what to do."""
    import errno

    where = exc.filename or "a file"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {where}; free some space or write elsewhere"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {where}; free some space or write elsewhere"
    if exc.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system; choose another output location"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {where}: permission denied; choose another output location"
    return f"{exc.strerror or exc} ({where})"


if __name__ == "__main__":
    sys.exit(main())
