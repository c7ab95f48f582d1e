"""What may happen to h_t at a step of the generative process: interventions on the bottleneck.

An intervention is any callable ``fn(h, ctx) -> h``: ``h`` is the batch's h_t as the U-Net computed it,
``ctx`` a ``StepContext`` (step index, timestep, the batch's rows among the run's samples, the pass); it
returns the h the decoder half goes on with (TransformerLens passes ``hook`` to every hook; baukit's
``Trace(edit_output=...)``). This one signature reaches the model: the engine hands the list to the
model wrapper, which calls each intervention in order at every step, and is the only place that knows how
the denoiser is called. The built-ins cover the paper: ``LinearEdit`` (h + gamma v_t, Sec. 3), ``Replace``
(h-swap, Fig. 3) and ``Record`` (h_t of every step, Sec. 4). An intervention may define
``edits(step) -> bool``: False where it leaves h unchanged, so that Asyrp's clean pass
(``eps_pass="clean"``) runs only where needed.

Under classifier-free guidance a step runs two passes, and an intervention's ``branch`` attribute says which
h it sees (``ctx.branch`` tells it):
- None (the default): where the spec's ``guide_edit`` sends delta-h: the conditional pass's h ("cond"), the
  unconditional one's ("uncond"), or for "both" the mean of the two, whose change is added to both passes
  (``ctx.branch`` None). Without guidance: the one pass (``ctx.branch`` None).
- "cond" or "uncond": that pass's h, whatever ``guide_edit`` is (an error on a model without that pass);
- "both": called once per pass, the unconditional first.
So recording does not depend on where delta-h goes: ``Record(branch="uncond")`` records the unconditional
pass's h, which is what the paper's official code records (its hook sees the unconditional half of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    branch: str | None = None  # the pass under guidance: "cond", "uncond", or None (the one pass, or both's mean)
    location: str | None = None  # the hook point whose h this is (its name as the model lists it)

    def on(self, branch: str | None) -> "StepContext":
        return self if branch == self.branch else replace(self, branch=branch)

    def at(self, location: str | None) -> "StepContext":
        return self if location == self.location else replace(self, location=location)


class Intervention(Protocol):
    def __call__(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


def locations_of(intervention: Callable) -> tuple[str | None, ...]:
    """The hook points where ``intervention`` acts (its ``locations``, names as the model lists them: ``mid.in``,
    ``block.3``); (None,): the engine's own h location."""
    locations = getattr(intervention, "locations", None)
    if locations is None:
        return (None,)
    if isinstance(locations, str):
        return (locations,)
    locations = tuple(locations)
    if not locations or not all(isinstance(name, str) for name in locations):
        raise HspaceError(f"intervention {intervention!r} names locations {locations!r}; valid: a list of h location names (None: the engine's)")
    return locations


def edits_at(intervention: Callable, step: int) -> bool:
    """Whether ``intervention`` may change h at ``step`` (a plain function: always)."""
    edits = getattr(intervention, "edits", None)
    return True if edits is None else bool(edits(step))


BRANCHES = (None, "cond", "uncond", "both")


def branch_of(intervention: Callable) -> str | None:
    """The pass(es) whose h ``intervention`` asks to see (module doc); None: where delta-h goes."""
    branch = getattr(intervention, "branch", None)
    if branch not in BRANCHES:
        raise HspaceError(f"intervention {intervention!r} asks for branch {branch!r}; valid: None, 'cond', 'uncond', 'both'")
    return branch


