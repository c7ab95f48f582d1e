"""The bundled toy-faces domain, registered with ``hspace.domains``: classifier, attributes, part masks, renderer."""

from __future__ import annotations

import torch

from ..domains import Domain, register
from .render import BINARY, CONTINUOUS, PARTS, region_mask, render_batch


def _scorer():
    from .classifier import classify

    return classify


def _mask(part: str, size: int) -> torch.Tensor:
    return torch.from_numpy(region_mask(part, size)).float()


def _commands(subparsers) -> None:
    from .cli import register

    register(subparsers)


def _realism(images: torch.Tensor) -> float:
    from .realism import toy_fid

    return toy_fid(images)


def _render(seeds, size: int):
    images, labels, _masks = render_batch(seeds, size=size)
    return torch.from_numpy(images), labels


TOYFACES = register(
    Domain(
        name="toyfaces",
        scorer=_scorer,
        binary=BINARY,
        continuous=CONTINUOUS,
        parts=PARTS,
        mask=_mask,
        render=_render,
        models=("toyfaces",),
        commands=_commands,
        realism=_realism,
    )
)
