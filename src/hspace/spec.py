"""The identity of a generative process: which model, where h is, which dtype and clipping, and for a
conditional U-Net (Stable Diffusion, SDXL) the prompt, the guidance and where delta-h goes under it.

One frozen ``Spec`` is validated once, stored inside every Trajectory, Bank and Direction file, and
turned back into the engine that made them (``Engine.load(spec)``).

Compatibility rules (``Spec.check``):
- ``model`` and ``h_location`` must be equal everywhere: h of another model or location is another space.
- ``clip_sample`` is part of the process: replaying a trajectory or reading a bank drawn with another
  clipping is an error. A direction does not depend on it (it is a vector in h-space).
- ``dtype`` is compatible: a trajectory, bank or direction from float32 replays in float16 and back,
  within the lower precision's tolerance. Extending a bank needs the same dtype (``Spec ==``), so that
  every sample of one bank is drawn by the same arithmetic.
- ``prompt``, ``negative_prompt``, ``guidance`` and ``guide_edit`` are part of the process (a replay of
  a sample drawn for another prompt is another process). A direction found under one prompt applies
  under any other (it is a vector in the model's h-space), as the paper's directions transfer between samples.

Conditioning (None for an unconditional model): ``prompt`` (a conditional model's default is ""),
``negative_prompt`` (None: the pipeline's own default, e.g. SDXL's zeros), ``guidance`` (the
classifier-free guidance scale; <= 1 is one conditional pass) and ``guide_edit``, where delta-h goes
under guidance: "cond" (the conditional pass only), "uncond" (the unconditional pass only) or "both"
(the paper's official code; the default). None when there is no guidance (one pass, which delta-h enters).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from .errors import HspaceError
from .hooks import DEFAULT_H_LOCATION, check_location

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
GUIDE_EDITS = ("both", "cond", "uncond")  # where delta-h goes under classifier-free guidance; "both" is the default
# What each kind of artefact must share with the engine that uses it.
MUST_MATCH = {
    "process": ("model", "h_location", "clip_sample", "prompt", "negative_prompt", "guidance", "guide_edit"),  # trajectories, banks
    "direction": ("model", "h_location"),
}


@dataclass(frozen=True)
class Spec:
    """model (built-in name, absolute folder path or hub id), h location, dtype name, clip_sample
    (None: the model's own setting)."""

    model: str
    h_location: str = DEFAULT_H_LOCATION
    dtype: str = "float32"
    clip_sample: bool | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    guide_edit: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise HspaceError(f"a spec's model must be a non-empty string, got {self.model!r}")
        check_location(self.h_location)
        if self.dtype not in DTYPE_NAMES:
            raise HspaceError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise HspaceError(f"clip_sample must be True, False or None (the model's setting), got {self.clip_sample!r}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise HspaceError(f"{name} must be a string, got {value!r}")
        if self.prompt is None and (self.negative_prompt, self.guidance, self.guide_edit) != (None, None, None):
            raise HspaceError("a negative prompt, guidance or guide_edit needs a prompt (a conditional model); this spec has none")
        if self.guidance is not None:
            if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or self.guidance < 0:
                raise HspaceError(f"guidance must be a finite number >= 0 (<= 1: no classifier-free guidance), got {self.guidance!r}")
            object.__setattr__(self, "guidance", float(self.guidance))
        if self.guide_edit is not None and self.guide_edit not in GUIDE_EDITS:
            raise HspaceError(f"unknown guide_edit {self.guide_edit!r}; valid: {', '.join(GUIDE_EDITS)}")
        if self.guide_edit is not None and not self.guided:
            raise HspaceError(f"guide_edit {self.guide_edit!r} needs guidance > 1 (two passes); with guidance {self.guidance} delta-h enters the one pass")

    @property
    def conditional(self) -> bool:
        return self.prompt is not None

    @property
    def guided(self) -> bool:
        """Whether every step runs a conditional and an unconditional pass (classifier-free guidance)."""
        return self.guidance is not None and self.guidance > 1

    def describe(self) -> str:
        """One line for people: the model, where h is, and the conditioning."""
        text = f"{self.model} (h at {self.h_location}, {self.dtype})"
        if self.conditional:
            text += f", prompt {self.prompt!r}"
            if self.negative_prompt:
                text += f", negative prompt {self.negative_prompt!r}"
            text += f", guidance {self.guidance:g}" + (f", delta-h in {self.guide_edit} pass(es)" if self.guided else "")
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Spec":
        if not isinstance(data, dict):
            raise HspaceError(f"a spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HspaceError(f"unknown spec field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise HspaceError(f"a spec must be JSON: {e}") from None

    def differences(self, other: "Spec", kind: str = "process") -> list[str]:
        """The fields (of ``MUST_MATCH[kind]``) in which ``other`` differs from this spec."""
        if kind not in MUST_MATCH:
            raise HspaceError(f"unknown compatibility kind {kind!r}; valid: {', '.join(MUST_MATCH)}")
        return [
            f"{key}: {getattr(other, key)!r} vs {getattr(self, key)!r}"
            for key in MUST_MATCH[kind]
            if getattr(self, key) != getattr(other, key)
        ]

    def check(self, other: "Spec | None", what: str, kind: str = "process") -> None:
        """Raise unless ``other`` (the spec of ``what``) is compatible with this one (see the module doc)."""
        if other is None:
            return
        bad = self.differences(other, kind)
        if bad:
            raise HspaceError(f"{what} was made by a different engine ({'; '.join(bad)}, theirs vs this engine's)")
