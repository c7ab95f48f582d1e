"""The bundled toy-faces domain, registered with ``hspace.domains``: classifier, attributes, part masks, renderer."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..domains import Domain, register
from .render import BINARY, CONTINUOUS, PARTS, region_mask, render_batch


def _scorer():
    from .classifier import classify

    return classify


def _mask(part: str, size: int) -> torch.Tensor:
    return torch.from_numpy(region_mask(part, size)).float()


def _realism(images: torch.Tensor) -> float:
    from .realism import toy_fid

    return toy_fid(images)


@lru_cache(maxsize=1)
def _spread() -> dict[str, float]:
    """The std of every continuous attribute over 5,000 training faces (binary attributes: 1, a probability)."""
    from .quality import training_labels

    labels = training_labels(5000)
    return {**{name: 1.0 for name in BINARY}, **{name: float(labels[name].std()) for name in CONTINUOUS}}


@lru_cache(maxsize=1)
def _fingerprints() -> tuple[str, ...]:
    """The content fingerprints of the bundled toy-faces models: a copy of either folder is the same model."""
    from ..fingerprint import folder_fingerprint
    from ..loading import BUNDLED_FOLDERS

    return tuple(folder_fingerprint(folder) for folder in BUNDLED_FOLDERS.values() if folder.is_dir())


def _render(seeds, size: int):
    images, labels, masks = render_batch(seeds, size=size)
    return torch.from_numpy(images), labels, {part: torch.from_numpy(m) for part, m in masks.items()}


TOYFACES = register(
    Domain(
        name="toyfaces",
        scorer=_scorer,
        binary=BINARY,
        continuous=CONTINUOUS,
        parts=PARTS,
        mask=_mask,
        render=_render,
        models=("toyfaces", "toydit", "toysd"),
        realism=_realism,
        spread=_spread,
        fingerprints=_fingerprints,
        circular=("background",),
    )
)
