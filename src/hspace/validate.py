"""The checks of values that users give, in one place: integers in a range, scales, batch sizes, choices.

Each raises ``HspaceError`` naming the value, what it got and what is valid; none changes what it checks beyond
the conversion it says (``check_scales`` returns floats)."""

from __future__ import annotations

import math

import torch

from .errors import HspaceError, check_choice

__all__ = ["FLOAT32_MAX", "check_batch_size", "check_choice", "check_int", "check_scales", "check_window", "is_int"]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def is_int(value) -> bool:
    """An integer and not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None, high: int | None = None, valid: str | None = None) -> int:
    """``value`` as an integer in [low, high] (either bound may be open); else an error naming ``name`` and what is
    ``valid`` (by default the range in words)."""
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return value
    if valid is None:
        valid = ("an integer" if low is None else "a positive integer" if low == 1 and high is None else f"an integer >= {low}"
                 if high is None else f"an integer from {low} to {high}")
    raise HspaceError(f"{name} must be {valid}, got {value!r}")


def check_window(window) -> tuple[float, float] | None:
    """A timestep window (t_start, t_end) with t_start >= t_end, as two floats; None stays None (every step)."""
    if window is None:
        return None
    try:
        start, end = (float(w) for w in window)
    except (TypeError, ValueError):
        raise HspaceError(f"window must be (t_start, t_end), two numbers, got {window!r}") from None
    if start < end:
        raise HspaceError(f"window ({start:g}, {end:g}) must run from the larger timestep to the smaller")
    return start, end


def check_scales(scales) -> list[float]:
    """A list of finite numbers, at least one (a string is not a list of digits)."""
    if isinstance(scales, (str, bytes)):
        raise HspaceError(f"scales must be a list of numbers, got the string {scales!r}")
    try:
        scales = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise HspaceError(f"scales must be a list of numbers, got {scales!r}") from None
    if not scales:
        raise HspaceError("scales is empty; give at least one scale, e.g. [-2, 0, 2]")
    bad = [s for s in scales if not math.isfinite(s) or abs(s) > FLOAT32_MAX]
    if bad:
        raise HspaceError(f"scale {bad[0]} is not a finite float32 number; valid: finite numbers like -2, 0, 2 (at most {FLOAT32_MAX:.3g})")
    return scales


def check_batch_size(batch_size) -> int:
    return check_int("batch_size", batch_size, 1)
