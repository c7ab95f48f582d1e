"""Hook points: every place where a denoiser's h can be read and written, by name, on the bare diffusers module.

A hook point names a module of the denoiser and how h is found there as a [B, C, H, W] grid:
- a U-Net's ``mid.out`` (the output of its mid block: the paper's h) and ``mid.in`` (the input of the mid block);
- a transformer's ``block.N`` (FLUX: ``joint.N`` and ``single.N``): the output of that block on the image tokens,
  [B, L, D] with L = (H/p)(W/p) row-major patches, seen as [B, D, H/p, W/p] so that directions, masks and PCA
  cells keep their spatial meaning.

``HookPoint.attach(denoiser, fn)`` puts torch hooks on the diffusers modules themselves, so the point works
wherever the denoiser is called from: hspace's loop, a user's own pipeline, another host's sampler. A
transformer's grid is read from each call's own inputs (the latents' size; FLUX's image position ids), never from a
size stored beforehand. ``fn`` maps the grid h to the h the rest of the denoiser goes on with; a hook whose ``fn``
returns h itself leaves the module's output untouched (recording h is bit-exact).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .errors import HspaceError

# Called with h at the hook point ([B, C, H, W]); returns the h the rest of the denoiser sees.
HFunction = Callable[[torch.Tensor], torch.Tensor]
# The image tokens' grid (H/p, W/p) of one call of the denoiser, from that call's arguments.
GridOf = Callable[[nn.Module, tuple, dict], tuple[int, int]]

H_LOCATIONS = {
    "mid.out": "output of the U-Net mid block (the paper's h-space)",
    "mid.in": "input of the U-Net mid block (output of the deepest down block)",
}
DEFAULT_H_LOCATION = "mid.out"
# A diffusion transformer's h: the output of block N on the image tokens (models/families.py).
BLOCK_KINDS = {
    "block": "output of transformer block N on the image tokens (DiT, PixArt, SD3)",
    "joint": "output of FLUX's double-stream block N on the image tokens",
    "single": "output of FLUX's single-stream block N on the image tokens",
}


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


class Handle:
    """The torch hooks one ``attach`` added; ``remove()`` (or leaving the ``with`` block) takes exactly those off."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class HookPoint:
    """One h location of a denoiser (module doc): its ``name``, the dotted ``path`` of its module in the denoiser,
    whether h is that module's ``input`` or ``output``, and for a transformer block which element of the block's
    output holds the image tokens (``tokens``: -1 for the output itself) and how a call's grid is read (``grid_of``)."""

    name: str
    path: str
    side: str  # "output" or "input"
    description: str
    tokens: int | None = None  # None: h is a [B, C, H, W] feature map already (a U-Net)
    grid_of: GridOf | None = None

    def module(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.get_submodule(self.path)

    def attach(self, denoiser: nn.Module, fn: HFunction) -> Handle:
        """Route h at this point through ``fn`` whenever ``denoiser`` runs, until the handle is removed."""
        module = self.module(denoiser)
        if self.tokens is None:
            if self.side == "output":
                return Handle([module.register_forward_hook(lambda _m, _a, output: fn(output))])
            return Handle([module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True)])
        grid: list[tuple[int, int]] = []

        def read_grid(root, args, kwargs):
            grid[:] = [self.grid_of(root, args, kwargs)]

        def post(_module, _args, output):
            tokens = output if self.tokens == -1 else output[self.tokens]
            h = tokens_to_grid(tokens, grid[0])
            changed = fn(h)
            if changed is h:
                return output
            tokens = grid_to_tokens(changed).to(tokens.dtype)
            if self.tokens == -1:
                return tokens
            return tuple(tokens if i == self.tokens else o for i, o in enumerate(output))

        return Handle([denoiser.register_forward_pre_hook(read_grid, with_kwargs=True), module.register_forward_hook(post)])


def _input_hook(fn: HFunction):
    def pre(_module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return pre


@contextlib.contextmanager
def hooked(denoiser: nn.Module, points: Mapping[str, HookPoint], functions: Mapping[str, HFunction]) -> Iterator[None]:
    """h at every named point through its function inside the block; every hook removed in ``finally``."""
    handles = []
    try:
        for name, fn in functions.items():
            handles.append(points[name].attach(denoiser, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, L, D] image tokens (row-major patches) -> [B, D, H/p, W/p]."""
    b, length, d = tokens.shape
    if length != grid[0] * grid[1]:
        raise HspaceError(f"the block made {length} image tokens but the sample has {grid[0]}x{grid[1]} patches")
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def grid_to_tokens(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(h.shape[0], h.shape[1], -1).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- the families' points



def unet_points(denoiser: nn.Module) -> dict[str, HookPoint]:
    """A U-Net's points (``UNet2DModel``, ``UNet2DConditionModel``): the mid block's output and input."""
    if getattr(denoiser, "mid_block", None) is None:
        raise HspaceError(f"{type(denoiser).__name__} has no mid block, so it has no h-space bottleneck")
    return {"mid.out": HookPoint("mid.out", "mid_block", "output", H_LOCATIONS["mid.out"]),
            "mid.in": HookPoint("mid.in", "mid_block", "input", H_LOCATIONS["mid.in"])}


def latent_grid(root: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """DiT, PixArt, SD3: the latents [B, C, H, W] are the first input; the grid is (H/p, W/p)."""
    x = args[0] if args else kwargs["hidden_states"]
    patch = int(root.config.patch_size)
    return (x.shape[-2] // patch, x.shape[-1] // patch)


def position_grid(root: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """FLUX: the latents come packed as tokens; the grid is read off the image position ids (0, row, column)."""
    ids = kwargs.get("img_ids")
    if ids is None:
        tokens = (args[0] if args else kwargs["hidden_states"]).shape[1]
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise HspaceError(f"FLUX was called without img_ids on {tokens} tokens, which is no square grid; pass img_ids as its pipeline does")
        return (side, side)
    ids = ids[0] if ids.ndim == 3 else ids
    return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)


def block_points(denoiser: nn.Module, kinds: Mapping[str, str], tokens: int, grid_of: GridOf) -> dict[str, HookPoint]:
    """A transformer's points: ``KIND.N`` for block N of every kind (``kinds``: name -> the attribute holding those
    blocks), in forward order; ``tokens`` is where a block's output holds the image tokens."""
    points = {}
    for kind, attribute in kinds.items():
        blocks = getattr(denoiser, attribute)
        what = attribute[:-1].replace("_", " ")
        for i in range(len(blocks)):
            points[f"{kind}.{i}"] = HookPoint(f"{kind}.{i}", f"{attribute}.{i}", "output", f"output of {what} {i} of {len(blocks)} on the image tokens",
                                              tokens, grid_of)
    return points


@contextlib.contextmanager
def h_hook(unet: nn.Module, location: str, fn: HFunction) -> Iterator[None]:
    """Route a U-Net's h at ``location`` (``mid.out`` or ``mid.in``) through ``fn`` inside the block; removed in ``finally``."""
    with unet_points(unet)[check_location(location)].attach(unet, fn):
        yield


def hook_count(module: nn.Module) -> int:
    """Number of forward (pre-)hooks on every module of ``module``; 0 when nothing leaked."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
