"""The `hspace` command line: one module per group of commands, each with ``register(subparsers)``
beside the ``run_*(args)`` functions it registers.

A domain's own command group (``hspace toyfaces ...``) is registered from here, never from the domain:
the bundled one by import, others by the ``hspace.commands`` entry point group (a ``register(subparsers)``
function), so that no library module imports the CLI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points

from ..distributed import launched
from ..errors import HspaceError
from ..toyfaces import cli as toyfaces_commands
from . import directions, generation, reports, ui
from .launch import ERRORS_VARIABLE, launch

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


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    """The parsers of hspace's commands by name (``toyfaces train`` for a group's command)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _subcommands(sub)
                found.update({f"{name} {k}": v for k, v in inner.items()} if inner else {name: sub})
    return found


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
    if launched() and not hasattr(args, "num_processes"):
        # torchrun / accelerate launch of a command that does not share its work: every process would do
        # all of it and write the same files at once
        if os.environ.get("RANK", "0") == "0":
            sharing = sorted(name for name, p in _subcommands(build_parser()).items() if any("--num-processes" in a.option_strings for a in p._actions))
            print(f"hspace {args.command}: error: this command does not share its work between processes, but WORLD_SIZE="
                  f"{os.environ.get('WORLD_SIZE')} says it was started on several; run it once, without a launcher "
                  f"(commands that share their work: {', '.join(sharing)})", file=sys.stderr)
        return 2
    try:
        check_outputs(args)
        args.func(args)
        if getattr(args, "_processes", None) is not None:
            args._processes.close()
    except HspaceError as e:
        _error(f"hspace {args.command}: error: {e}")
        if getattr(args, "_processes", None) is not None:
            args._processes.close(wait=False)
        return 2
    except OSError as e:  # the last resort for a file the checks could not foresee (a disk gone, a device that refuses)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _error(f"hspace {args.command}: error: {e.strerror or e}{where}")
        return 2
    except KeyboardInterrupt:
        print(f"hspace {args.command}: interrupted; finished work is kept (a bank or reproduce resumes with the same command)", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        hint = memory_hint(args)
        _error(f"hspace {args.command}: error: out of memory{hint}")
        return 2
    return 0


# What bounds the memory of a command, where it is not its --batch-size.
MEMORY_HINTS = {
    "jacobian": lambda a: f"a smaller --k (it is {a.k}), or Alg. 2 with a --b below it (vectors per Jacobian product)",
    "pca": lambda a: f"a smaller --memory-gb (it is {a.memory_gb}; the accumulators' budget)",
}


def memory_hint(args) -> str:
    """The out-of-memory hint: the option that bounds this command's memory, with its current value."""
    if args.command in MEMORY_HINTS:
        return "; try " + MEMORY_HINTS[args.command](args)
    size = getattr(args, "batch_size", None)
    return f"; try a smaller --batch-size (it is {size})" if size else ""


def _error(text: str) -> None:
    """Print an error, or, in a process that ``--num-processes`` started, leave it for the launcher, which
    prints each different message once when all processes have ended (``launch.collect_errors``)."""
    folder = os.environ.get(ERRORS_VARIABLE)
    if folder and launched():
        try:
            with open(os.path.join(folder, f"{os.environ.get('RANK', '0')}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            return
        except OSError:
            pass
    print(text, file=sys.stderr)


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
