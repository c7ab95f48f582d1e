"""The Direction type: a per-timestep offset delta-h_t, saved as safetensors with its metadata inside.

An edit adds gamma * delta[t] to h_t at step t (paper Sec. 3: h_edit = h + gamma v). A direction with
a single step applies the same offset at every step (e.g. a Jacobian direction found at one t).
Methods that know a natural unit store delta already scaled by it (PCA: one sigma per step), so that
scales read in that unit; ``sigma`` keeps the per-step std for reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import HspaceError

META_KEYS = ("name", "model", "num_steps", "h_location", "method", "params")


@dataclass
class Direction:
    delta: torch.Tensor  # [T, C, H, W] float32
    sigma: torch.Tensor | None = None  # [T]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.delta.ndim < 2:
            raise HspaceError(f"a direction's delta must be [T, *h_shape], got shape {tuple(self.delta.shape)}")
        self.delta = self.delta.detach().float().cpu()
        if self.sigma is not None:
            self.sigma = self.sigma.detach().float().cpu().flatten()
            if len(self.sigma) != self.num_steps:
                raise HspaceError(f"sigma has {len(self.sigma)} values for a direction of {self.num_steps} steps")
        self.meta = {"name": "", "model": "", "h_location": "", "method": "", "params": {}, **self.meta}
        self.meta["num_steps"] = self.num_steps

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.meta.get("method") or "direction"

    @property
    def num_steps(self) -> int:
        return self.delta.shape[0]

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape[1:])

    def norms(self) -> torch.Tensor:
        """||delta_t|| per step."""
        return self.delta.flatten(1).norm(dim=1)

    def check_compatible(self, h_shape: Sequence[int], num_steps: int, h_location: str) -> None:
        """Raise a clear error unless this direction can be applied to that engine and process."""
        if tuple(h_shape) != self.h_shape:
            raise HspaceError(
                f"direction {self.name!r} has h shape {self.h_shape} but the engine's h at {h_location!r} is {tuple(h_shape)}"
            )
        if self.num_steps not in (1, num_steps):
            raise HspaceError(
                f"direction {self.name!r} has {self.num_steps} steps but the process has {num_steps}; "
                f"use a direction found with {num_steps} steps (or a single-step one)"
            )
        loc = self.meta.get("h_location")
        if loc and loc != h_location:
            raise HspaceError(f"direction {self.name!r} was found at h location {loc!r}, the engine edits {h_location!r}")

    def per_step(self, num_steps: int) -> torch.Tensor:
        """delta as [num_steps, *h_shape] (a single-step direction is repeated)."""
        if self.num_steps == num_steps:
            return self.delta
        if self.num_steps == 1:
            return self.delta.expand(num_steps, *self.h_shape)
        raise HspaceError(f"direction {self.name!r} has {self.num_steps} steps, not {num_steps}")

    # Vector arithmetic in h-space (paper Fig. 4, Fig. 11): directions combine linearly.
    def _combine(self, other: "Direction", sign: float) -> "Direction":
        if not isinstance(other, Direction):
            return NotImplemented
        if other.h_shape != self.h_shape:
            raise HspaceError(f"cannot combine directions of h shapes {self.h_shape} and {other.h_shape}")
        steps = max(self.num_steps, other.num_steps)
        delta = self.per_step(steps) + sign * other.per_step(steps)
        op = "+" if sign > 0 else "-"
        return Direction(delta, meta={**self._shared_meta(other), "name": f"{self.name}{op}{other.name}", "method": "combination"})

    def _shared_meta(self, other: "Direction") -> dict:
        return {k: self.meta[k] for k in ("model", "h_location") if self.meta.get(k) == other.meta.get(k)}

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, gamma: float) -> "Direction":
        meta = {**self.meta, "name": f"{gamma:g}*{self.name}"}
        return Direction(self.delta * float(gamma), self.sigma, meta)

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return self * -1.0

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"delta": self.delta.contiguous()}
        if self.sigma is not None:
            tensors["sigma"] = self.sigma.contiguous()
        save_file(tensors, str(path), metadata={"kind": "hspace.Direction", "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HspaceError(f"direction file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for a file that is not safetensors
            raise HspaceError(f"{str(path)!r} is not a safetensors file: {e}") from None
        if meta.get("kind") != "hspace.Direction" or "delta" not in tensors:
            raise HspaceError(f"{str(path)!r} is not an hspace direction file (kind={meta.get('kind')!r})")
        return cls(tensors["delta"], tensors.get("sigma"), json.loads(meta.get("meta", "{}")))


def stack_directions(directions: Sequence[Direction], num_steps: int) -> torch.Tensor:
    """[D, T, *h_shape] from directions of one h shape."""
    return torch.stack([d.per_step(num_steps) for d in directions])
