"""The Direction type: a per-timestep offset delta-h_t, saved as safetensors with its metadata inside.

An edit adds gamma * delta[t] to h_t at step t (paper Sec. 3: h_edit = h + gamma v). A direction with
a single step applies the same offset at every step (e.g. a Jacobian direction found at one t).
Methods that know a natural unit store delta already scaled by it (PCA: one sigma per step), so that
scales read in that unit; ``sigma`` keeps the per-step std for reference. ``spec`` is the ``Space`` of the engine
the direction was found with (model, h location and h shape must match where it is applied; see ``spec.py``; an
engine's full ``Spec`` given here is reduced to its space: a direction carries no process), or
``FREE``, said explicitly, for a direction made without an engine: it applies to any engine whose h has
its shape. There is no default: a direction that silently applied anywhere would hide a wrong model.

``timesteps`` are the timesteps t of the steps it was found at ([T], descending; None for an older file or a
single-step direction, where the engine's schedule of T steps stands in). Applied in a process of other
steps it is resampled by timestep (``at``): delta and sigma are linear in t between the two found steps whose
timesteps enclose a target t, and the nearest end's beyond them. A direction found at 50 steps and used at 25
(DDPM/DDIM spacings: every 25-step timestep is a 50-step one) is the 50-step one at the shared timesteps, exactly.
"""

from __future__ import annotations

import json
import logging
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import HspaceError
from ..files import parse_json_object, read_json, read_safetensors, safe_name, save_safetensors, staged_folder, write_json
from ..spec import FREE, Space, Spec

logger = logging.getLogger(__name__)


