"""hspace inside a user's own diffusers pipeline: ``steer(pipe, directions, scales)`` and ``record(pipe)``.

Both attach to the denoiser's hook points (``models.hook_points``), so they work in whatever loop calls the denoiser:
the pipeline's own scheduler (DDIM, DPM-Solver++, Euler, UniPC, Karras sigmas, second-order ones that call the
denoiser twice a step), its LoRAs and ControlNets, its ``pipe(...)`` call. Two hooks per call:

- a pre-hook on the bare denoiser reads hspace's t of each row from its ``timestep`` argument (FLUX passes t / 1000;
  ``DenoiserCall.pipeline_timestep``) and, for ``branch`` other than "both", which rows are the guidance's
  unconditional pass (``DenoiserCall.unconditional_rows``: the first half of a guided text pipeline's batch, DiT's
  null-class rows; refused where a pipeline does not say);
- the hook point adds ``sum_d scale_d * unit_d * direction_d.at(t)`` to h of the chosen rows (steer) or keeps h
  (record). ``Direction.at`` resamples a direction to any timestep, so one found with hspace's 50-step DDIM loop
  applies at the 20 steps of a DPM-Solver++ pipeline.

``window=(t_hi, t_lo)`` limits the edit to t_hi >= t >= t_lo, in hspace's 0-1000 units for every family. Units follow
the one rule of ``edits.py`` (a carded direction moves in its effect unit under "auto"). Leaving the ``with`` block
(or ``handle.remove()``) removes every hook, also after an exception: the pipeline is exactly as before.

Identity: a direction carries its denoiser's fingerprint (``Spec.denoiser``: architecture and weights, not the
scheduler, folder or text encoders), compared with the pipeline's denoiser by ``check``: True (default) refuses
another model or a fused LoRA; "architecture" allows other weights of the same architecture (a fine-tune, another
precision); False compares nothing. A PEFT LoRA loaded but not fused is the user's choice: said once, then steered.
The h location and shape are always checked.

Offloading: model offload and group offloading (block or leaf level) steer as the plain pipeline does (tested on
the CPU); under sequential offload the weights are on the meta device, so only ``check="architecture"`` or False
can compare them (diffusers' sequential offload itself fails on a CPU-only machine: untested here). Not supported
(refused with what to do): diffusers' caching hooks (first-block cache, FasterCache, PAB, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import logging

import torch

from .deltas import DeltaTable
from .directions.direction import Direction
from .errors import HspaceError
from .validate import check_choice

__all__ = ["steer", "record", "Steering", "Recording"]
logger = logging.getLogger(__name__)
CHECKS = (True, "architecture", False)
_said: set[str] = set()

BRANCHES = ("both", "cond", "uncond")
# diffusers' hooks that skip or reuse blocks on some steps (first-block cache, FasterCache, MagCache, SeaCache,
# TaylorSeer, pyramid attention broadcast, layer skip): the hook point would not run there
SKIPPING_HOOKS = ("fbc_", "faster_cache", "mag_cache", "sea_cache", "taylorseer", "pyramid_attention_broadcast", "layer_skip")


def _denoiser_and_call(pipe):
    from .loading import denoiser_of
    from .models import backbone_for

    denoiser = denoiser_of(pipe)
    if denoiser is None:
        raise HspaceError(f"a {type(pipe).__name__} has neither a unet nor a transformer: hspace cannot steer it")
    call = backbone_for(denoiser)  # refuses a compiled denoiser (its hooks would not run) and an unknown class
    names = {name for module in denoiser.modules() for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}) or {}}
    skipping = sorted(n for n in names if n.startswith(SKIPPING_HOOKS))
    if skipping:
        raise HspaceError(f"the {type(denoiser).__name__} has diffusers' hook {skipping[0]!r}, which skips or reuses its blocks on some "
                          "steps: the hook point would not run there and the edit would silently miss those steps. Remove it "
                          "while steering (denoiser.disable_cache())")
    return denoiser, call


def _batch(denoiser, args: tuple, kwargs: dict) -> int:
    """Rows of one call: the length of its first argument (``sample`` or ``hidden_states``), given by position or name."""
    import inspect

    if args:
        return len(args[0])
    first = next(iter(inspect.signature(denoiser.forward).parameters))
    if first in kwargs:
        return len(kwargs[first])
    return len(next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))


@dataclass
class _Call:
    """What the pre-hook read off the current call of the denoiser."""

    t: torch.Tensor | None = None  # [B] hspace's t per row
    uncond: torch.Tensor | None = None  # [B] bool, or None: no guidance rows


class _Hooked:
    """Hooks on one pipeline's denoiser at one hook point; removed by ``remove`` (idempotent) or leaving ``with``."""

    def __init__(self, pipe, location: str | None, branch: str):
        check_choice("branch", branch, BRANCHES)
        self.pipe, self.branch = pipe, branch
        self.denoiser, self.call = _denoiser_and_call(pipe)
        self.points = self.call.hook_points(self.denoiser)
        self.location = self.call.check_location(self.denoiser, location)
        self.current = _Call()
        self.handles: list = []

    def _attach(self) -> None:
        def read(_module, args, kwargs):
            batch = _batch(self.denoiser, args, kwargs)
            uncond = None if self.branch == "both" else self.call.unconditional_rows(self.pipe, self.denoiser, kwargs, batch)
            self.current = _Call(self.call.pipeline_timestep(self.denoiser, args, kwargs, batch), uncond)

        self.handles = [self.denoiser.register_forward_pre_hook(read, with_kwargs=True),
                        self.points[self.location].attach(self.denoiser, self._h)]

    def rows(self) -> torch.Tensor:
        """[B] bool: the rows of the current call that ``branch`` names."""
        t = self.current.t
        uncond = self.current.uncond
        if uncond is None:
            return torch.ones(len(t), dtype=torch.bool)
        return uncond if self.branch == "uncond" else ~uncond

    def _h(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Steering(_Hooked):
    """The handle of ``steer``: ``.scales`` may be set between calls (a slider), ``.remove()`` ends it."""

    def __init__(self, pipe, directions, scales, window, branch, units, location, resize=False, check=True):
        self.table = DeltaTable(directions, scales, units, window)
        super().__init__(pipe, location or self.table.location, branch)
        self.directions, self.resize = self.table.directions, bool(resize)
        _check_identity(self.denoiser, self.directions, check)
        self._attach()

    @property
    def scales(self) -> list[float]:
        return self.table.scales

    @scales.setter
    def scales(self, scales) -> None:
        self.table.scales = scales

    def delta_at(self, t: float) -> torch.Tensor:
        """delta-h at hspace's timestep ``t`` (``DeltaTable.at``)."""
        return self.table.at(t)

    def _h(self, h: torch.Tensor) -> torch.Tensor:
        return self.table.add(h, self.current.t, self.rows(), self.location, self.resize)


def _check_identity(denoiser, directions: list[Direction], check) -> None:
    """Refuse directions found on another denoiser (module doc: ``check``)."""
    from .fingerprint import denoiser_fingerprint, has_unfused_lora, storage_of
    from .spec import FREE

    if not any(check is c for c in CHECKS):
        raise HspaceError(f"check must be True (the same weights), 'architecture' (the same architecture) or False (no check), got {check!r}")
    if check is False:
        return
    ours = denoiser_fingerprint(denoiser)
    if has_unfused_lora(denoiser) and "lora" not in _said:
        _said.add("lora")
        logger.warning("the %s has a LoRA loaded but not fused: the directions (found without it, or with it) steer the model "
                       "with the LoRA active, your choice", type(denoiser).__name__)
    for d in directions:
        theirs = None if d.spec == FREE else d.spec.denoiser
        if theirs is None:
            if d.spec != FREE and d.name not in _said:
                _said.add(d.name)
                logger.warning("direction %r carries no denoiser fingerprint (made before hspace checked it): its model is not "
                               "compared, only its h shape", d.name)
            continue
        if check is True and ours.endswith(":offloaded"):
            raise HspaceError(f"the {type(denoiser).__name__}'s weights are offloaded to the meta device (sequential offload): their "
                              "fingerprint cannot be taken; steer with check='architecture' (compares the architecture) or check=False")
        part = 0 if check == "architecture" else slice(None)
        if theirs.split(":")[part] != ours.split(":")[part]:
            what = "architecture" if check == "architecture" or theirs.split(":")[0] != ours.split(":")[0] else "weights"
            raise HspaceError(
                f"direction {d.name!r} was found on another denoiser: its {what} differ (fingerprint {theirs} of "
                f"{d.spec.model!r} vs this pipeline's {type(denoiser).__name__} {ours}, weights stored as {storage_of(denoiser)}). "
                "Another model, a fused LoRA, another quantization of the same model (a GGUF Q4 and a Q8 are different models; "
                "float8 or int8 storage too), or the same model in bfloat16 against float16/float32 (weights rounded otherwise)"
                + ("; check='architecture' steers it anyway where the architecture agrees, check=False never compares"
                   if what == "weights" else "; check=False steers it anyway where h's shape agrees"))


def steer(pipe, directions: Direction | Sequence[Direction], scales: float | Sequence[float] = 1.0, *, window=None,
          branch: str = "both", units: str = "raw", location: str | None = None, resize: bool = False, check=True) -> Steering:
    """Add the directions to h at every call of ``pipe``'s denoiser until the handle is removed (module doc); a context
    manager: ``with hspace.steer(pipe, smile, 2.0): image = pipe(prompt).images[0]``. ``resize``: apply directions
    found at another image size, bilinear on h's grid (an approximation; the channels must agree). ``check``: True,
    "architecture" or False (module doc: identity)."""
    return Steering(pipe, directions, scales, window, branch, units, location, resize, check)


@dataclass
class Generation:
    """h of one pipeline call: ``h`` [n, T, *h_shape] per sample and denoiser call, ``timesteps`` [T] (hspace's t)."""

    h: torch.Tensor
    timesteps: torch.Tensor


class Recording(_Hooked):
    """The handle of ``record``: ``.generations`` (one per pipeline call in the block) and ``.h`` / ``.timesteps``
    when every generation visited the same timesteps."""

    def __init__(self, pipe, location, branch):
        super().__init__(pipe, location, branch)
        self._calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._attach()

    def _h(self, h: torch.Tensor) -> torch.Tensor:
        t = self.current.t
        rows = self.rows()
        step_t = float(t[rows][0])
        if not self._calls or step_t > float(self._calls[-1][-1][0]):  # the timesteps rise again: a new pipeline call
            self._calls.append([])
        self._calls[-1].append((torch.tensor(step_t, dtype=torch.float64), h[rows].detach().float().cpu()))
        return h

    @property
    def spec(self):
        """The identity of the pipeline's model with h at the recorded location (``Engine.from_pipeline``'s spec): what
        directions found from this recording carry."""
        from .engine import Engine

        if getattr(self, "_spec", None) is None:
            self._spec = Engine.from_pipeline(self.pipe, h_location=self.location).spec.engine
        return self._spec

    @property
    def generations(self) -> list[Generation]:
        return [Generation(torch.stack([h for _, h in call], dim=1), torch.stack([t for t, _ in call])) for call in self._calls]

    def _alike(self) -> list[Generation]:
        """The generations, which must have visited the same timesteps."""
        gens = self.generations
        if not gens:
            raise HspaceError("nothing was recorded: call the pipeline inside the record block")
        if any(not torch.equal(g.timesteps, gens[0].timesteps) for g in gens):
            raise HspaceError("the recorded generations visited different timesteps; read them one by one (.generations)")
        return gens

    @property
    def timesteps(self) -> torch.Tensor:
        return self._alike()[0].timesteps

    @property
    def h(self) -> torch.Tensor:
        """[N, T, *h_shape] of every sample of every generation (the conditional rows by default)."""
        return torch.cat([g.h for g in self._alike()])


def record(pipe, locations: str | None = None, *, branch: str = "cond") -> Recording:
    """Record h at the pipeline's own timesteps for every call inside the block (module doc). Under guidance the
    conditional rows are kept (``branch``: "cond", "uncond" or "both")."""
    if not isinstance(locations, (str, type(None))):
        raise HspaceError("record takes one h location (a name such as 'mid.out' or 'block.3') or None for the default")
    return Recording(pipe, locations, branch)


# diffusers' schedulers by the names ``hspace edit --sampler`` takes, with the options that make them that sampler
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
KARRAS = ("dpm++2m", "euler", "unipc")  # the samplers whose schedulers take Karras sigmas


def scheduler_for(sampler: str, config: dict, karras: bool = False):
    """The diffusers scheduler of ``sampler`` (``SAMPLERS``) on the model's noise schedule ``config``."""
    import diffusers

    check_choice("sampler", sampler, SAMPLERS)
    if karras and sampler not in KARRAS:
        raise HspaceError(f"--karras takes one of the samplers {', '.join(KARRAS)}; {sampler!r} has no Karras sigmas")
    name, options = SAMPLERS[sampler]
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, name).from_config(config, **options, **({"use_karras_sigmas": True} if karras else {}))


