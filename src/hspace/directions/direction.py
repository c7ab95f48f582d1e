"""The Direction type: a per-timestep offset delta-h_t, saved as safetensors with its metadata inside.

An edit adds gamma * delta[t] to h_t at step t (paper Sec. 3: h_edit = h + gamma v). A direction with
a single step applies the same offset at every step (e.g. a Jacobian direction found at one t).
Methods that know a natural unit store delta already scaled by it (PCA: one sigma per step), so that
scales read in that unit; ``sigma`` keeps the per-step std for reference. ``spec`` is the engine the
direction was found with (model and h location must match where it is applied; see ``spec.py``), or
``FREE``, said explicitly, for a direction made without an engine: it applies to any engine whose h has
its shape. There is no default: a direction that silently applied anywhere would hide a wrong model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import HspaceError
from ..files import parse_json_object, read_json, read_safetensors, safe_name, save_safetensors, staged_folder, write_json
from ..spec import FREE, Spec

logger = logging.getLogger(__name__)


@dataclass
class Direction:
    delta: torch.Tensor  # [T, C, H, W] float32
    sigma: torch.Tensor | None = None  # [T]
    meta: dict = field(default_factory=dict)  # name, method, params (num_steps is added)
    spec: Spec | str | None = None  # the engine it was found with, or FREE (module doc); None is refused

    def __post_init__(self):
        if not isinstance(self.delta, torch.Tensor) or self.delta.ndim < 2 or self.delta.numel() == 0:
            got = tuple(self.delta.shape) if isinstance(self.delta, torch.Tensor) else type(self.delta).__name__
            raise HspaceError(f"a direction's delta must be a non-empty tensor [T, *h_shape], got {got}")
        self.delta = self.delta.detach().float().cpu()
        if not bool(torch.isfinite(self.delta).all()):
            raise HspaceError(f"direction {self.meta.get('name') or ''!r} holds NaN or infinite values; a direction must be finite")
        if self.sigma is not None:
            self.sigma = torch.as_tensor(self.sigma).detach().float().cpu().flatten()
            if len(self.sigma) != self.num_steps:
                raise HspaceError(f"sigma has {len(self.sigma)} values for a direction of {self.num_steps} steps")
            if not bool(torch.isfinite(self.sigma).all()):
                raise HspaceError("a direction's sigma holds NaN or infinite values")
        if not isinstance(self.meta, dict):
            raise HspaceError(f"a direction's meta must be a dict, got {type(self.meta).__name__}")
        self.meta = {"name": "", "method": "", "params": {}, **self.meta}
        if not isinstance(self.meta["name"], str):
            raise HspaceError(f"a direction's name must be a string, got {self.meta['name']!r}")
        self.meta["num_steps"] = self.num_steps
        if self.spec != FREE and not isinstance(self.spec, Spec):
            raise HspaceError(f"a direction needs the spec of the engine it was found with (spec=engine.spec), or spec=FREE "
                              f"(hspace.spec.FREE: it applies to any engine whose h has its shape); got {self.spec!r}")

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

    @property
    def h_location(self) -> str | None:
        return None if self.spec == FREE else self.spec.h_location

    def check_compatible(self, h_shape: Sequence[int], num_steps: int, h_location: str) -> None:
        """Raise a clear error unless this direction's shape and steps fit that engine and process."""
        if tuple(h_shape) != self.h_shape:
            raise HspaceError(
                f"direction {self.name!r} has h shape {self.h_shape} but the engine's h at {h_location!r} is {tuple(h_shape)}"
            )
        if self.num_steps not in (1, num_steps):
            raise HspaceError(
                f"direction {self.name!r} has {self.num_steps} steps but the process has {num_steps}; "
                f"use a direction found with {num_steps} steps (or a single-step one)"
            )
        loc = self.h_location
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
        if FREE not in (self.spec, other.spec):
            self.spec.check(other.spec, f"direction {other.name!r} (combined with {self.name!r})", "direction")
        steps = max(self.num_steps, other.num_steps)
        delta = self.per_step(steps) + sign * other.per_step(steps)
        op = "+" if sign > 0 else "-"
        meta = {"name": f"{self.name}{op}{other.name}", "method": "combination"}
        return Direction(delta, meta=meta, spec=other.spec if self.spec == FREE else self.spec)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, gamma: float) -> "Direction":
        meta = {**self.meta, "name": f"{gamma:g}*{self.name}"}
        return Direction(self.delta * float(gamma), self.sigma, meta, self.spec)

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return self * -1.0

    def save(self, path: str | Path) -> Path:
        """Write atomically to a safetensors file, metadata and spec inside."""
        tensors = {"delta": self.delta}
        if self.sigma is not None:
            tensors["sigma"] = self.sigma
        metadata = {"kind": "hspace.Direction", "meta": json.dumps(self.meta), "spec": FREE if self.spec == FREE else self.spec.to_json()}
        return save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        metadata, tensors = read_safetensors(path, "hspace.Direction", "hspace direction file")
        if "delta" not in tensors or set(tensors) - {"delta", "sigma"}:
            raise HspaceError(f"{str(path)!r} must hold 'delta' (and optionally 'sigma'), it holds {', '.join(sorted(tensors))}")
        try:
            meta = parse_json_object(metadata.get("meta", "{}"), f"the metadata of {str(path)!r}")
            spec = _spec_of(metadata, path)
            return cls(tensors["delta"], tensors.get("sigma"), meta, spec)
        except HspaceError as e:
            raise HspaceError(f"direction file {str(path)!r}: {e}") from None


