"""Disentanglement (paper eq. 11): remove from a direction its projection onto other directions.

v' = (I - Q Q^T) v with Q an orthonormal basis of span{u_1, ..., u_m}: the component of v orthogonal to
every u_j. As in the paper, over the whole concatenated h_{T:1} (every direction is one vector of
T * prod(h_shape) numbers); ``per_timestep=True`` projects at every step separately instead, so that
v'_t is orthogonal to every u_{j,t}.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import HspaceError
from ..spec import FREE
from .direction import Direction


def _basis(U: torch.Tensor, where: str) -> torch.Tensor:
    """Orthonormal columns spanning the columns of U [d, m] (float64); rank-deficient spans are an error."""
    norms = U.norm(dim=0)
    if (norms == 0).any():
        raise HspaceError(f"a direction to project out is zero {where}")
    Q, R = torch.linalg.qr(U / norms)
    if (R.diagonal().abs() <= 1e-10).any():
        raise HspaceError(f"the directions to project out are linearly dependent {where}; drop the redundant ones")
    return Q


def project_out(v: torch.Tensor, others: torch.Tensor, where: str = "") -> torch.Tensor:
    """(I - Q Q^T) v for v [d] and others [m, d], in float64."""
    Q = _basis(others.double().T, where)
    v = v.double()
    return v - Q @ (Q.T @ v)


def disentangle(direction: Direction, others: Sequence[Direction], per_timestep: bool = False, name: str | None = None) -> Direction:
    """``direction`` without its projection onto the span of ``others`` (eq. 11)."""
    if isinstance(others, Direction):
        others = [others]
    others = list(others)
    if not others:
        raise HspaceError("give at least one direction to project out")
    for other in others:
        if FREE not in (direction.spec, other.spec):
            direction.spec.check(other.spec, f"direction {other.name!r}")
        if other.h_shape != direction.h_shape:
            raise HspaceError(f"direction {other.name!r} has h shape {other.h_shape}, {direction.name!r} has {direction.h_shape}")
        if other.num_steps not in (1, direction.num_steps) and direction.num_steps != 1:
            raise HspaceError(f"direction {other.name!r} has {other.num_steps} steps, {direction.name!r} has {direction.num_steps}")
    steps = max([direction.num_steps] + [o.num_steps for o in others])
    v = direction.per_step(steps).double()
    U = torch.stack([o.per_step(steps).double() for o in others])  # [m, T, ...]
    if per_timestep:
        out = torch.stack([
            project_out(v[t].flatten(), U[:, t].flatten(1), f"at step {t}").reshape(v.shape[1:]) for t in range(steps)
        ])
    else:
        out = project_out(v.flatten(), U.flatten(1), "over h_{T:1}").reshape(v.shape)
    params = {"source": direction.name, "removed": [o.name for o in others], "per_timestep": per_timestep}
    meta = {**direction.meta, "name": name or f"{direction.name}-disentangled", "method": "disentangle", "params": params}
    return Direction(out.float(), direction.sigma if steps == direction.num_steps else None, meta, direction.spec)


def disentangle_each(directions: dict[str, Direction], per_timestep: bool = False) -> dict[str, Direction]:
    """Every direction of a set with the span of all the others removed (Table 1's disentangled rows)."""
    return {
        name: disentangle(d, [o for other, o in directions.items() if other != name], per_timestep)
        for name, d in directions.items()
    }
