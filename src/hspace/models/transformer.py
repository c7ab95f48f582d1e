"""Diffusion transformers behind the same interface as the U-Nets: DiT (class labels) and SD3 (text, flow matching).

A transformer has no bottleneck. h is the output of transformer block N on the image tokens, [B, L, D]
with L = (H/p)(W/p) tokens of a p x p patch each, seen as [B, D, H/p, W/p] (unpatchified) so that
directions, masks, PCA cells and painted regions keep their spatial meaning. ``block.N`` names it
(N from 0; negative counts from the end; the spec records it from 0). The default is the block a measurement
chose where one was made (DiT: the last block, docs/blocks/blocks.md), else the middle block (docs/transformers.md).

Guidance is the pipelines' own: both passes as one batch, uncond + g (cond - uncond); the interventions
see h as ``ConditionalUNetModel.route`` gives it (``guide_edit``). DiT's learned-variance channels are
dropped as DiTPipeline drops them (the process reads the eps channels only).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..errors import HspaceError
from .conditional import ConditionalUNetModel, EmbeddingCache, TextConditioner

logger = logging.getLogger(__name__)


def _tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, L, D] image tokens (row-major patches) -> [B, D, H/p, W/p]."""
    b, length, d = tokens.shape
    if length != grid[0] * grid[1]:
        raise HspaceError(f"the block made {length} image tokens but the sample has {grid[0]}x{grid[1]} patches")
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def _grid_to_tokens(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(h.shape[0], h.shape[1], -1).transpose(1, 2).contiguous()


class TransformerModel(ConditionalUNetModel):
    """A diffusion transformer (+ its VAE and conditioner) with h after one of its blocks (module doc)."""

    kind = "transformer"
    family = "transformer"
    kinds = {"block": "transformer_blocks"}  # location name -> the attribute holding those blocks, in forward order
    image_output = None  # index of the image tokens in a block's output tuple (None: the output is the tokens)

    def __init__(self, unet, decoder, h_location, device, dtype, conditioner, spec, speed=None):
        super().__init__(unet, decoder, h_location, device, dtype, conditioner, spec, speed)
        patch = int(self.unet.config.patch_size)
        self.grid = (self.sample_shape[1] // patch, self.sample_shape[2] // patch)

    @classmethod
    def block_list(cls, denoiser: nn.Module, kind: str | None = None) -> nn.ModuleList:
        """The blocks of one kind (default: the first, ``block`` for DiT, PixArt and SD3)."""
        return getattr(denoiser, cls.kinds[kind or next(iter(cls.kinds))])

    @classmethod
    def locations(cls, denoiser: nn.Module) -> dict[str, str]:
        found = {}
        for kind, attribute in cls.kinds.items():
            n = len(getattr(denoiser, attribute))
            what = attribute[:-1].replace("_", " ")
            found.update({f"{kind}.{i}": f"output of {what} {i} of {n} on the image tokens" for i in range(n)})
        return found

    default_depth = 0.5  # the default h: this fraction of the way through the blocks (0.5: the middle, not measured)

    @classmethod
    def default_location(cls, denoiser: nn.Module) -> str:
        """The block ``default_depth`` of the way through all blocks in forward order (block int(depth x n))."""
        names = list(cls.locations(denoiser))
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

    def size_multiple(self) -> int:
        return self.pixels_per_latent() * int(self.unet.config.patch_size)

    def _prepare_speed(self) -> None:
        if self.speed.compile:
            raise HspaceError(f"--compile is not supported for {self.family} backbones yet; valid: leave it out")
        self.speed.prepare(self.unet, self._block(), self.dtype)  # channels_last; autocast's dtype check

    def _block(self) -> nn.Module:
        kind, _, index = self.h_location.partition(".")
        return self.block_list(self.unet, kind)[int(index)]

    @contextlib.contextmanager
    def _hook(self, fn):
        """h (the block's image tokens as a grid) through ``fn``; a hook that changes nothing leaves the
        block's output untouched, so that recording h is bit-exact."""
        index, grid = self.image_output, self.grid

        def post(_module, _args, output):
            tokens = output if index is None else output[index]
            h = _tokens_to_grid(tokens, grid)
            changed = fn(h)
            if changed is h:
                return output
            tokens = _grid_to_tokens(changed).to(tokens.dtype)
            if index is None:
                return tokens
            return tuple(tokens if i == index else o for i, o in enumerate(output))

        handle = self._block().register_forward_hook(post)
        try:
            yield
        finally:
            handle.remove()

    def describe(self) -> dict:
        blocks = ", ".join(f"{len(getattr(self.unet, a))}" + ("" if k == "block" else f" {k}") for k, a in self.kinds.items())
        return {**super().describe(), "kind": f"{self.family} ({self.conditioner.kind}), patch {self.unet.config.patch_size}, {blocks} blocks"}


class ClassConditioner:
    """A class-conditional pipeline's conditioning (DiTPipeline): the "prompt" is a class label, an integer
    or one of the pipeline's label names; the unconditional pass gets the null class (1000, as DiTPipeline)."""

    kind = "class label"

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.num_classes = int(getattr(pipeline.transformer.config, "num_embeds_ada_norm", None) or 1000)
        # The unconditional embedding is the one after the classes (1000 for ImageNet's, as DiTPipeline). A model of one
        # class (the bundled toy DiT: trained without labels) is unconditional: class 0, one pass, by default.
        self.null_class = self.num_classes
        self.default_guidance = 4.0 if self.num_classes > 1 else 1.0  # DiTPipeline's default
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def label(self, prompt) -> int:
        text = str(prompt).strip()
        if text.lstrip("-").isdigit() and 0 <= int(text) < self.num_classes:
            return int(text)
        labels = getattr(self.pipeline, "labels", None) or {}
        if text in labels:
            return int(labels[text])
        examples = ", ".join(list(labels)[:5])
        raise HspaceError(f"class {prompt!r} is not a class of this model; valid: an integer from 0 to {self.num_classes - 1}"
                          + (f" or a label name ({examples}, ...)" if examples else ""))

    def fit(self, prompt, what: str = "prompt"):
        if prompt is None:
            return None
        if what != "prompt":
            raise HspaceError(f"a class-conditional model has no {what}; the unconditional pass uses the null class")
        if prompt == "" and self.num_classes == 1:
            return "0"
        if prompt == "":
            raise HspaceError(f"a class-conditional model needs a class: --prompt N with N from 0 to {self.num_classes - 1}")
        return str(self.label(prompt))

    def to(self, device, dtype, offload: bool = False) -> "ClassConditioner":
        self.device, self.dtype = device, dtype
        return self

    def embed(self, prompt, negative_prompt, guided, image_size):
        label = torch.tensor([self.label(prompt)], device=self.device)
        cond = {"class_labels": label}
        return ({"class_labels": torch.full_like(label, self.null_class)} if guided else None), cond


class DiTModel(TransformerModel):
    """``DiTTransformer2DModel`` (DiTPipeline): class labels, adaLN-Zero blocks, DDPM-family schedulers."""

    family = "DiT"
    # The last block: it won the block study on the bundled toy DiT (docs/blocks/blocks.md: best mean rank over PCA vs
    # random, regression entanglement and Jacobian locality; by a small margin, and not on every test).
    default_depth = 1.0

    @classmethod
    def conditioner_for(cls, pipeline) -> ClassConditioner:
        return ClassConditioner(pipeline)

    def _forward(self, x, t, kwargs):
        timesteps = t.reshape(-1).expand(len(x))
        out = self.unet(x, timestep=timesteps, **kwargs).sample
        channels = self.unet.config.in_channels
        return out[:, :channels] if self.unet.config.out_channels == 2 * channels else out  # learned variance dropped


class SD3Conditioner(TextConditioner):
    """StableDiffusion3Pipeline's prompt encoding (two CLIP encoders and T5; T5 may be absent) by its own
    ``encode_prompt``; keywords ``encoder_hidden_states`` and ``pooled_projections``."""

    default_guidance = 7.0  # StableDiffusion3Pipeline's default
    ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipeline):
        if getattr(pipeline, "text_encoder", None) is None:
            raise HspaceError(f"the {type(pipeline).__name__} has no text_encoder; an SD3 pipeline needs its CLIP encoders")
        self.pipeline = pipeline
        self.xl = False
        self._cache = EmbeddingCache()

    @property
    def kind(self) -> str:
        return "SD3 text" + ("" if getattr(self.pipeline, "text_encoder_3", None) is not None else ", no T5")

    def embed(self, prompt, negative_prompt, guided, image_size):
        key = (prompt, negative_prompt, guided)
        if key not in self._cache:
            with torch.no_grad(), self.on_device():
                cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
                    prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=guided, negative_prompt=negative_prompt,
                )

            def wrap(e, p):
                return {"encoder_hidden_states": e.to(self.dtype), "pooled_projections": p.to(self.dtype)}

            self._cache[key] = ((wrap(uncond, uncond_pooled) if guided else None), wrap(cond, pooled))
        return self._cache[key]


