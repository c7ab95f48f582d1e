"""The editor's state and operations, independent of the web framework: ``Editor`` (samples, directions,
combinations, edits, saving, Jacobian directions, cards) and ``Startup`` (the editor built in a thread while the
page is served). ``server.py`` wraps them in the FastAPI app; requests arrive as the typed values of ``requests.py``
(a dict from Python is read into them).

The editor is stateless per request: every edit request carries the whole combination (sample, directions with
scales and timestep windows, Asyrp or one pass), so browser tabs cannot disturb each other. What it keeps is shared
and only grows: the directions (the ones given, plus Jacobian directions computed on request) and caches of sampled
and uploaded trajectories. One lock serialises the engine, since an intervention is a hook on the shared U-Net. A
request that waits for the lock while a newer one from the same tab arrives is dropped (HTTP 409): a slider dragged
fast costs one edit, not one per position.

Live edits (``preview.py``): every sample the editor shows keeps its unedited run step by step (a ``Reference``),
so an edit replays from the first step its windows touch. While a slider moves the page asks for a preview
(``quality: "preview"``: the denoiser at 10 of 25 steps, its output at the others estimated from the reference; the
main image only) and, when the slider is released, for the final image (every step, exact, with the strip). A
request superseded by a newer one of the same tab stops at its next step.

The combination is one Direction: delta_t = sum_i scale_i delta_i[t] inside direction i's window. The page's image
is ``engine.edit(trajectory, [combination], [1.0]).images``, and Save writes exactly that Direction, so applying the
saved file in Python gives the image the page showed.
"""

import base64
import contextlib
import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..directions.direction import Direction, calibrated_unit
from ..edits import Edit
from ..errors import HspaceError
from ..files import free_name, safe_name
from ..images import to_pil
from .requests import CardRequest, EditRequest, JacobianRequest, Part, PromptSliderRequest
from ..validate import is_int

MAX_UPLOAD_BYTES = 4 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_JACOBIAN_K = 8
CACHED = 64  # trajectories kept per kind (seeds, uploads)
CARD_SAMPLES, MAX_CARD_SAMPLES, CARD_BATCH = 32, 256, 64  # a card from the editor: held-out samples (default, most) and batch
PAIR_SEEDS, MAX_PAIR_SEEDS = 16, 256  # a prompt-pair slider made in the page: its seeds (default, most)
PAIR_FIRST_SEED = 900_000  # they start here, away from the seeds one looks at
MAX_ADDED = 64  # Jacobian directions added on request over the server's life (each holds T x h of memory)
MAX_TABS = 1024  # tabs whose newest request number is remembered
EXACT_BUDGET = 0.25  # seconds: a preview whose exact edit is expected within this is computed exactly




class Superseded(Exception):
    """A newer request of the same tab arrived: this one stops (HTTP 409)."""


@dataclass
class Shown:
    """A sample the editor shows: its trajectory and its unedited run (``preview.Reference``)."""

    trajectory: object
    reference: object


