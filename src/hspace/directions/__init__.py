"""Direction methods: functions of trajectories and banks that return results with ``.directions`` and
``.save(folder)`` / ``load(folder)``: ``PCAResult`` (pca.py), ``JacobianDirections`` (jacobian.py) and
``DirectionSet`` (random baseline, eq. 10 over attributes, labelled examples)."""

from __future__ import annotations

from pathlib import Path

from .direction import Direction, DirectionSet

__all__ = ["Direction", "DirectionSet", "load_result"]


def load_result(folder: str | Path):
    """The method result saved in ``folder``: a PCAResult, JacobianDirections or DirectionSet."""
    folder = Path(folder)
    if (folder / "pca.safetensors").is_file():
        from .pca import PCAResult

        return PCAResult.load(folder)
    if (folder / "jacobian.json").is_file():
        from .jacobian import JacobianDirections

        return JacobianDirections.load(folder)
    return DirectionSet.load(folder)
