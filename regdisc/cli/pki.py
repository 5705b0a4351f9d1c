"""``regdisc pki``: make a CA and issue certificates, without openssl."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..pki import init_ca_dir, issue_to_dir


def add_pki(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki init`` and ``pki issue``."""
    pki = subparsers.add_parser(
        "pki",
        help="make a CA and issue certificates",
        description="Make a certificate authority and issue certificates from it.",
    )
    verbs = pki.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")

    init = verbs.add_parser(
        "init",
        help="make a CA in a directory",
        description="Make a CA as DIR/ca.pem and DIR/ca-key.pem (key mode 0600).",
    )
    init.add_argument("directory", metavar="DIR", type=Path)
    init.add_argument(
        "--cn", default="regdisc root CA", metavar="NAME", help="CA common name"
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA in DIR"
    )
    init.set_defaults(func=_pki_init)

    issue = verbs.add_parser(
        "issue",
        help="issue a certificate from a CA directory",
        description=(
            "Issue DIR/NAME.pem and DIR/NAME-key.pem signed by DIR's CA, "
            "for server and client use unless --server or --client is given."
        ),
    )
    issue.add_argument("name", metavar="NAME", help="certificate name and common name")
    issue.add_argument(
        "--dir",
        dest="directory",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory holding the CA",
    )
    issue.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="H",
        help="DNS name or IP address to certify; repeatable "
        "(a server certificate defaults to NAME)",
    )
    use = issue.add_mutually_exclusive_group()
    use.add_argument(
        "--server",
        dest="use",
        action="store_const",
        const="server",
        help="for server use only",
    )
    use.add_argument(
        "--client",
        dest="use",
        action="store_const",
        const="client",
        help="for client use only",
    )
    issue.add_argument(
        "--days",
        type=_positive_int,
        default=825,
        metavar="N",
        help="days of validity (default: %(default)s)",
    )
    issue.set_defaults(func=_pki_issue)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _pki_init(args: argparse.Namespace) -> int:
    paths = init_ca_dir(args.directory, common_name=args.cn, force=args.force)
    _print_paths(paths)
    return 0


def _pki_issue(args: argparse.Namespace) -> int:
    server = args.use in (None, "server")
    client = args.use in (None, "client")
    hosts = args.hosts or ([args.name] if server else [])
    paths = issue_to_dir(
        args.directory,
        args.name,
        hosts=hosts,
        server=server,
        client=client,
        days=args.days,
    )
    _print_paths(paths)
    return 0


def _print_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        print(path)
