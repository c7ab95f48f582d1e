"""Backbone plug-ins: one wrapper per denoiser family, found by the denoiser's diffusers class.

A wrapper is what the engine asks of a model (k-diffusion's wrappers are the pattern): the output at
(x_t, t) with interventions on h, its h locations and their shapes, its conditioning and guidance, the
function of h that the Jacobian differentiates, the latent autoencoder, and what its pipeline passes
to the scheduler. The engine, banks, methods, CLI and editor ask ``backbone_for`` and nothing else.

A new family enters with ``register("ItsDiffusersClass")`` on a subclass of ``UNetModel`` (or of
``TransformerModel``) that overrides what differs.
"""

from __future__ import annotations

from torch import nn

from ..errors import HspaceError
from .conditional import ConditionalUNetModel
from .transformer import DiTModel, FluxModel, PixArtModel, SD3Model, TransformerModel
from .unet import DecoderHalf, UNetModel

# diffusers class name -> wrapper class
BACKBONES: dict[str, type] = {
    "UNet2DModel": UNetModel,
    "UNet2DConditionModel": ConditionalUNetModel,
    "DiTTransformer2DModel": DiTModel,
    "SD3Transformer2DModel": SD3Model,
    "PixArtTransformer2DModel": PixArtModel,
    "FluxTransformer2DModel": FluxModel,
}


def register(class_name: str):
    """Class decorator: the wrapper of denoisers of the diffusers class ``class_name``."""

    def add(wrapper: type) -> type:
        BACKBONES[class_name] = wrapper
        return wrapper

    return add


def backbone_for(denoiser: nn.Module) -> type:
    """The wrapper class of ``denoiser``, by its class (or the nearest registered base class). A denoiser
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


__all__ = ["BACKBONES", "ConditionalUNetModel", "DecoderHalf", "DiTModel", "FluxModel", "PixArtModel", "SD3Model", "TransformerModel", "UNetModel", "backbone_for", "register"]
