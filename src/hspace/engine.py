"""The h-space engine: a diffusers U-Net (+ optional VQ/VAE decoder), its noise schedule, and a hook on h.

Sampling records h_t at every step (paper Sec. 3); a replay injects delta-h_t through the hook into
both P_t and D_t with one U-Net pass per step, or into P_t only with Asyrp's two passes (Kwon et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .diffusion import Schedule, eta_schedule
from .directions.direction import Direction, stack_directions
from .errors import HspaceError
from .hooks import DEFAULT_H_LOCATION, check_location, h_hook
from .loading import DEFAULT_MODEL, Components, load_components, resolve_device, resolve_dtype
from .trajectory import Trajectory, check_seeds, seeded_noise

Callback = Callable[[dict], None]


@dataclass
class HEdit:
    """What happens to h_t at step i of a batch of N: h_t <- (replace_t or h_t) + sum_d coef[n, d] v_d[t]."""

    active: torch.Tensor  # [T] bool: steps at which h is touched at all
    directions: torch.Tensor | None = None  # [D, T, *h_shape]
    coefficients: torch.Tensor | None = None  # [N, D]
    replace: torch.Tensor | None = None  # [N, T, *h_shape]

    def apply(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if not self.active[i]:
            return h
        if self.replace is not None:
            h = self.replace[:, i].to(h.device, h.dtype)
        if self.directions is not None:
            v = self.directions[:, i].to(h.device, torch.float32)
            delta = torch.einsum("nd,d...->n...", self.coefficients.to(h.device, torch.float32), v)
            h = h + delta.to(h.dtype)
        return h

    def chunk(self, rows: torch.Tensor) -> "HEdit":
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return HEdit(self.active, self.directions, pick(self.coefficients), pick(self.replace))


class Engine:
    """A diffusion model with its h-space exposed: sample, replay, edit, swap."""

    def __init__(
        self,
        components: Components,
        h_location: str = DEFAULT_H_LOCATION,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clip_sample: bool | None = None,
    ):
        self.h_location = check_location(h_location)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        # The step arithmetic runs in float32 at least, whatever the U-Net's dtype.
        self.compute_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.name = components.name
        self.scheduler_config = dict(components.scheduler_config)
        # None keeps the model's own setting. Clipping P_t makes high-noise DDIM steps many-to-one, which
        # DDIM inversion cannot undo; clip_sample=False is part of the engine's identity (meta).
        if clip_sample is not None and not isinstance(clip_sample, bool):
            raise HspaceError(f"clip_sample must be True, False or None (the model's setting), got {clip_sample!r}")
        self.clip_override = clip_sample
        if clip_sample is not None:
            self.scheduler_config["clip_sample"] = clip_sample
        self.unet = _prepare(components.unet, self.device, self.dtype)
        self.decoder = None if components.decoder is None else _prepare(components.decoder, self.device, self.dtype)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (self.unet.config.in_channels, *size)
        self._h_shape: tuple[int, ...] | None = None
        self._schedules: dict[int, Schedule] = {}

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        h_location: str = DEFAULT_H_LOCATION,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clip_sample: bool | None = None,
    ) -> "Engine":
        """Load a built-in model by name, a local diffusers folder, or a hub id.

        ``clip_sample`` overrides the scheduler's clipping of P_t (None: the model's own setting)."""
        check_location(h_location)
        return cls(load_components(model), h_location, device, dtype, clip_sample)

    @property
    def meta(self) -> dict:
        meta = {"model": self.name, "h_location": self.h_location}
        if self.clip_override is not None:
            meta["clip_sample"] = self.clip_override
        return meta

    @property
    def h_shape(self) -> tuple[int, ...]:
        """Shape of h_t for one sample, found by one U-Net pass the first time it is asked for."""
        if self._h_shape is None:
            seen = []

            def look(h):
                seen.append(tuple(h.shape[1:]))
                return h

            x = torch.zeros(1, *self.sample_shape, device=self.device, dtype=self.dtype)
            with torch.no_grad(), h_hook(self.unet, self.h_location, look):
                self.unet(x, torch.tensor(0, device=self.device))
            self._h_shape = seen[0]
        return self._h_shape

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images: the sample size, or what the decoder of a latent model makes of it."""
        if self.decoder is None:
            return tuple(self.sample_shape[1:])
        return tuple(self.decode(torch.zeros(1, *self.sample_shape)).shape[2:])

    def schedule(self, num_steps: int) -> Schedule:
        if num_steps not in self._schedules:
            self._schedules[num_steps] = Schedule.from_config(self.scheduler_config, num_steps)
        return self._schedules[num_steps]

    def decode(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from x_0 (through the VQ/VAE decoder of a latent model)."""
        if self.decoder is None:
            return x0
        scale = float(getattr(self.decoder.config, "scaling_factor", 1.0) or 1.0)
        out = []
        with torch.no_grad():
            for part in x0.split(batch_size):
                latents = part.to(self.device, self.dtype) / scale
                out.append(self.decoder.decode(latents).sample.float().cpu())
        return torch.cat(out)

    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x_0 in the U-Net's space from images [B, 3, H, W] in [-1, 1]: the images themselves for a
        pixel model, the autoencoder's latents (times scaling_factor) for a latent model."""
        if self.decoder is None:
            return images.to(self.compute_dtype)
        scale = float(getattr(self.decoder.config, "scaling_factor", 1.0) or 1.0)
        out = []
        with torch.no_grad():
            for part in images.split(batch_size):
                encoded = self.decoder.encode(part.to(self.device, self.dtype))
                latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
                out.append((latents * scale).to(self.compute_dtype).cpu())
        return torch.cat(out)

    def model_output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The U-Net's output at (x_t, t) in the compute dtype (hooks on h apply)."""
        return self.unet(x_t.to(self.device, self.dtype), torch.tensor(t, device=self.device)).sample.to(self.compute_dtype)

    # ------------------------------------------------------------------ the generative process

    def _generate(
        self,
        x_T: torch.Tensor,
        z: torch.Tensor | None,
        schedule: Schedule,
        eta: torch.Tensor,
        edit: HEdit | None,
        asyrp: bool,
        record_h: bool,
        callback: Callback | None,
        progress: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run eq. 2 from x_T with the given noise; returns x_0 and (optionally) h_t at every step."""
        n, steps = x_T.shape[0], schedule.num_steps
        sigma = schedule.sigma(eta)
        recorded = torch.empty(n, steps, *self.h_shape) if record_h else None
        current = {"i": 0, "edit": True}

        def on_h(h: torch.Tensor) -> torch.Tensor:
            if not current["edit"]:  # Asyrp's second, unedited pass
                return h
            i = current["i"]
            if edit is not None:
                h = edit.apply(i, h)
            if recorded is not None:
                recorded[:, i] = h.detach().float().cpu()
            return h

        x = x_T.to(self.device, self.compute_dtype)
        with torch.no_grad(), h_hook(self.unet, self.h_location, on_h):
            for i, t in enumerate(schedule.timesteps.tolist()):
                current.update(i=i, edit=True)
                p, eps = schedule.split_output(i, x, self.model_output(x, t))
                if asyrp and edit is not None and bool(edit.active[i]):
                    # Asyrp: delta-h reaches P_t only; D_t takes eps of a second, unedited pass.
                    current["edit"] = False
                    _, eps = schedule.split_output(i, x, self.model_output(x, t))
                s = float(sigma[i])
                x = schedule.step(i, x, p, eps, s, z[:, i].to(self.device) if s > 0 else None)
                if callback is not None:
                    callback({"step": i, "num_steps": steps, "timestep": t, **progress})
        return x.cpu(), recorded

    def sample(
        self,
        seeds: int | Sequence[int],
        num_steps: int = 50,
        eta: float | Sequence[float] = 1.0,
        *,
        record_h: bool = True,
        keep_noise: bool = True,
        batch_size: int = 32,
        callback: Callback | None = None,
    ) -> Trajectory:
        """Draw one sample per seed (paper eq. 2-5) and record its trajectory.

        Each seed has its own generator (see ``seeded_noise``); eta is a number or one value per step.
        ``keep_noise=False`` drops z (it is regenerated from the seeds when needed).
        """
        seeds = check_seeds(seeds)
        check_batch_size(batch_size)
        schedule = self.schedule(num_steps)
        eta_t = eta_schedule(eta, num_steps)
        chunks = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
        parts = []
        for c, chunk in enumerate(chunks):
            noise = [seeded_noise(s, self.sample_shape, num_steps) for s in chunk]
            x_T = torch.stack([x for x, _ in noise])
            z = torch.stack([z for _, z in noise])
            x0, h = self._generate(
                x_T, z, schedule, eta_t, None, False, record_h, callback, {"chunk": c, "num_chunks": len(chunks)}
            )
            parts.append(self._trajectory(chunk, schedule, eta_t, x_T, x0, h, z if keep_noise else None))
        return Trajectory.cat(parts)

    def _trajectory(self, seeds, schedule, eta, x_T, x0, h, z) -> Trajectory:
        image = None if self.decoder is None else self.decode(x0)
        return Trajectory(seeds, schedule.timesteps, eta, x_T, x0, h, z, image, self.meta)

    def _check_trajectory(self, trajectory: Trajectory) -> Schedule:
        if trajectory.meta and trajectory.meta != self.meta:
            raise HspaceError(f"trajectory was drawn by engine {trajectory.meta}, this engine is {self.meta}")
        if tuple(trajectory.x_T.shape[1:]) != self.sample_shape:
            raise HspaceError(f"trajectory x_T has shape {tuple(trajectory.x_T.shape[1:])}, the model samples {self.sample_shape}")
        schedule = self.schedule(trajectory.num_steps)
        if not torch.equal(schedule.timesteps, trajectory.timesteps.long()):
            raise HspaceError("trajectory timesteps differ from this engine's schedule for the same number of steps")
        return schedule

    def _replay(
        self,
        trajectory: Trajectory,
        source: torch.Tensor,
        edit: HEdit | None,
        asyrp: bool,
        record_h: bool,
        batch_size: int,
        callback: Callback | None,
    ) -> Trajectory:
        """Replay samples ``source`` [N] (indices into ``trajectory``) with its x_T and z, editing h."""
        check_batch_size(batch_size)
        schedule = self._check_trajectory(trajectory)
        noise = trajectory.noise() if bool((schedule.sigma(trajectory.eta) > 0).any()) else None
        rows = torch.arange(len(source)).split(batch_size)
        parts = []
        for c, chunk in enumerate(rows):
            src = source[chunk]
            x0, h = self._generate(
                trajectory.x_T[src],
                None if noise is None else noise[src],
                schedule,
                trajectory.eta,
                None if edit is None else edit.chunk(chunk),
                asyrp,
                record_h,
                callback,
                {"chunk": c, "num_chunks": len(rows)},
            )
            seeds = [trajectory.seeds[i] for i in src.tolist()]
            z = None if trajectory.z is None else trajectory.z[src]
            parts.append(self._trajectory(seeds, schedule, trajectory.eta, trajectory.x_T[src], x0, h, z))
        return Trajectory.cat(parts)

    def active_steps(self, num_steps: int, window: tuple[float, float] | None) -> torch.Tensor:
        """[T] bool: steps whose timestep t lies in ``window`` = (t_start, t_end), t_start >= t >= t_end."""
        timesteps = self.schedule(num_steps).timesteps
        if window is None:
            return torch.ones(num_steps, dtype=torch.bool)
        try:
            start, end = (float(w) for w in window)
        except (TypeError, ValueError):
            raise HspaceError(f"window must be (t_start, t_end), two numbers, got {window!r}") from None
        if start < end:
            raise HspaceError(f"window ({start:g}, {end:g}) must run from the larger timestep to the smaller")
        active = (timesteps <= start) & (timesteps >= end)
        if not active.any():
            raise HspaceError(
                f"window ({start:g}, {end:g}) contains no step; the {num_steps} steps have timesteps "
                f"{int(timesteps[0])} .. {int(timesteps[-1])}"
            )
        return active

    def replay(
        self,
        trajectory: Trajectory,
        delta: Direction | torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        window: tuple[float, float] | None = None,
        asyrp: bool = False,
        record_h: bool = False,
        batch_size: int = 32,
        callback: Callback | None = None,
    ) -> Trajectory:
        """Replay every sample with h_t + scale * delta_t injected (paper Sec. 3); no delta is a plain replay.

        ``delta`` is a Direction, a tensor [T, *h_shape] for every sample, or [B, T, *h_shape] per sample.
        """
        n = len(trajectory)
        edit = None
        if delta is not None:
            if isinstance(delta, Direction):
                delta.check_compatible(self.h_shape, trajectory.num_steps, self.h_location)
                delta = delta.per_step(trajectory.num_steps)
            delta = torch.as_tensor(delta, dtype=torch.float32)
            shape = (trajectory.num_steps, *self.h_shape)
            if tuple(delta.shape) == shape:
                directions, coefficients = delta[None], torch.full((n, 1), float(scale))
            elif tuple(delta.shape) == (n, *shape):
                directions, coefficients = delta, float(scale) * torch.eye(n)
            else:
                raise HspaceError(f"delta has shape {tuple(delta.shape)}; valid: {shape} or {(n, *shape)}")
            edit = HEdit(self.active_steps(trajectory.num_steps, window), directions, coefficients)
        return self._replay(trajectory, torch.arange(n), edit, asyrp, record_h, batch_size, callback)

    def edit(
        self,
        trajectory: Trajectory,
        directions: Direction | Sequence[Direction],
        scales: Sequence[float],
        *,
        window: tuple[float, float] | None = None,
        asyrp: bool = False,
        batch_size: int = 32,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """Images [D, S, B, C, H, W] of every sample edited by every direction at every scale, batched."""
        if isinstance(directions, Direction):
            directions = [directions]
        directions = list(directions)
        if not directions:
            raise HspaceError("no directions given to edit with")
        try:
            scales = [float(s) for s in scales]
        except (TypeError, ValueError):
            raise HspaceError(f"scales must be a list of numbers, got {scales!r}") from None
        if not scales:
            raise HspaceError("scales is empty; give at least one scale, e.g. [-2, 0, 2]")
        steps = trajectory.num_steps
        for d in directions:
            d.check_compatible(self.h_shape, steps, self.h_location)
        n_d, n_s, n_b = len(directions), len(scales), len(trajectory)
        # Batch item (d, s, b) in row-major order: sample b edited by direction d at scale s.
        d_idx, s_idx, b_idx = torch.meshgrid(torch.arange(n_d), torch.arange(n_s), torch.arange(n_b), indexing="ij")
        coefficients = torch.zeros(n_d * n_s * n_b, n_d)
        coefficients[torch.arange(coefficients.shape[0]), d_idx.flatten()] = torch.tensor(scales)[s_idx.flatten()]
        edit = HEdit(self.active_steps(steps, window), stack_directions(directions, steps), coefficients)
        out = self._replay(trajectory, b_idx.flatten(), edit, asyrp, False, batch_size, callback)
        return out.images.reshape(n_d, n_s, n_b, *out.images.shape[1:])

    def swap(
        self,
        trajectory: Trajectory,
        donor: Trajectory,
        *,
        window: tuple[float, float] | None = None,
        batch_size: int = 32,
        callback: Callback | None = None,
    ) -> Trajectory:
        """Replay ``trajectory`` (its x_T and z) with h_t replaced by ``donor``'s h_t (paper Fig. 3)."""
        if donor.h is None:
            raise HspaceError("the donor trajectory has no recorded h; sample it with record_h=True")
        if len(donor) != len(trajectory):
            raise HspaceError(f"swap pairs samples one to one: {len(trajectory)} samples vs {len(donor)} donors")
        if donor.num_steps != trajectory.num_steps or not torch.equal(donor.timesteps, trajectory.timesteps):
            raise HspaceError(f"donor has {donor.num_steps} steps, the trajectory {trajectory.num_steps}; they must match")
        if tuple(donor.h.shape[2:]) != self.h_shape:
            raise HspaceError(f"donor h has shape {tuple(donor.h.shape[2:])}, this engine's h is {self.h_shape}")
        edit = HEdit(self.active_steps(trajectory.num_steps, window), replace=donor.h)
        return self._replay(trajectory, torch.arange(len(trajectory)), edit, False, True, batch_size, callback)

    def x_t(self, trajectory: Trajectory, step: int, *, batch_size: int = 32) -> torch.Tensor:
        """x_t at the start of step ``step`` (0 = x_T, num_steps = x_0) of every sample, [B, C, H, W].

        Replays the first ``step`` steps of eq. 2 with the trajectory's x_T, z and eta through the
        sampling loop itself, so this is the x_t the U-Net saw at that step (no delta-h: for an edited
        replay it is the unedited process).
        """
        check_batch_size(batch_size)
        schedule = self._check_trajectory(trajectory)
        n = trajectory.num_steps
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= n:
            raise HspaceError(f"step must be an integer from 0 to {n} (0 = x_T, {n} = x_0), got {step!r}")
        head = schedule.steps(0, step)
        eta = trajectory.eta[:step]
        noise = trajectory.noise()[:, :step] if bool((head.sigma(eta) > 0).any()) else None
        return self._run_steps(trajectory.x_T, noise, head, eta, batch_size, None)

    def finish(
        self,
        x: torch.Tensor,
        step: int,
        num_steps: int,
        eta: float | Sequence[float] = 1.0,
        z: torch.Tensor | None = None,
        *,
        batch_size: int = 32,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """x_0 from x, taken as x_t at the start of step ``step`` of the ``num_steps``-step process: steps
        ``step .. num_steps-1`` of eq. 2 without delta-h (SDEdit when x is a noised image).

        ``z`` [B, num_steps - step, C, H, W] is the noise of those steps, needed where sigma_t > 0.
        """
        check_batch_size(batch_size)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
            raise HspaceError(f"step must be an integer from 0 to {num_steps - 1} (0 = x_T), got {step!r}")
        tail = self.schedule(num_steps).steps(step)
        return self._run_steps(x, z, tail, eta_schedule(eta, num_steps)[step:], batch_size, callback)

    def _run_steps(self, x, z, schedule: Schedule, eta, batch_size: int, callback: Callback | None) -> torch.Tensor:
        """Run ``schedule`` (a part of a process) from x in batches, without delta-h; returns where it ends."""
        parts = []
        for rows in torch.arange(len(x)).split(batch_size):
            parts.append(self._generate(x[rows], None if z is None else z[rows], schedule, eta, None, False, False, callback, {})[0])
        return torch.cat(parts)


def _prepare(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HspaceError(f"batch_size must be a positive integer, got {batch_size!r}")
