"""Fast edits of a sample already drawn: what the editor shows while a slider moves.

An edit replays the sample's whole process (eq. 2) with delta-h added: one denoiser pass per step, ~0.55 s
for 25 steps of the bundled model at batch 1 on a 2-core CPU. Given the sample's ``Reference`` (its unedited
run, step by step: x_t and the denoiser's output, recorded once), two things make it cheaper:

- Exact: before the first step that delta-h touches, the edited process is the unedited one, so the replay
  starts there from the reference's x_t. A window that starts late costs only its steps and those after.
- Approximate (``computed``: the steps where the denoiser runs): at the other steps its output is the
  reference's output at that step plus the change the edit made to the output at the last step where it ran:
  out'_i ~ out_i + (out'_j - out_j). The output itself changes a lot from step to step, the edit's change of
  it slowly. Under Asyrp (``eps_pass="clean"``) the clean pass's change is held the same way. The result is a
  preview of the edit, not the edit. ``preview_steps`` is the editor's choice: every 2nd step over the first
  half of the steps that run, every 4th over the second (10 passes of 25), because on the bundled model the
  early steps decide what the image becomes (a hat kept or removed) and every 3rd step there already misses
  such a change. Holding the output itself (out'_i ~ out'_j, "step caching") is several times worse. Its
  fidelity, measured: ``benchmarks/bench_ui.py --fidelity`` (docs/ui.md).

With every step computed (the default) it is exact: equal to ``Engine.edit`` of the trajectory (tests/test_preview.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .engine import Exact
from .errors import HspaceError
from .interventions import LinearEdit

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """The unedited run of a trajectory's samples: x_t at the start of every step and the denoiser's output
    there (the one that made P_t; under guidance, the guided one)."""

    x: torch.Tensor  # [B, T, C, H, W]
    output: torch.Tensor  # [B, T, C, H, W]

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def cat(cls, references: list["Reference"]) -> "Reference":
        return cls(torch.cat([r.x for r in references]), torch.cat([r.output for r in references]))


class Recorder:
    """A ``callback`` for ``Engine.run`` (and what calls it: ``sample``, ``replay``) that keeps what a
    ``Reference`` holds, for the N samples of the run."""

    def __init__(self, n: int, num_steps: int):
        self.n, self.num_steps = n, num_steps
        self.x: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.seen = torch.zeros(n, num_steps, dtype=torch.bool)

    def __call__(self, event) -> None:
        if not hasattr(event, "x_t") or event.output is None:
            return
        if self.x is None:
            self.x = torch.zeros(self.n, self.num_steps, *event.x_t.shape[1:])
            self.output = torch.zeros(self.n, self.num_steps, *event.output.shape[1:])
        self.x[event.rows, event.step] = event.x_t.float().cpu()
        self.output[event.rows, event.step] = event.output.float().cpu()
        self.seen[event.rows, event.step] = True

    def reference(self) -> Reference:
        if self.x is None or not bool(self.seen.all()):
            raise HspaceError("the run did not cover every step of every sample; a reference needs the whole process")
        return Reference(self.x, self.output)


def reference(engine, trajectory) -> Reference:
    """The ``Reference`` of a trajectory: one unedited replay (exact), recorded."""
    recorder = Recorder(len(trajectory), trajectory.num_steps)
    engine.replay(trajectory, callback=recorder, progress=False)
    return recorder.reference()


def sample(engine, seeds, num_steps: int, eta: float, **options):
    """``engine.sample`` that also returns the samples' ``Reference`` (no extra pass)."""
    recorder = Recorder(len(seeds), num_steps)
    trajectory = engine.sample(seeds, num_steps, eta, callback=recorder, **options)
    return trajectory, recorder.reference()


