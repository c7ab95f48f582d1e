"""The unconditional diffusers ``UNet2DModel`` split at h: an encoder half run once, a decoder half that h feeds.

eps(x_t, h_t) depends on h_t only through the decoder half of the U-Net (paper Sec. 4.2: the skip
tensors carry x_t's own dependency). ``encode`` computes once per (x_t, t) what does not depend on h
(time embedding, skip tensors, h itself); ``decode`` maps h to eps and is the function whose
Jacobian J_t (eq. 6) the Jacobian directions differentiate. Together they equal
``UNet2DModel.forward`` (diffusers 0.42) step by step, with the hook points of ``hooks.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import HspaceError
from ..hooks import DEFAULT_H_LOCATION, check_location
from ..speed import eager


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
    if getattr(unet, "mid_block", None) is None:
        raise HspaceError(f"{type(unet).__name__} has no mid block, so it has no h-space bottleneck")
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
