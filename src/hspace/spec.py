"""The identity of a generative process: which model (by content), where h is, which dtype and clipping,
the process that decides the numbers (steps, eta schedule, timestep spacing, autocast), and for a
conditional U-Net (Stable Diffusion, SDXL) the prompt, the guidance and where delta-h goes under it.

One frozen ``Spec`` is validated once, stored inside every Trajectory, Bank and Direction file, and
turned back into the engine that made them (``Engine.load(spec)``). ``Spec.check`` is the one
compatibility check every reader uses.

The fields, and what a mismatch means (``MUST_MATCH``):
- ``fingerprint``: a hash of the model's configs and weights (``fingerprint.py``); it, not the path, is the
  model's identity, so the same weights copied to another folder or machine are the same model and weights
  changed in place (a fused LoRA, a fine-tune saved over the folder) are another. ``model`` (built-in name,
  folder path or hub id) is only where ``Engine.load(spec)`` looks first. Artefacts made before fingerprints
  (``fingerprint`` None) are compared by ``model`` as before, with a warning once.
- ``h_location``: h of another location is another space; must match everywhere.
- ``clip_sample``, ``spacing`` (the scheduler's timestep spacing), ``autocast`` and the conditioning are
  part of the process: replaying a trajectory or reading a bank drawn with another value is an error.
  ``autocast`` changes samples beyond float tolerance (``speed.py``); ``check(..., tolerant=True)`` lets it
  differ for a replay the user knows is approximate. ``spacing`` None (an old artefact) is not compared.
- ``prompt`` is the engine's default prompt, not part of a process: a trajectory records each sample's prompt
  (``Trajectory.prompts``) and is replayed under them by an engine of any prompt; a bank records its prompts
  in its identity (``bank.py``). Extending a bank (``"exact"``) still compares it (its first prompt).
- ``num_steps`` and ``eta`` (one value per step) are the process of a trajectory or bank; an engine's own
  spec has None (it runs any process), and they are compared where both sides have them.
- ``dtype`` is compatible: a trajectory, bank or direction from float32 replays in float16 and back,
  within the lower precision's tolerance. Extending a bank needs every field equal (``kind="exact"``), so
  that every sample of one bank is drawn by the same arithmetic.
- A direction needs only the model, h location and h shape, its ``Space`` (it is a vector in h-space; it applies under
  any prompt and process, as the paper's directions transfer between samples). A direction made without any engine
  has the explicit spec ``FREE``: it applies to any engine whose h has its shape. ``Engine.load(space)`` rebuilds an
  engine of a direction's space (the process and conditioning the caller's).
- ``denoiser`` is the denoiser's own identity, ``ARCH:WEIGHTS`` (``fingerprint.denoiser_fingerprint``): implied by
  ``fingerprint`` and compared by no reader here; ``steer`` compares it with the denoiser of a user's pipeline, whose
  folder, scheduler and text encoders may differ from hspace's loading of the same model.
- ``timesteps`` (the model's timestep input at each step) belongs to the process with ``num_steps`` and ``eta``: a
  trajectory's spec holds all three and the trajectory derives its timesteps and eta from them (it stores no copies).

Two types split what travels where: a ``Space`` (model, fingerprint, h location, dtype, h shape) is all a direction
carries and is checked against (``Space.check``); a ``Spec`` is an engine's identity with, for a trajectory or bank,
the process it was drawn with (``Spec.process`` gives that part as a ``Process``).

Conditioning (None for an unconditional model): ``prompt`` (a conditional model's default is ""),
``negative_prompt`` (None: the pipeline's own default, e.g. SDXL's zeros), ``guidance`` (the
classifier-free guidance scale; <= 1 is one conditional pass) and ``guide_edit``, where delta-h goes
under guidance: "cond" (the conditional pass only), "uncond" (the unconditional pass only) or "both"
(the paper's official code; the default). None when there is no guidance (one pass, which delta-h enters).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import HspaceError
from .validate import check_int, is_int
from .hooks import DEFAULT_H_LOCATION, check_location_name

logger = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
AUTOCAST_DTYPES = ("bfloat16", "float16")
GUIDE_EDITS = ("both", "cond", "uncond")  # where delta-h goes under classifier-free guidance; "both" is the default
CONDITION_FIELDS = ("prompt", "negative_prompt", "guidance", "guide_edit")
PROCESS_FIELDS = ("num_steps", "eta", "timesteps")  # compared only where both sides have them (an engine runs any process)
TOLERABLE = ("autocast",)  # what ``check(..., tolerant=True)`` lets differ
# What each kind of reader must share with the engine (or bank) that uses an artefact ("model" is the fingerprint).
# The prompt is not part of a process: every sample of a trajectory or bank records its own (``Trajectory.prompts``),
# so a replay runs each sample under its prompt whatever the engine's is, and samples of several prompts are one batch.
PER_SAMPLE = ("negative_prompt", "guidance", "guide_edit")
MUST_MATCH = {
    "process": ("model", "h_location", "clip_sample", *PER_SAMPLE, "spacing", "autocast", "size", *PROCESS_FIELDS),  # trajectories, banks
    "samples": ("model", "h_location", "dtype", "clip_sample", *PER_SAMPLE, "spacing", "autocast", "size", *PROCESS_FIELDS),  # one batch
    "exact": ("model", "h_location", "dtype", "clip_sample", *CONDITION_FIELDS, "spacing", "autocast", "size", *PROCESS_FIELDS),  # extending a bank
}
NON_EMPTY = ("fingerprint", "spacing", "denoiser")
FREE = "free"  # the spec of a direction made without an engine: it applies to any engine whose h has its shape
_warned: set[str] = set()


@dataclass(frozen=True)
class Spec:
    """The identity of a process (module doc). ``model`` locates the model; ``fingerprint`` identifies it."""

    model: str
    h_location: str = DEFAULT_H_LOCATION
    dtype: str = "float32"
    clip_sample: bool | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    guide_edit: str | None = None
    fingerprint: str | None = None
    spacing: str | None = None
    autocast: str | None = None
    num_steps: int | None = None
    eta: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None  # (height, width) of the images in pixels; None: the model's default
    denoiser: str | None = None  # the denoiser's own architecture and weights (fingerprint.denoiser_fingerprint); informational
    timesteps: tuple[int | float, ...] | None = None  # the model's timestep input per step (ints: DDPM family; floats: flow)

    def __post_init__(self):
        _check_identity(self, "spec", ("prompt", "negative_prompt", "fingerprint", "spacing", "denoiser"))
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise HspaceError(f"clip_sample must be True, False or None (the model's setting), got {self.clip_sample!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise HspaceError(f"unknown autocast dtype {self.autocast!r}; valid: {', '.join(AUTOCAST_DTYPES)} (or None: off)")
        if self.size is not None:
            try:
                size = tuple(self.size)
            except TypeError:
                size = ()
            if len(size) != 2 or not all(is_int(s) and s >= 1 for s in size):
                raise HspaceError(f"size must be (height, width), two positive integers (pixels), got {self.size!r}")
            object.__setattr__(self, "size", size)
        self._check_condition()
        self._check_process()

    def _check_condition(self) -> None:
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

    def _check_process(self) -> None:
        if (self.num_steps is None) != (self.eta is None) or (self.timesteps is not None and self.num_steps is None):
            raise HspaceError("a spec's process needs both num_steps and eta (one value per step; timesteps optional), or none of them (an engine's spec)")
        if self.num_steps is None:
            return
        check_int("num_steps", self.num_steps, 1, valid="a positive integer")
        try:
            eta = tuple(float(e) for e in self.eta)
        except (TypeError, ValueError):
            raise HspaceError(f"eta must be a list of numbers, one per step, got {self.eta!r}") from None
        if len(eta) != self.num_steps or not all(0 <= e <= 1 for e in eta):
            raise HspaceError(f"eta must hold {self.num_steps} numbers from 0 to 1 (one per step), got {len(eta)} values")
        object.__setattr__(self, "eta", eta)
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", _timesteps(self.timesteps, self.num_steps))

    @property
    def conditional(self) -> bool:
        return self.prompt is not None

    @property
    def guided(self) -> bool:
        """Whether every step runs a conditional and an unconditional pass (classifier-free guidance)."""
        return self.guidance is not None and self.guidance > 1

    def with_process(self, num_steps: int, eta, timesteps=None) -> "Spec":
        """This engine spec with the process of a trajectory or bank: ``num_steps``, eta per step and (a trajectory's)
        the timesteps (a tensor or a sequence)."""
        if hasattr(timesteps, "tolist"):
            timesteps = timesteps.tolist()
        return replace(self, num_steps=num_steps, eta=tuple(float(e) for e in eta), timesteps=None if timesteps is None else tuple(timesteps))

    @property
    def engine(self) -> "Spec":
        """The engine's part of this spec (no steps, no eta, no timesteps): what ``Engine.load`` rebuilds."""
        return replace(self, num_steps=None, eta=None, timesteps=None)

    @property
    def space(self) -> "Space":
        """The h-space this spec's engine reads and writes: what a direction found with it carries (its h shape is the
        engine's, ``Engine.space``)."""
        return Space(self.model, self.h_location, self.dtype, self.fingerprint, self.denoiser)

    @property
    def process(self) -> "Process | None":
        """The process part of a trajectory's or bank's spec; None for an engine's (it runs any process)."""
        if self.num_steps is None:
            return None
        return Process(**{f.name: getattr(self, f.name) for f in fields(Process)})

    def describe(self) -> str:
        """One line for people: the model, where h is, and the conditioning."""
        text = f"{self.model} (h at {self.h_location}, {self.dtype}{', ' + self.autocast + ' autocast' if self.autocast else ''})"
        if self.conditional:
            text += f", prompt {self.prompt!r}"
            if self.negative_prompt:
                text += f", negative prompt {self.negative_prompt!r}"
            text += f", guidance {self.guidance:g}" + (f", delta-h in {self.guide_edit} pass(es)" if self.guided and self.guide_edit else "")
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["eta"] is not None:
            data["eta"] = list(data["eta"])
        if data["size"] is None:
            del data["size"]  # (a spec of the default size reads as before sizes existed: banks keep their fingerprint)
        else:
            data["size"] = list(data["size"])
        for name in ("denoiser", "timesteps"):  # absent where unknown: a spec reads (and hashes) as before they existed
            if data[name] is None:
                del data[name]
        if "timesteps" in data:
            data["timesteps"] = list(data["timesteps"])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def key(self) -> dict:
        """The fields that identify the process, without where the model was found (``model``) when the
        fingerprint identifies it: equal for a copy of the model at another path."""
        data = self.to_dict()
        data.pop("denoiser", None)  # implied by the fingerprint (and absent from artefacts made before it)
        if self.fingerprint is not None:
            data.pop("model")
        return data

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

    def differences(self, other: "Spec", kind: str = "process", tolerant: bool = False, what: str = "an artefact") -> list[str]:
        """The fields (of ``MUST_MATCH[kind]``) in which ``other`` differs from this spec (module doc)."""
        if kind not in MUST_MATCH:
            raise HspaceError(f"unknown compatibility kind {kind!r}; valid: {', '.join(MUST_MATCH)}")
        found = []
        for key in MUST_MATCH[kind]:
            if key == "model":
                found.append(model_difference(self, other, what))
                continue
            ours, theirs = getattr(self, key), getattr(other, key)
            if (key in PROCESS_FIELDS or key == "spacing") and (ours is None or theirs is None):
                continue
            if tolerant and key in TOLERABLE:
                continue
            if ours != theirs:
                found.append(f"{key}: {_short(theirs)} vs {_short(ours)}")
        return [d for d in found if d]

    def check(self, other: "Spec | None", what: str, kind: str = "process", tolerant: bool = False) -> None:
        """Raise unless ``other`` (the spec of ``what``) is compatible with this one (see the module doc). A direction is
        checked by its ``Space`` (``Space.check``)."""
        if not isinstance(other, Spec):
            raise HspaceError(f"{what} has no spec (the engine that made it is unknown); valid: an artefact made by an hspace engine")
        bad = self.differences(other, kind, tolerant, what)
        if bad:
            hint = "; replay with tolerant=True to allow autocast to differ" if any(b.startswith("autocast") for b in bad) else ""
            raise HspaceError(f"{what} was made by a different engine ({'; '.join(bad)}, theirs vs this engine's){hint}")


def _check_identity(identity, kind: str, strings: tuple[str, ...]) -> None:
    """The fields a spec and a space share: the model (a non-empty string), the h location, the dtype; and the optional
    ``strings`` (None or a string; non-empty where ``NON_EMPTY``)."""
    if not isinstance(identity.model, str) or not identity.model:
        raise HspaceError(f"a {kind}'s model must be a non-empty string, got {identity.model!r}")
    check_location_name(identity.h_location)
    if identity.dtype not in DTYPE_NAMES:
        raise HspaceError(f"unknown dtype {identity.dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
    for name in strings:
        value = getattr(identity, name)
        if value is not None and (not isinstance(value, str) or (name in NON_EMPTY and not value)):
            raise HspaceError(f"{name} must be a{' non-empty' if name in NON_EMPTY else ''} string, got {value!r}")


def model_difference(ours, theirs, what: str) -> str | None:
    """The model part of a compatibility check (of two specs or spaces): by fingerprint, else (an artefact from before
    fingerprints) by name, warned once."""
    if ours.fingerprint is not None and theirs.fingerprint is not None:
        if ours.fingerprint == theirs.fingerprint:
            return None
        return (f"model fingerprint: {theirs.fingerprint} ({theirs.model}) vs {ours.fingerprint} ({ours.model}); the weights "
                "or configs differ (changed in place, or another model)")
    if what not in _warned:
        _warned.add(what)
        logger.warning("%s has no model fingerprint (made before hspace 0.2 or without one): compared by the model's name "
                       "%r only; weights changed in place would go unnoticed", what, (theirs if theirs.fingerprint is None else ours).model)
    return None if ours.model == theirs.model else f"model: {theirs.model!r} vs {ours.model!r}"


@dataclass(frozen=True)
class Space:
    """What a direction needs and carries: the model (by content), where h is, the dtype it was found in, and (where
    known) the h shape. A direction applies wherever its space matches (``check``): under any prompt, steps or eta."""

    model: str
    h_location: str = DEFAULT_H_LOCATION
    dtype: str = "float32"
    fingerprint: str | None = None
    denoiser: str | None = None
    h_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        _check_identity(self, "space", ("fingerprint", "denoiser"))
        if self.h_shape is not None:
            shape = tuple(self.h_shape) if isinstance(self.h_shape, (list, tuple)) else ()
            if not shape or not all(is_int(d) and d >= 1 for d in shape):
                raise HspaceError(f"h_shape must be a list of positive integers, got {self.h_shape!r}")
            object.__setattr__(self, "h_shape", shape)

    def check(self, other: "Space | str | None", what: str) -> None:
        """Raise unless a direction of space ``other`` applies here: the same model (fingerprint), the same h location and,
        where both know it, the same h shape. ``FREE`` applies to every space (its delta's shape is checked by the caller)."""
        if other == FREE:
            return
        if not isinstance(other, Space):
            raise HspaceError(f"{what} has no spec (the engine that made it is unknown); valid: an artefact made by an hspace "
                              "engine, or a direction with spec=FREE")
        bad = [model_difference(self, other, what)]
        if other.h_location != self.h_location:
            bad.append(f"h_location: {other.h_location!r} vs {self.h_location!r}")
        if None not in (self.h_shape, other.h_shape) and self.h_shape != other.h_shape:
            raise HspaceError(f"{what} has h shape {other.h_shape} but the engine's h at {self.h_location!r} is {self.h_shape}")
        bad = [b for b in bad if b]
        if bad:
            raise HspaceError(f"{what} was made by a different engine ({'; '.join(bad)}, theirs vs this engine's)")

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if "h_shape" in data:
            data["h_shape"] = list(data["h_shape"])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Space":
        """A space; a full spec (a direction file written before spaces) gives its space (the rest is the process's).
        The fields are checked as a spec's are (an unknown field is an error)."""
        if not isinstance(data, dict):
            raise HspaceError(f"a spec must be a JSON object, got {type(data).__name__}")
        own = {f.name for f in fields(cls)}
        if set(data) <= own:
            return cls(**data)
        rest = {k: v for k, v in data.items() if k != "h_shape"}
        space = Spec.from_dict(rest).space
        return replace(space, h_shape=data.get("h_shape"))

    @classmethod
    def from_json(cls, text: str) -> "Space":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise HspaceError(f"a spec must be JSON: {e}") from None

    def describe(self) -> str:
        return f"{self.model} (h at {self.h_location}{', ' + 'x'.join(map(str, self.h_shape)) if self.h_shape else ''})"


@dataclass(frozen=True)
class Process:
    """How a trajectory or bank was drawn: the steps with their eta and timesteps, the spacing, autocast, clipping, the
    size and the conditioning (``Spec.process``)."""

    num_steps: int
    eta: tuple[float, ...]
    timesteps: tuple[int | float, ...] | None
    spacing: str | None
    autocast: str | None
    clip_sample: bool | None
    size: tuple[int, int] | None
    prompt: str | None
    negative_prompt: str | None
    guidance: float | None
    guide_edit: str | None

    def timestep_tensor(self):
        """The timesteps as the engine's schedule holds them: long (DDPM family) or float64 (flow matching)."""
        import torch

        if self.timesteps is None:
            raise HspaceError("this process has no recorded timesteps (a bank's); the engine's schedule gives them")
        return torch.tensor(self.timesteps, dtype=torch.long if all(isinstance(t, int) for t in self.timesteps) else torch.float64)

    def eta_tensor(self):
        import torch

        return torch.tensor(self.eta, dtype=torch.float64)


def _timesteps(values, num_steps: int) -> tuple:
    """A process's timesteps: ``num_steps`` finite numbers, kept as ints where all are (the DDPM family)."""
    try:
        values = tuple(values)
        ok = len(values) == num_steps and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    except TypeError:
        ok = False
    if not ok:
        raise HspaceError(f"timesteps must be {num_steps} finite numbers (one per step), got {str(values)[:80]}")
    return values if all(isinstance(v, int) for v in values) else tuple(float(v) for v in values)


def _short(value) -> str:
    """A value for an error message: a long eta schedule by its length and ends."""
    if isinstance(value, tuple) and len(value) > 6:
        return f"({value[0]:g}, ..., {value[-1]:g}; {len(value)} steps)"
    return repr(value)
