"""torchrun for ``--num-processes``, with the children's own exit status and messages.

``python -m torch.distributed.run`` ends a failed run in its ``ChildFailedError`` traceback and exit 1,
after every child has printed its own message. This module runs the same launcher (``run(parse_args)``),
quiets the agent's failure report, and exits with the status of the process that failed first: 2 for
an hspace error (its message is already printed), 1 with one line for anything else (a signal)."""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code == 2:
            return 2
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"hspace: error: process {rank} was stopped by {name}", file=sys.stderr)
        else:
            print(f"hspace: error: process {rank} exited with status {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
