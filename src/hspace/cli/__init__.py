"""The `hspace` command line: one module per group of commands, each with ``register(subparsers)``
beside the ``run_*(args)`` functions it registers.

A domain's own command group (``hspace toyfaces ...``) is registered from here, never from the domain:
the bundled one by import, others by the ``hspace.commands`` entry point group (a ``register(subparsers)``
function), so that no library module imports the CLI."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ..distributed import launched
from ..errors import HspaceError
from ..toyfaces import cli as toyfaces_commands
from . import directions, generation, reports, ui
from .launch import launch

GROUPS = (generation, directions, reports, ui, toyfaces_commands)
# Options that name outputs, checked before any computation (a command may override with set_defaults(outputs=...)).
OUTPUTS = {"out": "dir", "output": "file", "json": "file", "grid": "file", "save_trajectory": "file"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hspace", description="Discover and apply editing directions in the h-space of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    for entry in entry_points(group="hspace.commands"):  # command groups of installed domains
        entry.load()(sub)
    return parser


def check_outputs(args) -> None:
    from ..files import check_output_dir, check_output_file

    for name, kind in {**OUTPUTS, **getattr(args, "outputs", {})}.items():
        value = getattr(args, name, None)
        if value:
            option = "--" + name.replace("_", "-") if name != "output" else "-o/--output"
            (check_output_dir if kind == "dir" else check_output_file)(value, option)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed what is wrong (exit 2) or the help (exit 0)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="hspace: %(message)s", stream=sys.stderr)
    args._argv = list(argv if argv is not None else sys.argv[1:])  # which options were given (common.engine_of_spec)
    if getattr(args, "num_processes", 1) > 1 and not launched():
        return _launch(argv if argv is not None else sys.argv[1:], args)
    try:
        check_outputs(args)
        args.func(args)
        if getattr(args, "_processes", None) is not None:
            args._processes.close()
    except HspaceError as e:
        print(f"hspace {args.command}: error: {e}", file=sys.stderr)
        if getattr(args, "_processes", None) is not None:
            args._processes.close(wait=False)
        return 2
    except OSError as e:  # the last resort for a file the checks could not foresee (a disk gone, a device that refuses)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"hspace {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hspace {args.command}: interrupted; finished work is kept (a bank or reproduce resumes with the same command)", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        size = getattr(args, "batch_size", None)
        hint = f"; try a smaller --batch-size (it is {size})" if size else ""
        print(f"hspace {args.command}: error: out of memory{hint}", file=sys.stderr)
        return 2
    return 0


def _launch(argv: list[str], args) -> int:
    """``--num-processes N``: the same command on N local processes (``distributed.launch``)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    try:
        code = launch(rest, args.num_processes)
    except HspaceError as e:
        print(f"hspace {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0 if code == 0 else (2 if code == 2 else 1)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


if __name__ == "__main__":
    raise SystemExit(main())