@dataclass
class Direction:
    delta: torch.Tensor  # [T, C, H, W] float32
    sigma: torch.Tensor | None = None  # [T]
    meta: dict = field(default_factory=dict)  # name, method, params (num_steps is added)
    spec: Space | Spec | str | None = None  # the space it was found in (a Spec is reduced to it), or FREE (module doc); None is refused
    timesteps: torch.Tensor | None = None  # [T] the timesteps it was found at (module doc)

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
        if self.timesteps is not None:
            self.timesteps = torch.as_tensor(self.timesteps).detach().to(torch.float64).cpu().flatten()
            if len(self.timesteps) != self.num_steps or not bool(torch.isfinite(self.timesteps).all()):
                raise HspaceError(f"a direction's timesteps must be {self.num_steps} finite numbers (one per step), got {len(self.timesteps)}")
        if not isinstance(self.meta, dict):
            raise HspaceError(f"a direction's meta must be a dict, got {type(self.meta).__name__}")
        self.meta = {"name": "", "method": "", "params": {}, **self.meta}
        if not isinstance(self.meta["name"], str):
            raise HspaceError(f"a direction's name must be a string, got {self.meta['name']!r}")
        self.meta["num_steps"] = self.num_steps
        if isinstance(self.spec, (Spec, Space)):
            self.spec = dataclasses.replace(self.spec.space if isinstance(self.spec, Spec) else self.spec, h_shape=self.h_shape)
        elif self.spec != FREE:
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

    def renamed(self, name: str, norm_of: "Direction | None" = None) -> "Direction":
        """A copy named ``name``; with ``norm_of``, its delta rescaled to that direction's norm (two methods'
        directions compared at the same size: only the direction differs)."""
        delta = self.delta if norm_of is None else self.delta * (norm_of.delta.norm() / self.delta.norm())
        return dataclasses.replace(self, delta=delta, meta={**self.meta, "name": name})

    def norms(self) -> torch.Tensor:
        """||delta_t|| per step."""
        return self.delta.flatten(1).norm(dim=1)

    @property
    def h_location(self) -> str | None:
        return None if self.spec == FREE else self.spec.h_location

    def check_compatible(self, h_shape: Sequence[int], h_location: str) -> None:
        """Raise a clear error unless this direction's h fits that engine (any steps: ``at`` resamples)."""
        if tuple(h_shape) != self.h_shape:
            raise HspaceError(
                f"direction {self.name!r} has h shape {self.h_shape} but the engine's h at {h_location!r} is {tuple(h_shape)}"
            )
        loc = self.h_location
        if loc and loc != h_location:
            raise HspaceError(f"direction {self.name!r} was found at h location {loc!r}, the engine edits {h_location!r}")

    def per_step(self, num_steps: int) -> torch.Tensor:
        """delta as [num_steps, *h_shape] (a single-step direction is repeated); other step counts: ``at``."""
        if self.num_steps == num_steps:
            return self.delta
        if self.num_steps == 1:
            return self.delta.expand(num_steps, *self.h_shape)
        raise HspaceError(f"direction {self.name!r} has {self.num_steps} steps, not {num_steps}; resample it to the "
                          "process's timesteps (Direction.at, or engine.direction_at)")

    def at(self, timesteps: torch.Tensor, found_at: torch.Tensor | None = None) -> "Direction":
        """This direction resampled to the steps of ``timesteps`` (module doc); ``found_at`` stands in for
        ``self.timesteps`` when that is unknown. A single-step direction is repeated."""
        target = torch.as_tensor(timesteps).to(torch.float64).flatten()
        if self.num_steps == 1:
            return Direction(self.delta.expand(len(target), *self.h_shape).clone(), None if self.sigma is None else self.sigma.expand(len(target)).clone(),
                             self.meta, self.spec, target)
        source = self.timesteps if self.timesteps is not None else found_at
        if source is None:
            raise HspaceError(f"direction {self.name!r} has {self.num_steps} steps and no record of their timesteps; "
                              "resample it with the timesteps it was found at (found_at=)")
        source = torch.as_tensor(source).to(torch.float64).flatten()
        if len(source) != self.num_steps:
            raise HspaceError(f"found_at has {len(source)} timesteps for a direction of {self.num_steps} steps")
        if len(source) == len(target) and torch.equal(source, target):
            return self if self.timesteps is not None else Direction(self.delta, self.sigma, self.meta, self.spec, target)
        weights = interpolation_weights(source, target)  # [T_target, T_source]
        delta = torch.einsum("ts,s...->t...", weights, self.delta.double()).float()
        sigma = None if self.sigma is None else (weights @ self.sigma.double()).float()
        meta = {**self.meta, "resampled_from": self.num_steps}
        return Direction(delta, sigma, meta, self.spec, target)

    # Vector arithmetic in h-space (paper Fig. 4, Fig. 11): directions combine linearly.
    def _combine(self, other: "Direction", sign: float) -> "Direction":
        if not isinstance(other, Direction):
            return NotImplemented
        if other.h_shape != self.h_shape:
            raise HspaceError(f"cannot combine directions of h shapes {self.h_shape} and {other.h_shape}")
        if FREE not in (self.spec, other.spec):
            self.spec.check(other.spec, f"direction {other.name!r} (combined with {self.name!r})")
        steps = max(self.num_steps, other.num_steps)
        mine, theirs = (self, other) if self.num_steps == other.num_steps or 1 in (self.num_steps, other.num_steps) else _common(self, other)
        delta = mine.per_step(steps) + sign * theirs.per_step(steps)
        op = "+" if sign > 0 else "-"
        meta = {"name": f"{self.name}{op}{other.name}", "method": "combination"}
        timesteps = next((d.timesteps for d in (mine, theirs) if d.num_steps == steps and d.timesteps is not None), None)
        return Direction(delta, meta=meta, spec=other.spec if self.spec == FREE else self.spec, timesteps=timesteps)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, gamma: float) -> "Direction":
        meta = {**self.meta, "name": f"{gamma:g}*{self.name}"}
        unit = calibrated_unit(self)
        if unit is not None:  # the card measured this direction: one effect unit of gamma x it is unit / gamma of it
            if float(gamma) == 0:
                meta.pop("calibration")
            else:
                meta["calibration"] = {**meta["calibration"], "scale": unit / float(gamma)}
        return Direction(self.delta * float(gamma), self.sigma, meta, self.spec, self.timesteps)

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return self * -1.0

    def save(self, path: str | Path) -> Path:
        """Write atomically to a safetensors file, metadata and spec inside."""
        tensors = {"delta": self.delta}
        if self.sigma is not None:
            tensors["sigma"] = self.sigma
        if self.timesteps is not None:
            tensors["timesteps"] = self.timesteps
        # The space without its h shape (the delta carries it): a file an older hspace still reads as a spec.
        spec = FREE if self.spec == FREE else dataclasses.replace(self.spec, h_shape=None).to_json()
        metadata = {"kind": "hspace.Direction", "meta": json.dumps(self.meta), "spec": spec}
        return save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        metadata, tensors = read_safetensors(path, "hspace.Direction", "hspace direction file")
        if "delta" not in tensors or set(tensors) - {"delta", "sigma", "timesteps"}:
            raise HspaceError(f"{str(path)!r} must hold 'delta' (and optionally 'sigma', 'timesteps'), it holds {', '.join(sorted(tensors))}")
        try:
            meta = parse_json_object(metadata.get("meta", "{}"), f"the metadata of {str(path)!r}")
            spec = _spec_of(metadata, path)
            return cls(tensors["delta"], tensors.get("sigma"), meta, spec, tensors.get("timesteps"))
        except HspaceError as e:
            raise HspaceError(f"direction file {str(path)!r}: {e}") from None


