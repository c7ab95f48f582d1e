"""An edit as one value: ``Edit(directions, scales, units, window, eps_pass)``, and what applying it made (``Edited``).

The CLI, cards, evaluation, reproduce and the editor build an ``Edit``; ``Engine.edit(trajectory, edit)`` applies it
in one batched run and returns an ``Edited``: the images with the directions' names, the scales as given and as
applied (raw), the unit each direction moved in, and the samples' seeds.

One rule for units, everywhere (``units="auto"``, the default): a direction with a card (``hspace card``) moves in
its card's effect unit (scale 1 = 50% flips of its binary attribute, or one training-data std of a continuous
one), a direction without one in raw units (the scale times its delta-h). ``"raw"`` and ``"effect"`` force one way
(``"effect"`` is an error for a direction without a card). A card measured at another step count than the edit's is
said once per direction: its unit is that process's. ``Edit.describe`` is the line the CLI prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .directions.direction import Direction, calibrated_unit
from .errors import HspaceError
from .validate import check_choice, check_scales

logger = logging.getLogger(__name__)

UNITS = ("auto", "raw", "effect")
EPS_PASSES = ("edited", "clean")


def unit_of(direction: Direction, units: str = "auto") -> tuple[str, float]:
    """The unit ``direction`` moves in under ``units`` (module doc) and the raw scale of one of it."""
    check_choice("units", units, UNITS)
    unit = calibrated_unit(direction)
    if units == "raw" or (units == "auto" and unit is None):
        return "raw", 1.0
    if unit is None:
        calibration = direction.meta.get("calibration") or {}
        why = "has no card" if not calibration else f"has a card whose target ({calibration.get('attribute')}) never reached its unit"
        raise HspaceError(f"direction {direction.name!r} {why}: it cannot be applied in effect units; make its card first "
                          f"(hspace card {direction.name}.safetensors) or use units raw (--units raw)")
    return "effect", unit


def warn_other_steps(direction: Direction, num_steps: int) -> None:
    """Say that a card was measured at another step count than ``num_steps`` (its unit is that process's)."""
    measured = (direction.meta.get("calibration") or {}).get("steps")
    if measured and measured != num_steps:
        logger.warning("direction %r was calibrated at %d steps and is applied at %d: its effect unit is the %d-step process's "
                       "(make a card at %d steps for an exact one)", direction.name, measured, num_steps, measured, num_steps)


@dataclass(frozen=True)
class Edit:
    """Every direction at every scale (a grid of D x S edits per sample), in ``units`` (module doc), at the steps
    inside ``window`` ((t_start, t_end), None: every step), the delta in both of Asyrp's passes (``eps_pass``
    "edited") or in P_t only ("clean")."""

    directions: tuple[Direction, ...]
    scales: tuple[float, ...]
    units: str = "auto"
    window: tuple[float, float] | None = None
    eps_pass: str = "edited"

    def __post_init__(self):
        directions = (self.directions,) if isinstance(self.directions, Direction) else tuple(self.directions)
        if not directions:
            raise HspaceError("no directions given to edit with")
        bad = [d for d in directions if not isinstance(d, Direction)]
        if bad:
            raise HspaceError(f"directions must be Direction objects, got {type(bad[0]).__name__}")
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "scales", tuple(check_scales(self.scales)))
        check_choice("units", self.units, UNITS)
        check_choice("eps_pass", self.eps_pass, EPS_PASSES)
        for d in directions:
            unit_of(d, self.units)  # an effect unit that a direction lacks is an error before any pass

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.directions]

    def unit_names(self) -> list[str]:
        return [unit_of(d, self.units)[0] for d in self.directions]

    def raw_scales(self, num_steps: int | None = None) -> torch.Tensor:
        """[D, S]: the scale each direction is applied with (the unit times the scale); a card of another step count
        than ``num_steps`` is said."""
        rows = []
        for d in self.directions:
            name, unit = unit_of(d, self.units)
            if name == "effect" and num_steps is not None:
                warn_other_steps(d, num_steps)
            rows.append([float(s) * unit for s in self.scales])
        return torch.tensor(rows, dtype=torch.float32)

    def describe(self) -> str:
        """Which unit each direction moves in: the line the CLI prints."""
        parts = []
        for d in self.directions:
            name, unit = unit_of(d, self.units)
            card = d.meta.get("calibration") or {}
            parts.append(f"{d.name}: effect units (card at {card.get('steps')} steps; 1 = raw {unit:.4g})" if name == "effect" else f"{d.name}: raw")
        return "units: " + "; ".join(parts)


@dataclass
class Edited:
    """What an ``Edit`` made: ``images`` [D, S, B, C, H, W] (direction d at scale s on sample b), with the labels."""

    images: torch.Tensor
    names: list[str]
    scales: list[float]
    raw_scales: list[list[float]]
    units: list[str]
    seeds: list[int]
    prompts: list[str] | None = field(default=None)

    def image(self, direction: int | str, scale: int, sample: int) -> torch.Tensor:
        """One edited image [C, H, W]; ``direction`` by index or name, ``scale`` and ``sample`` by index."""
        if isinstance(direction, str) and direction not in self.names:
            raise HspaceError(f"no direction named {direction!r} in this edit; valid: {', '.join(self.names)}")
        d = self.names.index(direction) if isinstance(direction, str) else direction
        return self.images[d, scale, sample]

    def to_dict(self) -> dict:
        """The labels (what ``edit.json`` records)."""
        return {"scales": self.scales, "seeds": self.seeds, "prompts": self.prompts,
                "directions": [{"name": n, "units": u, "raw_scales": r} for n, u, r in zip(self.names, self.units, self.raw_scales)]}


def as_edit(directions: Edit | Direction | Sequence[Direction], scales: Sequence[float] | None, **options) -> Edit:
    """An ``Edit`` as given, or built from directions and scales and ``options`` (``Edit``'s fields)."""
    if isinstance(directions, Edit):
        if scales is not None or options:
            raise HspaceError("an Edit carries its scales and options; give either an Edit or directions with scales")
        return directions
    if scales is None:
        raise HspaceError("scales are needed with directions (or give an Edit)")
    return Edit(directions, scales, **options)
