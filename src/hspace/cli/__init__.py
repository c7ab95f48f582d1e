"""The `hspace` command line: one module per group of commands, each with ``register(subparsers)``
beside the ``run_*(args)`` functions it registers."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import HspaceError
from ..domains import registered_domains
from . import directions, generation, reports

GROUPS = (generation, directions, reports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hspace", description="Discover and apply editing directions in the h-space of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    for domain in registered_domains():  # a domain may bring a command group of its own
        if domain.commands is not None:
            domain.commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hspace: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except HspaceError as e:
        print(f"hspace {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