class PixArtConditioner(SD3Conditioner):
    """PixArt-alpha/sigma's prompt encoding (T5 with its attention mask) by the pipeline's own
    ``encode_prompt``, and the resolution conditioning PixArt-alpha 1024 (sample size 128) takes."""

    default_guidance = 4.5  # the PixArt pipelines' default
    ENCODERS = ("text_encoder",)

    @property
    def kind(self) -> str:
        return "T5 text"

    def embed(self, prompt, negative_prompt, guided, image_size):
        key = (prompt, negative_prompt, guided, image_size)
        if key not in self._cache:
            pipe = self.pipeline
            with torch.no_grad(), self.on_device():
                cond, mask, uncond, uncond_mask = pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=guided, negative_prompt=negative_prompt or "", num_images_per_prompt=1,
                    device=self.device, clean_caption=False,
                )
            added = {"resolution": None, "aspect_ratio": None}
            if pipe.transformer.config.sample_size == 128:  # as the pipeline: PixArt-alpha 1024's micro-conditions
                height, width = image_size
                added = {"resolution": torch.tensor([[height, width]], dtype=self.dtype, device=self.device),
                         "aspect_ratio": torch.tensor([[height / width]], dtype=self.dtype, device=self.device)}

            def wrap(e, m):
                return {"encoder_hidden_states": e.to(self.dtype), "encoder_attention_mask": m, "added_cond_kwargs": added}

            self._cache[key] = ((wrap(uncond, uncond_mask) if guided else None), wrap(cond, mask))
        return self._cache[key]


