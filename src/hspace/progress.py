"""Typed progress events and the meter that counts a job's work in U-Net passes.

Every long operation (sampling, replays and edits, banks, inversion, Jacobian directions) reports
through one ``Meter``: ``done`` and ``total`` count sample-passes through the U-Net (one sample through
the whole U-Net, or through its decoder half for a Jacobian product), so one progress bar serves them
all. A callback receives a ``StepEvent`` after every step of the generative process (k-diffusion's
``callback({'x', 'i', 'sigma', 'denoised'})``, diffusers' ``callback_on_step_end``) and an
``IterationEvent`` after every Jacobian subspace iteration.

A public function that takes ``callback`` also takes ``progress``: True draws a tqdm bar on stderr
(the default, unless the environment sets ``HSPACE_NO_PROGRESS=1``), False draws none. Nested calls
share the outer job's meter: passing a ``Meter`` as ``callback`` makes the inner call count into it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch

from .errors import HspaceError


@dataclass(frozen=True)
class StepEvent:
    """After step ``step`` of the generative process of the batch rows ``rows``."""

    stage: str
    step: int  # index in the whole process, 0 = the first (noisiest) step
    num_steps: int
    timestep: int
    rows: torch.Tensor  # [b] indices of this batch's samples in the call
    x_t: torch.Tensor  # [b, C, H, W] the state the step started from
    x0_pred: torch.Tensor  # [b, C, H, W] P_t, the predicted x_0 (eq. 3)
    x_next: torch.Tensor  # [b, C, H, W] x_{t-1}
    done: int  # U-Net sample-passes of the job done, this step included
    total: int
    output: torch.Tensor | None = None  # [b, C, H, W] the denoiser's output that made P_t (None where not run: inversion)


@dataclass(frozen=True)
class IterationEvent:
    """After one iteration of Jacobian subspace iteration (Alg. 1 / 2) at one step."""

    stage: str
    step: int
    iteration: int
    max_iter: int
    change: float  # largest relative change of a kept singular value
    block: int
    num_blocks: int
    done: int
    total: int


Event = Union[StepEvent, IterationEvent]
Callback = Callable[[Event], None]


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` as given, or (None) on unless HSPACE_NO_PROGRESS is set to a non-empty value other than 0."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("HSPACE_NO_PROGRESS", "") in ("", "0")


class Meter:
    """Counts one job's U-Net passes, calls the user's callback with each event and draws the bar."""

    def __init__(self, total: int, callback: Callable | None = None, progress: bool | None = None, desc: str = "", done: int = 0, scale: int = 1):
        self.total, self.done, self.callback, self.desc = int(total), int(done), callback, desc
        self.scale = int(scale)  # each pass counts this many times: one process's share standing for all of them
        self.bar = None
        if progress_enabled(progress):
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, total=self.total, initial=self.done, unit="pass", file=sys.stderr, dynamic_ncols=True)

    @classmethod
    @contextlib.contextmanager
    def job(cls, callback, total: int, progress: bool | None = None, desc: str = "", done: int = 0, scale: int = 1) -> Iterator["Meter"]:
        """A meter for a job of ``total`` passes, closed when the job ends; an outer job's meter
        (passed as ``callback``) is used as it is, since its total already counts this work."""
        if isinstance(callback, Meter):
            yield callback
            return
        meter = cls(total, callback, progress, desc, done, scale)
        try:
            yield meter
        finally:
            meter.close()

    def emit(self, event_type: type, passes: int, **fields) -> None:
        """Count ``passes`` more and report an event of ``event_type`` with ``fields`` and the counts."""
        self.skip(passes)
        if self.callback is not None:
            self.callback(event_type(**fields, done=self.done, total=self.total))

    def skip(self, passes: int) -> None:
        """Count ``passes`` (run, or saved by early convergence) and redraw the bar at tqdm's usual rate."""
        self.done = min(self.total, self.done + int(passes) * self.scale)
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def step_end_callback(fn: Callable, pipeline=None) -> Callable:
    """A ``callback`` for hspace's calls from a diffusers-style ``callback_on_step_end(pipe, step, timestep, kwargs)``:
    ``fn`` gets ``pipeline`` (None unless given), the step index, the timestep and ``{"latents": x_{t-1}, "x0_pred":
    P_t, "rows": the batch's samples}`` after every step of every batch. Its return value is ignored: hspace's process
    stays replayable (change h with interventions, not the latents)."""
    if not callable(fn):
        raise HspaceError(f"callback_on_step_end must be callable, got {type(fn).__name__}")

    def callback(event) -> None:
        if isinstance(event, StepEvent):
            fn(pipeline, event.step, event.timestep, {"latents": event.x_next, "x0_pred": event.x0_pred, "rows": event.rows})

    return callback