def preview_steps(start: int, num_steps: int) -> list[int]:
    """The steps where the denoiser runs in the editor's preview of an edit that starts at ``start`` (module doc)."""
    half = start + 2 * ((num_steps - start) // 4)
    return sorted({*range(start, half, 2), *range(half, num_steps, 4), num_steps - 1})


class Preview(Exact):
    """The editor's preview as ``Engine.run``'s strategy (module doc): the denoiser (or ``denoiser``, the compiled
    one) at the ``computed`` steps, and at the others its output estimated from the reference; the first step of the
    run must be one that it computes."""

    def __init__(self, reference: Reference, computed, denoiser: Callable | None = None):
        self.reference, self.computed, self.denoiser = reference, set(computed), denoiser
        self.change: torch.Tensor | None = None
        self.clean_change: torch.Tensor | None = None

    def computes(self, i: int) -> bool:
        return i in self.computed

    def outputs(self, model, i, rows, state, t, interventions, ctx, condition, clean: bool, dtype):
        if i not in self.computed:
            return self.estimate(i, rows, clean)
        output = (self.denoiser or model.output)(state, t, interventions, ctx, condition).to(dtype)
        clean_output = model.output(state, t, condition=condition).to(dtype) if clean else None
        self.observe(i, rows, output, clean_output)
        return output, clean_output

    def observe(self, i: int, rows: torch.Tensor, output: torch.Tensor, clean_output: torch.Tensor | None) -> None:
        reference = self.reference.output[rows, i].to(output.device, output.dtype)
        if self.change is None:
            self.change = torch.zeros(len(self.reference), *output.shape[1:], dtype=output.dtype, device=output.device)
        self.change[rows] = output - reference
        if clean_output is not None:
            if self.clean_change is None:
                self.clean_change = torch.zeros_like(self.change)
            self.clean_change[rows] = clean_output - reference

    def estimate(self, i: int, rows: torch.Tensor, clean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        reference = self.reference.output[rows, i].to(self.change.device, self.change.dtype)
        held = None if not clean else reference + (self.clean_change[rows] if self.clean_change is not None else 0)
        return reference + self.change[rows], held


def first_edited_step(delta: torch.Tensor) -> int | None:
    """The first step where ``delta`` [T, *h_shape] is not zero (None: it is zero everywhere)."""
    nonzero = delta.flatten(1).abs().amax(1) > 0
    return int(nonzero.nonzero()[0]) if bool(nonzero.any()) else None


def compiled_denoiser(engine) -> Callable | None:
    """The engine's denoiser compiled for additive edits (``Backbone.compiled_additive``), compiled now by one
    pass; None where the model has no such path (a conditional or transformer model) or compiling fails here
    (no C++ compiler): previews then run eagerly."""
    try:
        denoiser = engine.model.compiled_additive()
        if denoiser is None:
            return None
        x = torch.zeros(1, *engine.sample_shape)
        denoiser(x, engine.schedule(2).t(0), [LinearEdit(torch.zeros(1, 1, *engine.h_shape), torch.zeros(1, 1))])
    except Exception as e:  # noqa: BLE001 - any failure of the compiler leaves the eager path, which always works
        logger.warning("previews run eagerly: compiling the denoiser failed (%s: %s)", type(e).__name__, str(e)[:200])
        return None
    return denoiser


def edit(engine, trajectory, reference: Reference, delta: torch.Tensor, *, eps_pass: str = "edited", computed: Sequence[int] | None = None,
         callback: Callable | None = None, denoiser: Callable | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] of the trajectory's samples edited by ``delta`` [T, *h_shape] (one delta for all),
    from the first step it touches on. ``computed``: the steps where the denoiser runs, the first edited step among
    them (the editor's preview: ``preview_steps``; module doc); None: every step, exact. ``denoiser``: another
    implementation of the edited pass (``compiled_denoiser``)."""
    schedule = engine.check_trajectory(trajectory)
    n, steps = len(trajectory), trajectory.num_steps
    if len(reference) != n or reference.x.shape[1] != steps:
        raise HspaceError(f"the reference holds {len(reference)} samples of {reference.x.shape[1]} steps; the trajectory {n} of {steps}")
    delta = torch.as_tensor(delta, dtype=torch.float32)
    if tuple(delta.shape) != (steps, *engine.h_shape):
        raise HspaceError(f"delta has shape {tuple(delta.shape)}; valid: {(steps, *engine.h_shape)}")
    start = first_edited_step(delta)
    if start is None:
        return trajectory.images
    if computed is not None and start not in computed:
        raise HspaceError(f"the denoiser must run at the first edited step {start}; computed steps: {sorted(computed)}")
    strategy = None if computed is None else Preview(reference, computed, denoiser)
    x0 = engine.run(
        reference.x[:, start], schedule.num_steps, trajectory.eta, noise=engine.noise_of(trajectory, torch.arange(n)), start=start,
        interventions=[LinearEdit(delta[None], torch.ones(n, 1))], eps_pass=eps_pass, callback=callback, progress=False,
        prompts=trajectory.sample_prompts, strategy=strategy, stage="replay" if strategy is None else "preview",
    )
    return x0 if engine.decoder is None else engine.decode(x0)