class PixArtModel(DiTModel):
    """``PixArtTransformer2DModel`` (PixArt-alpha and -sigma): T5 cross-attention, adaLN-single, DDPM family;
    its pass is DiT's (the learned-variance channels dropped), its conditioning T5 text."""

    family = "PixArt"
    default_depth = 0.5  # not measured: the middle block

    @classmethod
    def conditioner_for(cls, pipeline) -> PixArtConditioner:
        return PixArtConditioner(pipeline)


class FluxConditioner(SD3Conditioner):
    """FluxPipeline's prompt encoding (CLIP pooled + T5) by its own ``encode_prompt``. FLUX-dev's guidance is
    an embedding given to its one pass (``guidance_embedded``): there is no unconditional pass."""

    default_guidance = 3.5  # FluxPipeline's default
    guidance_embedded = True
    ENCODERS = ("text_encoder", "text_encoder_2")

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.text_ids: dict = {}

    @property
    def kind(self) -> str:
        return "CLIP + T5 text, guidance " + ("embedded" if self.pipeline.transformer.config.guidance_embeds else "distilled away")

    def fit(self, prompt, what: str = "prompt"):
        if what != "prompt" and prompt is not None:
            raise HspaceError(f"FLUX runs one pass per step: there is no {what} (the pipeline's true CFG is not supported)")
        return super().fit(prompt, what)

    def embed(self, prompt, negative_prompt, guided, image_size):
        key = prompt
        if key not in self._cache:
            with torch.no_grad(), self.on_device():
                embeds, pooled, text_ids = self.pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=1)
            self._cache[key] = (None, {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)})
            self.text_ids[key] = text_ids
        return self._cache[key]


