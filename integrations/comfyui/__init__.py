# SPDX-License-Identifier: GPL-3.0-or-later
"""hspace nodes for ComfyUI: load an hspace direction file, apply it to a MODEL between the checkpoint loader and
any KSampler (any sampler, any scheduler). The logic lives in hspace (``hspace.comfyui``, MIT); this pack is the
ComfyUI side (it runs in ComfyUI's process and uses its classes: GPL-3.0-or-later, as ComfyUI). docs/comfyui.md."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "hspace"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def _error(e: Exception) -> Exception:
    """hspace's clear errors as ComfyUI shows them (a ValueError with the message), never a silent no-op."""
    from hspace.errors import HspaceError

    return ValueError(f"hspace: {e}") if isinstance(e, HspaceError) else e


class HspaceLoadDirection:
    """A direction file from models/hspace/ (subfolders too: a PCA or supervised run's folder of directions)."""

    CATEGORY = "hspace"
    RETURN_TYPES = ("HSPACE_DIRECTION", "STRING")
    RETURN_NAMES = ("direction", "info")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"direction": (folder_paths.get_filename_list(FOLDER),)}}

    def load(self, direction):
        from hspace.comfyui import describe
        from hspace.directions.direction import Direction

        try:
            loaded = Direction.load(folder_paths.get_full_path(FOLDER, direction))
        except Exception as e:
            raise _error(e) from e
        return (loaded, describe(loaded))


class HspaceApplyDirection:
    """MODEL -> MODEL with the direction added to h (a clone: the input MODEL is untouched); chain to stack several."""

    CATEGORY = "hspace"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "direction": ("HSPACE_DIRECTION",),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05}),
            "units": (["auto", "raw", "effect"], {"default": "auto"}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "branch": (["all", "cond", "uncond"], {"default": "all"}),
        }}

    def apply(self, model, direction, strength, units, start_percent, end_percent, branch):
        from hspace.comfyui import apply_direction

        try:
            return (apply_direction(model, [direction], [strength], units=units, start_percent=start_percent,
                                    end_percent=end_percent, branch=branch),)
        except Exception as e:
            raise _error(e) from e


NODE_CLASS_MAPPINGS = {"HspaceLoadDirection": HspaceLoadDirection, "HspaceApplyDirection": HspaceApplyDirection}
NODE_DISPLAY_NAME_MAPPINGS = {"HspaceLoadDirection": "hspace Load Direction", "HspaceApplyDirection": "hspace Apply Direction"}
