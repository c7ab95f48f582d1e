"""What is done with trajectories, over ``Engine.run`` (the one loop): sampling with h recorded (paper Sec. 3),
replays with delta-h (one pass, or Asyrp's two), edits of directions at scales (``edits.py``), h-swaps (Fig. 3),
and parts of a process (``x_t``, ``finish``). ``Engine`` has these as its methods (``TrajectoryOperations``)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .diffusion import Schedule, eta_schedule
from .directions.direction import Direction
from .errors import HspaceError
from .validate import check_int
from .interventions import LinearEdit, Record, Replace
from .trajectory import Trajectory, check_seeds, seeded_noise, seeded_x_T
from .validate import check_batch_size, check_scales, check_window

if TYPE_CHECKING:
    from .edits import Edit, Edited

Noise = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


def check_trajectory_type(trajectory) -> None:
    if not isinstance(trajectory, Trajectory):
        raise HspaceError(f"expected a Trajectory (from Engine.sample, Trajectory.load or invert), got {type(trajectory).__name__}")


class TrajectoryOperations:
    """The trajectory methods of ``Engine`` (module doc); they use its ``run``, ``schedule``, ``decode`` and checks."""

    def sample(
        self,
        seeds: int | Sequence[int],
        num_steps: int = 50,
        eta: float | Sequence[float] = 1.0,
        *,
        record_h: bool = True,
        keep_noise: bool = True,
        interventions: Sequence[Callable] = (),
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
        prompts: str | Sequence[str] | None = None,
    ) -> Trajectory:
        """Draw one sample per seed (paper eq. 2-5) and record its trajectory.

        Each seed has its own generator (see ``seeded_noise``); eta is a number or one value per step.
        ``keep_noise=False`` drops z (it is regenerated from the seeds when needed). ``interventions`` act on
        h at every step as in ``run``; the recorded h is h after them. ``prompts`` (a conditional model): one
        for all samples or one per seed (a shorter list is cycled); None: the engine's. Each sample records its prompt.
        """
        seeds = check_seeds(seeds)
        prompts = self.prompts_for(prompts, len(seeds))
        check_batch_size(batch_size)
        schedule = self.schedule(num_steps)
        eta_t = eta_schedule(eta, num_steps)
        x_T = torch.stack([seeded_x_T(s, self.sample_shape) for s in seeds])
        kept: list[torch.Tensor] = []

        def noise(rows: torch.Tensor) -> torch.Tensor:
            z = torch.stack([seeded_noise(seeds[r], self.sample_shape, num_steps)[1] for r in rows.tolist()])
            if keep_noise:
                kept.append(z)
            return z

        record = Record() if record_h else None
        x0 = self.run(
            x_T, num_steps, eta_t, noise=noise, interventions=[*interventions] + ([record] if record else []),
            batch_size=batch_size, callback=callback, progress=progress, stage="sampling", prompts=prompts,
        )
        return self._trajectory(seeds, schedule, eta_t, x_T, x0, record and record.h, torch.cat(kept) if keep_noise else None, prompts)

    def _trajectory(self, seeds, schedule, eta, x_T, x0, h, z, prompts: list[str] | None) -> Trajectory:
        image = None if self.decoder is None else self.decode(x0)
        spec = self.spec.with_process(schedule.num_steps, eta.tolist(), schedule.timesteps)
        return Trajectory(seeds, x_T, x0, spec, h, z, image, prompts)

    def check_trajectory(self, trajectory: Trajectory, tolerant: bool = False) -> Schedule:
        check_trajectory_type(trajectory)
        self.spec.check(trajectory.spec, "the trajectory", tolerant=tolerant)
        if tuple(trajectory.x_T.shape[1:]) != self.sample_shape:
            raise HspaceError(f"trajectory x_T has shape {tuple(trajectory.x_T.shape[1:])}, the model samples {self.sample_shape}")
        schedule = self.schedule(trajectory.num_steps)
        if not torch.equal(schedule.timesteps.to(trajectory.timesteps.dtype), trajectory.timesteps):
            raise HspaceError("trajectory timesteps differ from this engine's schedule for the same number of steps")
        return schedule

    def noise_of(self, trajectory: Trajectory, source: torch.Tensor) -> Noise:
        """z of the samples ``source`` (stored, or regenerated batch by batch), None where no step needs it."""
        if not bool((self.schedule(trajectory.num_steps).sigma(trajectory.eta) > 0).any()):
            return None
        if trajectory.z is not None:
            return lambda rows: trajectory.z[source[rows]]
        return lambda rows: trajectory.noise(source[rows].tolist())

    def replay(
        self,
        trajectory: Trajectory,
        delta: Direction | torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        window: tuple[float, float] | None = None,
        interventions: Sequence[Callable] = (),
        source: Sequence[int] | torch.Tensor | None = None,
        eps_pass: str = "edited",
        record_h: bool = False,
        tolerant: bool = False,
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
    ) -> Trajectory:
        """Replay samples with their x_T and z, h_t + scale * delta_t injected (paper Sec. 3); no delta and
        no interventions is a plain (exact) replay.

        ``delta`` is a Direction, a tensor [T, *h_shape] for every sample, or [B, T, *h_shape] per sample;
        ``interventions`` are applied after it. ``source`` picks (and may repeat) the samples to replay.
        ``tolerant=True`` replays a trajectory drawn with another autocast (approximately: ``spec.py``).
        """
        check_batch_size(batch_size)
        schedule = self.check_trajectory(trajectory, tolerant)
        source = torch.arange(len(trajectory)) if source is None else torch.as_tensor(source, dtype=torch.long).flatten()
        if len(source) and not (0 <= int(source.min()) and int(source.max()) < len(trajectory)):
            raise HspaceError(f"source indices must lie in 0..{len(trajectory) - 1}")
        steps = list(interventions)
        if delta is not None:
            steps.insert(0, self._delta_edit(delta, len(source), trajectory.num_steps, scale, window))
        record = Record() if record_h else None
        prompts = trajectory.sample_prompts
        prompts = None if prompts is None else [prompts[i] for i in source.tolist()]
        x0 = self.run(
            trajectory.x_T[source], schedule.num_steps, trajectory.eta, noise=self.noise_of(trajectory, source),
            interventions=steps + ([record] if record else []), eps_pass=eps_pass,
            batch_size=batch_size, callback=callback, progress=progress, stage="replay", prompts=prompts,
        )
        seeds = [trajectory.seeds[i] for i in source.tolist()]
        z = None if trajectory.z is None else trajectory.z[source]
        return self._trajectory(seeds, schedule, trajectory.eta, trajectory.x_T[source], x0, record and record.h, z, prompts)

    def _delta_edit(self, delta, n: int, num_steps: int, scale: float, window) -> LinearEdit:
        scale = check_scales([scale])[0]
        if isinstance(delta, Direction):
            delta = self.direction_at(delta, num_steps).per_step(num_steps)
        delta = torch.as_tensor(delta, dtype=torch.float32)
        shape = (num_steps, *self.h_shape)
        if tuple(delta.shape) == shape:
            directions, coefficients = delta[None], torch.full((n, 1), float(scale))
        elif tuple(delta.shape) == (n, *shape):
            directions, coefficients = delta, float(scale) * torch.eye(n)
        else:
            raise HspaceError(f"delta has shape {tuple(delta.shape)}; valid: {shape} or {(n, *shape)}")
        if not bool(torch.isfinite(delta).all()):
            raise HspaceError("delta holds NaN or infinite values")
        return LinearEdit(directions, coefficients, self.active_steps(num_steps, window))

    def active_steps(self, num_steps: int, window: tuple[float, float] | None) -> torch.Tensor:
        """[T] bool: steps whose timestep t lies in ``window`` = (t_start, t_end), t_start >= t >= t_end."""
        timesteps = self.schedule(num_steps).timesteps
        if window is None:
            return torch.ones(num_steps, dtype=torch.bool)
        start, end = check_window(window)
        active = (timesteps <= start) & (timesteps >= end)
        if not active.any():
            raise HspaceError(
                f"window ({start:g}, {end:g}) contains no step; the {num_steps} steps have timesteps "
                f"{int(timesteps[0])} .. {int(timesteps[-1])}"
            )
        return active

    def edit(
        self,
        trajectory: Trajectory,
        directions: "Edit | Direction | Sequence[Direction]",
        scales: Sequence[float] | None = None,
        *,
        window: tuple[float, float] | None = None,
        eps_pass: str = "edited",
        units: str = "auto",
        tolerant: bool = False,
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
    ) -> "Edited":
        """Every sample edited by every direction at every scale, in one batched run: an ``Edit`` (``edits.py``), or
        directions with scales and the Edit's options (``units``: "auto", the one rule, moves a carded direction in its
        card's effect unit and any other raw). Returns an ``Edited``: ``images`` [D, S, B, C, H, W] with the directions'
        names, the scales as given and as applied, each direction's unit, the seeds (``tolerant`` as in ``replay``)."""
        from .edits import Edit, Edited

        check_trajectory_type(trajectory)
        if isinstance(directions, Edit):
            if scales is not None:
                raise HspaceError("an Edit carries its scales; give either an Edit or directions with scales")
            edit = directions
        else:
            if scales is None:
                raise HspaceError("scales are needed with directions (or give an Edit)")
            edit = Edit(directions, scales, units, window, eps_pass)
        steps = trajectory.num_steps
        deltas = self.directions_at(list(edit.directions), steps)  # each direction checked here, once, before any pass
        raw = edit.raw_scales(steps)  # [D, S]
        n_d, n_s, n_b = len(edit.directions), len(edit.scales), len(trajectory)
        # Batch item (d, s, b) in row-major order: sample b edited by direction d at scale s.
        d_idx, s_idx, b_idx = torch.meshgrid(torch.arange(n_d), torch.arange(n_s), torch.arange(n_b), indexing="ij")
        coefficients = torch.zeros(n_d * n_s * n_b, n_d)
        coefficients[torch.arange(coefficients.shape[0]), d_idx.flatten()] = raw[d_idx.flatten(), s_idx.flatten()]
        linear = LinearEdit(deltas, coefficients, self.active_steps(steps, edit.window))
        out = self.replay(
            trajectory, interventions=[linear], source=b_idx.flatten(), eps_pass=edit.eps_pass, tolerant=tolerant,
            batch_size=batch_size, callback=callback, progress=progress,
        )
        images = out.images.reshape(n_d, n_s, n_b, *out.images.shape[1:])
        return Edited(images, edit.names, list(edit.scales), raw.tolist(), edit.unit_names(), list(trajectory.seeds), trajectory.prompts)

    def swap(
        self,
        trajectory: Trajectory,
        donor: Trajectory,
        *,
        window: tuple[float, float] | None = None,
        tolerant: bool = False,
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
    ) -> Trajectory:
        """Replay ``trajectory`` (its x_T and z) with h_t replaced by ``donor``'s h_t (paper Fig. 3; ``tolerant``
        as in ``replay``)."""
        check_trajectory_type(trajectory)
        check_trajectory_type(donor)
        if donor.h is None:
            raise HspaceError("the donor trajectory has no recorded h; sample it with record_h=True")
        if len(donor) != len(trajectory):
            raise HspaceError(f"swap pairs samples one to one: {len(trajectory)} samples vs {len(donor)} donors")
        if donor.num_steps != trajectory.num_steps or not torch.equal(donor.timesteps, trajectory.timesteps):
            raise HspaceError(f"donor has {donor.num_steps} steps, the trajectory {trajectory.num_steps}; they must match")
        self.space.check(replace(donor.spec.space, h_shape=self.h_shape), "the donor trajectory")  # its h, a point of the same h-space
        if tuple(donor.h.shape[2:]) != self.h_shape:
            raise HspaceError(f"donor h has shape {tuple(donor.h.shape[2:])}, this engine's h is {self.h_shape}")
        swap = Replace(donor.h, self.active_steps(trajectory.num_steps, window))
        return self.replay(trajectory, interventions=[swap], record_h=True, tolerant=tolerant, batch_size=batch_size, callback=callback, progress=progress)

    def x_t(self, trajectory: Trajectory, step: int, *, tolerant: bool = False, batch_size: int = 32) -> torch.Tensor:
        """x_t at the start of step ``step`` (0 = x_T, num_steps = x_0) of every sample, [B, C, H, W]:
        the first ``step`` steps of eq. 2 with the trajectory's x_T, z and eta, without delta-h."""
        self.check_trajectory(trajectory, tolerant)
        n = trajectory.num_steps
        check_int("step", step, 0, n, valid=f"an integer from 0 to {n} (0 = x_T, {n} = x_0)")
        noise = self.noise_of(trajectory, torch.arange(len(trajectory)))
        return self.run(trajectory.x_T, n, trajectory.eta, noise=noise, stop=step, batch_size=batch_size, progress=False,
                        prompts=trajectory.sample_prompts)

    def finish(
        self,
        x: torch.Tensor,
        step: int,
        num_steps: int,
        eta: float | Sequence[float] = 1.0,
        z: torch.Tensor | None = None,
        *,
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
        prompts: str | Sequence[str] | None = None,
    ) -> torch.Tensor:
        """x_0 from x, taken as x_t at the start of step ``step`` of the ``num_steps``-step process: steps
        ``step .. num_steps-1`` of eq. 2 without delta-h (SDEdit when x is a noised image).

        ``z`` [B, num_steps - step, C, H, W] is the noise of those steps, needed where sigma_t > 0.
        """
        check_int("step", step, 0, num_steps - 1, valid=f"an integer from 0 to {num_steps - 1} (0 = x_T)")
        noise = None if z is None else (lambda rows: torch.cat([torch.zeros(len(rows), step, *z.shape[2:]), z[rows]], 1))
        return self.run(x, num_steps, eta, noise=noise, start=step, batch_size=batch_size, callback=callback, progress=progress, stage="finish",
                        prompts=prompts)
