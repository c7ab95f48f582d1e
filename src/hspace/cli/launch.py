"""``hspace ... --num-processes N``: the same command on N local processes, started with torchrun (what
``accelerate launch`` uses under the hood for one machine), one per GPU where there are GPUs.

The launcher lives beside the CLI it starts; ``distributed.py`` (what the processes do together) knows
nothing of the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

import torch

from ..errors import HspaceError


def launch(argv: Sequence[str], num_processes: int) -> int:
    """Run ``hspace ARGV`` on ``num_processes`` local processes (torchrun), one per GPU where there are
    GPUs; returns the exit status (non-zero when any process failed)."""
    if num_processes < 1:
        raise HspaceError(f"--num-processes must be >= 1, got {num_processes}")
    gpus = torch.cuda.device_count()
    cap = max_cpu_processes()
    if not gpus and num_processes > cap:
        raise HspaceError(f"--num-processes {num_processes} on a machine with {cap // PER_CORE} CPU cores; valid: 1 to {cap} "
                          f"({PER_CORE} per core at most: more processes only share the same cores)")
    if gpus and num_processes > gpus:
        raise HspaceError(f"--num-processes {num_processes} but this machine has {gpus} GPUs; valid: 1 to {gpus} (one process per GPU)")
    env = thread_environment(dict(os.environ), num_processes)
    # The command travels in the environment: torchrun's own option parser would take hspace's options
    # (--n, --no-clip, ...) as abbreviations of its own.
    env[ARGV_VARIABLE] = json.dumps(list(argv))
    command = [sys.executable, "-m", "hspace.cli.torchrun", "--standalone", f"--nproc-per-node={num_processes}", "-m", "hspace.cli.launched"]
    with tempfile.TemporaryDirectory(prefix="hspace-errors-") as errors:
        env[ERRORS_VARIABLE] = errors
        code = subprocess.run(command, env=env).returncode
        for text in collect_errors(errors):
            print(text, file=sys.stderr)
    return code


def collect_errors(folder: str) -> list[str]:
    """The error messages the processes left in ``folder`` (one file per rank), each different one once,
    in rank order: N processes that meet the same bad input say so once."""
    texts = []
    for name in sorted(os.listdir(folder), key=lambda n: int(n.split(".")[0]) if n.split(".")[0].isdigit() else 1 << 30):
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text and text not in texts:
            texts.append(text)
    return texts


ARGV_VARIABLE = "HSPACE_LAUNCH_ARGV"
ERRORS_VARIABLE = "HSPACE_LAUNCH_ERRORS"


PER_CORE = 4


def max_cpu_processes() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return PER_CORE * cores


def thread_environment(env: dict, num_processes: int) -> dict:
    """``env`` with the CPU threads of each of ``num_processes`` processes: OMP_NUM_THREADS as the user set
    it, else this machine's cores split between the processes (each using every core would oversubscribe
    them), as accelerate launch does for CPU processes."""
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // num_processes))
    return env
