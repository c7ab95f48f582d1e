"""Conditional directions by joint regression (beyond the paper: InterFaceGAN's conditional manipulation,
done the linear way). Per timestep, least squares of h_t on all attribute labels at once,

    h_t ~ W_t [1, y_1, ..., y_A],

so attribute a's direction is its column W_t[a]: the change of h_t per unit of y_a with the other
attributes held fixed (a partial effect), where eq. 10's mean difference also carries whatever is
correlated with y_a. Every output coordinate is regressed on the same design, so the fit is the same per
timestep or over the concatenated h_{T:1}. Streams a bank: X^T X (A+1 squared) and X^T H (A+1 rows of
h's size) accumulate in float64, never all of h.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import HspaceError
from ..spec import Spec
from .direction import Direction, DirectionSet


class Regression:
    """Streaming least squares of h [b, T, *h_shape] on labels [b, A] (with an intercept)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise HspaceError(f"give one or more distinct attribute names, got {self.names}")
        self.n = 0
        self.xtx = torch.zeros(len(self.names) + 1, len(self.names) + 1, dtype=torch.float64)
        self.xth: torch.Tensor | None = None  # [A+1, T, *h_shape]

    def update(self, h: torch.Tensor, labels: torch.Tensor) -> "Regression":
        labels = torch.as_tensor(labels, dtype=torch.float64)
        if labels.ndim == 1:
            labels = labels[:, None]
        if h.ndim < 3 or labels.shape != (h.shape[0], len(self.names)):
            raise HspaceError(f"h {tuple(h.shape)} and labels {tuple(labels.shape)} must be [b, T, *h_shape] and [b, {len(self.names)}]")
        if not bool(torch.isfinite(labels).all()) or not bool(torch.isfinite(h).all()):
            raise HspaceError("labels and h must be finite")
        x = torch.cat([torch.ones(len(labels), 1, dtype=torch.float64), labels], 1)
        self.xtx += x.T @ x
        part = torch.einsum("np,n...->p...", x, h.double())
        self.xth = part if self.xth is None else self.xth + part
        self.n += len(labels)
        return self

    def coefficients(self) -> torch.Tensor:
        """W [A+1, T, *h_shape]: the intercept, then one partial effect per attribute."""
        p = len(self.names) + 1
        if self.n < p + 1:
            raise HspaceError(f"a regression on {p - 1} attributes needs more than {p} samples, got {self.n}")
        eigenvalues = torch.linalg.eigvalsh(self.xtx)
        if float(eigenvalues[0]) <= float(eigenvalues[-1]) * 1e-10:
            variances = self.xtx.diagonal()[1:] / self.n - (self.xtx[0, 1:] / self.n) ** 2
            flat = [name for name, v in zip(self.names, variances.tolist()) if v <= 1e-12]
            why = f"{', '.join(flat)} does not vary" if flat else "some attributes are linear combinations of the others"
            raise HspaceError(f"the labels cannot be separated by regression: {why}; drop the redundant attributes")
        shape = self.xth.shape
        return torch.linalg.solve(self.xtx, self.xth.reshape(p, -1)).reshape(shape)

    def directions(self, spec: Spec | str, params: dict | None = None, timesteps: torch.Tensor | None = None, lift=None) -> DirectionSet:
        """One Direction per attribute (its partial effect), with ``timesteps``: those of the steps of h (a bank's
        ``h_timesteps``), so that the directions apply at any step count; ``lift``: a pooled bank's ``Bank.lift``."""
        W = self.coefficients() if lift is None else lift(self.coefficients())
        out = []
        for a, name in enumerate(self.names):
            meta = {"name": name, "method": "regression", "params": {**(params or {}), "attributes": self.names, "n": self.n, "unit": f"one unit of {name}"}}
            out.append(Direction(W[a + 1].float(), meta=meta, spec=spec, timesteps=timesteps))
        return DirectionSet(out, "regression", {**(params or {}), "attributes": self.names, "n": self.n})


def regression_from_h(h: torch.Tensor, labels: dict[str, torch.Tensor], spec: Spec | str) -> DirectionSet:
    """Conditional directions from h [N, T, *h_shape] in memory and labels {name: [N]}; ``spec``: the engine whose h
    this is, or FREE."""
    names = list(labels)
    y = torch.stack([torch.as_tensor(labels[n], dtype=torch.float64).flatten() for n in names], 1)
    return Regression(names).update(h, y).directions(spec)


def regression_directions(bank, attributes: Sequence[str], scores: str = "classifier") -> DirectionSet:
    """Conditional directions over a bank: h of every sample regressed on its stored scores of ``attributes``."""
    table = bank.scores(scores)
    unknown = [a for a in attributes if a not in table]
    if unknown:
        raise HspaceError(f"scores {scores!r} of bank {str(bank.path)!r} have no {unknown[0]!r}; valid: {', '.join(sorted(table))}")
    y = torch.stack([table[a].double().flatten() for a in attributes], 1)
    fit = Regression(attributes)
    offset = 0
    for chunk in bank.h_chunks()():
        fit.update(chunk, y[offset : offset + len(chunk)])
        offset += len(chunk)
    return fit.directions(bank.spec.engine, {"bank": str(bank.path), "scores": scores}, bank.h_timesteps, bank.lift)
