"""Directions from examples (paper Sec. 5, eq. 10): the mean difference of h between positives and negatives."""

from __future__ import annotations

from ..errors import HspaceError
from ..trajectory import Trajectory
from .direction import Direction


def mean_difference(positive: Trajectory, negative: Trajectory, name: str = "difference") -> Direction:
    """v = mean_i h(x_i^+) - mean_i h(x_i^-) over all timesteps (eq. 10; Fig. 4's vector arithmetic)."""
    for label, t in (("positive", positive), ("negative", negative)):
        if t.h is None:
            raise HspaceError(f"the {label} trajectories have no recorded h; sample them with record_h=True")
    if positive.num_steps != negative.num_steps or positive.h.shape[2:] != negative.h.shape[2:]:
        raise HspaceError(
            f"positive h {tuple(positive.h.shape[1:])} and negative h {tuple(negative.h.shape[1:])} differ in steps or shape"
        )
    if positive.meta != negative.meta:
        raise HspaceError(f"positives and negatives come from different engines: {positive.meta} vs {negative.meta}")
    delta = positive.h.double().mean(0) - negative.h.double().mean(0)
    params = {"positive_seeds": positive.seeds, "negative_seeds": negative.seeds, "eta": positive.eta.tolist()}
    return Direction(delta.float(), meta={**positive.meta, "name": name, "method": "mean_difference", "params": params})
