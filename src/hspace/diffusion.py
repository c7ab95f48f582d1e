"""The generative process of the paper (Sec. 3, eq. 2-5): the noise schedule and one step.

x_{t-1} = sqrt(a_{t-1}) P_t + D_t + sigma_t z_t, with
P_t = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                        (eq. 3, the predicted x_0)
D_t = sqrt(1 - a_{t-1} - sigma_t^2) eps                            (eq. 4, the direction to x_t)
sigma_t = eta_t sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})   (eq. 5)
where a_t is the cumulative product of alphas (the paper's alpha_t). eta_t = 0 is DDIM, 1 is DDPM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .errors import HspaceError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Schedule:
    """Timesteps of an n-step generative process and the cumulative alphas around each step.

    ``timesteps[i]`` is the t of step i (descending), ``alpha[i]`` is a_t and ``alpha_prev[i]`` is
    a_{t-1} of that step, spaced as diffusers' DDIMScheduler spaces them for the same config.
    """

    timesteps: torch.Tensor  # [T] long, descending
    alpha: torch.Tensor  # [T] float64
    alpha_prev: torch.Tensor  # [T] float64
    prediction_type: str = "epsilon"
    clip_sample: float | None = None  # clip P_t to [-c, c] when the scheduler config asks for it

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_config(cls, scheduler_config: dict, num_steps: int) -> "Schedule":
        """Build the schedule for ``num_steps`` steps from a diffusers scheduler config (any class)."""
        from diffusers import DDIMScheduler

        train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= train_steps:
            raise HspaceError(f"num_steps must be an integer from 1 to {train_steps}, got {num_steps!r}")
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise HspaceError(f"unsupported prediction_type {prediction_type!r}; valid: {PREDICTION_TYPES}")
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long().clone()
        alphas_cumprod = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        # DDIMScheduler.step's rule for the previous timestep, so that steps match it exactly.
        prev = timesteps - train_steps // num_steps
        alpha = alphas_cumprod[timesteps]
        alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
        clip = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
        return cls(timesteps, alpha, alpha_prev, prediction_type, clip)

    def steps(self, start: int, stop: int | None = None) -> "Schedule":
        """The schedule of steps ``start .. stop-1`` only (a head or tail of the process)."""
        part = slice(start, stop)
        return replace(self, timesteps=self.timesteps[part], alpha=self.alpha[part], alpha_prev=self.alpha_prev[part])

    def sigma(self, eta: torch.Tensor) -> torch.Tensor:
        """sigma_t for every step (eq. 5); ``eta`` has one value per step."""
        a, a_prev = self.alpha, self.alpha_prev
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        return eta.double() * variance.clamp(min=0).sqrt()

    def split_output(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps) of step i from the U-Net output, for any prediction type (eq. 3)."""
        a = float(self.alpha[i])
        if self.prediction_type == "epsilon":
            eps = model_output
            p = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
        elif self.prediction_type == "v_prediction":
            p = a**0.5 * x_t - (1 - a) ** 0.5 * model_output
            eps = a**0.5 * model_output + (1 - a) ** 0.5 * x_t
        else:  # "sample"
            p = model_output
            eps = (x_t - a**0.5 * p) / (1 - a) ** 0.5
        if self.clip_sample is not None:
            p = p.clamp(-self.clip_sample, self.clip_sample)
        return p, eps

    def step(
        self,
        i: int,
        x_t: torch.Tensor,
        p: torch.Tensor,
        eps: torch.Tensor,
        sigma: float,
        z: torch.Tensor | None,
    ) -> torch.Tensor:
        """x_{t-1} of step i (eq. 2) from P_t, the eps that D_t uses, sigma_t and z_t."""
        a_prev = float(self.alpha_prev[i])
        d = max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        x_prev = a_prev**0.5 * p + d
        if sigma > 0:
            if z is None:
                raise HspaceError(f"step {i} has sigma_t = {sigma:.4g} > 0 but no noise z_t was given")
            x_prev = x_prev + sigma * z.to(x_prev.dtype)
        return x_prev.to(x_t.dtype)


def spacing_of(scheduler_config: dict) -> str:
    """How a scheduler config spaces the timesteps of an n-step process (part of the spec): diffusers'
    ``timestep_spacing`` (DDIMScheduler's default "leading") and ``steps_offset``."""
    return f"{scheduler_config.get('timestep_spacing', 'leading')}+{int(scheduler_config.get('steps_offset', 0) or 0)}"


def eta_schedule(eta: float | Sequence[float] | torch.Tensor, num_steps: int) -> torch.Tensor:
    """eta_t for every step: one number for all steps, or exactly one value per step, each in [0, 1]
    (above 1 the variance of eq. 5 exceeds 1 - a_{t-1} and D_t of eq. 4 has no real square root)."""
    if isinstance(eta, torch.Tensor):
        values = eta.detach().double().flatten()
    elif isinstance(eta, (int, float)) and not isinstance(eta, bool):
        values = torch.full((num_steps,), float(eta), dtype=torch.float64)
    else:
        try:
            values = torch.tensor([float(e) for e in eta], dtype=torch.float64)
        except (TypeError, ValueError):
            raise HspaceError(f"eta must be a number or a list of numbers, got {eta!r}") from None
    if values.numel() == 1 and num_steps != 1:
        values = values.expand(num_steps).clone()
    if values.numel() != num_steps:
        raise HspaceError(f"eta has {values.numel()} values but the process has {num_steps} steps; give one number or {num_steps}")
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        bad = [v for v in values.tolist() if not 0 <= v <= 1]
        raise HspaceError(f"eta {bad[0]} is out of range; valid: numbers from 0 (DDIM) to 1 (DDPM), one for all steps or one per step")
    return values
