"""Conditional U-Nets (Stable Diffusion 1.x/2.x, SDXL): a text-conditioned ``UNet2DConditionModel`` with
classifier-free guidance, behind the same interface as the unconditional ``UNetModel``.

h is still the mid block's output (or input). Under guidance every step runs the unconditional and the
conditional pass as one batch, and ``route`` gives each intervention the h it asks for (its ``branch``,
``interventions.py``); one that asks for nothing sees where the spec's ``guide_edit`` sends delta-h:
- "cond": h of the conditional pass; the intervention's result replaces it (the unconditional pass is untouched);
- "uncond": the same with the unconditional pass;
- "both" (the paper's official code): the mean of the two passes' h; the change the intervention makes to
  it is added to both passes, so an edit delta-h moves each pass's h by delta-h.
Without guidance (guidance <= 1) there is one pass (conditional), and it is what the interventions see.

The prompt's embeddings (and SDXL's pooled embeddings and time ids) are computed once per prompt by the
pipeline's own ``encode_prompt``, so that a zero-delta sample equals diffusers' pipeline.

Precomputed embeddings (diffusers' ``prompt_embeds``, ``negative_prompt_embeds`` and SDXL's pooled ones: prompt
weighting, textual inversion, interpolated prompts) are registered with ``TextConditioner.register`` and then stand
for a prompt: their label, ``<prompt embeds SHA>`` with the SHA-256 of the tensors, is what a spec, a trajectory or a
bank records, so a replay needs the same tensors registered (an error says so) and other tensors are another prompt.
They go through the same ``encode_prompt`` as the pipelines (which computes the negative side from the negative
prompt when no negative embeddings are given).

The Jacobian's function (eq. 6) here is the guided output as a function of the h that the interventions
see: J = g J_cond for "cond", (1 - g) J_uncond for "uncond", (1 - g) J_uncond + g J_cond for "both", which is
what an edit of that h does to the step. It runs the whole U-Net with h replaced by a hook: under
``vmap`` the part before h does not depend on the vectors and runs once per product, so splitting the
U-Net (as ``unet.py`` does for UNet2DModel) would save little (docs/directions.md measures this).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import HspaceError
from ..interventions import StepContext, apply, branch_of, context
from .unet import UNetModel, forward_mode

logger = logging.getLogger(__name__)

# Classes of pipelines whose prompt encoding is understood (other pipelines with the same components work too).
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
DEFAULT_GUIDANCE = 7.5  # diffusers' pipelines' default guidance scale


class EmbeddingCache(dict):
    """Embeddings per prompt, the most recent ``size`` kept (a bank over thousands of prompts holds a few)."""

    def __init__(self, size: int = 256):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]


EMBEDS = "<prompt embeds "  # the label of registered prompt embeddings: EMBEDS + 16 hex digits + ">"
EMBED_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class TextConditioner:
    """The text side of a Stable Diffusion-like pipeline: prompt -> the U-Net's conditioning keywords.

    ``embed`` returns (uncond, cond): each a dict of ``UNet2DConditionModel`` keyword arguments for ONE
    sample (``encoder_hidden_states`` [1, L, D]; for SDXL also ``added_cond_kwargs``), uncond None when
    there is no guidance. Results are cached per (prompt, negative prompt, guided).
    """

    def __init__(self, pipeline):
        if getattr(pipeline, "text_encoder", None) is None and getattr(pipeline, "text_encoder_2", None) is None:
            raise HspaceError(f"the {type(pipeline).__name__} has no text encoder; valid conditional models: {', '.join(PIPELINES)}-like folders")
        self.pipeline = pipeline
        self.xl = getattr(pipeline, "text_encoder_2", None) is not None or "text_time" == pipeline.unet.config.addition_embed_type
        self._cache = EmbeddingCache()
        self.registered: dict[str, dict[str, torch.Tensor]] = {}  # label -> precomputed embeddings (module doc)

    def register(self, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None) -> str:
        """Precomputed embeddings as a prompt: their label (module doc). Each is [1, ...] or without the batch axis."""
        if type(self).embed is not TextConditioner.embed:
            raise HspaceError(f"precomputed prompt embeddings are taken for Stable Diffusion 1.x/2.x and SDXL pipelines; not yet for "
                              f"this model ({type(self).__name__}): give the prompt as text")
        given = dict(zip(EMBED_KEYS, (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)))
        width = self.pipeline.unet.config.cross_attention_dim
        tensors = {}
        for key, value in given.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise HspaceError(f"{key} must be a tensor, got {type(value).__name__}")
            pooled = key.endswith("pooled_prompt_embeds")
            value = value.detach().to("cpu", torch.float32)
            value = value if value.ndim == (2 if pooled else 3) else value[None]
            expected = "[1, D]" if pooled else f"[1, L, {width}]"
            if value.ndim != (2 if pooled else 3) or value.shape[0] != 1 or (not pooled and value.shape[-1] != width):
                raise HspaceError(f"{key} has shape {tuple(value.shape)}; valid: {expected} (one prompt's, as encode_prompt returns it)")
            if not bool(torch.isfinite(value).all()):
                raise HspaceError(f"{key} holds NaN or infinite values")
            tensors[key] = value
        if "prompt_embeds" not in tensors:
            raise HspaceError("prompt_embeds is needed (the other embeddings go with it)")
        if self.xl and ("pooled_prompt_embeds" not in tensors or ("negative_prompt_embeds" in tensors) != ("negative_pooled_prompt_embeds" in tensors)):
            raise HspaceError("an SDXL pipeline needs pooled_prompt_embeds with prompt_embeds, and negative_pooled_prompt_embeds with "
                              "negative_prompt_embeds (as its encode_prompt returns them)")
        digest = hashlib.sha256()
        for key, value in tensors.items():
            digest.update(key.encode() + str(tuple(value.shape)).encode() + value.numpy().tobytes())
        label = f"{EMBEDS}{digest.hexdigest()[:16]}>"
        self.registered[label] = tensors
        return label

    def _registered(self, prompt: str) -> dict | None:
        if not prompt.startswith(EMBEDS):
            return None
        if prompt not in self.registered:
            raise HspaceError(f"the prompt {prompt} is precomputed embeddings that this engine does not hold: register the same tensors "
                              "first (engine.prompt_embeds(...) returns this label for them)")
        return self.registered[prompt]

    @property
    def kind(self) -> str:
        return "sdxl" if self.xl else "sd"

    def fit(self, prompt: str | None, what: str = "prompt") -> str | None:
        """The prompt as the text encoder sees it: cut to the tokenizer's length (as the pipelines cut it, and
        said, as they log it), so that the spec records what was used."""
        tokenizer = getattr(self.pipeline, "tokenizer", None) or getattr(self.pipeline, "tokenizer_2", None)
        if not isinstance(prompt, str) or tokenizer is None:
            return prompt  # (not a string: the spec says what is wrong with it)
        if self._registered(prompt) is not None:
            if what != "prompt":
                raise HspaceError(f"the {what} cannot be precomputed embeddings: give them as negative_prompt_embeds with the prompt's")
            return prompt
        ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
        room = tokenizer.model_max_length - 2  # the start and end tokens
        if len(ids) <= room:
            return prompt
        kept = tokenizer.decode(ids[:room])
        logger.warning("the %s is %d tokens, longer than the text encoder's %d: it is cut to %r (recorded in the spec)", what, len(ids), room, kept)
        return kept

    ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline's attributes holding its text encoders

    def to(self, device: torch.device, dtype: torch.dtype, offload: bool = False) -> "TextConditioner":
        """Encode on ``device`` in ``dtype``; with ``offload`` the encoders wait on the CPU between prompts."""
        if (getattr(self, "device", None), getattr(self, "dtype", None), getattr(self, "offload", False)) == (device, dtype, offload):
            return self
        for encoder in self.encoders():
            encoder.to(device=torch.device("cpu") if offload else device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype, self.offload = device, dtype, offload
        self._cache.clear()
        return self

    def encoders(self) -> list[torch.nn.Module]:
        return [e for e in (getattr(self.pipeline, name, None) for name in self.ENCODERS) if e is not None]

    @contextlib.contextmanager
    def on_device(self):
        """The encoders on the device while a prompt is encoded; back on the CPU after, when offloading."""
        if not getattr(self, "offload", False):
            yield
            return
        for encoder in self.encoders():
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.encoders():
                encoder.to("cpu")

    def embed(self, prompt: str, negative_prompt: str | None, guided: bool, image_size: tuple[int, int]) -> tuple[dict | None, dict]:
        key = (prompt, negative_prompt, guided, image_size)
        if key not in self._cache:
            given = self._registered(prompt) or {}
            if given:
                prompt = None  # as the pipelines take embeddings: prompt=None, prompt_embeds=...
                if "negative_prompt_embeds" in given:
                    negative_prompt = None
                given = {k: v.to(self.device, self.dtype) for k, v in given.items()}
            with torch.no_grad(), self.on_device():
                self._cache[key] = self._embed_xl(prompt, negative_prompt, guided, image_size, given) if self.xl else self._embed_sd(prompt, negative_prompt, guided, given)
        return self._cache[key]

    def _embed_sd(self, prompt, negative_prompt, guided, given=None):
        cond, uncond = self.pipeline.encode_prompt(prompt, self.device, 1, guided, negative_prompt, **(given or {}))
        wrap = lambda e: {"encoder_hidden_states": e.to(self.dtype)}  # noqa: E731
        return (wrap(uncond) if guided else None), wrap(cond)

    def _embed_xl(self, prompt, negative_prompt, guided, image_size, given=None):
        pipe = self.pipeline
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided, negative_prompt=negative_prompt,
            **(given or {}),
        )
        projection = int(pooled.shape[-1]) if getattr(pipe, "text_encoder_2", None) is None else pipe.text_encoder_2.config.projection_dim
        # As the pipeline with its defaults: original size = target size = the image size, crop (0, 0).
        time_ids = pipe._get_add_time_ids(tuple(image_size), (0, 0), tuple(image_size), dtype=cond.dtype, text_encoder_projection_dim=projection)

        def wrap(e, p):
            return {"encoder_hidden_states": e.to(self.dtype), "added_cond_kwargs": {"text_embeds": p.to(self.dtype), "time_ids": time_ids.to(self.device, self.dtype)}}

        return (wrap(uncond, uncond_pooled) if guided else None), wrap(cond, pooled)


def _rows(kwargs: dict, n: int) -> dict:
    """Conditioning keywords of one sample repeated for n samples (None stays None)."""
    return {k: _rows(v, n) if isinstance(v, dict) else (None if v is None else v.expand(n, *v.shape[1:])) for k, v in kwargs.items()}


def _cat(a: dict, b: dict) -> dict:
    return {k: _cat(v, b[k]) if isinstance(v, dict) else (None if v is None else torch.cat([v, b[k]])) for k, v in a.items()}


def _stack(rows: list[dict]) -> dict:
    """Conditioning keywords of several samples (one dict each, [1, ...] tensors) as one batch."""
    first = rows[0]
    return {k: _stack([r[k] for r in rows]) if isinstance(v, dict) else (None if v is None else torch.cat([r[k] for r in rows]))
            for k, v in first.items()}


class ConditionalUNetModel(UNetModel):
    """A ``UNet2DConditionModel`` (+ its VAE and text encoders) for one prompt, guidance and guide_edit (a spec)."""

    kind = "conditional"
    family = "conditional U-Net"

    @classmethod
    def build(cls, components, h_location, device, dtype, spec, speed) -> "ConditionalUNetModel":
        return cls(components.unet, components.decoder, h_location, device, dtype, components.conditioner, spec, speed)

    @classmethod
    def conditioner_for(cls, pipeline) -> "TextConditioner":
        return TextConditioner(pipeline)

    def __init__(self, unet, decoder, h_location, device, dtype, conditioner: TextConditioner, spec, speed=None):
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise HspaceError("U-Nets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported; valid: SD 1.x/2.x and SDXL U-Nets")
        super().__init__(unet, decoder, h_location, device, dtype, speed, spec.size)
        self.conditioner = conditioner.to(device, dtype, self.speed.offload)
        self.guided, self.guidance, self.guide_edit = spec.guided, spec.guidance, spec.guide_edit
        self.image_size = tuple(s * self.pixels_per_latent() for s in self.sample_shape[1:])  # the images' size, as the pipeline's
        self.negative_prompt = spec.negative_prompt
        self.uncond, self.cond = self.conditioner.embed(spec.prompt, spec.negative_prompt, spec.guided, self.image_size)

    def conditioning(self, prompts: Sequence[str]) -> dict:
        """The denoiser's conditioning keywords for a batch whose samples have these prompts (both passes under
        guidance: all unconditional rows, then all conditional rows); each prompt is encoded once (cached)."""
        pairs = [self.conditioner.embed(p, self.negative_prompt, self.guided, self.image_size) for p in prompts]
        cond = _stack([c for _, c in pairs])
        return _cat(_stack([u for u, _ in pairs]), cond) if self.guided else cond

    def _conditioning(self, n: int) -> dict:
        if not self.guided:
            return _rows(self.cond, n)
        return _cat(_rows(self.uncond, n), _rows(self.cond, n))

    def route(self, h: torch.Tensor, interventions: Sequence[Callable], ctx: StepContext) -> torch.Tensor:
        """h of the U-Net batch (both passes under guidance) after every intervention acted, in order, on the
        h it asks for (module doc)."""
        if not self.guided:
            for intervention in interventions:
                if branch_of(intervention) not in (None, "cond"):
                    raise HspaceError(f"intervention {intervention!r} asks for the {branch_of(intervention)!r} pass(es), but without "
                                      "guidance there is one, conditional pass; valid: branch None or 'cond'")
                h = apply(intervention, h, ctx.on(branch_of(intervention)))
            return h
        uncond, cond = h.chunk(2)
        for intervention in interventions:
            branch = branch_of(intervention) or self.guide_edit
            if branch_of(intervention) is None and branch == "both":
                mean = (uncond + cond) / 2
                change = apply(intervention, mean, ctx.on(None)) - mean
                uncond, cond = uncond + change, cond + change
                continue
            if branch in ("uncond", "both"):
                uncond = apply(intervention, uncond, ctx.on("uncond"))
            if branch in ("cond", "both"):
                cond = apply(intervention, cond, ctx.on("cond"))
        return torch.cat([uncond, cond])

    def guided_output(self, x_t: torch.Tensor, t: int, interventions: Sequence[Callable] = (), ctx: StepContext | None = None,
                      autocast: bool = False, condition: dict | None = None) -> torch.Tensor:
        """The guided output (gradients allowed): uncond + g (cond - uncond), as diffusers' pipelines; h through
        ``interventions`` (``route``), in float32 for them when ``autocast`` (``Speed.h_function``). ``condition``
        (``conditioning``) gives each sample its prompt; None: the spec's prompt for all."""
        x = x_t.to(self.device, self.dtype)
        n = len(x)
        if self.guided:
            x = torch.cat([x, x])
        x = self.speed.memory_format(x)
        t = torch.tensor(t, device=self.device)
        kwargs = self._conditioning(n) if condition is None else condition
        ctx = ctx or context(int(t), n)
        if not interventions:
            out = self._forward(x, t, kwargs)
        else:
            hook = lambda h: self.route(h, interventions, ctx)  # noqa: E731
            with self._hook(self.speed.h_function(hook) if autocast else hook):
                out = self._forward(x, t, kwargs)
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def output(self, x_t: torch.Tensor, t: int, interventions: Sequence[Callable] = (), ctx: StepContext | None = None,
               condition: dict | None = None) -> torch.Tensor:
        with torch.no_grad(), self.speed.context(self.device):  # autocast here only: the Jacobian runs in the model's dtype
            return self.guided_output(x_t, t, interventions, ctx, autocast=True, condition=condition)

    def decoder_half(self, x_t: torch.Tensor, t: int, prompt: str | None = None) -> "HookedDecoderHalf":
        seen: list[torch.Tensor] = []
        condition = None if prompt is None else self.conditioning([prompt])
        with torch.no_grad():  # (not ``output``: no autocast, the Jacobian is taken in the model's dtype)
            self.guided_output(x_t, t, [lambda h, ctx: seen.append(h) or h], condition=condition)
        return HookedDecoderHalf(self, x_t.to(self.device, self.dtype), t, seen[0], prompt)

    def describe(self) -> dict:
        return {"family": self.family, "kind": f"conditional ({self.conditioner.kind})", "guided": self.guided, "guide_edit": self.guide_edit}


@dataclass
class HookedDecoderHalf:
    """The guided output at one (x_t, t) as a function of the h the interventions see (see the module doc);
    ``h`` is that h of the unedited pass [1, *h_shape]."""

    model: ConditionalUNetModel
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
        return forward_mode(self.model.unet)
