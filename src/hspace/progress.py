"""Stages of a long job, each under a progress bar of its own (a factory from description to callback)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")
ProgressFactory = Callable[[str], Callable]  # desc -> a callback with .close(), e.g. cli.Progress


def staged(progress_factory: ProgressFactory | None, desc: str, fn: Callable[[Callable | None], T]) -> T:
    """Call ``fn(callback)`` under a bar made for ``desc`` (None without a factory), closed when it ends."""
    bar = None if progress_factory is None else progress_factory(desc)
    try:
        return fn(bar)
    finally:
        if bar is not None:
            bar.close()