def generate(engine, seeds: Sequence[int], num_steps: int, sampler: str, *, karras: bool = False) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] of ``seeds`` drawn with diffusers' ``sampler`` on the engine's model: its own
    pipeline for a text-to-image model, else the scheduler's loop around the U-Net (with ``scale_model_input``);
    one seed per call, so sample b is seed b's whatever the others. Directions steered in act (``steer``)."""
    pipe, own = pipeline_of(engine)
    scheduler = scheduler_for(sampler, engine.scheduler_config, karras)
    images = []
    if own:
        for seed in seeds:
            images.append(_scheduler_loop(engine, pipe, scheduler, num_steps, seed))
        return torch.cat(images)
    before = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        height, width = engine.model.image_size
        options = {"guidance_scale": engine.spec.guidance, "num_inference_steps": num_steps, "output_type": "pt", "height": height,
                   "width": width}
        if engine.spec.negative_prompt is not None:
            options["negative_prompt"] = engine.spec.negative_prompt
        for seed in seeds:
            out = pipe(engine.spec.prompt, generator=torch.Generator().manual_seed(seed), **options).images
            images.append(out.to(torch.float32) * 2 - 1)
    finally:
        pipe.scheduler = before
    return torch.cat(images)


def steered_images(engine, direction: Direction, raw_scales: Sequence[float], seeds: Sequence[int], num_steps: int, sampler: str, *,
                   karras: bool = False, window=None, branch: str | None = None) -> torch.Tensor:
    """Images [S, B, C, H, W] in [-1, 1]: ``seeds`` drawn by ``generate`` with ``direction`` steered in at each raw
    scale (0 draws the plain sample); ``branch`` defaults to the engine's ``guide_edit``."""
    pipe = pipeline_of(engine)[0]
    branch = branch or engine.spec.guide_edit or "both"
    grids = []
    for scale in raw_scales:
        with steer(pipe, direction, float(scale), window=window, branch=branch):
            grids.append(generate(engine, seeds, num_steps, sampler, karras=karras))
    return torch.stack(grids)


def pipeline_of(engine):
    """(pipeline, own loop): the text-to-image pipeline the engine's conditioner wraps, or a ``DDPMPipeline`` holding
    the U-Net (steer's handle on it) whose loop hspace runs itself."""
    from diffusers import DDPMPipeline

    pipe = getattr(engine.model.conditioner, "pipeline", None)
    if pipe is not None:
        if not hasattr(type(pipe), "encode_prompt"):
            raise HspaceError(f"--sampler runs text-to-image pipelines and unconditional U-Nets; a {type(pipe).__name__} is neither")
        return pipe, False
    if engine.spec.conditional:
        raise HspaceError(f"--sampler does not run {engine.name!r}'s conditioning yet; leave --sampler out")
    return DDPMPipeline(unet=engine.denoiser, scheduler=scheduler_for("ddpm", engine.scheduler_config)), True


def _scheduler_loop(engine, pipe, scheduler, num_steps: int, seed: int) -> torch.Tensor:
    import inspect

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *engine.sample_shape), generator=generator).to(engine.device, engine.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return (engine.decode(x) if engine.decoder is not None else x).float().cpu()
