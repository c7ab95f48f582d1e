"""Hook points on the U-Net bottleneck: where h lives, and a context manager that can never leak hooks.

The paper's h (Sec. 3, Fig. 2) is the output of the U-Net's mid block; its input is offered too.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import HspaceError

H_LOCATIONS = {
    "mid.out": "output of the U-Net mid block (the paper's h-space)",
    "mid.in": "input of the U-Net mid block (output of the deepest down block)",
}
DEFAULT_H_LOCATION = "mid.out"
# A diffusion transformer's h: the output of block N on the image tokens (models/transformer.py).
BLOCK_KINDS = {
    "block": "output of transformer block N on the image tokens (DiT, PixArt, SD3)",
    "joint": "output of FLUX's double-stream block N on the image tokens",
    "single": "output of FLUX's single-stream block N on the image tokens",
}

# Called with the activation at the hook point; returns the activation the rest of the U-Net sees.
HFunction = Callable[[torch.Tensor], torch.Tensor]


def check_location_name(location: str) -> str:
    """A location's name is well formed (which ones a model has, its backbone says): ``mid.out``, ``mid.in``,
    or ``block.N`` / ``joint.N`` / ``single.N`` with N an integer (negative counts from the end)."""
    if isinstance(location, str) and location in H_LOCATIONS:
        return location
    kind, _, index = location.partition(".") if isinstance(location, str) else ("", "", "")
    if kind in BLOCK_KINDS and index.lstrip("-").isdigit():
        return location
    raise HspaceError(f"unknown h location {location!r}; valid: {', '.join(H_LOCATIONS)} (U-Nets), or "
                      f"{', '.join(k + '.N' for k in BLOCK_KINDS)} (transformers; N counts blocks from 0, negative from the end)")


def check_location(location: str) -> str:
    if location not in H_LOCATIONS:
        valid = ", ".join(f"{k!r} ({v})" for k, v in H_LOCATIONS.items())
        raise HspaceError(f"unknown h location {location!r}; valid: {valid}")
    return location


def bottleneck(unet: nn.Module) -> nn.Module:
    mid = getattr(unet, "mid_block", None)
    if mid is None:
        raise HspaceError(f"{type(unet).__name__} has no mid block, so it has no h-space bottleneck")
    return mid


@contextlib.contextmanager
def h_hook(unet: nn.Module, location: str, fn: HFunction) -> Iterator[None]:
    """Route the activation at ``location`` through ``fn`` inside the block; removed in ``finally``."""
    check_location(location)
    module = bottleneck(unet)
    if location == "mid.out":

        def post(_module, _args, output):
            return fn(output)

        handle = module.register_forward_hook(post)
    else:

        def pre(_module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def hook_count(unet: nn.Module) -> int:
    """Number of forward (pre-)hooks on every module of ``unet``; 0 when nothing leaked."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
