"""Entry point of the processes that ``hspace ... --num-processes N`` starts (see ``cli/launch.py``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from . import main
from .launch import ARGV_VARIABLE


def launched_main() -> int:
    """The entry point of a process that ``launch`` started: the hspace command in ``HSPACE_LAUNCH_ARGV``."""
    code = 1
    try:
        code = main(json.loads(os.environ[ARGV_VARIABLE]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        # Leave without the interpreter's teardown: the process group is down (``Processes.close``), and what
        # is left of the communication library's threads can abort a process in its C++ destructors while
        # the others exit (a SIGABRT after all the work was written, seen as a rare CI failure).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    raise SystemExit(launched_main())
