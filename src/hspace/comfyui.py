"""hspace directions on ComfyUI's own patch points, without importing ComfyUI (MIT, like the rest of hspace).

The node pack (``integrations/comfyui/``, GPL-3.0-or-later, as ComfyUI) registers the callables of ``ComfyPatch`` on a
cloned ``ModelPatcher``; everything here follows ComfyUI's calling convention and is tested against a stand-in of it:

- **where h is.** A U-Net's ``mid.out`` (the paper's h) is ``h`` of the output-block patch
  (``ModelPatcher.set_model_output_block_patch``, called as ``fn(h, hsp, transformer_options) -> (h, hsp)``) where
  ``transformer_options["block"] == ("output", 0)``: the middle block's output, plus ControlNet's middle residual (the
  additions commute). ``mid.in`` is ``h`` of ``input_block_patch_after_skip`` (``fn(h, transformer_options) -> h``)
  at the last input block. FLUX's ``joint.N`` / ``single.N`` are ``patches_replace["dit"][("double_block", N)]`` /
  ``("single_block", N)`` (``fn(args, {"original_block": f}) -> out``); in a single block the image tokens are
  ``img[:, n_txt : n_txt + H*W]``, n_txt read off the text tokens of the double blocks. SD3's MMDiT takes the same
  ``("double_block", N)`` replace patch: hspace's ``block.N``.
- **when.** The current sigmas are ``transformer_options["sigmas"]``; hspace's timestep of a row is
  ``timestep_of(sigma) * timestep_scale`` (the model's ``model_sampling.timestep``; FLUX's is sigma, so 1000).
  ComfyUI's windows are percents of the schedule: ``percent_window`` turns ``start_percent`` / ``end_percent`` into
  hspace's (t_hi, t_lo) through ``model_sampling.percent_to_sigma``.
- **which rows.** ``transformer_options["cond_or_uncond"]`` lists the guidance chunks of the batch in order (0: cond,
  1: uncond; any number, any order, cond alone at cfg 1): ``chunk_rows`` routes by that list, never by halves.
- **what.** ``deltas.DeltaTable``: the directions resampled to each timestep, scales, units (the one rule of
  ``edits.py``), the shape check.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .deltas import DeltaTable
from .errors import HspaceError
from .hooks import grid_to_tokens, tokens_to_grid

COND, UNCOND = 0, 1  # ComfyUI's values in cond_or_uncond
BRANCHES = ("all", "cond", "uncond")
LOCATIONS = {"unet": ("mid.out", "mid.in"), "flux": ("joint.N", "single.N"), "sd3": ("block.N",)}
TXT_TOKENS = "hspace.text_tokens"  # where a FLUX call keeps its number of text tokens in transformer_options


def chunk_rows(cond_or_uncond: Sequence[int] | None, batch: int, branch: str) -> torch.Tensor:
    """[batch] bool: the rows of the guidance chunks ``branch`` names ("all", "cond", "uncond"). The batch is
    ``len(cond_or_uncond)`` equal chunks in that order; None (a model called outside a sampler) is one cond chunk."""
    if branch not in BRANCHES:
        raise HspaceError(f"unknown branch {branch!r}; valid: {', '.join(BRANCHES)}")
    if branch == "all":
        return torch.ones(batch, dtype=torch.bool)
    chunks = list(cond_or_uncond) if cond_or_uncond is not None else [COND]
    if not chunks or batch % len(chunks) or any(c not in (COND, UNCOND) for c in chunks):
        raise HspaceError(f"cannot split a batch of {batch} rows by cond_or_uncond {chunks!r} (one 0 or 1 per equal chunk)")
    want = COND if branch == "cond" else UNCOND
    return torch.tensor([c == want for c in chunks], dtype=torch.bool).repeat_interleave(batch // len(chunks))


def percent_window(start_percent: float, end_percent: float, percent_to_sigma: Callable[[float], float],
                   timestep_of: Callable[[torch.Tensor], torch.Tensor], timestep_scale: float = 1.0) -> tuple[float, float] | None:
    """hspace's (t_hi, t_lo) of ComfyUI's ``start_percent`` .. ``end_percent`` (0: the first step, 1: the last), or None
    for the whole run (0 .. 1)."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise HspaceError(f"{name} must be a number from 0 to 1, got {value!r}")
    if start_percent > end_percent:
        raise HspaceError(f"start_percent {start_percent:g} is after end_percent {end_percent:g}; the window runs from start to end")
    if start_percent <= 0 and end_percent >= 1:
        return None
    hi = 1000.0 if start_percent <= 0 else float(timestep_of(torch.tensor(float(percent_to_sigma(start_percent))))) * timestep_scale
    lo = 0.0 if end_percent >= 1 else float(timestep_of(torch.tensor(float(percent_to_sigma(end_percent))))) * timestep_scale
    return min(hi, 1000.0), max(lo, 0.0)