def _png(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _raw(image: torch.Tensor) -> str:
    return base64.b64encode(image.float().contiguous().numpy().tobytes()).decode()


class _Cache(OrderedDict):
    """The newest ``limit`` entries: memory that requests fill stays bounded."""

    def __init__(self, limit: int = CACHED):
        super().__init__()
        self.limit = limit

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


def unit_of(direction: Direction) -> tuple[str, float]:
    """A direction's slider unit and range (+-): its card's effect unit when it has one, sigma for PCA, ||h_t|| for
    Jacobian, raw for the rest."""
    if calibrated_unit(direction) is not None:
        return f"effect: 1 = {direction.meta['calibration'].get('unit', 'its card unit')}", 2.0
    method = direction.meta.get("method", "")
    if method in ("pca", "random"):
        return "sigma", 4.0
    if method == "jacobian":
        return "||h_t||", 0.5
    return "raw", 2.0


class Editor:
    """The editor's state and operations, independent of the web framework (the app below wraps it)."""

    def __init__(self, engine, directions: list[Direction], save_dir: str | Path, steps: int = 25, eta: float = 1.0, bank=None,
                 compile_preview: bool = False, scorer: Callable | None = None, scorer_domain=None):
        self.engine, self.steps, self.eta, self.bank = engine, steps, eta, bank
        # what cards are scored by: ``scorer`` (CLIP), a named domain, else the model's domain (none of them: no card button)
        self.scorer, self.scorer_domain = scorer, scorer_domain
        self.job = None  # the card being measured: {"what", "done", "total"} (read by /api/info while it runs)
        self.save_dir = Path(save_dir)
        self.lock = threading.Lock()
        self.directions: dict[str, Direction] = {}
        for d in directions:
            self.add_direction(d)
        self.samples, self.uploads = _Cache(), _Cache()
        self.added = 0  # directions added on request (bounded by MAX_ADDED)
        self.latest = _Cache(limit=MAX_TABS)  # the newest request number of each tab
        self._latest_lock = threading.Lock()
        schedule = engine.schedule(steps)
        self.timesteps = [schedule.t(i) for i in range(steps)]  # ints, or floats for flow matching (sigma * 1000)
        self.pass_seconds = None  # measured time of one denoiser pass at batch 1 (chooses exact or preview)
        self.denoiser, self.preview_denoiser = None, "eager"  # previews' denoiser: compiled where it can be (preview.py)
        if compile_preview:
            self.preview_denoiser = "compiling"
            threading.Thread(target=self._compile, daemon=True, name="hspace-preview-compile").start()

    def _compile(self) -> None:
        from ..preview import compiled_denoiser

        self.denoiser = compiled_denoiser(self.engine)
        self.preview_denoiser = "eager" if self.denoiser is None else "compiled"

    # ---------------------------------------------------------------- what there is
    def add_direction(self, direction: Direction) -> str:
        self.engine.check_direction(direction, self.steps)
        name, i = direction.name, 1
        while name in self.directions:
            i += 1
            name = f"{direction.name}-{i}"
        self.directions[name] = direction
        return name

    def info(self) -> dict:
        directions = []
        for name, d in self.directions.items():
            unit, limit = unit_of(d)
            calibration = d.meta.get("calibration") or {}
            card = None if calibrated_unit(d) is None else {  # the card's dose-response: the page reads it while a slider moves
                "unit": calibrated_unit(d), "target": calibration.get("target"), "scales": calibration.get("scales", []),
                "change": calibration.get("change", {}), "flip": calibration.get("flip", [])}
            directions.append({"name": name, "method": d.meta.get("method", ""), "unit": unit, "limit": limit, "card": card})
        domain = self._domain()
        return {
            "model": self.engine.spec.describe(), "spec": self.engine.spec.to_dict(), "steps": self.steps, "eta": self.eta,
            "timesteps": self.timesteps, "h_shape": list(self.engine.h_shape), "directions": directions,
            "bank": None if self.bank is None else {"path": str(self.bank.path), "n": self.bank.n},
            "parts": sorted(domain.parts) if domain is not None and domain.parts else [],
            "max_upload_bytes": MAX_UPLOAD_BYTES, "preview_denoiser": self.preview_denoiser,
            "can_card": self.scorer is not None or self.scorer_domain is not None or domain is not None, "card_samples": CARD_SAMPLES,
            "job": self.job, "conditional": bool(self.engine.spec.conditional), "prompt": self.engine.spec.prompt,
            "pair_seeds": PAIR_SEEDS,
        }

    def _domain(self):
        from ..domains import domain_of

        try:
            return domain_of(self.engine.spec)
        except HspaceError:
            return None

    # ---------------------------------------------------------------- samples
    def shown(self, source: dict) -> Shown:
        """The sample {"seed": s} (a text-to-image model: {"seed": s, "prompt": P}, drawn under P; without it, under the
        engine's prompt) | {"bank": i} | {"upload": id} with its reference (drawn once, then cached)."""
        from .. import preview

        prompt = source.get("prompt") if isinstance(source, dict) and "seed" in source and len(source) == 2 else None
        if prompt is not None:
            if not isinstance(prompt, str):
                raise HspaceError(f"bad prompt {prompt!r}; valid: a string")
            source = {"seed": source["seed"]}
        if not isinstance(source, dict) or len(source) != 1:
            raise HspaceError('a sample is {"seed": N} (a text-to-image model: {"seed": N, "prompt": TEXT}), {"bank": INDEX} or {"upload": ID}')
        (kind, value), = source.items()
        if kind == "seed":
            seed = _integer(value, "seed", 0, 2**63 - 1)
            key = seed if prompt is None else (seed, self.engine.fit_prompts(prompt)[0])  # (an unconditional model refuses it)
            if key not in self.samples:
                began = time.perf_counter()
                trajectory, reference = preview.sample(self.engine, [seed], self.steps, self.eta, record_h=False, progress=False,
                                                       prompts=None if prompt is None else [key[1]])
                self._timed(began, self.steps)
                self.samples.put(key, Shown(trajectory, reference))
            return self.samples[key]
        if kind == "bank":
            if self.bank is None:
                raise HspaceError("no bank was given to the editor (hspace ui --bank DIR)")
            index = _integer(value, "bank index", 0, self.bank.n - 1)
            key = ("bank", index)
            if key not in self.samples:
                recorder = preview.Recorder(1, self.steps)
                trajectory = self.bank.trajectory(self.engine, [index], callback=recorder, progress=False)
                self.samples.put(key, Shown(trajectory, recorder.reference()))
            return self.samples[key]
        if kind == "upload":
            if not isinstance(value, str) or value not in self.uploads:
                raise HspaceError(f"no uploaded image {value!r} (uploads are kept while the server runs; upload it again)")
            return self.uploads[value]
        raise HspaceError(f"unknown sample kind {kind!r}; valid: seed, bank, upload")

    def trajectory(self, source: dict):
        return self.shown(source).trajectory

    def _timed(self, began: float, passes: int) -> None:
        """Keep the measured time of one pass (a running mean that follows the machine's load)."""
        if passes > 0:
            seconds = (time.perf_counter() - began) / passes
            self.pass_seconds = seconds if self.pass_seconds is None else 0.7 * self.pass_seconds + 0.3 * seconds

    def upload(self, data: bytes) -> str:
        """Decode an uploaded image safely, invert it (edit-friendly DDPM inversion) and keep it; its id."""
        from PIL import Image

        from ..inversion import image_tensor, invert

        if len(data) > MAX_UPLOAD_BYTES:
            raise HspaceError(f"the upload has {len(data)} bytes; valid: at most {MAX_UPLOAD_BYTES} bytes")
        Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                tensor = image_tensor(image.convert("RGB"), self.engine.image_size, resize=True, what="the upload")
        except HspaceError:
            raise
        except Exception as e:
            raise HspaceError(f"the upload is not an image this server can read ({type(e).__name__}); valid: PNG, JPEG, ...") from None
        from ..preview import reference

        with self.lock:
            trajectory = invert(self.engine, tensor[None], self.steps, self.eta, progress=False)
            shown = Shown(trajectory, reference(self.engine, trajectory))
        key = uuid.uuid4().hex[:12]
        self.uploads.put(key, shown)
        return key

    # ---------------------------------------------------------------- the combination
    def combination(self, parts: list, name: str = "combination") -> Direction:
        """One Direction from [{"name", "scale", "window": [t_start, t_end] or null}, ...] (``requests.Part``; module doc)."""
        if not isinstance(parts, list):
            raise HspaceError("a combination is a list of {name, scale, window} (empty: no edit)")
        delta = torch.zeros(self.steps, *self.engine.h_shape)
        used = []
        for given in parts:
            name_given = given.get("name") if isinstance(given, dict) else getattr(given, "name", given)
            if not isinstance(name_given, str) or name_given not in self.directions:
                raise HspaceError(f"unknown direction {name_given!r}; valid: {', '.join(self.directions)}")
            part = Part.read(given)
            scale, window = part.scale, part.window
            active = self.engine.active_steps(self.steps, window)
            direction = self.directions[part.name]
            edit = Edit([direction], [float(scale)])  # the one rule (edits.py): a carded direction moves in its effect unit
            raw = float(edit.raw_scales(self.steps)[0, 0])
            delta += raw * self.engine.direction_at(direction, self.steps).per_step(self.steps) * active.float().reshape(-1, *[1] * len(self.engine.h_shape))
            used.append({"name": part.name, "scale": float(scale), "units": edit.unit_names()[0], "raw_scale": raw,
                         "window": None if window is None else [float(w) for w in window],
                         "method": direction.meta.get("method", ""), "params": direction.meta.get("params", {})})
        meta = {"name": name, "method": "combination", "params": {"parts": used, "steps": self.steps}}
        return Direction(delta, meta=meta, spec=self.engine.spec)

    def edit(self, request: "EditRequest | dict") -> dict:
        """Original and edited image of the sample under the combination: ``quality`` "final" (exact, every step,
        with the strip of seeds) or "preview" (the main image only, approximate where the exact edit would take
        longer than ``EXACT_BUDGET``: module doc). Superseded by a newer request of the tab: {"superseded": True}."""
        from .. import preview

        began = time.perf_counter()
        request = EditRequest.read(request)
        tab, seq = str(request.tab), request.seq
        if is_int(seq):
            with self._latest_lock:  # requests arrive on several threads
                self.latest.put(tab, max(self.latest.get(tab, -1), seq))
        quality, asyrp, strip = request.quality, request.asyrp, request.strip or []
        delta = self.combination(request.parts).per_step(self.steps)
        start = preview.first_edited_step(delta)
        passes = 0 if start is None else self.steps - start

        def newer(_event=None):
            if isinstance(seq, int) and seq < self.latest.get(tab, -1):
                raise Superseded

        with self.lock:
            try:
                newer()
                main = self.shown(request.sample)
                prompt = request.sample.get("prompt") if isinstance(request.sample, dict) and "seed" in request.sample else None
                strip = [] if quality == "preview" else [(s, self.shown({"seed": s} if prompt is None else {"seed": s, "prompt": prompt})) for s in strip]
                newer()
                cheap = self.pass_seconds is not None and passes * self.pass_seconds <= EXACT_BUDGET
                approximate = quality == "preview" and not cheap and start is not None
                computed = preview.preview_steps(start, self.steps) if approximate else None
                trajectory = _concat([main.trajectory, *(shown.trajectory for _, shown in strip)])
                reference = preview.Reference.cat([main.reference, *(shown.reference for _, shown in strip)])
                computing = time.perf_counter()
                images = preview.edit(self.engine, trajectory, reference, delta, eps_pass="clean" if asyrp else "edited",
                                      computed=computed, callback=newer, denoiser=self.denoiser if approximate and not asyrp else None)
                if len(trajectory) == 1 and start is not None:
                    self._timed(computing, (self.steps - start if computed is None else len(computed)) * (2 if asyrp else 1))
            except Superseded:
                return {"superseded": True}
        out = {"original": _png(trajectory.images[0]), "edited": _png(images[0]), "quality": quality, "exact": not approximate,
               "computed_steps": 0 if start is None else passes if computed is None else len(computed), "first_step": start,
               "denoiser": "compiled" if approximate and not asyrp and self.denoiser is not None else "eager",
               "server_ms": round(1000 * (time.perf_counter() - began), 1), "seq": seq,
               "strip": [{"seed": s, "original": _png(trajectory.images[i + 1]), "edited": _png(images[i + 1])} for i, (s, _) in enumerate(strip)]}
        if request.raw:
            out["edited_raw"] = _raw(images[0])
        return out

    def save(self, name: str, parts: list) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise HspaceError("give the direction a name")
        if not isinstance(parts, list) or not any(isinstance(p, dict) and p.get("scale") for p in parts):
            raise HspaceError("nothing to save: move at least one slider away from 0")
        direction = self.combination(parts, name.strip())
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:  # never replace a saved file: a name taken (or one that maps to the same file) gets -2, -3, ...
            return direction.save(free_name(self.save_dir, safe_name(name.strip(), suffix=".safetensors")[: -len(".safetensors")], ".safetensors"))

    def jacobian(self, request: "JacobianRequest | dict") -> list[str]:
        """Jacobian directions of the sample at one step (optionally masked); added to the sliders."""
        from ..directions.jacobian import jacobian_directions
        from ..domains import load_mask

        request = JacobianRequest.read(request)
        step = self._step_of(request)
        k = _integer(request.k, "k", 1, MAX_JACOBIAN_K)
        if self.added + k > MAX_ADDED:
            raise HspaceError(f"this editor already holds {self.added} directions computed on request (at most {MAX_ADDED}); "
                              "save what you need and restart it")
        mask, mask_name = None, None
        if request.part:
            domain = self._domain()
            if domain is None or request.part not in (domain.parts or {}):
                raise HspaceError(f"unknown part {request.part!r}; valid: {', '.join(sorted(domain.parts)) if domain and domain.parts else 'none'}")
            mask, mask_name = load_mask(request.part, tuple(self.engine.sample_shape[1:]), domain), request.part
        elif request.mask is not None:
            mask, mask_name = self._painted(request.mask), "painted"
        with self.lock:
            trajectory = self.trajectory(request.sample)
            result = jacobian_directions(self.engine, trajectory, steps=[step], k=k, mask=mask, mask_name=mask_name, max_iter=30, progress=False)
        self.added += len(result[0].directions)
        t = self.timesteps[step]
        names = []
        for i, d in enumerate(result[0].directions):  # readable: the part and the timestep, not j12_0-3
            label = f"jacobian {mask_name or 'whole image'} t={t:g} #{i + 1}"
            names.append(self.add_direction(d.renamed(label)))
        return names

    @contextlib.contextmanager
    def _job(self, what: str):
        """A long operation shown by /api/info while it runs ({"what", "stage", "done", "total"}); yields the engine callback
        that counts its passes."""
        job = self.job = {"what": what, "done": 0, "total": 0}

        def counted(event) -> None:
            if hasattr(event, "done"):
                job.update(stage=event.stage, done=event.done, total=event.total)

        try:
            yield counted
        finally:
            self.job = None

    def make_card(self, request: "CardRequest | dict") -> dict:
        """Measure the card of a slider's direction ({"name", "n"}: ``card.py`` on n held-out samples of the editor's
        process), write it to ``save_dir/cards/NAME/`` and make the slider move in its effect unit."""
        from ..card import calibrated, card, write_card

        request = CardRequest.read(request)
        name = request.name
        if not isinstance(name, str) or name not in self.directions:
            raise HspaceError(f"unknown direction {name!r}; valid: {', '.join(self.directions)}")
        n = _integer(CARD_SAMPLES if request.n is None else request.n, "n", 2, MAX_CARD_SAMPLES)
        domain = None if self.scorer is not None else self.scorer_domain or self._domain()
        if self.scorer is None and domain is None:
            raise HspaceError(f"no scorer measures {self.engine.name!r}'s images: start the editor with --scorer clip:DIR --attributes ..., "
                              "or make the card with hspace card")
        direction = self.directions[name]
        with self._job(f"card of {name}") as counted:
            with self.lock:
                result = card(direction, self.engine, n=n, num_steps=self.steps, eta=self.eta, scorer=self.scorer, domain=domain,
                              batch_size=CARD_BATCH, progress=False, callback=counted)
            folder = write_card(result, direction, self.save_dir / "cards" / safe_name(name))
        self.directions[name] = calibrated(result, direction)  # the same delta: the slider now moves in its effect unit (where found)
        unit = calibrated_unit(self.directions[name])
        return {"card": str(folder / "card.md"), "target": result.target, "unit": unit, "samples": n,
                "message": f"card of {name}: target {result.target}; " + (f"effect unit = raw scale {unit:.3g}" if unit is not None
                                                                           else "its unit was not reached within the sweep: the slider stays raw")}

    def prompt_slider(self, request: "PromptSliderRequest | dict") -> list[str]:
        """A prompt-pair slider ({"plus", "minus", "n", "name"}: ``prompt_direction`` over n seeds of the editor's process),
        added to the sliders; its name in a list."""
        from ..directions.prompts import prompt_direction

        request = PromptSliderRequest.read(request)
        if not self.engine.spec.conditional:
            raise HspaceError(f"{self.engine.name!r} is an unconditional model: a prompt-pair slider needs a text-to-image one")
        if not request.plus.strip():
            raise HspaceError("give the prompt with the attribute (plus)")
        n = _integer(PAIR_SEEDS if request.n is None else request.n, "n", 1, MAX_PAIR_SEEDS)
        if self.added >= MAX_ADDED:
            raise HspaceError(f"{MAX_ADDED} directions were added while this server runs; restart it to add more")
        with self._job(f"prompt pair {request.plus!r} | {request.minus!r}") as counted, self.lock:
            direction = prompt_direction(self.engine, [(request.plus.strip(), request.minus.strip())], n, self.steps, self.eta,
                                         base_seed=PAIR_FIRST_SEED, name=request.name or None, batch_size=CARD_BATCH,
                                         callback=counted, progress=False)
        self.added += 1
        return [self.add_direction(direction)]

    def _step_of(self, request: JacobianRequest) -> int:
        """The step of a Jacobian request: {"t": a timestep of the schedule} or {"step": its index}."""
        if request.t is not None:
            t = request.t
            matches = [i for i, u in enumerate(self.timesteps) if abs(float(u) - float(t)) < 1e-6]
            if not matches:
                raise HspaceError(f"t = {t:g} is not a timestep of the {self.steps} steps; valid: {', '.join(f'{u:g}' for u in self.timesteps)}")
            return matches[0]
        return _integer(self.steps // 2 if request.step is None else request.step, "step", 0, self.steps - 1)

    # ---------------------------------------------------------------- saved combinations
    def saved(self) -> list[dict]:
        """The saved directions in ``save_dir``, newest first: file, name, parts."""
        from safetensors import safe_open

        found = []
        for path in sorted(self.save_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = json.loads((f.metadata() or {}).get("meta", "{}"))
                parts = [f"{p['name']} x {float(p['scale']):g}" for p in meta.get("params", {}).get("parts", [])]
            except Exception:
                continue  # not a direction file of this editor: not listed
            found.append({"file": path.name, "name": meta.get("name", path.stem), "parts": parts})
        return found

    def saved_path(self, file: str) -> Path:
        """The path of a saved file named by the page: only a file listed in ``save_dir``."""
        names = {entry["file"] for entry in self.saved()}
        if not isinstance(file, str) or file not in names:
            raise HspaceError(f"no saved direction {file!r}; valid: {', '.join(sorted(names)) or 'none saved yet'}")
        return self.save_dir / file

    def load_saved(self, file: str) -> str:
        """Add a saved direction as a slider; its name."""
        direction = Direction.load(self.saved_path(file))
        return self.add_direction(direction.renamed(f"saved: {direction.name}"))

    def _painted(self, mask) -> torch.Tensor:
        try:
            grid = torch.tensor(mask, dtype=torch.float32)
        except (TypeError, ValueError):
            raise HspaceError("a painted mask is a 2-D list of numbers in [0, 1]") from None
        if grid.ndim != 2 or grid.numel() > 1024 * 1024 or not bool(((grid >= 0) & (grid <= 1)).all()) or not bool((grid > 0).any()):
            raise HspaceError("a painted mask is a 2-D list of numbers in [0, 1] with something painted, at most 1024x1024")
        size = self.engine.sample_shape[1:]
        return torch.nn.functional.interpolate(grid[None, None], size=size, mode="area")[0]


class Startup:
    """The editor, built in a thread while the page is already served: the first ``hspace ui`` on an empty
    workdir draws its starter set (seconds to minutes), and the page shows its progress meanwhile."""

    def __init__(self, build: Callable[["Startup"], Editor] | None = None, editor: Editor | None = None):
        self.build, self.editor, self.error, self.on_error = build, editor, None, None
        self.progress = {"stage": "starting", "done": 0, "total": 0}

    def start(self, on_error: Callable | None = None) -> "Startup":
        """Build the editor in a thread; ``on_error`` is called there if that fails."""
        self.on_error = on_error
        threading.Thread(target=self._build, args=(self.build,), daemon=True, name="hspace-editor-startup").start()
        return self

    def _build(self, build) -> None:
        try:
            self.editor = build(self)
        except Exception as e:  # shown in the page; ``on_error`` (hspace ui: stop the server, print it, exit 2)
            self.error = str(e) if isinstance(e, HspaceError) else f"{type(e).__name__}: {e}"
            if self.on_error is not None:
                self.on_error()

    def report(self, stage: str, done: int = 0, total: int = 0) -> None:
        self.progress = {"stage": stage, "done": int(done), "total": int(total)}

    def step_callback(self, stage: str):
        """A ``callback`` for the engine's jobs that reports their passes as ``stage``."""
        return lambda event: self.report(stage, getattr(event, "done", 0), getattr(event, "total", 0))

    def get(self) -> Editor:
        if self.editor is None:
            raise NotReady(self.error and f"the editor could not start: {self.error}" or
                           f"the editor is still starting ({self.progress['stage']}); try again when the page says it is ready")
        return self.editor

    def status(self) -> dict:
        return {"loading": self.progress} if self.error is None else {"load_error": self.error}


class NotReady(HspaceError):
    """The editor is not built yet (or failed to): HTTP 503."""


def _integer(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HspaceError(f"bad {what} {value!r}; valid: an integer from {low} to {high}")
    return value


def _concat(trajectories):
    from ..trajectory import Trajectory

    return trajectories[0] if len(trajectories) == 1 else Trajectory.cat(trajectories)
