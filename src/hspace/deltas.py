"""delta-h of several directions at any timestep, added to the rows of a batch: the logic every hook shares.

``DeltaTable(directions, scales, units, window)`` is what ``hspace.steer`` (a torch hook in a diffusers pipeline)
and the ComfyUI patches (``comfyui.py``: ComfyUI's own patch points) add to h:

- ``at(t)``: ``sum_d scale_d * unit_d * direction_d.at(t)`` [*h_shape], each direction resampled to the timestep the
  sampler visits (``Direction.at``), in hspace's 0-1000 units; cached per timestep, the scales applied on each call so
  that a slider moves them without rebuilding anything;
- ``add(h, t, rows, location)``: h [B, *h_shape] with delta-h added to the chosen rows inside the window, a clear
  error for h of another shape (``resize=True``: bilinear on h's grid, an approximation).

Units follow the one rule of ``edits.py`` ("auto": a carded direction moves in its effect unit; "raw"; "effect").
"""

from __future__ import annotations


import torch

from .directions.direction import Direction
from .edits import unit_of
from .errors import HspaceError
from .validate import check_scales, check_window


def check_timestep_window(window) -> tuple[float, float] | None:
    """``validate.check_window``, within hspace's 0-1000 timesteps (a sampler's are never outside)."""
    window = check_window(window)
    if window is not None and not (0 <= window[1] <= window[0] <= 1000):
        raise HspaceError(f"window ({window[0]:g}, {window[1]:g}) must lie within the timesteps 0-1000")
    return window


class DeltaTable:
    """The directions, their scales (settable), units and window (module doc)."""

    def __init__(self, directions, scales=1.0, units: str = "raw", window=None):
        directions = [directions] if isinstance(directions, Direction) else list(directions)
        if not directions or not all(isinstance(d, Direction) for d in directions):
            raise HspaceError("give a Direction or a list of them")
        locations = {d.h_location for d in directions} - {None}
        if len(locations) > 1:
            raise HspaceError(f"the directions were found at different h locations ({', '.join(sorted(locations))}); steer one location at a time")
        shapes = {tuple(d.h_shape) for d in directions}
        if len(shapes) > 1:
            raise HspaceError(f"the directions have h of different shapes ({', '.join(map(str, sorted(shapes)))}); give directions of one h")
        self.directions = directions
        self.location = next(iter(locations), None)
        self.h_shape = tuple(directions[0].h_shape)
        self.units = [unit_of(d, units) for d in directions]
        self.window = check_timestep_window(window)
        self.scales = scales
        self._at: dict[float, torch.Tensor] = {}

    @property
    def scales(self) -> list[float]:
        return list(self._scales)

    @scales.setter
    def scales(self, scales) -> None:
        scales = [scales] if isinstance(scales, (int, float)) and not isinstance(scales, bool) else scales
        scales = check_scales(scales)
        if len(scales) != len(self.directions):
            raise HspaceError(f"{len(scales)} scales for {len(self.directions)} directions; give one scale per direction")
        self._scales = [float(s) for s in scales]

    def at(self, t: float) -> torch.Tensor:
        """sum_d unit_d * direction_d.at(t) * scale_d at hspace's timestep ``t``, [*h_shape] (float32)."""
        if t not in self._at:
            self._at[t] = torch.stack([d.at(torch.tensor([t], dtype=torch.float64)).delta[0] for d in self.directions])
        per_direction = self._at[t]
        coefficients = torch.tensor([s * unit for s, (_, unit) in zip(self._scales, self.units)], dtype=per_direction.dtype)
        return torch.einsum("d,d...->...", coefficients, per_direction)

    def in_window(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows whose timestep lies in the window."""
        if self.window is None:
            return torch.ones(len(t), dtype=torch.bool)
        return (t <= self.window[0]) & (t >= self.window[1])

    def add(self, h: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, location: str, resize: bool = False) -> torch.Tensor:
        """h [B, *h_shape] with delta-h at each row's timestep ``t`` [B] added to ``rows`` [B] (bool) in the window; h
        itself when nothing is added. A grid of another size only with ``resize`` (bilinear, same channels)."""
        rows = rows & self.in_window(t)
        if not bool(rows.any()) or not any(self._scales):
            return h
        shape = self.h_shape
        if tuple(h.shape[1:]) != shape and not (resize and len(shape) == 3 and h.ndim == 4 and h.shape[1] == shape[0]):
            raise HspaceError(f"the directions have h of shape {shape}, but this model's h at {location!r} is {tuple(h.shape[1:])} "
                              "(another image size or another model); find directions at this size"
                              + (", or resize=True (bilinear on h's grid, an approximation)" if h.ndim == 4 and h.shape[1] == shape[0] else ""))
        unique, inverse = torch.unique(t[rows], return_inverse=True)  # one timestep per call in every sampler known
        deltas = torch.stack([self.at(float(u)) for u in unique]).to(h.device, h.dtype)
        if tuple(deltas.shape[1:]) != tuple(h.shape[1:]):  # resize=True: delta-h bilinear on the grid of this image size
            deltas = torch.nn.functional.interpolate(deltas, size=tuple(h.shape[2:]), mode="bilinear", align_corners=False)
        edited = h.clone()
        rows = rows.to(h.device)
        edited[rows] = h[rows] + deltas[inverse.to(h.device)]
        return edited


