"""Work spread over processes (GPUs or CPU processes) with Hugging Face Accelerate.

A job started by ``accelerate launch`` or ``torchrun`` (the environment has WORLD_SIZE > 1) runs on every
process; ``Processes.current()`` joins them through Accelerate's ``PartialState`` (NCCL between GPUs, gloo
between CPU processes). One process is one of them: the same code runs unchanged.

The rules every distributed command follows:
- the work is a list of units that do not depend on who draws them (a bank's shards, a share of the
  samples), and ``share(units)`` gives each process every num-th unit, so the result is the same for any
  number of processes;
- the processes first agree on what they are doing (``agree``: the same settings on every process, or an
  error on all of them);
- what is shared (a bank's manifest, a scores file) is written by the main process only, after the others
  are done (``barrier``); a file a process writes is written by it alone, atomically.

``hspace ... --num-processes N`` starts N local processes with torchrun (``cli/launch.py``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch

from .errors import HspaceError

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by a launcher (accelerate launch, torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Processes:
    """The processes of one job: ``num``, this one's ``index``, and the few collective steps hspace needs."""

    def __init__(self, state=None):
        self.state = state
        self.num = 1 if state is None else state.num_processes
        self.index = 0 if state is None else state.process_index
        self.local_index = 0 if state is None else state.local_process_index

    @classmethod
    def current(cls, device: str | torch.device | None = None) -> "Processes":
        """The job's processes: Accelerate's state when launched as several, else this one process alone.
        ``device`` "cpu" joins CPU processes over gloo even on a machine with GPUs."""
        if not launched():
            return cls()
        try:
            from accelerate import PartialState
        except ImportError:
            raise HspaceError("this process was launched as one of several, which needs accelerate: pip install accelerate torch==2.13.0") from None
        cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
        try:
            return cls(PartialState(cpu=cpu))
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HspaceError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} says this is one of several processes, but they cannot be joined "
                              f"({first}); start them with --num-processes N, accelerate launch or torchrun, or unset WORLD_SIZE") from None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        """This process's device under a launcher (its own GPU), or None: the engine chooses."""
        if self.state is None or self.state.device.type == "cpu":
            return None
        return self.state.device

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's part of ``units``: every num-th one, from its index."""
        return list(units[self.index :: self.num])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def close(self, wait: bool = True) -> None:
        """Wait for every process (unless this one failed), then take the process group down: a process that
        exits with it up can abort in its communication threads ("terminate called without an active exception")."""
        if self.state is not None and torch.distributed.is_initialized():
            if wait:
                self.barrier()
            torch.distributed.destroy_process_group()

    def gather(self, value: Any) -> list:
        """``value`` of every process, in process order, on every process."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def agree(self, value: Any, what: str) -> None:
        """Raise on every process unless every process has the same ``value`` (e.g. a bank's settings)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            bad = next(i for i, v in enumerate(values) if v != values[0])
            raise HspaceError(f"the processes disagree on {what}: process 0 has {values[0]!r}, process {bad} has {values[bad]!r}; "
                              "run the same command with the same options on every process")

    def main_first(self, work, *args, **kwargs):
        """Run ``work`` on the main process while the others wait; its result (or its HspaceError) on all."""
        result, error = None, None
        if self.is_main:
            try:
                result = work(*args, **kwargs)
            except HspaceError as e:
                error = str(e)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise HspaceError(error)
        return result
