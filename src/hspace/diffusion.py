"""The generative process (paper Sec. 3, eq. 2-5) as a plug-in: a Gaussian path and one step.

Both processes hspace runs are Gaussian paths x_t = a_t x_0 + s_t eps:
- the DDPM/DDIM family (diffusers' DDPM/DDIM/... schedulers): a_t = sqrt(alpha_t), s_t = sqrt(1 - alpha_t),
  alpha_t the cumulative product of the alphas (the paper's alpha_t);
- flow matching (``FlowMatchEulerDiscreteScheduler``, SD3, FLUX, ...): a_t = 1 - sigma_t, s_t = sigma_t, with
  the scheduler's sigmas (its shift, or the dynamic shift ``mu`` a pipeline sets from the image size).

The model's output gives P_t (the predicted x_0, eq. 3) and the predicted eps:
  epsilon:       eps = out,                    P_t = (x_t - s_t eps) / a_t
  v_prediction:  P_t = a_t x_t - s_t v,        eps = a_t v + s_t x_t          (a_t^2 + s_t^2 = 1)
  sample:        P_t = out,                    eps = (x_t - a_t P_t) / s_t
  flow:          v = eps - x_0, so P_t = x_t - s_t v,  eps = x_t + a_t v       (a_t + s_t = 1)
and a step (eq. 2, with s_{t-1} written for the noise coefficient of the next state) is
  x_{t-1} = a_{t-1} P_t + sqrt(s_{t-1}^2 - sigma_t^2) eps + sigma_t z_t.                       (eq. 2, 4)
sigma_t = eta_t times the std of the posterior q(x_{t-1} | x_t, x_0) of the path: the forward step from
t-1 to t is x_t = (a_t / a_{t-1}) x_{t-1} + noise of variance s_t^2 - (a_t / a_{t-1})^2 s_{t-1}^2, so
  sigma_t^2 = eta_t^2 (s_{t-1}^2 / s_t^2) (s_t^2 - (a_t / a_{t-1})^2 s_{t-1}^2)                 (eq. 5)
which for the DDPM family is eq. 5 of the paper, (1 - alpha_{t-1}) / (1 - alpha_t) (1 - alpha_t / alpha_{t-1}).

With eta = 0 a flow-matching step is the pipeline's Euler step: a_{t-1} P_t + s_{t-1} eps with a = 1 - s is
(1 - s')(x - s v) + s'(x + (1 - s) v) = x + (s' - s) v, FlowMatchEulerDiscreteScheduler.step. With eta > 0
it is the stochastic sampler of the same path: its z_t are stored in a trajectory, so exact replay, Asyrp
(delta-h in P_t only), edit-friendly inversion and x_t mean what they mean for DDPM.

The schedule stores the squares alpha = a^2 and var = s^2 (float64): for the DDPM family these are the
scheduler's own alphas_cumprod and 1 - alphas_cumprod, so its arithmetic is unchanged bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .errors import HspaceError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass(frozen=True)
class Schedule:
    """Timesteps of an n-step generative process and the path's coefficients around each step.

    ``timesteps[i]`` is the model's timestep input at step i (descending; integers for the DDPM family,
    sigma * num_train_timesteps for flow matching); ``alpha[i]`` / ``var[i]`` are a_t^2 / s_t^2 there and
    ``alpha_prev[i]`` / ``var_prev[i]`` those of the state the step goes to.
    """

    timesteps: torch.Tensor  # [T] descending
    alpha: torch.Tensor  # [T] float64, a_t^2
    alpha_prev: torch.Tensor  # [T] float64
    prediction_type: str = "epsilon"
    clip_sample: float | None = None  # clip P_t to [-c, c] when the scheduler config asks for it
    var: torch.Tensor | None = None  # [T] float64, s_t^2 (default 1 - alpha: variance preserving)
    var_prev: torch.Tensor | None = None
    process: str = "ddpm"  # "ddpm" (the DDPM/DDIM family) or "flow" (flow matching)

    def __post_init__(self):
        if self.var is None:
            object.__setattr__(self, "var", 1 - self.alpha)
            object.__setattr__(self, "var_prev", 1 - self.alpha_prev)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def t(self, i: int) -> int | float:
        """The model's timestep at step i: an int for the DDPM family, a float for flow matching."""
        return float(self.timesteps[i]) if self.process == "flow" else int(self.timesteps[i])

    def a(self, i: int) -> float:
        return float(self.alpha[i]) ** 0.5

    def s(self, i: int) -> float:
        return float(self.var[i]) ** 0.5

    def noised(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t of step i on the path: a_t x_0 + s_t eps."""
        return self.a(i) * x0 + self.s(i) * eps

    @classmethod
    def from_config(cls, scheduler_config: dict, num_steps: int, **options) -> "Schedule":
        """The schedule for ``num_steps`` steps from a diffusers scheduler config: flow matching for
        ``FlowMatchEulerDiscreteScheduler`` (``options``: what the pipeline passes to its set_timesteps,
        ``mu`` for dynamic shifting, ``sigmas``), else the DDPM family spaced as DDIMScheduler spaces it."""
        train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= train_steps:
            raise HspaceError(f"num_steps must be an integer from 1 to {train_steps}, got {num_steps!r}")
        if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
            return cls._flow(scheduler_config, num_steps, options)
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES[:3]:
            raise HspaceError(f"unsupported prediction_type {prediction_type!r}; valid: {PREDICTION_TYPES[:3]}")
        from diffusers import DDIMScheduler

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

    @classmethod
    def _flow(cls, scheduler_config: dict, num_steps: int, options: dict) -> "Schedule":
        """Flow matching: the scheduler's own sigmas (shift, dynamic shift, Karras/exponential/beta spacing)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if scheduler.config.get("stochastic_sampling"):
            raise HspaceError("the scheduler config sets stochastic_sampling, a sampler of its own; hspace's eta > 0 is the "
                              "stochastic sampler of the path (diffusion.py): set stochastic_sampling false and choose eta")
        if scheduler.config.use_dynamic_shifting and options.get("mu") is None:
            raise HspaceError("the scheduler uses dynamic shifting and needs mu (the pipeline computes it from the image size)")
        sigmas = options.get("sigmas")
        scheduler.set_timesteps(num_steps if sigmas is None else None, sigmas=sigmas, mu=options.get("mu"))
        sig = scheduler.sigmas.double()
        if len(sig) != num_steps + 1:
            raise HspaceError(f"the flow-matching scheduler made {len(sig) - 1} steps for num_steps={num_steps}")
        a, a_prev = 1 - sig[:-1], 1 - sig[1:]
        return cls(scheduler.timesteps.double().clone(), a * a, a_prev * a_prev, "flow", None, sig[:-1] ** 2, sig[1:] ** 2, "flow")

    def steps(self, start: int, stop: int | None = None) -> "Schedule":
        """The schedule of steps ``start .. stop-1`` only (a head or tail of the process)."""
        part = slice(start, stop)
        return replace(self, timesteps=self.timesteps[part], alpha=self.alpha[part], alpha_prev=self.alpha_prev[part],
                       var=self.var[part], var_prev=self.var_prev[part])

    def sigma(self, eta: torch.Tensor) -> torch.Tensor:
        """sigma_t for every step (eq. 5, module doc); ``eta`` has one value per step."""
        a, a_prev = self.alpha, self.alpha_prev
        if self.process == "ddpm":
            variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        else:
            variance = self.var_prev / self.var * (self.var - a / a_prev * self.var_prev)
        return eta.double() * variance.clamp(min=0).sqrt()

    def split_output(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps) of step i from the model output, for any prediction type (eq. 3, module doc)."""
        a, v = float(self.alpha[i]), float(self.var[i])
        if self.prediction_type == "epsilon":
            eps = model_output
            p = (x_t - v**0.5 * eps) / a**0.5
        elif self.prediction_type == "v_prediction":
            p = a**0.5 * x_t - v**0.5 * model_output
            eps = a**0.5 * model_output + v**0.5 * x_t
        elif self.prediction_type == "flow":
            p = x_t - v**0.5 * model_output
            eps = x_t + a**0.5 * model_output
        else:  # "sample"
            p = model_output
            eps = (x_t - a**0.5 * p) / v**0.5
        if self.clip_sample is not None:
            p = p.clamp(-self.clip_sample, self.clip_sample)
        return p, eps

    def eps_scale(self, i: int) -> float:
        """d eps / d(model output) at step i: what the Jacobian of eps is, per unit of the model's output
        (1 for eps-prediction; SM Sec. E for the others)."""
        a = float(self.alpha[i])
        if self.prediction_type in ("v_prediction", "flow"):
            return math.sqrt(a)  # eps = sqrt(a) v + sqrt(1 - a) x_t; flow: eps = x_t + (1 - sigma) v, a = (1 - sigma)^2
        if self.prediction_type == "sample":
            return -math.sqrt(a) / math.sqrt(float(self.var[i]))  # eps = (x_t - sqrt(a) x_0) / sqrt(1 - a)
        return 1.0

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
        a_prev, var_prev = float(self.alpha_prev[i]), float(self.var_prev[i])
        d = max(var_prev - sigma**2, 0.0) ** 0.5 * eps
        x_prev = a_prev**0.5 * p + d
        if sigma > 0:
            if z is None:
                raise HspaceError(f"step {i} has sigma_t = {sigma:.4g} > 0 but no noise z_t was given")
            x_prev = x_prev + sigma * z.to(x_prev.dtype)
        return x_prev.to(x_t.dtype)


# Scheduler classes whose step is the process hspace runs (eq. 2 with eta: DDIM at 0, DDPM's posterior at 1; flow
# matching's Euler step at 0). For any other class (PNDM, Euler, DPM-Solver, ...) hspace runs eq. 2 on that scheduler's
# noise schedule and spacing: the samples are not those of the pipeline with its own scheduler, and ``process_note`` says so.
NATIVE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", *FLOW_SCHEDULERS)


def process_note(scheduler_config: dict) -> str | None:
    """What differs between the folder's scheduler and the process hspace runs (None: nothing)."""
    name = scheduler_config.get("_class_name")
    if name is None or name in NATIVE_SCHEDULERS:
        return None
    return (f"the model's scheduler is {name}; hspace runs its own sampler (eq. 2: DDIM at eta 0, DDPM at eta 1) on that scheduler's "
            f"noise schedule and timestep spacing, so samples equal the pipeline's only with a DDIMScheduler (or DDPMScheduler) "
            f"swapped in: pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")


def describe_process(scheduler_config: dict, prediction_type: str) -> str:
    """The process in words, for ``hspace info``."""
    if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
        return f"flow matching (x_t = (1 - t) x_0 + t eps, the model predicts v = eps - x_0), {spacing_of(scheduler_config)[5:]}"
    note = process_note(scheduler_config)
    return (f"DDPM/DDIM (x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps, {prediction_type} prediction), "
            f"{scheduler_config.get('num_train_timesteps', 1000)} training timesteps spaced {spacing_of(scheduler_config)}"
            f"{', clipping P_t to +-' + format(scheduler_config.get('clip_sample_range', 1.0), 'g') if scheduler_config.get('clip_sample') else ', no clipping'}"
            + (f"; NOTE: {note}" if note else ""))


def spacing_of(scheduler_config: dict) -> str:
    """How a scheduler config spaces the timesteps of an n-step process (part of the spec): diffusers'
    ``timestep_spacing`` (DDIMScheduler's default "leading") and ``steps_offset``; for flow matching the
    shift (or "dynamic": from the image size) and any non-uniform spacing of the sigmas."""
    if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
        shift = "dynamic" if scheduler_config.get("use_dynamic_shifting") else f"shift={float(scheduler_config.get('shift', 1.0)):g}"
        spaced = [k.replace("use_", "") for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if scheduler_config.get(k)]
        return "flow:" + "+".join([shift, *spaced])
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
