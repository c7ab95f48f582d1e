"""A backbone: what the engine asks of a model, composed of four parts, whatever the family.

- the **denoiser call** (``families.py``): how the diffusers module is called at (x, t), its sample shape;
- its **hook points** (``hookpoints.py``): every h location by name, attached to the bare diffusers module;
- the **latent codec** (``codec.py``): the VAE of a latent model (None in pixel space);
- the **conditioner** (``conditioning.py``): prompt to keywords, default guidance, how many passes a step runs.

``output(x_t, t, interventions, ctx)`` runs one step's denoiser pass(es) with every intervention at the hook point
it names (``interventions.py``: an intervention's ``locations``; None is the engine's h), routed to the guidance
pass it asks for, and returns the guided output: uncond + g (cond - uncond) under classifier-free guidance, as
diffusers' pipelines. Nothing here branches on a family: the call and the conditioner say what differs.

The Jacobian's function (eq. 6) is the output as a function of h at the engine's location: for an unconditional
U-Net the U-Net split (``unet.py``: the encoder half cached, the decoder half differentiated); otherwise the whole
pass with h replaced by a hook, which under guidance is J = g J_cond for "cond", (1 - g) J_uncond for "uncond",
(1 - g) J_uncond + g J_cond for "both": what an edit of that h does to the step (under ``vmap`` the part before h
does not depend on the vectors and runs once per product, so splitting would save little: docs/directions.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import HspaceError
from ..interventions import LinearEdit, StepContext, apply_all, context, locations_of
from ..speed import Speed
from .codec import LatentCodec, prepare
from .conditioning import _cat, _rows, _stack, route
from .families import DenoiserCall
from ..hooks import hooked
from .unet import DecoderHalf, decode, encode, forward_mode


def sized_shape(call: DenoiserCall, factor: int, size: tuple[int, int]) -> tuple[int, ...]:
    """[C, H, W] of x_t for images of ``size`` (height, width) pixels, ``factor`` image pixels per latent pixel; heights
    and widths must be multiples of ``factor`` x the call's patch."""
    step, default = factor * call.patch(), call.sample_shape()
    bad = [s for s in size if s % step]
    if bad:
        raise HspaceError(f"image size {size[0]}x{size[1]}: {bad[0]} is not a multiple of {step}; valid: heights and widths that are "
                          f"multiples of {step} for this model (its default is {'x'.join(str(s * factor) for s in default[1:])})")
    return (default[0], size[0] // factor, size[1] // factor)


class Backbone:
    """A denoiser (+ codec and conditioner) on a device, in a dtype, for one spec's conditioning, with h at ``h_location``."""

    def __init__(self, call: type[DenoiserCall], components, h_location: str, device: torch.device, dtype: torch.dtype, spec,
                 speed: Speed | None = None):
        denoiser = components.unet
        call.check(denoiser)
        self.points = call.hook_points(denoiser)
        self.h_location = call.check_location(denoiser, h_location)
        self.device, self.dtype = device, dtype
        self.speed = speed or Speed()
        self.denoiser = prepare(denoiser, device, dtype)
        self.call = call(self.denoiser)
        if self.speed.compile and not call.compiles:
            raise HspaceError(f"--compile is not supported for {call.family} backbones yet; valid: leave it out")
        self.speed.prepare(self.denoiser, self.points[self.h_location].module(self.denoiser), dtype)
        if self.speed.vae_tiling and components.decoder is None:
            raise HspaceError("vae_tiling (--vae-tiling) tiles a latent model's VAE; this model has no VAE (it runs in pixel space)")
        self.codec = None if components.decoder is None else LatentCodec(components.decoder, device, dtype, self.speed.offload,
                                                                         self.speed.vae_slicing, self.speed.vae_tiling)
        self.sample_shape = self.call.sample_shape() if spec.size is None else self._sized(spec.size)
        self._h_shapes: dict[str, tuple[int, ...]] = {}
        self._condition(components.conditioner, spec)

    def _condition(self, conditioner, spec) -> None:
        """The conditioner on the device and the spec's prompt embedded (both passes under guidance)."""
        self.conditioner = conditioner
        self.guided = spec.guided and conditioner is not None and conditioner.passes == "cfg"
        self.guidance, self.guide_edit, self.negative_prompt, self.spec_prompt = spec.guidance, spec.guide_edit, spec.negative_prompt, spec.prompt
        self.image_size = tuple(s * self.pixels_per_latent() for s in self.sample_shape[1:])  # the images' size, as the pipeline's
        if conditioner is None:
            self.uncond, self.cond = None, {}
        else:
            conditioner.to(self.device, self.dtype, self.speed.offload)
            self.uncond, self.cond = conditioner.embed(spec.prompt, spec.negative_prompt, spec.guided, self.image_size)
        self.call.bind(self)

    # ------------------------------------------------------------------ what the model is

    @property
    def family(self) -> str:
        return self.call.family

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (the name the engine has always used for it, whatever the family)."""
        return self.denoiser

    @property
    def decoder(self) -> torch.nn.Module | None:
        """The latent model's VAE module (None in pixel space)."""
        return None if self.codec is None else self.codec.vae

    def pixels_per_latent(self) -> int:
        return 1 if self.codec is None else self.codec.pixels_per_latent

    def _sized(self, size: tuple[int, int]) -> tuple[int, ...]:
        return sized_shape(self.call, self.pixels_per_latent(), size)

    def default_shape(self) -> tuple[int, ...]:
        return self.call.sample_shape()

    def locations(self) -> dict[str, str]:
        """Every h location of this model, in forward order, with what it is."""
        return {name: point.description for name, point in self.points.items()}

    def check_location(self, location: str | None) -> str:
        return self.call.check_location(self.denoiser, location)

    def at(self, location: str) -> "Backbone":
        """This backbone (the same loaded modules, conditioning and speed) with h at ``location``."""
        location = self.check_location(location)
        if self.speed.compile and self.points[location].module(self.denoiser) is not self.points[self.h_location].module(self.denoiser):
            raise HspaceError(f"h at {location!r} lies inside a block that --compile compiled around {self.h_location!r}; load the engine "
                              f"with h_location={location!r} instead")
        other = copy.copy(self)
        other.h_location = location
        return other

    def schedule_options(self, num_steps: int, config: dict) -> dict:
        return self.call.schedule_options(num_steps, config, self.sample_shape)

    def describe(self) -> dict:
        latent = "latent, " + type(self.decoder).__name__ if self.codec is not None else "pixel space"
        kind = self.call.describe(self.conditioner)
        info = {"family": self.family, "kind": f"{kind} ({latent})" if self.conditioner is None else kind}
        if self.conditioner is not None:
            info.update({"guided": self.guided, "guide_edit": self.guide_edit})
        return info

    # ------------------------------------------------------------------ h

    @property
    def h_shape(self) -> tuple[int, ...]:
        """Shape of h_t for one sample at the engine's location."""
        return self.location_shape(self.h_location)

    def location_shape(self, location: str) -> tuple[int, ...]:
        """Shape of h for one sample at ``location``; every location's found by one pass the first time one is asked for."""
        if not self._h_shapes:
            from ..interventions import Record

            record = Record(locations=list(self.points))
            self.output(torch.zeros(1, *self.sample_shape), 0, [record])
            self._h_shapes = {name: tuple(h.shape[2:]) for name, h in record.by_location().items()}
        return self._h_shapes[self.check_location(location)]

    # ------------------------------------------------------------------ the pass

    def conditioning(self, prompts: Sequence[str]) -> dict:
        """The denoiser's conditioning keywords for a batch whose samples have these prompts (both passes under
        guidance: all unconditional rows, then all conditional rows); each prompt is encoded once (cached)."""
        if self.conditioner is None:
            raise HspaceError("an unconditional model takes no prompts")
        pairs = [self.conditioner.embed(p, self.negative_prompt, self.guided, self.image_size) for p in prompts]
        cond = _stack([c for _, c in pairs])
        return _cat(_stack([u for u, _ in pairs]), cond) if self.guided else cond

    def _conditioning(self, n: int) -> dict:
        if not self.guided:
            return _rows(self.cond, n)
        return _cat(_rows(self.uncond, n), _rows(self.cond, n))

    def _functions(self, interventions: Sequence[Callable], ctx: StepContext, autocast: bool) -> dict[str, Callable]:
        """One function of h per hook point that an intervention names, applying those interventions in order."""
        at: dict[str, list[Callable]] = {}
        for intervention in interventions:
            for location in locations_of(intervention):
                at.setdefault(self.h_location if location is None else self.check_location(location), []).append(intervention)
        functions = {}
        for location, acting in at.items():
            here = ctx.at(location)
            if self.conditioner is None:
                fn = (lambda acting, here: lambda h: apply_all(acting, h, here))(acting, here)
            else:
                fn = (lambda acting, here: lambda h: route(h, acting, here, self.guided, self.guide_edit))(acting, here)
            functions[location] = self.speed.h_function(fn) if autocast else fn
        return functions

    def guided_output(self, x_t: torch.Tensor, t: int, interventions: Sequence[Callable] = (), ctx: StepContext | None = None,
                      autocast: bool = False, condition: dict | None = None) -> torch.Tensor:
        """The guided output (gradients allowed): uncond + g (cond - uncond), as diffusers' pipelines; h through
        ``interventions`` at their hook points, in float32 for them when ``autocast`` (``Speed.h_function``).
        ``condition`` (``conditioning``) gives each sample its prompt; None: the spec's prompt for all."""
        if condition is not None and self.conditioner is None:
            raise HspaceError("an unconditional model takes no prompts")
        x = x_t.to(self.device, self.dtype)
        n = len(x)
        if self.guided:
            x = torch.cat([x, x])
        x = self.speed.memory_format(x)
        t = torch.tensor(t, device=self.device)
        kwargs = self._conditioning(n) if condition is None else condition
        ctx = ctx or context(int(t), n)
        if not interventions:
            out = self.call(x, t, kwargs)
        else:
            with hooked(self.denoiser, self.points, self._functions(interventions, ctx, autocast)):
                out = self.call(x, t, kwargs)
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def output(self, x_t: torch.Tensor, t: int, interventions: Sequence[Callable] = (), ctx: StepContext | None = None,
               condition: dict | None = None) -> torch.Tensor:
        """The output at (x_t, t), h passed through ``interventions`` (hooks removed after), no gradient, run as
        ``self.speed`` says (autocast here only: the Jacobian runs in the model's dtype)."""
        with torch.no_grad(), self.speed.context(self.device):
            return self.guided_output(x_t, t, interventions, ctx, autocast=True, condition=condition)

    def decoder_half(self, x_t: torch.Tensor, t: int, prompt: str | None = None):
        """The output at (x_t, t) as a function of h at the engine's location, for the Jacobian of eq. 6 (module doc)."""
        if self.call.splits and self.conditioner is None:
            if prompt is not None:
                raise HspaceError("an unconditional model takes no prompt")
            return DecoderHalf(self.denoiser, encode(self.denoiser, x_t, t, self.h_location))
        seen: list[torch.Tensor] = []
        condition = None if prompt is None else self.conditioning([prompt])
        with torch.no_grad():  # (not ``output``: no autocast, the Jacobian is taken in the model's dtype)
            self.guided_output(x_t, t, [lambda h, ctx: seen.append(h) or h], condition=condition)
        return HookedDecoderHalf(self, x_t.to(self.device, self.dtype), t, seen[0], prompt)

    def compiled_additive(self) -> Callable | None:
        """A denoiser with ``output``'s signature for interventions that add to h (``LinearEdit``): the whole U-Net
        compiled (``torch.compile`` with freezing: the weights prepacked as constants), delta-h an input of the graph,
        so nothing recompiles when the edit changes. ~30% faster per pass at batch 1 on a CPU; its output within
        float rounding of ``output`` (not bit-equal), so the editor uses it for previews only. The first call
        compiles (tens of seconds; cached on disk by torch for the next start). None where the model has no such
        path: a conditional or transformer model, or an engine that autocasts or compiles its blocks already."""
        if not self.call.splits or self.conditioner is not None or self.speed.autocast or self.speed.compile:
            return None
        unet, location, h_shape = self.denoiser, self.h_location, self.h_shape

        def additive(x, t, delta):
            cache = encode(unet, x, t, location)
            return decode(unet, cache.h + delta, cache)

        compiled = torch.compile(additive, options={"freezing": True}, dynamic=False)

        def output(x_t, t, interventions=(), ctx=None, condition=None):
            if condition is not None:
                raise HspaceError("an unconditional model takes no prompts")
            if not all(isinstance(intervention, LinearEdit) for intervention in interventions):
                raise HspaceError("the compiled denoiser takes additive edits only (LinearEdit); run the others through output()")
            x = x_t.to(self.device, self.dtype)
            ctx = ctx or context(int(t), len(x))
            with torch.no_grad():
                delta = apply_all(interventions, torch.zeros(len(x), *h_shape, device=self.device, dtype=self.dtype), ctx)
                return compiled(x, torch.tensor([int(t)], device=self.device), delta)

        return output

    # ------------------------------------------------------------------ images

    def decode(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from x_0 (through the VQ/VAE decoder of a latent model)."""
        return x0 if self.codec is None else self.codec.decode(x0, batch_size)

    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x_0 from images [B, 3, H, W] in [-1, 1]: the images for a pixel model, the autoencoder's latents
        (times its scaling factor) for a latent model. float32 on the CPU."""
        return images.float() if self.codec is None else self.codec.encode(images, batch_size)


@dataclass
class HookedDecoderHalf:
    """The guided output at one (x_t, t) as a function of the h the interventions see (see the module doc);
    ``h`` is that h of the unedited pass [1, *h_shape]."""

    model: Backbone
    x_t: torch.Tensor
    t: int
    h: torch.Tensor
    prompt: str | None = None  # the sample's prompt; None: the spec's

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[1:]) != tuple(self.h.shape[1:]):
            raise HspaceError(f"h has shape {tuple(h.shape)}; valid: [k, {', '.join(map(str, self.h.shape[1:]))}]")
        x = self.x_t.expand(h.shape[0], *self.x_t.shape[1:])
        condition = None if self.prompt is None else self.model.conditioning([self.prompt] * h.shape[0])
        return self.model.guided_output(x, self.t, [lambda _seen, ctx: h], condition=condition)

    def forward_mode(self):
        return forward_mode(self.model.denoiser)
