"""A bank's layout: everything its samples depend on, as one typed value with its own digest and differences.

A ``Layout`` is the spec of the engine and process that drew the bank (``spec.py``: model fingerprint, h location,
dtype, steps, eta, spacing, autocast, conditioning), the timesteps, the first seed, the shard size, h's and the
sample's shapes, the thumbnail size and, only where they differ from the default (so that banks drawn before them
keep their digest), the prompts and their order, the steps whose h is stored, the pooling of h's grid (``h_pool``: h
averaged over cells, a direction found on it applied as its nearest upsampling) and how h is stored (``h_storage``:
float16, bfloat16, or float8 e4m3 with a float32 scale per sample and step). Every shard of a bank carries the
layout's ``digest``: a shard of another layout is refused, and extending a bank needs ``differences`` to be empty.

The model counts by its fingerprint, not its path (``Spec.key``), so a copy of the model extends the bank. Banks of
format 2 (steps, eta and autocast as keys beside the spec) are read and extended as they are: their layout keeps the
settings it was read from, and its digest is theirs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from .errors import HspaceError, check_choice
from .spec import Spec
from .validate import check_int

FORMAT = 3  # 3: the whole process (steps, eta, spacing, autocast) is in the spec
PROMPT_ORDERS = ("cycle", "random")  # sample i gets prompts[i % P], or one drawn by its seed
_REQUIRED = ("spec", "timesteps", "base_seed", "shard_size", "h_shape", "sample_shape", "thumbnail_size")
_FORMAT2 = ("spec", "num_steps", "eta", "timesteps", "base_seed", "shard_size", "h_shape", "sample_shape", "thumbnail_size")


@dataclass(frozen=True)
class Layout:
    """What a bank's samples depend on (module doc); ``Layout.of_settings(manifest)`` reads one, ``to_dict`` writes it."""

    spec: Spec  # the engine's spec with the process (num_steps, eta)
    timesteps: tuple  # integers (DDPM family) or floats (flow matching: 1000 sigma), as drawn
    base_seed: int
    shard_size: int
    h_shape: tuple[int, ...]
    sample_shape: tuple[int, ...]
    thumbnail_size: int
    prompts: tuple[str, ...] | None = None  # several prompts (the spec names the first); None: the spec's one prompt
    prompt_order: str | None = None  # with prompts: PROMPT_ORDERS
    h_steps: tuple[int, ...] | None = None  # the steps whose h is stored; None: all
    h_pool: int | None = None  # h stored averaged over h_pool x h_pool cells of its grid; None: the full grid
    h_storage: str | None = None  # H_STORAGE: how h is stored; None: float16
    format2: dict | None = field(default=None, compare=False, repr=False)  # a format-2 bank's settings, as read

    def __post_init__(self):
        if self.spec.num_steps is None:
            raise HspaceError("a bank's layout needs a spec with its process (num_steps and eta)")
        if (self.prompts is None) != (self.prompt_order is None):
            raise HspaceError("a bank's layout has prompts and their order together, or neither")
        if self.prompt_order is not None:
            check_choice("prompt_order", self.prompt_order, PROMPT_ORDERS)
        if self.h_storage is not None:
            check_choice("h_storage", self.h_storage, H_STORAGE)
        if self.h_pool is not None:
            check_int("h_pool", self.h_pool, 2, valid="an integer >= 2 (or None: the full grid)")
            pooled_shape(self.h_shape, self.h_pool)

    @classmethod
    def of_settings(cls, settings: dict) -> "Layout":
        """The layout of a manifest's (or a shard's) settings, format 3 or 2."""
        legacy = "num_steps" in settings
        missing = [key for key in (_FORMAT2 if legacy else _REQUIRED) if key not in settings]
        if missing:
            raise HspaceError(f"lacks {', '.join(missing)} (what a bank's settings of format {2 if legacy else FORMAT} hold)")
        spec = Spec.from_dict(settings["spec"])
        if legacy:
            spec = replace(spec.with_process(settings["num_steps"], settings["eta"]), autocast=settings.get("autocast"))
        optional = {key: tuple(settings[key]) if key in settings else None for key in ("prompts", "h_steps")}
        optional.update({key: settings.get(key) for key in ("h_pool", "h_storage")})
        return cls(spec, tuple(settings["timesteps"]), settings["base_seed"], settings["shard_size"], tuple(settings["h_shape"]),
                   tuple(settings["sample_shape"]), settings["thumbnail_size"], prompt_order=settings.get("prompt_order"),
                   format2=_format2(settings) if legacy else None, **optional)

    @classmethod
    def of(cls, spec: Spec, timesteps: Sequence, base_seed: int, shard_size: int, h_shape, sample_shape, thumbnail_size: int,
           prompts: Sequence[str] | None = None, prompt_order: str = "cycle", h_steps: Sequence[int] | None = None,
           h_pool: int | None = None, h_storage: str | None = None) -> "Layout":
        """A new bank's layout: ``prompts`` kept only when there are several, ``h_steps`` only when not every step,
        ``h_pool`` only above 1 and ``h_storage`` only when not float16 (so that a default bank reads as before)."""
        several = prompts is not None and len(prompts) > 1
        every = h_steps is None or list(h_steps) == list(range(spec.num_steps))
        return cls(spec, tuple(timesteps), base_seed, shard_size, tuple(h_shape), tuple(sample_shape), thumbnail_size,
                   tuple(prompts) if several else None, prompt_order if several else None, None if every else tuple(h_steps),
                   None if h_pool in (None, 1) else h_pool, None if h_storage in (None, "float16") else h_storage)

    @property
    def format(self) -> int:
        return 2 if self.format2 is not None else FORMAT

    @property
    def stored_steps(self) -> list[int]:
        """The steps (indices into the process's T) whose h is stored."""
        return list(self.h_steps) if self.h_steps is not None else list(range(self.spec.num_steps))

    def to_dict(self) -> dict:
        """The settings as a manifest holds them (a format-2 layout: the settings it was read from)."""
        if self.format2 is not None:
            return dict(self.format2)
        data = {"spec": self.spec.to_dict(), "timesteps": list(self.timesteps), "base_seed": self.base_seed, "shard_size": self.shard_size,
                "h_shape": list(self.h_shape), "sample_shape": list(self.sample_shape), "thumbnail_size": self.thumbnail_size}
        if self.prompts is not None:
            data.update(prompts=list(self.prompts), prompt_order=self.prompt_order)
        if self.h_steps is not None:
            data["h_steps"] = list(self.h_steps)
        data.update({key: getattr(self, key) for key in ("h_pool", "h_storage") if getattr(self, key) is not None})
        return data

    @property
    def digest(self) -> str:
        """A short fingerprint of the layout, stored in every shard; the model by its fingerprint (``Spec.key``)."""
        data = self.to_dict()
        if self.format2 is None:
            data["spec"] = self.spec.key()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "Layout") -> list[str]:
        """What differs between this (a bank's) layout and ``other`` (requested): the spec field by field ("spec.FIELD"),
        then every other setting."""
        found = [f"spec.{d}" for d in other.spec.differences(self.spec, "exact", what="the bank")]
        ours, theirs = self.to_dict(), other.to_dict()
        keys = ("timesteps", "base_seed", "shard_size", "h_shape", "sample_shape", "thumbnail_size", "prompts", "prompt_order", "h_steps",
                "h_pool", "h_storage")
        return found + [f"{key}: bank has {ours.get(key)!r}, requested {theirs.get(key)!r}" for key in keys if ours.get(key) != theirs.get(key)]

    def describe(self) -> str:
        spec = self.spec
        eta = spec.eta if len(set(spec.eta)) > 1 else spec.eta[0]
        return (f"model {spec.model!r} (fingerprint {spec.fingerprint}), h location {spec.h_location!r}, {spec.num_steps} steps, "
                f"eta {eta}, base seed {self.base_seed}, shard size {self.shard_size}")

    @property
    def stored_h_shape(self) -> tuple[int, ...]:
        """The shape of h as stored: the engine's, or its grid averaged over ``h_pool`` x ``h_pool`` cells."""
        return pooled_shape(self.h_shape, self.h_pool)

    @property
    def storage(self) -> str:
        return self.h_storage or "float16"

    @property
    def h_bytes_per_sample(self) -> int:
        """h of one sample on disk, as stored."""
        return sample_bytes(self.stored_h_shape, len(self.stored_steps), 0, self.storage) - 8

    @property
    def bytes_per_sample(self) -> int:
        """One sample on disk: its h, its thumbnail and its seed (``sample_bytes``)."""
        return sample_bytes(self.stored_h_shape, len(self.stored_steps), self.thumbnail_size, self.storage)

    def prompt_of(self, index: int) -> str | None:
        """The prompt of sample ``index``: fixed by the index alone, so a bank drawn in pieces, resumed or extended
        gives every sample the same prompt; None for an unconditional model."""
        if self.prompts is None:
            return self.spec.prompt if self.spec.conditional else None
        if self.prompt_order == "cycle":
            return self.prompts[index % len(self.prompts)]
        import random

        return self.prompts[random.Random(self.base_seed + index).randrange(len(self.prompts))]