class FluxModel(TransformerModel):
    """``FluxTransformer2DModel`` (FluxPipeline): double-stream (``joint.N``) then single-stream (``single.N``)
    blocks on 2x2-packed latents with rotary position ids, flow matching with the pipeline's dynamic shift.

    x_t stays the unpacked latent [C, H, W] (C = in_channels / 4), so h, masks and directions are spatial as
    for every family; the wrapper packs before each pass and unpacks the output (``pack`` / ``unpack``,
    the pipeline's ``_pack_latents`` / ``_unpack_latents``). h is the image stream after the block, on the
    packed tokens' (H/2) x (W/2) grid."""

    family = "FLUX"
    kinds = {"joint": "transformer_blocks", "single": "single_transformer_blocks"}
    image_output = 1  # both block kinds return (text tokens, image tokens)
    DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px through an 8x VAE

    @classmethod
    def conditioner_for(cls, pipeline) -> FluxConditioner:
        return FluxConditioner(pipeline)

    def __init__(self, unet, decoder, h_location, device, dtype, conditioner, spec, speed=None):
        super().__init__(unet, decoder, h_location, device, dtype, conditioner, spec, speed)
        self.guided = False  # one pass; the guidance scale is an input of it
        self.grid = (self.sample_shape[1] // 2, self.sample_shape[2] // 2)
        self.txt_ids = conditioner.text_ids[spec.prompt].to(device)
        self.img_ids = conditioner.pipeline._prepare_latent_image_ids(1, self.grid[0], self.grid[1], device, dtype)
        self.guidance_input = torch.tensor([spec.guidance], dtype=torch.float32, device=device) if self.unet.config.guidance_embeds else None

    def size_multiple(self) -> int:
        return 2 * self.pixels_per_latent()  # 2x2 packing of the latents

    def _sample_shape(self) -> tuple[int, ...]:
        if self.unet.config.in_channels % 4:
            raise HspaceError(f"a FLUX transformer takes 2x2-packed latents: in_channels {self.unet.config.in_channels} is not a multiple of 4")
        return (self.unet.config.in_channels // 4, self.DEFAULT_SAMPLE_SIZE, self.DEFAULT_SAMPLE_SIZE)

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

    def _forward(self, x, t, kwargs):
        timesteps = t.reshape(-1).to(x.dtype).expand(len(x)) / 1000
        guidance = None if self.guidance_input is None else self.guidance_input.expand(len(x))
        out = self.unet(hidden_states=self.pack(x), timestep=timesteps, guidance=guidance, txt_ids=self.txt_ids, img_ids=self.img_ids,
                        **kwargs).sample
        return self.unpack(out, tuple(x.shape[2:]))

    def schedule_options(self, num_steps: int, config: dict) -> dict:
        import numpy as np

        tokens = self.grid[0] * self.grid[1]
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        return {"mu": mu, "sigmas": sigmas}


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The dynamic shift mu of the flow-matching pipelines (SD3, FLUX): linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class SD3Model(TransformerModel):
    """``SD3Transformer2DModel`` (StableDiffusion3Pipeline): joint text-image blocks, flow matching."""

    family = "SD3"
    image_output = 1  # a JointTransformerBlock returns (text tokens, image tokens)

    @classmethod
    def conditioner_for(cls, pipeline) -> SD3Conditioner:
        return SD3Conditioner(pipeline)

    def _forward(self, x, t, kwargs):
        timesteps = t.reshape(-1).to(torch.float32).expand(len(x))
        return self.unet(hidden_states=x, timestep=timesteps, **kwargs).sample

    def schedule_options(self, num_steps: int, config: dict) -> dict:
        if not config.get("use_dynamic_shifting"):
            return {}
        tokens = self.grid[0] * self.grid[1]
        return {"mu": calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))}
