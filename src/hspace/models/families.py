"""The denoiser call of each diffusers denoiser class: how it is called at (x, t), what it names as h, its sample shape.

A ``DenoiserCall`` is the part of a backbone that differs by family (``backbone.py`` composes it with the hook
points, the latent codec and the conditioner). It knows its denoiser's signature (a U-Net's ``(x, t)``, a
transformer's ``timestep=`` keyword, FLUX's packed tokens and position ids), its hook points (``hooks.py``)
and default h, the shape of x_t, what an image size must be a multiple of, and what its pipeline passes to the
scheduler. New families enter with ``models.register``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import HspaceError
from .conditioning import ClassConditioner, FluxConditioner, PixArtConditioner, SD3Conditioner, TextConditioner
from ..hooks import HookPoint, block_points, latent_grid, position_grid, unet_points
from ..validate import is_int


class DenoiserCall:
    """What every family's call shares: ``denoiser(x, t, **keywords).sample``, the sample shape from the config, no
    conditioning and no scheduler options. A family says what differs, its hook points first (``hook_points``)."""

    family = "denoiser"
    splits = False  # True: the U-Net split (``unet.py``) computes the Jacobian's decoder half and compiled previews
    compiles = False  # True: Speed(compile=True) compiles the blocks around h

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser

    @classmethod
    def check(cls, denoiser: nn.Module) -> None:
        """Raise where this family cannot run ``denoiser``."""

    @classmethod
    def conditioner_for(cls, pipeline):
        """The conditioner of a pipeline holding this denoiser (None: unconditional; ``conditioning.py``)."""
        return None

    @classmethod
    def hook_points(cls, denoiser: nn.Module) -> dict[str, HookPoint]:
        """Every h location of ``denoiser`` by name, in forward order (``hooks.py``)."""
        raise NotImplementedError(f"{cls.__name__} names no hook points")

    @classmethod
    def default_location(cls, denoiser: nn.Module) -> str:
        return next(iter(cls.hook_points(denoiser)))

    @classmethod
    def check_location(cls, denoiser: nn.Module, location: str | None) -> str:
        """``location`` as the spec records it (None: the family's default); an error listing the valid ones."""
        if location is None:
            return cls.default_location(denoiser)
        valid = cls.hook_points(denoiser)
        if location not in valid:
            raise HspaceError(f"unknown h location {location!r} for this {type(denoiser).__name__}; valid: {', '.join(valid)}")
        return location

    def sample_shape(self) -> tuple[int, ...]:
        """[C, H, W] of x_t: the denoiser's in_channels and sample_size."""
        size = self.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(is_int(s) and s >= 1 for s in size):
            raise HspaceError(f"the denoiser's config has sample_size {self.denoiser.config.sample_size!r}; valid: a positive integer "
                              "(or two): the size of the samples it makes")
        return (self.denoiser.config.in_channels, *size)

    def patch(self) -> int:
        """Latent pixels per side of one image token (1 for a U-Net)."""
        return 1

    def bind(self, backbone) -> None:
        """Per-engine inputs of the call that do not change from step to step (FLUX's position ids)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The denoiser's output (the part the process reads) at (x, t) with conditioning keywords."""
        return self.denoiser(x, t, **kwargs).sample

    def schedule_options(self, num_steps: int, config: dict, sample_shape: tuple[int, ...]) -> dict:
        """What the family's pipeline passes to its scheduler's set_timesteps (flow matching's mu, sigmas)."""
        return {}

    def describe(self, conditioner) -> str:
        return "unconditional"

    # Calls from a user's own pipeline (``steering.py``): what hspace's t is, and which rows are the guidance's
    # unconditional pass, read off the bare denoiser's arguments.
    timestep_scale = 1.0  # the pipeline's ``timestep`` argument times this is hspace's t (0-1000)
    guidance_halves = True  # a guided call is [unconditional, conditional] halves (False: the rows cannot be told apart)

    @classmethod
    def pipeline_timestep(cls, denoiser: nn.Module, args: tuple, kwargs: dict, batch: int) -> torch.Tensor:
        """hspace's t (0-1000, float64) of each of the ``batch`` rows of one call of ``denoiser`` from any pipeline."""
        import inspect

        try:
            t = inspect.signature(denoiser.forward).bind_partial(*args, **kwargs).arguments.get("timestep")
        except TypeError:
            t = kwargs.get("timestep")
        if t is None:
            raise HspaceError(f"this call of the {type(denoiser).__name__} passes no timestep; hspace cannot tell the step to steer")
        t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1) * cls.timestep_scale
        return t.expand(batch) if len(t) == 1 else t

    @classmethod
    def unconditional_rows(cls, pipeline, denoiser: nn.Module, kwargs: dict, batch: int) -> torch.Tensor | None:
        """[batch] bool: the rows of this call that are the guidance's unconditional pass (None: an unguided call);
        an error where the pipeline's layout cannot be told apart."""
        if not cls.guidance_halves or not hasattr(pipeline, "do_classifier_free_guidance"):
            raise HspaceError(f"a {type(pipeline).__name__} does not say which rows of its {type(denoiser).__name__}'s call are the "
                              "unconditional pass; steer both passes (branch='both')")
        if not pipeline.do_classifier_free_guidance:
            return None
        if batch % 2:
            raise HspaceError(f"a guided call of {batch} rows cannot be split into conditional and unconditional halves; use branch='both'")
        rows = torch.zeros(batch, dtype=torch.bool)
        rows[: batch // 2] = True  # torch.cat([negative, positive]) in every diffusers text pipeline
        return rows


class UNetCall(DenoiserCall):
    """The unconditional ``UNet2DModel``: ``unet(x, t).sample``; h at the mid block's output (or input)."""

    family = "U-Net"
    splits = True
    compiles = True

    @classmethod
    def unconditional_rows(cls, pipeline, denoiser, kwargs, batch):
        return None  # DDPM/DDIM/LDM pipelines are unguided

    @classmethod
    def check(cls, denoiser: nn.Module) -> None:
        from .unet import check_unet

        check_unet(denoiser)

    @classmethod
    def hook_points(cls, denoiser: nn.Module) -> dict[str, HookPoint]:
        return unet_points(denoiser)

    @classmethod
    def default_location(cls, denoiser: nn.Module) -> str:
        return "mid.out"


class ConditionalUNetCall(UNetCall):
    """``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL): the same call with the text keywords."""

    unconditional_rows = DenoiserCall.unconditional_rows

    family = "conditional U-Net"
    splits = False  # under guidance the Jacobian runs the whole U-Net with h replaced by a hook (``backbone.py``)

    @classmethod
    def check(cls, denoiser: nn.Module) -> None:
        if getattr(denoiser.config, "time_cond_proj_dim", None) is not None:
            raise HspaceError("U-Nets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported; valid: SD 1.x/2.x and SDXL U-Nets")

    @classmethod
    def conditioner_for(cls, pipeline) -> TextConditioner:
        return TextConditioner(pipeline)

    def describe(self, conditioner) -> str:
        return f"conditional ({conditioner.kind})"


class TransformerCall(DenoiserCall):
    """A diffusion transformer: h after one of its blocks on the image tokens (``hooks.py``)."""

    family = "transformer"
    splits = False
    compiles = False
    kinds = {"block": "transformer_blocks"}  # location name -> the attribute holding those blocks, in forward order
    image_tokens = -1  # where a block's output holds the image tokens (-1: the output is the tokens)
    grid_of = staticmethod(latent_grid)
    default_depth = 0.5  # the default h: this fraction of the way through the blocks (0.5: the middle, not measured)

    @classmethod
    def check(cls, denoiser: nn.Module) -> None:
        pass

    @classmethod
    def hook_points(cls, denoiser: nn.Module) -> dict[str, HookPoint]:
        return block_points(denoiser, cls.kinds, cls.image_tokens, cls.grid_of)

    @classmethod
    def default_location(cls, denoiser: nn.Module) -> str:
        """The block ``default_depth`` of the way through all blocks in forward order (block int(depth x n))."""
        names = list(cls.hook_points(denoiser))
        return names[min(len(names) - 1, int(cls.default_depth * len(names)))]

    @classmethod
    def check_location(cls, denoiser: nn.Module, location: str | None) -> str:
        if location is None:
            return cls.default_location(denoiser)
        kind, _, index = location.partition(".")
        counts = {k: len(getattr(denoiser, a)) for k, a in cls.kinds.items()}
        n = counts.get(kind, 0)
        if n and index.lstrip("-").isdigit() and -n <= int(index) < n:
            return f"{kind}.{int(index) % n}"
        valid = "; ".join(f"{k}.0 to {k}.{c - 1} (or -1 to -{c} from the end)" for k, c in counts.items())
        raise HspaceError(f"unknown h location {location!r} for this {type(denoiser).__name__} ({', '.join(f'{c} {k}' for k, c in counts.items())} "
                          f"blocks); valid: {valid}")

    def patch(self) -> int:
        return int(self.denoiser.config.patch_size)

    def describe(self, conditioner) -> str:
        blocks = ", ".join(f"{len(getattr(self.denoiser, a))}" + ("" if k == "block" else f" {k}") for k, a in self.kinds.items())
        return f"{self.family} ({conditioner.kind}), patch {self.denoiser.config.patch_size}, {blocks} blocks"


class DiTCall(TransformerCall):
    """``DiTTransformer2DModel`` (DiTPipeline): class labels, adaLN-Zero blocks, DDPM-family schedulers; the
    learned-variance channels are dropped as DiTPipeline drops them."""

    family = "DiT"
    # The last block: it won the block study on the bundled toy DiT (docs/blocks/blocks.md: best mean rank over PCA vs
    # random, regression entanglement and Jacobian locality; by a small margin, and not on every test).
    default_depth = 1.0

    @classmethod
    def conditioner_for(cls, pipeline) -> ClassConditioner:
        return ClassConditioner(pipeline)

    @classmethod
    def unconditional_rows(cls, pipeline, denoiser, kwargs, batch):
        """DiTPipeline's guided call labels its unconditional rows with the null class (1000, the pipeline's constant)."""
        labels = kwargs.get("class_labels")
        if labels is None:
            return None
        rows = torch.as_tensor(labels).reshape(-1).cpu() == 1000
        return rows if bool(rows.any()) else None

    def __call__(self, x, t, kwargs):
        timesteps = t.reshape(-1).expand(len(x))
        out = self.denoiser(x, timestep=timesteps, **kwargs).sample
        channels = self.denoiser.config.in_channels
        return out[:, :channels] if self.denoiser.config.out_channels == 2 * channels else out  # learned variance dropped


class PixArtCall(DiTCall):
    """``PixArtTransformer2DModel`` (PixArt-alpha and -sigma): DiT's call, T5 text."""

    family = "PixArt"
    default_depth = 0.5  # not measured: the middle block
    unconditional_rows = DenoiserCall.unconditional_rows  # (PixArt's pipeline keeps its guidance flag local: refused)

    @classmethod
    def conditioner_for(cls, pipeline) -> PixArtConditioner:
        return PixArtConditioner(pipeline)


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The dynamic shift mu of the flow-matching pipelines (SD3, FLUX): linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _tokens(config: dict, sample_shape: tuple[int, ...], patch: int) -> int:
    return (sample_shape[1] // patch) * (sample_shape[2] // patch)


class SD3Call(TransformerCall):
    """``SD3Transformer2DModel`` (StableDiffusion3Pipeline): joint text-image blocks, flow matching."""

    family = "SD3"
    image_tokens = 1  # a JointTransformerBlock returns (text tokens, image tokens)

    @classmethod
    def conditioner_for(cls, pipeline) -> SD3Conditioner:
        return SD3Conditioner(pipeline)

    def __call__(self, x, t, kwargs):
        timesteps = t.reshape(-1).to(torch.float32).expand(len(x))
        return self.denoiser(hidden_states=x, timestep=timesteps, **kwargs).sample

    def schedule_options(self, num_steps: int, config: dict, sample_shape) -> dict:
        if not config.get("use_dynamic_shifting"):
            return {}
        tokens = _tokens(config, sample_shape, self.patch())
        return {"mu": calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))}


