"""Conditioning: what a denoiser is given besides (x_t, t), and how many passes a step runs.

A conditioner turns a prompt (text, a class label, or registered embeddings) into the denoiser's keyword
arguments for one sample, ``embed(prompt, negative_prompt, guided, image_size) -> (uncond, cond)``, with its
pipeline's own ``encode_prompt`` (so that a zero-delta sample equals the pipeline), and says how many passes a
step runs (``passes``):
- ``"cfg"``: classifier-free guidance, an unconditional and a conditional pass as one batch when guidance > 1
  (Stable Diffusion 1.x/2.x, SDXL, SD3, PixArt, DiT); one conditional pass otherwise;
- ``"embedded"``: the guidance scale is an input of the one pass (FLUX.1-dev); there is no second pass.
An unconditional model has no conditioner (``resolve`` refuses prompts for it).

Precomputed embeddings (diffusers' ``prompt_embeds``, ``negative_prompt_embeds`` and SDXL's pooled ones: prompt
weighting, textual inversion, interpolated prompts) are registered with ``TextConditioner.register`` and then stand
for a prompt: their label, ``<prompt embeds SHA>`` with the SHA-256 of the tensors, is what a spec, a trajectory or a
bank records, so a replay needs the same tensors registered (an error says so) and other tensors are another prompt.
They go through the same ``encode_prompt`` as the pipelines (which computes the negative side from the negative
prompt when no negative embeddings are given). Stable Diffusion 1.x/2.x and SDXL take them; the other conditioners
refuse such a label with a clear error.

``route`` gives each intervention the h it asks for under guidance (``interventions.py``): one that asks for
nothing sees where the spec's ``guide_edit`` sends delta-h:
- "cond": h of the conditional pass; the intervention's result replaces it (the unconditional pass is untouched);
- "uncond": the same with the unconditional pass;
- "both" (the paper's official code): the mean of the two passes' h; the change the intervention makes to
  it is added to both passes, so an edit delta-h moves each pass's h by delta-h.
Without guidance (guidance <= 1, or embedded guidance) there is one pass, and it is what the interventions see.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Callable, Sequence

import torch

from ..errors import HspaceError
from ..interventions import StepContext, apply, branch_of

logger = logging.getLogger(__name__)

# Classes of pipelines whose prompt encoding is understood (other pipelines with the same components work too).
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
DEFAULT_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance scale
SDXL_GUIDANCE = 5.0  # StableDiffusionXLPipeline's


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

    passes = "cfg"
    default_guidance = DEFAULT_GUIDANCE
    takes_embeddings = True  # precomputed embeddings (``register``)

    def __init__(self, pipeline):
        self._check(pipeline)
        self.pipeline = pipeline
        self.xl = self._is_xl(pipeline)
        if self.xl:
            self.default_guidance = SDXL_GUIDANCE  # as StableDiffusionXLPipeline
        self._cache = EmbeddingCache()
        self.registered: dict[str, dict[str, torch.Tensor]] = {}  # label -> precomputed embeddings (module doc)

    @staticmethod
    def _check(pipeline) -> None:
        if getattr(pipeline, "text_encoder", None) is None and getattr(pipeline, "text_encoder_2", None) is None:
            raise HspaceError(f"the {type(pipeline).__name__} has no text encoder; valid conditional models: {', '.join(PIPELINES)}-like folders")

    @staticmethod
    def _is_xl(pipeline) -> bool:
        return getattr(pipeline, "text_encoder_2", None) is not None or "text_time" == pipeline.unet.config.addition_embed_type

    def register(self, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None) -> str:
        """Precomputed embeddings as a prompt: their label (module doc). Each is [1, ...] or without the batch axis."""
        if not self.takes_embeddings:
            raise HspaceError(self._no_embeddings())
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

    def _no_embeddings(self) -> str:
        return (f"precomputed prompt embeddings are taken for Stable Diffusion 1.x/2.x and SDXL pipelines; not yet for this model "
                f"({self.kind}): give the prompt as text")

    def _registered(self, prompt: str) -> dict | None:
        if not prompt.startswith(EMBEDS):
            return None
        if not self.takes_embeddings:
            raise HspaceError(f"the prompt {prompt!r} stands for precomputed embeddings: " + self._no_embeddings())
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


class ClassConditioner:
    """A class-conditional pipeline's conditioning (DiTPipeline): the "prompt" is a class label, an integer
    or one of the pipeline's label names; the unconditional pass gets the null class (1000, as DiTPipeline)."""

    kind = "class label"
    passes = "cfg"

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


