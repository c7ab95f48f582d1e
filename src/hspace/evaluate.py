"""Measured edits: how often a direction flips the attribute it is meant to change, and what else it changes."""

from __future__ import annotations

from typing import Callable

import torch

from .directions.direction import Direction
from .errors import HspaceError
from .interventions import LinearEdit


def flip_rates(
    engine,
    trajectory,
    directions: dict[str, Direction],
    scale: float,
    classify: Callable[[torch.Tensor], dict],
    *,
    watch: list[str] | None = None,
    domain=None,
    batch_size: int = 32,
    callback=None,
    progress: bool | None = None,
) -> dict:
    """For each attribute -> direction: the share of samples whose classifier label flips when the
    direction is applied towards the opposite label (+scale where the attribute is absent, -scale where it
    is present), and the share flipped of every other binary attribute (what the edit drags along).

    ``classify`` maps images to probabilities per attribute (names as the keys of ``directions``);
    ``watch`` names the binary scores to count as other attributes (default: the binary attributes of
    ``domain``, or of the domain registered for the engine's model, among the scores). Every edit of
    every sample is one batched replay.
    """
    before = classify(trajectory.images)
    missing = [name for name in directions if name not in before]
    if missing:
        raise HspaceError(f"the classifier has no {missing[0]!r}; it scores {', '.join(sorted(before))}")
    if watch is None:
        from .domains import domain_of

        watch = _binary_keys(before, domain or domain_of(engine.name, required=False))
    watch = list(watch)
    unknown = [k for k in watch if k not in before]
    if unknown:
        raise HspaceError(f"the classifier has no {unknown[0]!r} to watch; it scores {', '.join(sorted(before))}")
    binary = list(dict.fromkeys(list(directions) + watch))  # the edited ones, then the rest
    for direction in directions.values():
        engine.check_direction(direction, trajectory.num_steps)
    n, names = len(trajectory), list(directions)
    # One batched run: row (d, b) is sample b edited by direction d towards its opposite label.
    labels = torch.stack([before[name] > 0.5 for name in names])  # [D, n]
    coefficients = torch.zeros(len(names) * n, len(names))
    for d in range(len(names)):
        coefficients[d * n : (d + 1) * n, d] = torch.where(labels[d], -1.0, 1.0) * float(scale)
    edit = LinearEdit(engine.directions_at(list(directions.values()), trajectory.num_steps), coefficients)
    source = torch.arange(n).repeat(len(names))
    edited = engine.replay(trajectory, interventions=[edit], source=source, batch_size=batch_size, callback=callback, progress=progress)
    after_all = classify(edited.images)
    report = {"n": n, "scale": float(scale), "attributes": {}}
    for d, name in enumerate(names):
        after = {k: v[d * n : (d + 1) * n] for k, v in after_all.items()}
        label = labels[d]
        flips = {k: float(((after[k] > 0.5) != (before[k] > 0.5)).float().mean()) for k in binary}
        report["attributes"][name] = {
            "flipped": flips[name],
            "flipped_to_present": float(((after[name] > 0.5) & ~label).float().sum() / max(1, int((~label).sum()))),
            "flipped_to_absent": float(((after[name] <= 0.5) & label).float().sum() / max(1, int(label.sum()))),
            "others_flipped": {k: v for k, v in flips.items() if k != name},
        }
    return report


def _binary_keys(scores: dict, domain) -> list[str]:
    """The domain's binary attributes among the scores (no domain: only the edited ones count)."""
    return [] if domain is None else [k for k in domain.binary if k in scores]


def mean_off_target(report: dict) -> float:
    """Mean share of other attributes flipped, over all directions of a ``flip_rates`` report."""
    values = [v for a in report["attributes"].values() for v in a["others_flipped"].values()]
    return sum(values) / len(values) if values else 0.0