def apply(intervention: Callable, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """h after ``intervention``, which must keep its shape."""
    out = intervention(h, ctx)
    if not isinstance(out, torch.Tensor) or out.shape != h.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HspaceError(f"intervention {intervention!r} returned {got} at step {ctx.step}; it must return h of shape {tuple(h.shape)}")
    return out


def apply_all(interventions: Sequence[Callable], h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """h of a single pass after every intervention, in order (an intervention asking for a pass under
    guidance is an error here: there is only one)."""
    for intervention in interventions:
        branch = branch_of(intervention)
        if branch is not None:
            raise HspaceError(f"intervention {intervention!r} asks for the {branch!r} pass(es), but this model runs one pass per "
                              "step (no classifier-free guidance); valid here: branch None")
        h = apply(intervention, h, ctx)
    return h


def context(t: int, n: int) -> StepContext:
    """The context of one pass outside a process (a probe of h's shape, the Jacobian's centre)."""
    return StepContext(0, int(t), 1, torch.arange(n), n)


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
        if ctx.step >= len(self.active):
            raise HspaceError(f"{type(self).__name__} holds {len(self.active)} steps, but this run has {ctx.num_steps}; "
                              "resample its directions to the run's steps (Direction.at or per_step)")
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

    ``branch`` (module doc) chooses the pass under guidance: None (where delta-h goes), "cond", "uncond", or
    "both", whose ``h`` is [N, T, 2, *h_shape] with the unconditional pass first. ``locations`` (names of hook
    points: ``["block.2", "block.5"]``) records h at each of them in the same run (``h_at(name)``,
    ``by_location()``); None records the engine's h location.
    On a GPU the copy of each step's h to the host does not stop the GPU: it goes, asynchronously, into
    pinned memory (a batch's rows are contiguous), and reading ``h`` waits for the copies once."""

    def __init__(self, branch: str | None = None, locations: str | Sequence[str] | None = None):
        if branch not in BRANCHES:
            raise HspaceError(f"unknown branch {branch!r}; valid: None (where delta-h goes), 'cond', 'uncond', 'both'")
        self.branch = branch
        self.locations = None if locations is None else ((locations,) if isinstance(locations, str) else tuple(locations))
        if self.locations is not None:
            locations_of(self)
        self._h: dict[tuple[str | None, str | None], torch.Tensor] = {}  # (location, branch) -> h
        self._pending = False

    def _wait(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False

    def _of(self, location: str | None) -> torch.Tensor | None:
        stored = {branch: h for (where, branch), h in self._h.items() if where == location}
        if self.branch == "both":
            return torch.stack([stored["uncond"], stored["cond"]], 2) if len(stored) == 2 else None
        return next(iter(stored.values()), None)

    @property
    def h(self) -> torch.Tensor | None:
        """h at the one location recorded (None before a run)."""
        self._wait()
        seen = list(dict.fromkeys(where for where, _ in self._h))
        if len(seen) > 1:
            raise HspaceError(f"this record holds h at {len(seen)} locations ({', '.join(map(str, seen))}): read one with h_at(name)")
        return self._of(seen[0]) if seen else None

    def h_at(self, location: str) -> torch.Tensor:
        """h at ``location`` (a name as the model lists it)."""
        self._wait()
        seen = list(dict.fromkeys(where for where, _ in self._h))
        if location not in seen:
            raise HspaceError(f"no h recorded at {location!r}; recorded: {', '.join(map(str, seen)) or 'nothing yet'}")
        return self._of(location)

    def by_location(self) -> dict[str, torch.Tensor]:
        """Every location's h, in the order of the hooks' first calls (forward order)."""
        self._wait()
        return {where: self._of(where) for where in dict.fromkeys(where for where, _ in self._h)}

    def edits(self, step: int) -> bool:
        return False

    def __call__(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        key = (ctx.location, ctx.branch)
        if key not in self._h:
            self._h[key] = torch.empty(ctx.num_samples, ctx.num_steps, *h.shape[1:], pin_memory=h.is_cuda)
        store, rows = self._h[key], ctx.rows
        first = int(rows[0])
        if h.is_cuda and bool((rows == torch.arange(first, first + len(rows))).all()):
            store[first : first + len(rows), ctx.step].copy_(h.detach().float(), non_blocking=True)
            self._pending = True
        else:
            store[rows, ctx.step] = h.detach().float().cpu()
        return h
