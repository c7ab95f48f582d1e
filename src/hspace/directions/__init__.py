"""Direction methods: functions of trajectories and banks that return results with ``.directions`` and
``.save(folder)`` / ``load(folder)``: ``PCAResult`` (pca.py), ``JacobianDirections`` (jacobian.py) and
``DirectionSet`` (random baseline, eq. 10 over attributes, labelled examples)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HspaceError
from .direction import Direction, DirectionSet

__all__ = ["Direction", "DirectionSet", "load_result"]


def _kinds() -> dict:
    from .jacobian import JacobianDirections
    from .pca import PCAResult

    return {"pca": PCAResult, "jacobian": JacobianDirections, "directions": DirectionSet}


def load_result(folder: str | Path):
    """The method result saved in ``folder``: a PCAResult, JacobianDirections or DirectionSet, by the ``kind`` its
    ``result.json`` records. A folder written before results recorded their kind is recognised by its files."""
    from ..files import read_json
    from .direction import RESULT_FILE

    folder, kinds = Path(folder), _kinds()
    record = folder / RESULT_FILE
    kind = read_json(record, "method result").get("kind") if record.is_file() else None
    if kind is None:  # an earlier version's folder
        kind = "pca" if (folder / "pca.safetensors").is_file() else "jacobian" if (folder / "jacobian.json").is_file() else "directions"
    if kind not in kinds:
        raise HspaceError(f"{str(record)!r} records a result of kind {kind!r}; valid: {', '.join(kinds)}")
    return kinds[kind].load(folder)
