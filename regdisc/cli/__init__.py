"""The ``regdisc`` command line: one argparse subcommand per verb."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..pki import PKIError
from .output import fail
from .pki import add_pki
from .registry import add_registry_verbs

__all__ = ["build_parser", "main", "run"]

PROG = "regdisc"


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every verb; each sets ``func`` to its handler."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Service registry and discovery: inspect and change a registry, "
        "or make TLS material for one.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_registry_verbs(subparsers)
    add_pki(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return its status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)  # type: ignore[no-any-return]
    except PKIError as error:
        return fail(str(error))
    except OSError as error:
        return fail(_describe_os_error(error))


def run() -> None:
    """Console-script entry point: exit with ``main``'s status."""
    sys.exit(main())


def _describe_os_error(error: OSError) -> str:
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)
