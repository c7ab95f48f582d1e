"""Backbones: a composition of a denoiser call, its hook points, a latent codec and a conditioner (``backbone.py``).

The denoiser call is the one part chosen by the denoiser's diffusers class (``families.py``; k-diffusion's wrappers
are the pattern): its signature, its hook points (``hooks.py``) and default h, its sample shape, what its pipeline
passes to the scheduler, and the conditioner its pipeline needs (``conditioning.py``). The engine, banks, methods,
CLI and editor build a ``Backbone`` through ``build`` and ask it, and nothing else, about the model.

A new family enters with ``register("ItsDiffusersClass")`` on a ``DenoiserCall`` subclass that overrides what differs.
"""

from __future__ import annotations

from torch import nn

from ..errors import HspaceError
from .backbone import Backbone, HookedDecoderHalf
from .families import (ConditionalUNetCall, DenoiserCall, DiTCall, FluxCall, PixArtCall, SD3Call, TransformerCall,
                       UNetCall, calculate_shift)
from .unet import DecoderHalf

# diffusers class name -> denoiser call
BACKBONES: dict[str, type[DenoiserCall]] = {
    "UNet2DModel": UNetCall,
    "UNet2DConditionModel": ConditionalUNetCall,
    "DiTTransformer2DModel": DiTCall,
    "SD3Transformer2DModel": SD3Call,
    "PixArtTransformer2DModel": PixArtCall,
    "FluxTransformer2DModel": FluxCall,
}


def register(class_name: str):
    """Class decorator: the denoiser call of denoisers of the diffusers class ``class_name``."""

    def add(call: type[DenoiserCall]) -> type[DenoiserCall]:
        BACKBONES[class_name] = call
        return call

    return add


def backbone_for(denoiser: nn.Module) -> type[DenoiserCall]:
    """The denoiser call of ``denoiser``, by its class (or the nearest registered base class). A denoiser
    compiled by its user is refused: its hooks would not run, so every edit would be a no-op and nothing recorded."""
    compiled = hasattr(denoiser, "_orig_mod") or getattr(denoiser, "_compiled_call_impl", None) is not None
    if compiled:
        inner = type(getattr(denoiser, "_orig_mod", denoiser)).__name__
        raise HspaceError(f"the {inner} was compiled (torch.compile / .compile()): hspace's hooks on h would not run in it, so edits "
                          "would do nothing and no h would be recorded. Pass the model uncompiled and ask hspace to compile it: "
                          "--compile (Speed(compile=True)), which compiles the blocks around h and keeps h's module eager")
    for cls in type(denoiser).__mro__:
        if cls.__name__ in BACKBONES:
            return BACKBONES[cls.__name__]
    raise HspaceError(f"no backbone for a {type(denoiser).__name__}; valid denoisers: {', '.join(BACKBONES)}")


def hook_points(denoiser: nn.Module) -> dict:
    """Every h location of a bare diffusers denoiser (a ``UNet2DConditionModel``, a ``FluxTransformer2DModel``, ...) by name,
    in forward order: ``hook_points(pipe.unet)["mid.out"].attach(pipe.unet, fn)`` routes h through ``fn`` in any call."""
    call = backbone_for(denoiser)
    call.check(denoiser)
    return call.hook_points(denoiser)


def build(components, h_location: str | None, device, dtype, spec, speed) -> Backbone:
    """The backbone of ``components`` for ``spec``'s conditioning, with h at ``h_location`` (None: the family's default)."""
    return Backbone(backbone_for(components.unet), components, h_location, device, dtype, spec, speed)


__all__ = ["BACKBONES", "Backbone", "ConditionalUNetCall", "DecoderHalf", "DenoiserCall", "DiTCall", "FluxCall", "HookedDecoderHalf",
           "PixArtCall", "SD3Call", "TransformerCall", "UNetCall", "backbone_for", "build", "hook_points", "calculate_shift", "register"]