def _spec_of(metadata: dict, path) -> Space | str:
    """A direction file's space (a file written with a full engine spec gives its space); a file from before directions
    always had one (no "spec") is a free direction."""
    if metadata.get("spec", FREE) == FREE:
        if "spec" not in metadata:
            logger.warning("direction file %s has no spec (made before hspace 0.2): loaded as a free direction", path)
        return FREE
    return Space.from_json(metadata["spec"])


def interpolation_weights(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[len(target), len(source)]: each row the weights of linear interpolation in t between the two ``source``
    timesteps that enclose that target t (the nearest end's alone beyond them); rows sum to 1."""
    order = torch.argsort(source)
    s = source[order]
    weights = torch.zeros(len(target), len(source), dtype=torch.float64)
    for row, t in enumerate(target.tolist()):
        if t <= s[0]:
            weights[row, order[0]] = 1.0
            continue
        if t >= s[-1]:
            weights[row, order[-1]] = 1.0
            continue
        hi = int(torch.searchsorted(s, torch.tensor(t, dtype=torch.float64)))
        lo = hi - 1
        if s[hi] == t:
            weights[row, order[hi]] = 1.0
            continue
        w = (t - float(s[lo])) / float(s[hi] - s[lo])
        weights[row, order[lo]], weights[row, order[hi]] = 1 - w, w
    return weights


def _common(a: Direction, b: Direction) -> tuple[Direction, Direction]:
    """Two directions of different step counts on the steps of the one with more (both need their timesteps)."""
    more, fewer = (a, b) if a.num_steps >= b.num_steps else (b, a)
    if more.timesteps is None or fewer.timesteps is None:
        raise HspaceError(f"cannot combine directions of {a.num_steps} and {b.num_steps} steps without their timesteps; "
                          "resample one to the other's first (Direction.at)")
    fewer = fewer.at(more.timesteps)
    return (more, fewer) if more is a else (fewer, more)


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
            write_result_record(stage, "directions", self.method, self.params, names)
        return [Path(folder) / name for name in names]

    @classmethod
    def load(cls, folder: str | Path) -> "DirectionSet":
        folder = Path(folder)
        info_path = folder / RESULT_FILE
        if info_path.is_file():
            info = read_json(info_path, "direction set")
            names = info.get("directions")
            if not isinstance(names, list) or not all(isinstance(n, str) and n == safe_name(n) for n in names):
                raise HspaceError(f"{str(info_path)!r} must list its direction files by plain name under 'directions'")
            return cls([Direction.load(folder / name) for name in names], str(info.get("method", "")), dict(info.get("params") or {}))
        return cls(load_directions([folder]))


RESULT_FILE = "result.json"  # every method result's record: its kind (what load_result dispatches on), method, params, files


def write_result_record(folder: Path, kind: str, method: str, params: dict, names: Sequence[str]) -> Path:
    """``folder/result.json``: ``{"kind", "method", "params", "directions"}`` (the direction files in order)."""
    return write_json(Path(folder) / RESULT_FILE, {"kind": kind, "method": method, "params": params, "directions": list(names)})


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


def calibrated_unit(direction: Direction) -> float | None:
    """The raw scale of one effect unit of a direction with a card (``meta["calibration"]["scale"]``): a finite number
    other than 0, else None (no card, or a card whose target never reached its unit)."""
    unit = (direction.meta.get("calibration") or {}).get("scale")
    ok = isinstance(unit, (int, float)) and not isinstance(unit, bool) and math.isfinite(unit) and unit != 0
    return float(unit) if ok else None
