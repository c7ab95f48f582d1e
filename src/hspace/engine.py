"""The h-space engine: a model wrapper, its noise schedule, and one loop over the generative process.

``Engine.run`` drives eq. 2 from x_T with given noise and applies interventions on h at every step
(``interventions.py``); sampling records h_t (paper Sec. 3), a replay adds delta-h_t into both P_t and
D_t with one U-Net pass per step, or into P_t only with Asyrp's second, clean pass (Kwon et al.).
``sample``, ``replay``, ``edit``, ``swap``, ``x_t`` and ``finish`` are thin wrappers over it (``operations.py``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Callable, Sequence

import torch

from .diffusion import Schedule, eta_schedule, process_note, spacing_of
from .directions.direction import Direction
from .errors import HspaceError, check_choice
from .fingerprint import denoiser_fingerprint
from .interventions import StepContext, edits_at
from .loading import (
    DEFAULT_MODEL,
    Components,
    load_components,
    resolve_device,
    resolve_dtype,
)
from .models import backbone_for, build
from .models.conditioning import EMBED_KEYS, resolve
from .operations import Noise, TrajectoryOperations
from .progress import Meter, StepEvent
from .spec import CONDITION_FIELDS, FREE, Space, Spec
from .speed import Speed
from .validate import check_batch_size

logger = logging.getLogger(__name__)
_noted: set[str] = set()  # what was said once per process (process_note)

EPS_PASSES = ("edited", "clean")  # where D_t's eps comes from: the edited pass, or Asyrp's clean one


class Exact:
    """How ``Engine.run`` has the denoiser's output at a step: the denoiser itself, at every step (the process as the
    paper runs it), and a second pass without the interventions where Asyrp's clean eps is asked for. Another strategy
    overrides ``computes`` and ``outputs`` (the editor's preview, ``preview.Preview``)."""

    def computes(self, i: int) -> bool:
        """Whether the denoiser runs at step ``i`` (what the progress counts)."""
        return True

    def outputs(self, model, i, rows, state, t, interventions, ctx, condition, clean: bool, dtype):
        """The output of step ``i`` (with the interventions) and, where ``clean``, the output without them."""
        output = model.output(state, t, interventions, ctx, condition).to(dtype)
        return output, (model.output(state, t, condition=condition).to(dtype) if clean else None)


EXACT = Exact()


class Engine(TrajectoryOperations):
    """A diffusion model with its h-space exposed: one loop (``run``) and its wrappers."""

    def __init__(
        self,
        components: Components,
        h_location: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clip_sample: bool | None = None,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        guide_edit: str | None = None,
        speed: Speed | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        dtype = resolve_dtype(dtype)
        if speed is not None and not isinstance(speed, Speed):
            raise HspaceError(f"speed must be a hspace.speed.Speed, got {type(speed).__name__}")
        self.speed = speed or Speed()
        condition = resolve(components.conditioner, components.name, prompt, negative_prompt, guidance, guide_edit)
        backbone = backbone_for(components.unet)
        h_location = backbone.check_location(components.unet, h_location)  # the family's default for None
        self.spec = Spec(
            components.name, h_location, str(dtype).replace("torch.", ""), clip_sample, **condition,
            fingerprint=components.content_fingerprint(), spacing=spacing_of(components.scheduler_config), autocast=self.speed.autocast,
            size=_size(height, width), denoiser=denoiser_fingerprint(components.unet),
        )
        self.components = components
        self.device = resolve_device(device)
        self.dtype = dtype
        # The step arithmetic runs in float32 at least, whatever the U-Net's dtype.
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.scheduler_config = dict(components.scheduler_config)
        # None keeps the model's own setting. Clipping P_t makes high-noise DDIM steps many-to-one, which
        # DDIM inversion cannot undo; clip_sample=False is part of the spec.
        if clip_sample is not None:
            self.scheduler_config["clip_sample"] = clip_sample
        elif "clip_sample" not in self.scheduler_config and components.decoder is not None:
            # A latent model's scheduler without the key (PNDM, Euler, DPM-Solver configs) clips nothing; DDIM's
            # default (clip to +-1) would destroy latents, whose range is not [-1, 1].
            self.scheduler_config["clip_sample"] = False
        note = process_note(self.scheduler_config)
        if note and note not in _noted:
            _noted.add(note)
            logger.warning("%s", note)
        self.model = build(components, h_location, self.device, dtype, self.spec, self.speed)
        if self.spec.size is not None and self.model.sample_shape == self.model.default_shape():
            self.spec = replace(self.spec, size=None)  # the model's default size: the spec of no size, as before sizes existed
        self._schedules: dict[int, Schedule] = {}

    @classmethod
    def load(
        cls,
        model: str | Spec = DEFAULT_MODEL,
        h_location: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clip_sample: bool | None = None,
        speed: Speed | None = None,
        *,
        folder: str | None = None,
        **condition,
    ) -> "Engine":
        """Load a built-in model by name, a local diffusers folder or a hub id; or rebuild the engine of a
        ``Spec`` (``Engine.load(bank.spec)``), where ``device`` and ``speed`` may still be chosen and nothing else.

        A spec's model is found at ``spec.model`` or, when it was moved or copied, at ``folder``; either way
        its fingerprint must be the spec's. ``clip_sample`` overrides the scheduler's clipping of P_t (None: the
        model's own setting). A conditional model (Stable Diffusion, SDXL) takes ``prompt``, ``negative_prompt``,
        ``guidance`` and ``guide_edit`` (see ``spec.py``); ``engine.conditioned(prompt=...)`` changes them later.
        ``speed`` (``hspace.speed.Speed``) chooses how the U-Net runs: channels_last, torch.compile, autocast."""
        _check_options(condition, "folder")
        embeds = _pop_embeds(condition)
        if _is_pipeline(model):
            if folder is not None:
                raise HspaceError("folder= relocates the model of a spec; a loaded pipeline is its own model")
            return cls.from_pipeline(model, h_location, device, dtype, clip_sample, speed, **condition, **embeds)
        if isinstance(model, Space):
            return cls._of_space(model, device, speed, folder, clip_sample, condition, embeds, given_h=h_location, given_dtype=dtype)
        if not isinstance(model, (str, Spec)) and not hasattr(model, "__fspath__"):
            raise HspaceError(f"model must be a name, a folder, a hub id, a Spec, a direction's Space or a loaded diffusers pipeline; "
                              f"got a {type(model).__name__}")
        if isinstance(model, Spec):
            given = {"h_location": h_location, "dtype": dtype, "clip_sample": clip_sample, **condition}  # (size too: the spec's)
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise HspaceError(f"a spec fixes {', '.join(extra)}; load it alone (Engine.load(spec, device=..., speed=...))")
            return cls._of_spec(model, device, speed, folder, embeds)
        if folder is not None:
            raise HspaceError("folder= relocates the model of a spec; to load a folder pass it as the model")
        if h_location is not None:
            Spec(str(model), h_location)  # checks the name of the h location before loading
        components = load_components(model)
        return cls(components, h_location, device, dtype, clip_sample, **_embedded(components, condition, embeds), speed=speed)

    @classmethod
    def from_pipeline(
        cls,
        pipeline,
        h_location: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        clip_sample: bool | None = None,
        speed: Speed | None = None,
        *,
        name: str | None = None,
        **condition,
    ) -> "Engine":
        """The engine of a diffusers pipeline already loaded (``StableDiffusionPipeline.from_pretrained(...)``, with a
        LoRA loaded or fused, on its device and in its dtype unless ``device``/``dtype`` say otherwise); the other
        options as ``load``. The model is identified by the content of its modules in memory (a LoRA changes it);
        ``name`` (default: the folder or hub id it was loaded from) is where ``Engine.load(spec)`` looks for it later."""
        from .loading import components_of_pipeline, denoiser_of

        if not _is_pipeline(pipeline):
            raise HspaceError(f"from_pipeline takes a loaded diffusers pipeline, got a {type(pipeline).__name__}")
        _check_options(condition, "name")
        embeds = _pop_embeds(condition)
        denoiser = denoiser_of(pipeline)
        label = name or getattr(pipeline, "name_or_path", None) or f"{type(pipeline).__name__} (in memory)"
        from .models.codec import compute_dtype

        components = components_of_pipeline(pipeline, str(label))
        if denoiser is not None and not hasattr(denoiser, "_orig_mod"):
            first = next(denoiser.parameters(), None)
            device = device if device is not None else (None if first is None else first.device)
            dtype = dtype if dtype is not None else (None if first is None else compute_dtype(denoiser))
        return cls(components, h_location, device, dtype, clip_sample, **_embedded(components, condition, embeds), speed=speed)

    @classmethod
    def _of_space(cls, space: Space, device, speed, folder, clip_sample, condition: dict, embeds: dict, given_h, given_dtype) -> "Engine":
        """An engine reading the h-space of a direction (``Engine.load(direction.spec)``): its model (at ``folder`` when
        given), h location and dtype, checked by fingerprint; the process and the conditioning are the caller's."""
        fixed = [name for name, value in (("h_location", given_h), ("dtype", given_dtype)) if value is not None]
        if fixed:
            raise HspaceError(f"a direction's space fixes {', '.join(fixed)}; give the rest (prompt, guidance, device, speed)")
        try:
            components = load_components(folder or space.model)
        except HspaceError as e:
            raise HspaceError(f"the model of this direction (fingerprint {space.fingerprint}) cannot be loaded from {folder or space.model!r}: "
                              f"{e}. If it was moved, pass where it is now (Engine.load(space, folder=DIR))") from None
        engine = cls(components, space.h_location, device, space.dtype, clip_sample, **_embedded(components, condition, embeds), speed=speed)
        engine.space.check(space, f"the direction's model (found at {folder or space.model!r})")
        return engine

    @classmethod
    def _of_spec(cls, spec: Spec, device, speed: Speed | None, folder: str | None, embeds: dict | None = None) -> "Engine":
        """The engine of ``spec``, with its autocast, from its model (at ``folder`` when given), checked by fingerprint."""
        speed = speed or Speed()
        if speed.autocast is not None and speed.autocast != spec.autocast:
            raise HspaceError(f"the spec was drawn with autocast {spec.autocast}, and autocast {speed.autocast} was asked for; "
                              "autocast is part of the process (leave it out: the spec's own is used)")
        try:
            components = load_components(folder or spec.model)
        except HspaceError as e:
            if folder is not None:
                raise
            raise HspaceError(f"the model of this spec (fingerprint {spec.fingerprint}) cannot be loaded from {spec.model!r}: {e}. "
                              "If it was moved, pass where it is now (Engine.load(spec, folder=DIR), or --model DIR)") from None
        if embeds:  # a spec whose prompt is precomputed embeddings: the same tensors, registered before the prompt is encoded
            label = _embedded(components, {}, embeds)["prompt"]
            if label != spec.prompt:
                raise HspaceError(f"these embeddings are {label}, not the spec's prompt {spec.prompt!r}")
        engine = cls(components, spec.h_location, device, spec.dtype, spec.clip_sample, **{k: getattr(spec, k) for k in CONDITION_FIELDS},
                     speed=replace(speed, autocast=spec.autocast), **_size_options(spec))
        engine.spec.check(spec.engine, f"the spec's model (found at {folder or spec.model!r})", kind="exact")
        return engine

    def prompt_embeds(self, prompt_embeds, negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None) -> str:
        """Precomputed embeddings (diffusers' names and shapes, one prompt's) as a prompt: the label to pass wherever a
        prompt goes (``prompts=[...]``, ``conditioned(prompt=...)``); it is what trajectories and banks record, and a
        replay needs the same tensors registered (``models/conditioning.py``). SD 1.x/2.x and SDXL pipelines."""
        given = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        return _embedded(self.components, {}, {k: v for k, v in zip(EMBED_KEYS, given) if v is not None})["prompt"]

    def conditioned(self, **changes) -> "Engine":
        """This engine (the same loaded model, no reload) for another prompt, negative prompt, guidance or
        guide_edit: ``engine.conditioned(prompt="a cat")``. Text is encoded once per prompt."""
        unknown = sorted(set(changes) - set(CONDITION_FIELDS))
        if unknown:
            raise HspaceError(f"unknown condition(s) {', '.join(unknown)}; valid: {', '.join(CONDITION_FIELDS)}")
        condition = {**{k: getattr(self.spec, k) for k in CONDITION_FIELDS}, **changes}
        if "guidance" in changes and "guide_edit" not in changes:
            condition["guide_edit"] = None  # the default for the new guidance
        return Engine(self.components, self.h_location, self.device, self.dtype, self.spec.clip_sample, **condition, speed=self.speed,
                      **_size_options(self.spec))

    def at(self, location: str) -> "Engine":
        """This engine (the same loaded model, conditioning and speed: no reload) reading and editing h at another
        hook point: ``engine.at("block.2")``. Its spec names the new location, so what it makes is that h's."""
        model = self.model.at(location)
        other = copy.copy(self)
        other.model, other.spec = model, replace(self.spec, h_location=model.h_location)
        return other

    # ------------------------------------------------------------------ what the engine is

    @property
    def name(self) -> str:
        return self.spec.model

    @property
    def h_location(self) -> str:
        return self.spec.h_location

    @property
    def denoiser(self) -> torch.nn.Module:
        """The diffusers denoiser (a U-Net or a transformer)."""
        return self.model.denoiser

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the engine has always given it (a transformer too)."""
        return self.model.denoiser

    @property
    def decoder(self) -> torch.nn.Module | None:
        return self.model.decoder

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.model.sample_shape

    @property
    def h_shape(self) -> tuple[int, ...]:
        return self.model.h_shape

    @property
    def space(self) -> Space:
        """The h-space this engine reads and writes (model, h location, dtype, h shape): what its directions carry."""
        return replace(self.spec.space, h_shape=tuple(self.h_shape))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images: the sample size, or what the decoder of a latent model makes of it."""
        if self.decoder is None:
            return tuple(self.sample_shape[1:])
        return tuple(self.decode(torch.zeros(1, *self.sample_shape)).shape[2:])

    def schedule(self, num_steps: int) -> Schedule:
        if num_steps not in self._schedules:
            options = self.model.schedule_options(num_steps, self.scheduler_config)
            self._schedules[num_steps] = Schedule.from_config(self.scheduler_config, num_steps, **options)
        return self._schedules[num_steps]

    def decode(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from x_0 (through the VQ/VAE decoder of a latent model)."""
        return self.model.decode(x0, batch_size)

    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x_0 in the U-Net's space from images [B, 3, H, W] in [-1, 1] (latents for a latent model)."""
        return self.model.encode(images, batch_size).to(self.compute_dtype)

    def model_output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The U-Net's output at (x_t, t) in the compute dtype, without interventions."""
        return self.model.output(x_t, t).to(self.compute_dtype)

    def decoder_half(self, x_t: torch.Tensor, t: int, prompt: str | None = None):
        """eps as a function of h at (x_t, t) (under ``prompt``; None: the engine's): ``models.DecoderHalf``
        (what the Jacobian differentiates)."""
        return self.model.decoder_half(x_t, t, None if prompt is None else self.prompts_for(prompt, 1)[0])

    def prompts_for(self, prompts: str | Sequence[str] | None, n: int) -> list[str] | None:
        """Each of n samples' prompt: a string for all, or a list of n (a shorter list is cycled: sample i gets
        prompts[i % len]); None: the engine's prompt. None for an unconditional model (which refuses prompts)."""
        if prompts is None:
            return [self.spec.prompt] * n if self.spec.conditional else None
        prompts = self.fit_prompts(prompts)
        if len(prompts) > n:
            raise HspaceError(f"{len(prompts)} prompts for {n} samples; valid: one prompt, or at most one per sample (cycled)")
        return [prompts[i % len(prompts)] for i in range(n)]

    def fit_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        """A prompt or a list of them, checked and each fitted to the text encoder as the spec's prompt is."""
        if not self.spec.conditional:
            raise HspaceError(f"{self.name!r} is an unconditional model: it takes no prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise HspaceError(f"prompts must be a string or a non-empty list of strings, got {str(prompts)[:80]}")
        fitted = {p: self.components.conditioner.fit(p) for p in dict.fromkeys(prompts)}
        return [fitted[p] for p in prompts]

    def check_direction(self, direction: Direction, num_steps: int | None = None) -> None:
        """Raise a clear error unless ``direction`` applies to this engine's h (any number of steps: ``direction_at``)."""
        if direction.spec == FREE:  # no space to compare: its h shape must fit
            direction.check_compatible(self.h_shape, self.h_location)
        else:
            self.space.check(direction.spec, f"direction {direction.name!r}")

    def direction_at(self, direction: Direction, num_steps: int) -> Direction:
        """``direction`` on the steps of this engine's ``num_steps``-step schedule: as it is when found on them,
        else resampled by timestep (``Direction.at``; a direction without recorded timesteps was found on this
        engine's schedule of its own step count)."""
        self.check_direction(direction)
        target = self.schedule(num_steps).timesteps
        if direction.num_steps == num_steps and (direction.timesteps is None or torch.equal(direction.timesteps, target.double())):
            return direction
        found_at = None if direction.num_steps == 1 or direction.timesteps is not None else self.schedule(direction.num_steps).timesteps
        return direction.at(target, found_at)

    def directions_at(self, directions: Sequence[Direction], num_steps: int) -> torch.Tensor:
        """[D, num_steps, *h_shape]: each direction's delta on this engine's steps (``direction_at``)."""
        return torch.stack([self.direction_at(d, num_steps).per_step(num_steps) for d in directions])

    # ------------------------------------------------------------------ the one loop

    def run(
        self,
        x: torch.Tensor,
        num_steps: int,
        eta: float | Sequence[float] | torch.Tensor,
        *,
        noise: Noise = None,
        start: int = 0,
        stop: int | None = None,
        interventions: Sequence[Callable] = (),
        eps_pass: str = "edited",
        batch_size: int = 32,
        callback: Callable | None = None,
        progress: bool | None = None,
        stage: str = "run",
        prompts: Sequence[str] | None = None,
        strategy: "Exact | None" = None,
    ) -> torch.Tensor:
        """Steps ``start .. stop-1`` of eq. 2 of the ``num_steps``-step process from x (x_t at the start of
        step ``start``; x_T for 0), in batches; returns the state where it stops (x_0 for the whole process).

        ``noise`` is z [N, num_steps, C, H, W], or a callable from a batch's rows to theirs (needed where
        sigma_t > 0). ``interventions`` act on h at every step, in order (see ``interventions.py``);
        ``eps_pass="clean"`` takes D_t's eps from a second pass without them (Asyrp), at the steps where
        one of them edits. ``callback`` gets a ``StepEvent`` after every step of every batch. ``prompts``
        (a conditional model) gives each of the N samples its prompt (``prompts_for``); None: the engine's.
        ``strategy`` says how each step's denoiser output is had (``Exact``, the default: the denoiser at every step;
        the editor's preview, ``preview.Preview``, computes some steps and estimates the others).
        """
        check_batch_size(batch_size)
        check_choice("eps_pass", eps_pass, EPS_PASSES)
        strategy = strategy or EXACT
        schedule = self.schedule(num_steps)
        eta = eta_schedule(eta, num_steps)
        stop = num_steps if stop is None else stop
        if not 0 <= start <= stop <= num_steps:
            raise HspaceError(f"steps {start}..{stop} are not a part of a {num_steps}-step process")
        sigma = schedule.sigma(eta)
        interventions = list(interventions)
        clean = [eps_pass == "clean" and any(edits_at(iv, i) for iv in interventions) for i in range(num_steps)]
        n = len(x)
        prompts = None if prompts is None else self.prompts_for(prompts, n)
        if prompts is not None and len(set(prompts)) == 1 and prompts[0] == self.spec.prompt:
            prompts = None  # the engine's own conditioning, embedded once
        runs = [strategy.computes(i) for i in range(num_steps)]
        total = n * sum((1 + c) * r for c, r in zip(clean[start:stop], runs[start:stop]))
        out = []
        with Meter.job(callback, total, progress, stage) as meter:
            for rows in torch.arange(n).split(batch_size):
                z = noise(rows) if callable(noise) else (None if noise is None else noise[rows])
                condition = None if prompts is None else self.model.conditioning([prompts[r] for r in rows.tolist()])
                state = x[rows].to(self.device, self.compute_dtype)
                for i in range(start, stop):
                    state = self._step(schedule, i, rows, n, state, z, sigma, interventions, condition, clean[i], strategy, meter, stage)
                out.append(state.cpu())
        return torch.cat(out)

    def _step(self, schedule, i, rows, n, state, z, sigma, interventions, condition, clean: bool, strategy, meter, stage) -> torch.Tensor:
        """One step of eq. 2 on a batch: the denoiser's output by the strategy, P_t and D_t, x_{t-1}."""
        t, s = schedule.t(i), float(sigma[i])
        ctx = StepContext(i, t, schedule.num_steps, rows, n)
        output, clean_output = strategy.outputs(self.model, i, rows, state, t, interventions, ctx, condition, clean, self.compute_dtype)
        p, eps = schedule.split_output(i, state, output)
        if clean:
            _, eps = schedule.split_output(i, state, clean_output)
        if s > 0 and z is None:
            raise HspaceError(f"step {i} has sigma_t = {s:.4g} > 0 but no noise z_t was given")
        following = schedule.step(i, state, p, eps, s, z[:, i].to(self.device) if s > 0 else None)
        check_finite(following, i, t)
        meter.emit(StepEvent, len(rows) * (1 + clean) * strategy.computes(i), stage=stage, step=i, num_steps=schedule.num_steps,
                   timestep=t, rows=rows, x_t=state, x0_pred=p, x_next=following, output=output)
        return following

SIZE_FIELDS = ("height", "width")  # the image size in pixels (both or neither; default: the model's)


def _check_options(options: dict, own: str) -> None:
    """The keyword options of ``load`` / ``from_pipeline`` (whose own extra option is ``own``): conditions, sizes and
    precomputed prompt embeddings only."""
    unknown = sorted(set(options) - set(CONDITION_FIELDS) - set(SIZE_FIELDS) - set(EMBED_KEYS))
    if unknown:
        raise HspaceError(f"unknown option(s) {', '.join(unknown)}; valid: h_location, device, dtype, clip_sample, speed, {own}, "
                          f"{', '.join(CONDITION_FIELDS + SIZE_FIELDS + EMBED_KEYS)}")


def _pop_embeds(options: dict) -> dict:
    """The precomputed prompt embeddings among ``options`` (diffusers' keyword names), taken out of them."""
    return {k: options.pop(k) for k in EMBED_KEYS if options.get(k) is not None}


def _embedded(components: Components, condition: dict, embeds: dict) -> dict:
    """``condition`` with the prompt standing for ``embeds`` (registered on the model's text conditioner) where given."""
    if not embeds:
        return condition
    if components.conditioner is None or not callable(getattr(components.conditioner, "register", None)):
        raise HspaceError(f"{components.name!r} takes no prompt embeddings (it is not a text-conditioned pipeline)")
    if condition.get("prompt") is not None:
        raise HspaceError("give the prompt as text (prompt=) or as embeddings (prompt_embeds=), not both")
    if "negative_prompt_embeds" in embeds and condition.get("negative_prompt") is not None:
        raise HspaceError("give the negative prompt as text (negative_prompt=) or as embeddings (negative_prompt_embeds=), not both")
    return {**condition, "prompt": components.conditioner.register(**embeds)}


def _size_options(spec: Spec) -> dict:
    """The ``height``/``width`` keywords that rebuild a spec's image size (none for the model's default)."""
    return {} if spec.size is None else {"height": spec.size[0], "width": spec.size[1]}


def _size(height, width) -> tuple[int, int] | None:
    if height is None and width is None:
        return None
    if height is None or width is None:
        raise HspaceError(f"give height and width together (pixels), got height={height!r}, width={width!r}")
    return (height, width)


def _is_pipeline(model) -> bool:
    """Whether ``model`` is a loaded diffusers pipeline (not a name, folder or spec)."""
    return not isinstance(model, (str, Spec)) and hasattr(model, "components") and hasattr(model, "scheduler")


def check_finite(x: torch.Tensor, step: int, t: int) -> None:
    """Raise where a step produced NaN or infinite values: finite inputs can still overflow float32 on the way
    (an edit scale or a guidance too large, a direction of huge norm, a broken noise schedule)."""
    if not bool(torch.isfinite(x).all()):
        raise HspaceError(
            f"step {step} (t = {t}) produced NaN or infinite values: an edit scale, a guidance or a direction too large "
            "for float32, or a noise schedule that cannot be sampled (e.g. zero betas); nothing was written"
        )