def pooled_shape(h_shape, pool: int | None) -> tuple[int, ...]:
    """h's shape [C, H, W] with its grid averaged over ``pool`` x ``pool`` cells (None or 1: as it is); a pool that does not
    divide both sides is an error."""
    if pool in (None, 1):
        return tuple(h_shape)
    if len(h_shape) != 3 or h_shape[1] % pool or h_shape[2] % pool:
        raise HspaceError(f"h_pool {pool} must divide both sides of h's grid {list(h_shape)} (C, H, W)")
    c, height, width = h_shape
    return (c, height // pool, width // pool)


# How a bank may store h: 2 bytes a value, or float8 e4m3 (1 byte) with a float32 scale per sample and step.
H_STORAGE = ("float16", "bfloat16", "float8")


def sample_bytes(h_shape, stored_steps: int, thumbnail_size: int, storage: str = "float16") -> int:
    """One sample of a bank on disk: h (as stored) at ``stored_steps`` steps in ``storage`` (``H_STORAGE``), a uint8 RGB
    thumbnail, an int64 seed."""
    per_value, per_step = (1, 4) if storage == "float8" else (2, 0)
    return stored_steps * (per_value * math.prod(h_shape) + per_step) + 3 * thumbnail_size**2 + 8


def _format2(settings: dict) -> dict:
    """A format-2 bank's settings as its digest saw them: the format-2 keys, and its autocast where set."""
    autocast = {"autocast": settings["autocast"]} if settings.get("autocast") is not None else {}
    return {**{k: settings[k] for k in _FORMAT2}, **autocast}
