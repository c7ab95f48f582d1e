"""The latent autoencoder of a latent model (VQModel, AutoencoderKL): images to x_0 and back, as the pipelines do."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import HspaceError


def casts_itself(module: nn.Module) -> bool:
    """Whether ``module`` stores its weights in a format of its own and casts them to compute (diffusers' layerwise
    casting: float8 storage, bfloat16 compute; a quantizer's weights): converting it to a dtype would undo that."""
    if getattr(module, "hf_quantizer", None) is not None or getattr(module, "is_quantized", False):
        return True
    return any("layerwise_casting" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in module.modules())


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its parameters', or for a module that casts itself the compute dtype diffusers reports."""
    first = next(module.parameters())
    return getattr(module, "dtype", first.dtype) if casts_itself(module) else first.dtype


def vae_scale_factor(config) -> int:
    """Image pixels per latent pixel of a VAE config (a dict or a diffusers config): 2 per down block, as the pipelines'
    ``vae_scale_factor``."""
    channels = config.get("block_out_channels") if isinstance(config, dict) else getattr(config, "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 1


def prepare(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype`` (its storage kept where it casts itself), in eval mode, without gradients."""
    module = module.to(device)
    computes = compute_dtype(module)
    if computes != dtype:
        if casts_itself(module):
            raise HspaceError(f"this {type(module).__name__} computes in {computes} from weights stored in a format of its "
                              f"own (layerwise casting or a quantizer); valid dtype: {str(computes).replace('torch.', '')} "
                              "(or none: the module's own)")
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class LatentCodec:
    """A VQ/VAE between images in [-1, 1] and the denoiser's x_0 (scaled, shifted latents), on a device.

    As the pipelines: a VAE whose config sets force_upcast (SDXL's) decodes and encodes in float32 under a float16
    model, where its activations overflow float16. ``offload`` keeps it on the CPU between uses; ``slicing``
    decodes one image per call; ``tiling`` uses the VAE's own tiles."""

    def __init__(self, vae: nn.Module, device: torch.device, dtype: torch.dtype, offload: bool = False, slicing: bool = False,
                 tiling: bool = False):
        upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        self.dtype = torch.float32 if upcast else dtype
        self.device, self.offload, self.slicing = device, offload, slicing
        self.vae = prepare(vae, torch.device("cpu") if offload else device, self.dtype)
        if tiling:
            if not callable(getattr(self.vae, "enable_tiling", None)):
                raise HspaceError(f"vae_tiling (--vae-tiling) tiles a latent model's VAE; its {type(self.vae).__name__} has no enable_tiling")
            self.vae.enable_tiling()

    @property
    def pixels_per_latent(self) -> int:
        """Image pixels per latent pixel (``vae_scale_factor``)."""
        return vae_scale_factor(self.vae.config)

    @property
    def scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift(self) -> float | None:
        """The VAE's shift_factor (SD3, FLUX): latents are (z - shift) * scale."""
        return getattr(self.vae.config, "shift_factor", None) or None

    @contextlib.contextmanager
    def on_device(self):
        """The VAE on the engine's device while it runs; back on the CPU after, when offloading."""
        if not self.offload:
            yield
            return
        self.vae.to(self.device)
        try:
            yield
        finally:
            self.vae.to("cpu")

    def decode(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from x_0, float32 on the CPU."""
        out = []
        with torch.no_grad(), self.on_device():
            for part in x0.split(1 if self.slicing else batch_size):
                z = part.to(self.device, self.dtype) / self.scale
                if self.shift is not None:
                    z = z + self.shift
                out.append(self.vae.decode(z).sample.float().cpu())
        images = torch.cat(out)
        if not bool(torch.isfinite(images).all()):
            raise HspaceError(f"the {type(self.vae).__name__} decoded NaN or infinite values in {str(self.dtype).replace('torch.', '')}: "
                              "its activations overflow that precision; load the model in float32 (--dtype float32), or set the VAE "
                              "config's force_upcast so that it decodes in float32")
        return images

    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x_0 from images [B, 3, H, W] in [-1, 1]: the latents (times the scaling factor), float32 on the CPU."""
        out = []
        with torch.no_grad(), self.on_device():
            for part in images.split(1 if self.slicing else batch_size):
                encoded = self.vae.encode(part.to(self.device, self.dtype))
                latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
                if self.shift is not None:
                    latents = latents - self.shift
                out.append((latents * self.scale).float().cpu())
        return torch.cat(out)
