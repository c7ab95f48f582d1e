"""What may happen to h_t at a step of the generative process: interventions on the bottleneck.

An intervention is any callable ``fn(h, ctx) -> h``: ``h`` is the batch's h_t as the U-Net computed it,
``ctx`` a ``StepContext`` (step index, timestep, the batch's rows among the run's samples); it returns
the h the decoder half goes on with (TransformerLens passes ``hook`` to every hook; baukit's
``Trace(edit_output=...)``). ``Engine.run`` applies a list of them in order at every step. The
built-ins cover the paper: ``LinearEdit`` (h + gamma v_t, Sec. 3), ``Replace`` (h-swap, Fig. 3) and
``Record`` (h_t of every step, Sec. 4). An intervention may define ``edits(step) -> bool``: False
where it leaves h unchanged, so that Asyrp's clean pass (``eps_pass="clean"``) runs only where needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .errors import HspaceError


@dataclass(frozen=True)
class StepContext:
    """Where in the process an intervention is called."""

    step: int  # index of the step in the whole process (0 = the noisiest)
    timestep: int
    num_steps: int
    rows: torch.Tensor  # [b] long: which of the run's samples this batch holds
    num_samples: int  # samples in the whole run


class Intervention(Protocol):
    def __call__(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


def edits_at(intervention: Callable, step: int) -> bool:
    """Whether ``intervention`` may change h at ``step`` (a plain function: always)."""
    edits = getattr(intervention, "edits", None)
    return True if edits is None else bool(edits(step))


def apply_all(interventions: Sequence[Callable], h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """h after every intervention, in order; each must keep h's shape."""
    for intervention in interventions:
        out = intervention(h, ctx)
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HspaceError(f"intervention {intervention!r} returned {got} at step {ctx.step}; it must return h of shape {tuple(h.shape)}")
        h = out
    return h


def _active(active: torch.Tensor | None, num_steps: int) -> torch.Tensor:
    if active is None:
        return torch.ones(num_steps, dtype=torch.bool)
    active = torch.as_tensor(active, dtype=torch.bool).flatten()
    if len(active) != num_steps:
        raise HspaceError(f"active has {len(active)} values for {num_steps} steps")
    return active


class Windowed:
    """An intervention that acts at the ``active`` steps only (a timestep window) and leaves h alone elsewhere."""

    active: torch.Tensor  # [T] bool

    def edits(self, step: int) -> bool:
        return bool(self.active[step])

    def __call__(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.apply(h, ctx) if self.active[ctx.step] else h

    def apply(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


class LinearEdit(Windowed):
    """h_t <- h_t + sum_d coefficients[n, d] directions[d, t] at the active steps (paper Sec. 3).

    ``directions`` [D, T, *h_shape]; ``coefficients`` [N, D], one row per sample of the run (sample n
    gets direction d at scale coefficients[n, d]); ``active`` [T] bool (a timestep window), default all.
    """

    def __init__(self, directions: torch.Tensor, coefficients: torch.Tensor, active: torch.Tensor | None = None):
        self.directions = torch.as_tensor(directions, dtype=torch.float32)
        self.coefficients = torch.as_tensor(coefficients, dtype=torch.float32)
        if self.coefficients.ndim != 2 or self.coefficients.shape[1] != self.directions.shape[0]:
            raise HspaceError(
                f"coefficients have shape {tuple(self.coefficients.shape)}; valid: [N, {self.directions.shape[0]}] (one per direction)"
            )
        if not bool(torch.isfinite(self.coefficients).all()):
            raise HspaceError("edit scales must be finite numbers")
        self.active = _active(active, self.directions.shape[1])

    def apply(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        v = self.directions[:, ctx.step].to(h.device)
        coef = self.coefficients[ctx.rows].to(h.device)
        return h + torch.einsum("nd,d...->n...", coef, v).to(h.dtype)


class Replace(Windowed):
    """h_t <- source[n, t] at the active steps: the h of other samples (h-swap, paper Fig. 3)."""

    def __init__(self, source: torch.Tensor, active: torch.Tensor | None = None):
        self.source = torch.as_tensor(source)
        self.active = _active(active, self.source.shape[1])

    def apply(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.source[ctx.rows, ctx.step].to(h.device, h.dtype)


class Record:
    """Keeps h_t of every step as the decoder half saw it: ``h`` [N, T, *h_shape] float32 on the CPU.

    On a GPU the copy of each step's h to the host does not stop the GPU: it goes, asynchronously, into
    pinned memory (a batch's rows are contiguous), and reading ``h`` waits for the copies once."""

    def __init__(self):
        self._h: torch.Tensor | None = None
        self._pending = False

    @property
    def h(self) -> torch.Tensor | None:
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False
        return self._h

    def edits(self, step: int) -> bool:
        return False

    def __call__(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self._h is None:
            self._h = torch.empty(ctx.num_samples, ctx.num_steps, *h.shape[1:], pin_memory=h.is_cuda)
        rows = ctx.rows
        first = int(rows[0])
        if h.is_cuda and bool((rows == torch.arange(first, first + len(rows))).all()):
            self._h[first : first + len(rows), ctx.step].copy_(h.detach().float(), non_blocking=True)
            self._pending = True
        else:
            self._h[rows, ctx.step] = h.detach().float().cpu()
        return h