class FluxCall(TransformerCall):
    """``FluxTransformer2DModel`` (FluxPipeline): double-stream (``joint.N``) then single-stream (``single.N``) blocks
    on 2x2-packed latents with rotary position ids, flow matching with the pipeline's dynamic shift.

    x_t stays the unpacked latent [C, H, W] (C = in_channels / 4), so h, masks and directions are spatial as for every
    family; the call packs before each pass and unpacks the output (``pack`` / ``unpack``, the pipeline's
    ``_pack_latents`` / ``_unpack_latents``). h is the image stream after the block, on the packed tokens'
    (H/2) x (W/2) grid (read off the call's ``img_ids``)."""

    family = "FLUX"
    timestep_scale = 1000.0  # FluxPipeline passes t / 1000
    guidance_halves = False  # embedded guidance is one pass; true CFG calls the transformer twice, alike
    kinds = {"joint": "transformer_blocks", "single": "single_transformer_blocks"}
    image_tokens = 1  # both block kinds return (text tokens, image tokens)
    grid_of = staticmethod(position_grid)
    DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px through an 8x VAE

    @classmethod
    def conditioner_for(cls, pipeline) -> FluxConditioner:
        return FluxConditioner(pipeline)

    def patch(self) -> int:
        return 2  # 2x2 packing of the latents

    def sample_shape(self) -> tuple[int, ...]:
        if self.denoiser.config.in_channels % 4:
            raise HspaceError(f"a FLUX transformer takes 2x2-packed latents: in_channels {self.denoiser.config.in_channels} is not a multiple of 4")
        return (self.denoiser.config.in_channels // 4, self.DEFAULT_SAMPLE_SIZE, self.DEFAULT_SAMPLE_SIZE)

    def bind(self, backbone) -> None:
        grid = (backbone.sample_shape[1] // 2, backbone.sample_shape[2] // 2)
        self.txt_ids = backbone.conditioner.text_ids[backbone.spec_prompt].to(backbone.device)
        self.img_ids = backbone.conditioner.pipeline._prepare_latent_image_ids(1, grid[0], grid[1], backbone.device, backbone.dtype)
        embedded = self.denoiser.config.guidance_embeds
        self.guidance_input = torch.tensor([backbone.guidance], dtype=torch.float32, device=backbone.device) if embedded else None

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/2)(W/2), 4C], as FluxPipeline._pack_latents."""
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The inverse of ``pack``: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
        b, _, d = tokens.shape
        h, w = size
        return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    def __call__(self, x, t, kwargs):
        timesteps = t.reshape(-1).to(x.dtype).expand(len(x)) / 1000
        guidance = None if self.guidance_input is None else self.guidance_input.expand(len(x))
        out = self.denoiser(hidden_states=self.pack(x), timestep=timesteps, guidance=guidance, txt_ids=self.txt_ids, img_ids=self.img_ids,
                            **kwargs).sample
        return self.unpack(out, tuple(x.shape[2:]))

    def schedule_options(self, num_steps: int, config: dict, sample_shape) -> dict:
        import numpy as np

        tokens = _tokens(config, sample_shape, self.patch())
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        return {"mu": mu, "sigmas": sigmas}
