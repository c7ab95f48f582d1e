"""Domains: what the generic code asks of an image domain, registered by name and by model.

A domain supplies a scorer (images [N, 3, H, W] in [-1, 1] -> named scores [N]), its attribute names
and kinds (binary / continuous), part masks by name, and optionally a renderer of labelled images for
real-image tests. ``annotate``, ``evaluate``, Jacobian masks, the demo and reproduce take a domain; a
user's own classifier plugs in with ``register(Domain(...))``. Nothing outside ``toyfaces/`` imports
the bundled domain except through this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import HspaceError

Scorer = Callable[[torch.Tensor], dict]


@dataclass(frozen=True)
class Domain:
    name: str
    scorer: Callable[[], Scorer]  # loads the scorer on first use (no weights at import time)
    binary: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    mask: Callable[[str, int], torch.Tensor] | None = None  # (part, size) -> float [size, size]
    render: Callable | None = None  # (seeds, size) -> (images [N, 3, H, W] in [-1, 1], labels, part masks [N, H, W])
    models: tuple[str, ...] = field(default=())  # model names (Spec.model) this domain describes
    realism: Callable[[torch.Tensor], float] | None = None  # images -> distance to real data (lower: more real)
    spread: Callable[[], dict[str, float]] | None = None  # each attribute's std in the real data (binary: 1)
    fingerprints: Callable[[], tuple[str, ...]] | None = None  # the model fingerprints (Spec.fingerprint) it describes
    circular: tuple[str, ...] = ()  # continuous attributes on a circle of period 1 (a hue): changes go the shorter way

    def change(self, attribute: str, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """The signed change of an attribute's scores: ``after - before``, the shorter way round for a circular one."""
        return attribute_change(attribute, before, after, self)

    def part_mask(self, part: str, size: int) -> torch.Tensor:
        if self.mask is None or part not in self.parts:
            raise HspaceError(f"domain {self.name!r} has no part {part!r}; valid: {', '.join(self.parts) or 'none'}")
        return self.mask(part, size)


def attribute_change(attribute: str, before: torch.Tensor, after: torch.Tensor, domain: Domain | None = None) -> torch.Tensor:
    """``after - before``, the shorter way round the circle where ``domain`` says the attribute is circular."""
    delta = after - before
    if domain is not None and attribute in domain.circular:
        delta = torch.remainder(delta + 0.5, 1.0) - 0.5
    return delta


_REGISTRY: dict[str, Domain] = {}
# Built-in domains register themselves when their module is imported, on first use.
_BUILTIN_MODULES = {"toyfaces": "hspace.toyfaces.domain"}


def register(domain: Domain) -> Domain:
    _REGISTRY[domain.name] = domain
    return domain


def _load_builtins() -> None:
    for name, module in _BUILTIN_MODULES.items():
        if name not in _REGISTRY:
            importlib.import_module(module)


def registered_domains() -> list[Domain]:
    _load_builtins()
    return list(_REGISTRY.values())


def get_domain(name: str) -> Domain:
    _load_builtins()
    if name not in _REGISTRY:
        raise HspaceError(f"unknown domain {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def domain_of(model, required: bool = True) -> Domain | None:
    """The domain registered for a model: a ``Spec`` (or anything with ``spec``: an engine, a bank) is found by its
    name, else by its content fingerprint, so a copy of a bundled model in another folder keeps its domain; a string
    by name. None, or an error when ``required``."""
    _load_builtins()
    spec = getattr(model, "spec", model)
    name = getattr(spec, "model", spec)
    fingerprint = getattr(spec, "fingerprint", None)
    for domain in _REGISTRY.values():
        if name in domain.models:
            return domain
    if fingerprint is not None:
        for domain in _REGISTRY.values():
            if domain.fingerprints is not None and fingerprint in domain.fingerprints():
                return domain
    model = name
    if required:
        known = ", ".join(f"{d.name} ({', '.join(d.models)})" for d in _REGISTRY.values())
        raise HspaceError(
            f"no domain is registered for model {model!r} (registered: {known}); pass a scorer, or register "
            "one with hspace.domains.register(Domain(...))"
        )
    return None


def load_mask(text: str, size: tuple[int, int], domain: Domain | None = None, what: str = "mask") -> torch.Tensor:
    """A mask over the U-Net output [H, W]: a part name of ``domain``, or an image (.png, .jpg; resized
    to ``size``) or a .npy file. ``what`` names the value in errors (e.g. the CLI's --mask)."""
    import numpy as np

    if domain is not None and text in domain.parts:
        if size[0] != size[1]:
            raise HspaceError(f"{domain.name} part masks are square; the U-Net output is {size}")
        return domain.part_mask(text, size[0])
    path = Path(text)
    if not path.is_file():
        _load_builtins()
        owners = [d for d in _REGISTRY.values() if text in d.parts]
        if owners and domain is None:
            raise HspaceError(
                f"part masks like {text!r} exist for the {owners[0].name} domain's models only ({', '.join(owners[0].models)}); "
                "give a mask image or .npy file"
            )
        parts = ", ".join(domain.parts) if domain is not None else "none for this model"
        raise HspaceError(f"{what} {text!r} is neither a part name ({parts}) nor a file (.png, .jpg or .npy)")
    try:
        if path.suffix == ".npy":
            mask = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        else:
            mask = _mask_image(path, size)
    except HspaceError:
        raise
    except Exception as e:  # a truncated file, a decompression bomb, a pickled or malformed array: named, never run
        raise HspaceError(f"{what} {text!r} cannot be read as a mask ({type(e).__name__}: {str(e)[:120]}); valid: a PNG/JPEG image "
                          f"or a .npy array of at most {MAX_MASK_PIXELS:,} pixels") from None
    if mask.ndim != 2 or not bool(torch.isfinite(mask).all()):
        raise HspaceError(f"{what} {text!r} must be a 2-D array of finite numbers, got shape {tuple(mask.shape)}")
    return mask


MAX_MASK_PIXELS = 4096 * 4096


def _mask_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask image as [H, W] in [0, 1], resized to the U-Net output (documented), at most MAX_MASK_PIXELS."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        if image.width * image.height > MAX_MASK_PIXELS:
            raise HspaceError(f"mask {str(path)!r} has {image.width}x{image.height} pixels; valid: at most {MAX_MASK_PIXELS:,}")
        image = image.convert("L")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
