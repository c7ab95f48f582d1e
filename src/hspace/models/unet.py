"""The unconditional diffusers ``UNet2DModel`` behind the engine, and its forward split at h.

``UNetModel`` is what the engine asks of a model (k-diffusion's wrappers are the pattern): the U-Net's
output at (x_t, t) with an intervention on h, the shape of h, the decoder half at h for the Jacobian,
and the latent autoencoder of a latent model. The split: an encoder half run once, a decoder half that h feeds.

eps(x_t, h_t) depends on h_t only through the decoder half of the U-Net (paper Sec. 4.2: the skip
tensors carry x_t's own dependency). ``encode`` computes once per (x_t, t) what does not depend on h
(time embedding, skip tensors, h itself); ``decode`` maps h to eps and is the function whose
Jacobian J_t (eq. 6) the Jacobian directions differentiate. Together they equal
``UNet2DModel.forward`` (diffusers 0.42) step by step, with the hook point of ``hooks.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import HspaceError
from ..hooks import DEFAULT_H_LOCATION, H_LOCATIONS, bottleneck, check_location, h_hook
from ..interventions import LinearEdit, StepContext, apply_all, context
from ..speed import Speed, eager


@dataclass
class EncoderCache:
    """Everything of one U-Net pass at (x_t, t) that does not depend on h (batch B, usually 1)."""

    location: str
    timesteps: torch.Tensor  # [B] the timestep of every sample (the Fourier embedding divides by it)
    emb: torch.Tensor  # [B, E] time embedding
    res_samples: tuple[torch.Tensor, ...]  # the skip tensors (down_block_res_samples), shallow to deep
    h: torch.Tensor  # [B, *h_shape] h at ``location``, as the decoder half sees it

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.h.shape[1:])


def check_unet(unet: nn.Module) -> None:
    """Raise HspaceError unless ``unet`` is a UNet2DModel this module can split."""
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet2DModel):
        raise HspaceError(f"the U-Net split supports diffusers UNet2DModel only, got {type(unet).__name__}")
    bottleneck(unet)
    if unet.class_embedding is not None:
        raise HspaceError(
            f"class-conditional U-Nets (class_embed_type={unet.config.class_embed_type!r}, num_class_embeds="
            f"{unet.config.num_class_embeds!r}) are not supported by the U-Net split; valid: an unconditional "
            "UNet2DModel (no class embedding)"
        )


def encode(unet: nn.Module, x_t: torch.Tensor, t: int | torch.Tensor, location: str = DEFAULT_H_LOCATION) -> EncoderCache:
    """Run the U-Net up to h (``location``) at (x_t, t) and keep what the decoder half needs.

    Mirrors ``UNet2DModel.forward`` steps 0-4 (center_input_sample, time embedding, conv_in, down
    blocks including the skip-conv variants, and the mid block for "mid.out"). No gradient.
    """
    check_location(location)
    check_unet(unet)
    if x_t.ndim != 4:
        raise HspaceError(f"x_t must be [B, C, H, W], got shape {tuple(x_t.shape)}")
    device, dtype = unet.device, unet.dtype
    sample = x_t.to(device, dtype)
    with torch.no_grad():
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # As UNet2DModel.forward: a Python number becomes a long tensor (a float timestep is truncated).
        timesteps = t if torch.is_tensor(t) else torch.tensor([t], dtype=torch.long)
        timesteps = timesteps.to(device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=dtype))

        skip_sample = sample
        sample = unet.conv_in(sample)
        res_samples: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            res_samples += res
        if location == "mid.out":
            sample = unet.mid_block(sample, emb)
    return EncoderCache(location, timesteps, emb, res_samples, sample)


def decode(unet: nn.Module, h: torch.Tensor, cache: EncoderCache) -> torch.Tensor:
    """eps (the U-Net output) from h and a cache: the decoder half of ``UNet2DModel.forward`` (steps 4-6).

    ``h`` is [k, *h_shape]; a cache of batch 1 serves any k (its tensors are expanded), otherwise k
    must equal the cache's batch. Differentiable in h (reverse mode; forward mode inside
    ``forward_mode(unet)``).
    """
    if tuple(h.shape[1:]) != cache.h_shape or h.ndim != len(cache.h_shape) + 1:
        raise HspaceError(f"h has shape {tuple(h.shape)}; valid: [k, {', '.join(map(str, cache.h_shape))}]")
    k = h.shape[0]
    if cache.batch_size not in (1, k):
        raise HspaceError(f"h has batch {k} but the encoder cache has batch {cache.batch_size}; valid: {cache.batch_size} or a cache of batch 1")

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.expand(k, *x.shape[1:]) if x.shape[0] != k else x

    emb = expand(cache.emb)
    res_samples = tuple(expand(r) for r in cache.res_samples)
    sample = h
    if cache.location == "mid.in":
        sample = unet.mid_block(sample, emb)

    skip_sample = None
    for block in unet.up_blocks:
        res = res_samples[-len(block.resnets) :]
        res_samples = res_samples[: -len(block.resnets)]
        if hasattr(block, "skip_conv"):
            sample, skip_sample = block(sample, res, emb, skip_sample)
        else:
            sample = block(sample, res, emb)

    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    if skip_sample is not None:
        sample = sample + skip_sample  # not in place: the output may carry forward-mode tangents
    if unet.config.time_embedding_type == "fourier":
        sample = sample / cache.timesteps.reshape(-1, *([1] * (sample.ndim - 1)))
    return sample


@contextlib.contextmanager
def forward_mode(unet: nn.Module) -> Iterator[None]:
    """Make the U-Net differentiable in forward mode (torch 2.13) inside the block; undone in ``finally``.

    Two gaps in torch's forward-mode AD are routed around, values unchanged:
    - scaled_dot_product_attention goes to its math backend: the fused kernels (CPU flash, CUDA
      flash / memory-efficient) have no forward derivative, so a JVP through diffusers'
      AttnProcessor2_0 fails with NotImplementedError;
    - GroupNorm inputs are made contiguous: an attention block returns a channels-last view, and
      group_norm's forward derivative fails on one ("view size is not compatible"), e.g. in the
      mid block for h at "mid.in".
    Blocks compiled by ``Speed(compile=True)`` run eagerly inside (torch.compile does not trace forward-mode AD).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    handles = [m.register_forward_pre_hook(_contiguous_input) for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    try:
        with sdpa_kernel(SDPBackend.MATH), eager():  # compiled blocks (``Speed.compile``) run eagerly here
            yield
    finally:
        for handle in handles:
            handle.remove()


def _contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


@dataclass
class DecoderHalf:
    """eps(x_t, h) as a function of h alone at one (x_t, t): the function whose Jacobian J_t (eq. 6) the
    Jacobian directions decompose. ``h`` is h_t of the unedited pass; ``forward_mode()`` must enclose
    forward-mode differentiation."""

    unet: nn.Module
    cache: EncoderCache

    @property
    def h(self) -> torch.Tensor:
        return self.cache.h

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return decode(self.unet, h, self.cache)

    def forward_mode(self):
        return forward_mode(self.unet)


def _prepare(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class UNetModel:
    """An unconditional U-Net (+ the VQ/VAE of a latent model) on a device, in a dtype, with h at ``h_location``.

    The backbone plug-in of ``UNet2DModel`` (``models/__init__.py``): every other family subclasses it and
    overrides what differs (``locations``, ``_forward``, ``_hook``, ``conditioner_for``, ``schedule_options``)."""

    kind = "unconditional"
    family = "U-Net"

    def __init__(self, unet: nn.Module, decoder: nn.Module | None, h_location: str, device: torch.device, dtype: torch.dtype,
                 speed: Speed | None = None, size: tuple[int, int] | None = None):
        self.h_location = self.check_location(unet, h_location)
        self.device, self.dtype = device, dtype
        self.speed = speed or Speed()
        self.unet = _prepare(unet, device, dtype)
        self._prepare_speed()
        # As the pipelines: a VAE whose config sets force_upcast (SDXL's) decodes and encodes in float32 under a
        # float16 model, where its activations overflow float16 (NaN images otherwise).
        upcast = decoder is not None and dtype == torch.float16 and bool(getattr(decoder.config, "force_upcast", False))
        self.decoder_dtype = torch.float32 if upcast else dtype
        self.decoder = None if decoder is None else _prepare(decoder, torch.device("cpu") if self.speed.offload else device, self.decoder_dtype)
        if self.speed.vae_tiling:
            if self.decoder is None or not callable(getattr(self.decoder, "enable_tiling", None)):
                what = "this model has no VAE (it runs in pixel space)" if self.decoder is None else f"its {type(self.decoder).__name__} has no enable_tiling"
                raise HspaceError(f"vae_tiling (--vae-tiling) tiles a latent model's VAE; {what}")
            self.decoder.enable_tiling()
        self.sample_shape = self._sample_shape() if size is None else self._sized(size)
        self._h_shape: tuple[int, ...] | None = None

    def pixels_per_latent(self) -> int:
        """Image pixels per latent pixel: 2 per down block of the VAE, as the pipelines' ``vae_scale_factor``; 1 in pixel space."""
        if self.decoder is None:
            return 1
        channels = getattr(self.decoder.config, "block_out_channels", None)
        return 2 ** (len(channels) - 1) if channels else 1

    def size_multiple(self) -> int:
        """What an image height or width must be a multiple of."""
        return self.pixels_per_latent()

    def _sized(self, size: tuple[int, int]) -> tuple[int, ...]:
        """[C, H, W] of x_t for images of ``size`` (height, width) pixels."""
        step, factor, default = self.size_multiple(), self.pixels_per_latent(), self._sample_shape()
        bad = [s for s in size if s % step]
        if bad:
            raise HspaceError(f"image size {size[0]}x{size[1]}: {bad[0]} is not a multiple of {step}; valid: heights and widths that are "
                              f"multiples of {step} for this model (its default is {'x'.join(str(s * factor) for s in default[1:])})")
        return (default[0], size[0] // factor, size[1] // factor)

    def _sample_shape(self) -> tuple[int, ...]:
        """[C, H, W] of x_t: the denoiser's in_channels and sample_size."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
            raise HspaceError(f"the denoiser's config has sample_size {self.unet.config.sample_size!r}; valid: a positive integer "
                              "(or two): the size of the samples it makes")
        return (self.unet.config.in_channels, *size)

    @classmethod
    def build(cls, components, h_location: str, device, dtype, spec, speed) -> "UNetModel":
        """The wrapper of ``components`` (``models.backbone_for`` chose the class)."""
        return cls(components.unet, components.decoder, h_location, device, dtype, speed, spec.size)

    @classmethod
    def locations(cls, denoiser: nn.Module) -> dict[str, str]:
        """Every h location of this denoiser, with what it is."""
        return dict(H_LOCATIONS)

    @classmethod
    def default_location(cls, denoiser: nn.Module) -> str:
        return DEFAULT_H_LOCATION

    def location_shape(self, location: str) -> tuple[int, ...]:
        """h's shape at ``location`` for one sample (the mid block keeps its input's shape)."""
        return self.h_shape

    @classmethod
    def check_location(cls, denoiser: nn.Module, location: str | None) -> str:
        """``location`` as the spec records it (None: the family's default); an error listing the valid ones."""
        if location is None:
            return cls.default_location(denoiser)
        valid = cls.locations(denoiser)
        if location not in valid:
            raise HspaceError(f"unknown h location {location!r} for this {type(denoiser).__name__}; valid: {', '.join(valid)}")
        return location

    @classmethod
    def conditioner_for(cls, pipeline):
        """The conditioner of a pipeline holding this denoiser (None: unconditional)."""
        return None

    def schedule_options(self, num_steps: int, config: dict) -> dict:
        """What the family's pipeline passes to its scheduler's set_timesteps (flow matching's mu, sigmas)."""
        return {}

    def _prepare_speed(self) -> None:
        self.speed.prepare(self.unet, bottleneck(self.unet), self.dtype)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The denoiser's output (the part the process reads) at (x, t) with conditioning keywords."""
        return self.unet(x, t, **kwargs).sample

    def _hook(self, fn):
        """A context in which h passes through ``fn`` (``hooks.h_hook`` for the U-Nets)."""
        return h_hook(self.unet, self.h_location, fn)

    def output(self, x_t: torch.Tensor, t: int, interventions: Sequence[Callable] = (), ctx: StepContext | None = None,
               condition: dict | None = None) -> torch.Tensor:
        """The U-Net's output at (x_t, t), h passed through ``interventions`` (each ``fn(h, ctx)``,
        ``interventions.py``; hook removed after), no gradient, run as ``self.speed`` says. (``condition``:
        conditional models only.)"""
        if condition is not None:
            raise HspaceError("an unconditional model takes no prompts")
        x = self.speed.memory_format(x_t.to(self.device, self.dtype))
        t = torch.tensor(t, device=self.device)
        ctx = ctx or context(int(t), len(x))
        with torch.no_grad(), self.speed.context(self.device):
            if not interventions:
                return self._forward(x, t, {})
            with self._hook(self.speed.h_function(lambda h: apply_all(interventions, h, ctx))):
                return self._forward(x, t, {})

    def compiled_additive(self) -> Callable:
        """A denoiser with ``output``'s signature for interventions that add to h (``LinearEdit``): the whole U-Net
        compiled (``torch.compile`` with freezing: the weights prepacked as constants), delta-h an input of the graph,
        so nothing recompiles when the edit changes. ~30% faster per pass at batch 1 on a CPU; its output within
        float rounding of ``output`` (not bit-equal), so the editor uses it for previews only. The first call
        compiles (tens of seconds; cached on disk by torch for the next start)."""
        unet, location, h_shape = self.unet, self.h_location, self.h_shape

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

    @property
    def h_shape(self) -> tuple[int, ...]:
        """Shape of h_t for one sample, found by one U-Net pass the first time it is asked for."""
        if self._h_shape is None:
            seen = []
            self.output(torch.zeros(1, *self.sample_shape), 0, [lambda h, ctx: seen.append(tuple(h.shape[1:])) or h])
            self._h_shape = seen[0]
        return self._h_shape

    def describe(self) -> dict:
        return {"family": self.family, "kind": f"{self.kind} ({'latent, ' + type(self.decoder).__name__ if self.decoder is not None else 'pixel space'})"}

    def decoder_half(self, x_t: torch.Tensor, t: int, prompt: str | None = None) -> DecoderHalf:
        """The decoder half at (x_t, t) (encoder half computed once here), for the Jacobian of eq. 6."""
        if prompt is not None:
            raise HspaceError("an unconditional model takes no prompt")
        return DecoderHalf(self.unet, encode(self.unet, x_t, t, self.h_location))

    @contextlib.contextmanager
    def _decoder_on_device(self):
        """The VAE on the engine's device while it runs; back on the CPU after, with ``Speed.offload``."""
        if not self.speed.offload:
            yield
            return
        self.decoder.to(self.device)
        try:
            yield
        finally:
            self.decoder.to("cpu")

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.decoder.config, "scaling_factor", 1.0) or 1.0)

    @property
    def latent_shift(self) -> float | None:
        """The VAE's shift_factor (SD3, FLUX): latents are (z - shift) * scale."""
        return getattr(self.decoder.config, "shift_factor", None) or None

    def decode(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from x_0 (through the VQ/VAE decoder of a latent model)."""
        if self.decoder is None:
            return x0
        out = []
        with torch.no_grad(), self._decoder_on_device():
            for part in x0.split(1 if self.speed.vae_slicing else batch_size):
                z = part.to(self.device, self.decoder_dtype) / self.latent_scale
                if self.latent_shift is not None:
                    z = z + self.latent_shift
                out.append(self.decoder.decode(z).sample.float().cpu())
        images = torch.cat(out)
        if not bool(torch.isfinite(images).all()):
            raise HspaceError(f"the {type(self.decoder).__name__} decoded NaN or infinite values in {str(self.decoder_dtype).replace('torch.', '')}: "
                              "its activations overflow that precision; load the model in float32 (--dtype float32), or set the VAE "
                              "config's force_upcast so that it decodes in float32")
        return images

    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x_0 from images [B, 3, H, W] in [-1, 1]: the images for a pixel model, the autoencoder's latents
        (times its scaling factor) for a latent model. float32 on the CPU."""
        if self.decoder is None:
            return images.float()
        out = []
        with torch.no_grad(), self._decoder_on_device():
            for part in images.split(1 if self.speed.vae_slicing else batch_size):
                encoded = self.decoder.encode(part.to(self.device, self.decoder_dtype))
                latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
                if self.latent_shift is not None:
                    latents = latents - self.latent_shift
                out.append((latents * self.latent_scale).float().cpu())
        return torch.cat(out)
