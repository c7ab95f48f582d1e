"""Measured edits: how often a direction flips the attribute it is meant to change, and what else it changes."""

from __future__ import annotations

from typing import Callable

import torch

from .directions.direction import Direction
from .errors import HspaceError


def flip_rates(
    engine,
    trajectory,
    directions: dict[str, Direction],
    scale: float,
    classify: Callable[[torch.Tensor], dict],
    *,
    watch: list[str] | None = None,
    batch_size: int = 32,
    callback=None,
) -> dict:
    """For each attribute -> direction: the share of samples whose classifier label flips when the
    direction is applied towards the opposite label (+scale where the attribute is absent, -scale where it
    is present), and the share flipped of every other binary attribute (what the edit drags along).

    ``classify`` maps images to probabilities per attribute (names as the keys of ``directions``);
    ``watch`` names the binary scores to count as other attributes (default: the toy-faces binary
    attributes among the scores).
    """
    before = classify(trajectory.images)
    missing = [name for name in directions if name not in before]
    if missing:
        raise HspaceError(f"the classifier has no {missing[0]!r}; it scores {', '.join(sorted(before))}")
    watch = _binary_keys(before) if watch is None else list(watch)
    unknown = [k for k in watch if k not in before]
    if unknown:
        raise HspaceError(f"the classifier has no {unknown[0]!r} to watch; it scores {', '.join(sorted(before))}")
    binary = list(dict.fromkeys(list(directions) + watch))  # the edited ones, then the rest
    report = {"n": len(trajectory), "scale": float(scale), "attributes": {}}
    n, T = len(trajectory), trajectory.num_steps
    report_step = None if callback is None else (lambda info: callback({**info, "num_parts": len(directions)}))
    for name, direction in directions.items():
        label = before[name] > 0.5
        signs = torch.where(label, -1.0, 1.0)  # towards the opposite label
        delta = signs.view(n, *([1] * (1 + len(direction.h_shape)))) * direction.per_step(T)[None]
        edited = engine.replay(trajectory, delta, scale=scale, batch_size=batch_size, callback=report_step)
        after = classify(edited.images)
        flips = {k: float(((after[k] > 0.5) != (before[k] > 0.5)).float().mean()) for k in binary}
        report["attributes"][name] = {
            "flipped": flips[name],
            "flipped_to_present": float(((after[name] > 0.5) & ~label).float().sum() / max(1, int((~label).sum()))),
            "flipped_to_absent": float(((after[name] <= 0.5) & label).float().sum() / max(1, int(label.sum()))),
            "others_flipped": {k: v for k, v in flips.items() if k != name},
        }
    return report


def _binary_keys(scores: dict) -> list[str]:
    """The toy-faces binary attributes among the scores (other classifiers: only the edited ones count)."""
    from .toyfaces.render import BINARY

    return [k for k in BINARY if k in scores]


def mean_off_target(report: dict) -> float:
    """Mean share of other attributes flipped, over all directions of a ``flip_rates`` report."""
    values = [v for a in report["attributes"].values() for v in a["others_flipped"].values()]
    return sum(values) / len(values) if values else 0.0