class ComfyPatch:
    """One applied direction set on one model: ``family`` "unet" or "flux", ``location`` an hspace name ("mid.out",
    "mid.in", "joint.3", "single.10"), ``timestep_of`` the model's ``model_sampling.timestep``."""

    def __init__(self, table: DeltaTable, family: str, location: str, timestep_of: Callable, *, timestep_scale: float = 1.0,
                 branch: str = "all", input_blocks: int | None = None):
        if family not in LOCATIONS:
            raise HspaceError(f"hspace's ComfyUI nodes support the model families {', '.join(LOCATIONS)} (SD 1.x/2.x/SDXL U-Nets, FLUX, "
                              f"SD3), not {family!r}")
        self.table, self.family, self.location, self.branch = table, family, location, branch
        self.timestep_of, self.timestep_scale = timestep_of, float(timestep_scale)
        self.kind, self.index = _parse_location(family, location)
        self.input_blocks = input_blocks
        chunk_rows(None, 1, branch)  # a bad branch fails when the node runs, not at the first step

    def timesteps(self, transformer_options: dict, batch: int) -> torch.Tensor:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            raise HspaceError("ComfyUI gave this call no sigmas (transformer_options['sigmas']): hspace cannot tell its timestep")
        t = self.timestep_of(torch.as_tensor(sigmas).float()).double().reshape(-1).cpu() * self.timestep_scale
        return t.expand(batch) if len(t) == 1 else t

    def _add(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        rows = chunk_rows(transformer_options.get("cond_or_uncond"), len(h), self.branch)
        return self.table.add(h, self.timesteps(transformer_options, len(h)), rows, self.location)

    # U-Net patch points
    def output_block_patch(self, h, hsp, transformer_options):
        if self.location == "mid.out" and tuple(transformer_options.get("block", ())) == ("output", 0):
            h = self._add(h, transformer_options)
        return h, hsp

    def input_block_patch_after_skip(self, h, transformer_options):
        block = tuple(transformer_options.get("block", ()))
        if self.location == "mid.in" and block == ("input", self.input_blocks - 1):
            h = self._add(h, transformer_options)
        return h

    # FLUX patch points (patches_replace["dit"])
    def replace_patches(self, existing: dict) -> dict:
        """{("double_block" | "single_block", i): fn(args, extra)} to put in ``patches_replace["dit"]``: the block of
        ``location``, and double block 0 (which records the text tokens' count for a single block). A patch already
        at that key (``existing``) runs inside ours: stacked directions and other node packs keep working."""
        keys = {(self.kind, self.index), ("double_block", 0)}
        return {key: self._replace(key, existing.get(key)) for key in keys}

    def _replace(self, key: tuple[str, int], previous: Callable | None) -> Callable:
        def patch(args: dict, extra: dict) -> dict:
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            options = args["transformer_options"]
            if key[0] == "double_block":
                options[TXT_TOKENS] = int(out["txt"].shape[1])
            if key == (self.kind, self.index):
                if key[0] == "single_block" and TXT_TOKENS not in options:
                    raise HspaceError("a FLUX single block ran before any double block: hspace cannot tell text from image tokens")
                start = 0 if key[0] == "double_block" else options[TXT_TOKENS]
                out = {**out, "img": self._tokens(out["img"], start, options)}
            return out

        return patch

    def _tokens(self, tokens: torch.Tensor, start: int, transformer_options: dict) -> torch.Tensor:
        """Image tokens [B, start : start + H*W, C] moved as the grid [B, C, H, W] hspace's directions live on."""
        channels, height, width = self.table.h_shape
        image = tokens[:, start : start + height * width]
        if image.shape[1] != height * width or image.shape[2] != channels:
            raise HspaceError(f"the directions have h of shape {self.table.h_shape} ({height * width} image tokens of {channels} "
                              f"channels), but this model's {self.location} has {tokens.shape[1] - start} tokens of {tokens.shape[2]} after "
                              "the text (another image size or another model)")
        moved = grid_to_tokens(self._add(tokens_to_grid(image, (height, width)), transformer_options))
        return torch.cat([tokens[:, :start], moved.to(tokens.dtype), tokens[:, start + height * width :]], dim=1)


def _parse_location(family: str, location: str) -> tuple[str, int | None]:
    if family == "unet":
        if location not in LOCATIONS["unet"]:
            raise HspaceError(f"h location {location!r} is not on a ComfyUI patch point of a U-Net; valid: {', '.join(LOCATIONS['unet'])}")
        return location, None
    kind, _, number = location.partition(".")
    kinds = {"joint": "double_block", "single": "single_block"} if family == "flux" else {"block": "double_block"}
    if kind not in kinds or not number.isdigit():
        raise HspaceError(f"h location {location!r} is not on a ComfyUI patch point of {family.upper()}; valid: {' or '.join(LOCATIONS[family])}")
    return kinds[kind], int(number)


FAMILIES = {"UNetModel": "unet", "Flux": "flux", "MMDiT": "sd3", "OpenAISignatureMMDITWrapper": "sd3"}
DEFAULT_LOCATION = {"unet": "mid.out"}
_warned: set[str] = set()


def family_of(diffusion_model) -> str:
    """The family of ComfyUI's ``diffusion_model`` by its class (or a base class) name (``FAMILIES``)."""
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise HspaceError(f"hspace's ComfyUI nodes do not know a {type(diffusion_model).__name__} model; they apply directions to "
                      "SD 1.x/2.x and SDXL U-Nets (UNetModel), FLUX (Flux) and SD3 (MMDiT)")


def apply_direction(model, directions, strengths, *, units: str = "auto", start_percent: float = 0.0, end_percent: float = 1.0,
                    branch: str = "all"):
    """A clone of ComfyUI's ``model`` (a ModelPatcher; the input stays untouched) with ``directions`` added to h at
    their location on ComfyUI's patch point (module doc), at ``strengths`` in ``units``, from ``start_percent`` to
    ``end_percent`` of the schedule, in the guidance chunks ``branch`` names. Stacks on patches already there."""
    table = DeltaTable(directions, strengths, units)
    diffusion_model = model.model.diffusion_model
    family = family_of(diffusion_model)
    location = table.location or DEFAULT_LOCATION.get(family)
    if location is None:
        raise HspaceError(f"the direction has no h location (made without an engine); on {family.upper()} give one found at a block")
    sampling = model.get_model_object("model_sampling")
    scale = 1000.0 if family in ("flux", "sd3") else 1.0  # flow matching: ComfyUI's timestep is sigma, hspace's 1000 sigma
    table.window = percent_window(start_percent, end_percent, sampling.percent_to_sigma, sampling.timestep, scale)
    inputs = len(getattr(diffusion_model, "input_blocks", ())) or None
    patch = ComfyPatch(table, family, location, sampling.timestep, timestep_scale=scale, branch=branch, input_blocks=inputs)
    if "comfy" not in _warned:
        _warned.add("comfy")
        import logging

        logging.getLogger(__name__).warning("ComfyUI gives no model fingerprint: hspace checks h's shape only; apply directions found "
                                            "on this checkpoint's weights")
    clone = model.clone()
    # plain closures, not bound methods: ModelPatcher.clone deep-copies model_options, and a function is copied by
    # reference, a bound method with its object (the table, ComfyUI's model_sampling)
    if location == "mid.out":
        clone.set_model_output_block_patch(lambda h, hsp, options: patch.output_block_patch(h, hsp, options))
    elif location == "mid.in":
        clone.set_model_input_block_patch_after_skip(lambda h, options: patch.input_block_patch_after_skip(h, options))
    else:
        existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for (kind, index), fn in patch.replace_patches(existing).items():
            clone.set_model_patch_replace(fn, "dit", kind, index)
    return clone


def describe(direction) -> str:
    """One line for the Load node: name, method, card unit, h location and shape."""
    calibration = direction.meta.get("calibration") or {}
    unit = f"card: 1 effect unit = {calibration['unit']} = raw {calibration['scale']:.3g}" if calibration.get("scale") else "no card (raw units)"
    return (f"{direction.name} ({direction.meta.get('method', 'direction')}); {unit}; h at {direction.h_location or 'any location'}, "
            f"shape {list(direction.h_shape)}, {direction.num_steps} steps")