def _spec_of(metadata: dict, path) -> Spec | str:
    """A direction file's spec; a file from before directions always had one (no "spec") is a free direction."""
    if metadata.get("spec", FREE) == FREE:
        if "spec" not in metadata:
            logger.warning("direction file %s has no spec (made before hspace 0.2): loaded as a free direction", path)
        return FREE
    return Spec.from_json(metadata["spec"])


def stack_directions(directions: Sequence[Direction], num_steps: int) -> torch.Tensor:
    """[D, T, *h_shape] from directions of one h shape."""
    return torch.stack([d.per_step(num_steps) for d in directions])


class DirectionSet(list):
    """The result of a method that yields directions only (random baseline, eq. 10 over attributes, ...):
    a list of Directions with the method's name and parameters, saved as one folder."""

    def __init__(self, directions: Sequence[Direction] = (), method: str = "", params: dict | None = None):
        super().__init__(directions)
        self.method, self.params = method, dict(params or {})

    @property
    def directions(self) -> list[Direction]:
        return list(self)

    def save(self, folder: str | Path) -> list[Path]:
        """Every direction as NAME.safetensors and result.json (method, parameters, the files in order),
        all or nothing."""
        with staged_folder(folder) as stage:
            names = [p.name for p in save_directions(self, stage)]
            write_json(stage / "result.json", {"method": self.method, "params": self.params, "directions": names})
        return [Path(folder) / name for name in names]

    @classmethod
    def load(cls, folder: str | Path) -> "DirectionSet":
        folder = Path(folder)
        info_path = folder / "result.json"
        if info_path.is_file():
            info = read_json(info_path, "direction set")
            names = info.get("directions")
            if not isinstance(names, list) or not all(isinstance(n, str) and n == safe_name(n) for n in names):
                raise HspaceError(f"{str(info_path)!r} must list its direction files by plain name under 'directions'")
            return cls([Direction.load(folder / name) for name in names], str(info.get("method", "")), dict(info.get("params") or {}))
        return cls(load_directions([folder]))


def save_directions(directions: Sequence[Direction], folder: str | Path) -> list[Path]:
    """Write every direction as ``folder/NAME.safetensors`` (the name made safe for a file name); returns
    the paths. Two directions of one name are an error (the second would overwrite the first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [safe_name(d.name) for d in directions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HspaceError(f"two directions would be saved as {twice[0]}.safetensors; give them different names")
    return [direction.save(folder / f"{name}.safetensors") for direction, name in zip(directions, names)]


def direction_files(items: Sequence[str | Path]) -> list[Path]:
    """Direction files from paths of files and folders (a folder gives its direction files, pc2 before pc10)."""
    import re

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.glob("*.safetensors") if _is_direction_file(p)]
            found.sort(key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)])
            if not found:
                raise HspaceError(f"folder {str(item)!r} holds no direction files (*.safetensors)")
            files += found
        else:
            files.append(path)
    return files


def _is_direction_file(path: Path) -> bool:
    """A folder of a method's result also holds the result's own tensors (pca.safetensors, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("kind") == "hspace.Direction"
    except Exception:
        return True  # let Direction.load name what is wrong with it


def load_directions(items: Sequence[str | Path]) -> list[Direction]:
    """The directions of files and folders (see ``direction_files``)."""
    return [Direction.load(p) for p in direction_files(items)]