class SD3Conditioner(TextConditioner):
    """StableDiffusion3Pipeline's prompt encoding (two CLIP encoders and T5; T5 may be absent) by its own
    ``encode_prompt``; keywords ``encoder_hidden_states`` and ``pooled_projections``."""

    default_guidance = 7.0  # StableDiffusion3Pipeline's default
    ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    takes_embeddings = False

    @staticmethod
    def _check(pipeline) -> None:
        if getattr(pipeline, "text_encoder", None) is None:
            raise HspaceError(f"the {type(pipeline).__name__} has no text_encoder; an SD3, PixArt or FLUX pipeline needs its first text encoder")

    @staticmethod
    def _is_xl(pipeline) -> bool:
        return False

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


class FluxConditioner(SD3Conditioner):
    """FluxPipeline's prompt encoding (CLIP pooled + T5) by its own ``encode_prompt``. FLUX-dev's guidance is
    an embedding given to its one pass (``passes`` is "embedded"): there is no unconditional pass."""

    default_guidance = 3.5  # FluxPipeline's default
    passes = "embedded"
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




def resolve(conditioner, name: str, prompt, negative_prompt, guidance, guide_edit) -> dict:
    """The conditioning a spec records: a conditional model's defaults filled in (prompt "", the pipeline's
    guidance, delta-h in both passes under guidance), the prompts fitted to the text encoder; an error for
    conditioning given to an unconditional model (``conditioner`` None) or a second pass asked of a model without one."""
    given = {"prompt": prompt, "negative_prompt": negative_prompt, "guidance": guidance, "guide_edit": guide_edit}
    if conditioner is None:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise HspaceError(f"{name!r} is an unconditional model: {', '.join(named)} apply(ies) only to text-conditioned "
                              "models (a Stable Diffusion or SDXL pipeline folder or hub id)")
        return given
    prompt = conditioner.fit("" if prompt is None else prompt)
    negative_prompt = conditioner.fit(negative_prompt, "negative prompt")
    guidance = conditioner.default_guidance if guidance is None else guidance
    if conditioner.passes == "embedded":
        if guide_edit is not None:
            raise HspaceError(f"guide_edit {guide_edit!r}: this model's guidance is an embedding of its one pass (FLUX), there is "
                              "no second pass to route delta-h to; leave guide_edit out")
    elif guide_edit is None and isinstance(guidance, (int, float)) and guidance > 1:
        guide_edit = "both"
    return {"prompt": prompt, "negative_prompt": negative_prompt, "guidance": guidance, "guide_edit": guide_edit}


def route(h: torch.Tensor, interventions: Sequence[Callable], ctx: StepContext, guided: bool, guide_edit: str | None) -> torch.Tensor:
    """h of the denoiser's batch (both passes under guidance, unconditional rows first) after every intervention
    acted, in order, on the h it asks for (module doc)."""
    if not guided:
        for intervention in interventions:
            if branch_of(intervention) not in (None, "cond"):
                raise HspaceError(f"intervention {intervention!r} asks for the {branch_of(intervention)!r} pass(es), but without "
                                  "guidance there is one, conditional pass; valid: branch None or 'cond'")
            h = apply(intervention, h, ctx.on(branch_of(intervention)))
        return h
    uncond, cond = h.chunk(2)
    for intervention in interventions:
        branch = branch_of(intervention) or guide_edit
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
