"""A Bank: many trajectories of one engine on disk, what the direction methods read (paper Sec. 4-5).

A bank is a folder:

    bank.json                 what drew it: the spec (model fingerprint, h location, dtype, clipping, steps,
                              eta, spacing, autocast), the timesteps, base seed, shard size, h and sample
                              shapes; and how many samples it should hold
    shard-000000000000.safetensors   samples from 0 on: seeds, h [b, T, *h_shape] in float16 (or as the layout says),
    shard-000000000064.safetensors   x_0 thumbnails (uint8, at most ``thumbnail_size`` px) ...
    scores/NAME.safetensors   optional per-sample scores (labels, classifier outputs), [n] per key

Sample i has seed ``base_seed + i``; a shard's name is its first sample, and it holds at most
``shard_size`` samples. The per-step noise z is not stored: a
sample is reproducible from its seed and the bank's settings (``Bank.trajectory``).

Writing is atomic (a temporary file, then ``os.replace``) and every shard is drawn on its own, in the
same batches whenever it is drawn, so a bank interrupted at any point and built again by the same call
equals a bank built in one go: no sample is lost or drawn twice. Asking for more samples extends the
bank with new shards. Extending needs exactly the bank's settings (its spec included, dtype too; the
model by fingerprint, so a copy of the model at another path extends it); reading and editing its samples
needs a compatible engine (``Spec.check``: any dtype), and ``Engine.load(bank.spec)`` rebuilds the one
that drew it. Banks of format 2 (the process as loose keys beside the spec) are read and extended as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .distributed import Processes
from .errors import HspaceError
from .validate import check_int, is_int
from .layout import PROMPT_ORDERS, Layout
from .files import check_inside, read_json, read_safetensors, remove_stale_temporaries, save_safetensors, write_json
from .progress import Meter
from .spec import Spec
from .trajectory import MAX_SEED, Trajectory

__all__ = ["Bank", "Layout", "build_bank", "build_banks"]

logger = logging.getLogger(__name__)

FORMATS = (2, 3)  # 2: steps, eta and autocast as keys beside the spec (read and extended as they are; layout.py)
MANIFEST = "bank.json"
FLOAT16_MAX = 65504.0
_SHARD = re.compile(r"shard-(\d{12})\.safetensors")


def _stored_steps(h_steps, num_steps: int) -> list[int]:
    """``h_steps`` checked: distinct step indices from 0 to num_steps - 1, in process order."""
    try:
        given = list(h_steps)
        steps = [s for s in given if is_int(s)]
    except TypeError:
        given, steps = None, []
    if not steps or len(steps) != len(given) or not all(0 <= s < num_steps for s in steps) or len(set(steps)) != len(steps):
        raise HspaceError(f"h_steps {given if given is not None else h_steps!r} must be distinct step indices from 0 to {num_steps - 1} "
                          f"(the process has {num_steps} steps)")
    return sorted(steps)


LOCK = "bank.lock"
MAX_SAMPLES = 100_000_000  # one bank; its list of shards to draw is held in memory (1.6 M entries at 64 per shard)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in ("seeds", "h", "thumbnails", "h_scale"):  # h_scale: float8 storage only
        if name in tensors:
            digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def pool_h(h: torch.Tensor, pool: int | None) -> torch.Tensor:
    """h [..., C, H, W] averaged over ``pool`` x ``pool`` cells of its grid (None: as it is)."""
    if pool is None:
        return h
    *lead, c, height, width = h.shape
    return h.reshape(*lead, c, height // pool, pool, width // pool, pool).mean(dim=(-3, -1))


def lift_h(h: torch.Tensor, pool: int | None) -> torch.Tensor:
    """A pooled h (or direction) [..., C, H/p, W/p] on the full grid: each cell's value at each of its p x p positions
    (nearest upsampling; ``pool_h`` of it gives it back exactly)."""
    if pool is None:
        return h
    return h.repeat_interleave(pool, dim=-1).repeat_interleave(pool, dim=-2)


def encode_h(h: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """h [b, T, ...] float32 as a shard stores it (``layout.H_STORAGE``): float16 (float32 where a value exceeds its
    range), bfloat16, or float8 e4m3 with a float32 scale per sample and step (its largest magnitude maps to 448)."""
    if storage == "bfloat16":
        return {"h": h.to(torch.bfloat16)}
    if storage == "float8":
        amax = h.abs().flatten(2).amax(dim=2)  # [b, T]
        scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax)).float()
        return {"h": (h / scale.reshape(*scale.shape, *[1] * (h.ndim - 2))).to(torch.float8_e4m3fn), "h_scale": scale}
    return {"h": h.half() if float(h.abs().max()) <= FLOAT16_MAX else h}


def decode_h(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The h of a shard's stored tensors (``encode_h``'s inverse, up to its rounding): float8 scaled back, in float32;
    float16 and bfloat16 as stored."""
    h = tensors["h"]
    if "h_scale" in tensors:
        scale = tensors["h_scale"]
        h = h.float() * scale.reshape(*scale.shape, *[1] * (h.ndim - 2))
    return h


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One writer per bank: an OS lock (``flock``) on bank.lock, held exactly as long as the writer's process
    lives (the kernel releases it however the process ends, so there is nothing to take over and no race);
    the file names the writer's pid, for the message another writer gets."""
    import fcntl

    lock = path / LOCK
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise HspaceError(
                f"bank {str(path)!r} is being drawn by {who} (it holds {LOCK}); wait for it to finish, or stop it "
                "and run the same command again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # (while still locked) the pid of a writer that has finished is not left behind
        os.close(fd)  # releases the lock


def _positive_int(name: str, value, minimum: int = 1) -> int:
    check_int(name, value, minimum, valid=f"an integer >= {minimum}")
    return value


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, h, w] from images [B, 3, H, W] in [-1, 1], shrunk by area so the longer side is <= size."""
    x = images.detach().float().cpu()
    H, W = x.shape[-2:]
    if max(H, W) > size:
        factor = max(H, W) / size
        x = F.interpolate(x, size=(max(1, round(H / factor)), max(1, round(W / factor))), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Bank:
    """An open bank folder (see the module docstring). ``Bank.open(path)`` or ``build_bank(...)``."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._layout: Layout | None = None  # parsed once: only the manifest's n ever changes

    # ------------------------------------------------------------------ opening and checking

    @classmethod
    def open(cls, path: str | Path) -> "Bank":
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            found = _shard_identity(path) if path.is_dir() else None
            if found is not None:
                raise HspaceError(
                    f"{str(path)!r} has shard files but no {MANIFEST}: run `hspace bank {path}` with the bank's settings "
                    f"to rebuild it from the shards (they were drawn with {_describe(found)})"
                )
            raise HspaceError(f"{str(path)!r} is not a bank: it has no {MANIFEST} (build one with `hspace bank {path}`)")
        manifest = read_json(file, "bank manifest")
        if manifest.get("kind") != "hspace.Bank":
            raise HspaceError(f"{file} is not an hspace bank manifest (kind={manifest.get('kind')!r})")
        if manifest.get("format") not in FORMATS:
            raise HspaceError(f"{file} has bank format {manifest.get('format')!r}; this hspace reads formats {', '.join(map(str, FORMATS))}")
        try:
            Layout.of_settings(manifest)
        except (HspaceError, TypeError, ValueError) as e:
            raise HspaceError(f"{file} has bad settings: {e}") from None
        if "n" not in manifest:
            raise HspaceError(f"{file} lacks n; it is not a complete bank manifest")
        n = manifest["n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise HspaceError(f"{file} has n = {n!r}; valid: an integer >= 1")
        return cls(path, manifest)

    @staticmethod
    def layout_of(engine, num_steps: int, eta, base_seed: int, shard_size: int, thumbnail_size: int,
                  prompts: str | Sequence[str] | None = None, prompt_order: str = "cycle", h_steps: Sequence[int] | None = None,
                  h_pool: int | None = None, h_storage: str | None = None) -> Layout:
        """The layout of a bank of ``engine``; over several ``prompts`` (the spec records the first), else the
        one prompt (None: the engine's) is the spec's. ``h_steps``: the steps (indices) whose h is stored (None: all);
        ``h_pool``, ``h_storage``: how (``layout.py``)."""
        from dataclasses import replace

        from .diffusion import eta_schedule
        from .errors import check_choice

        check_choice("prompt_order", prompt_order, PROMPT_ORDERS)
        schedule = engine.schedule(num_steps)
        pool = None if prompts is None else list(dict.fromkeys(engine.fit_prompts(prompts)))
        spec = engine.spec if pool is None else replace(engine.spec, prompt=pool[0])
        steps = None if h_steps is None else _stored_steps(h_steps, num_steps)
        return Layout.of(spec.with_process(num_steps, eta_schedule(eta, num_steps).tolist()), schedule.timesteps.tolist(), base_seed,
                         shard_size, engine.h_shape, engine.sample_shape, thumbnail_size, pool, prompt_order, steps, h_pool, h_storage)

    @property
    def layout(self) -> Layout:
        """What the bank's samples depend on (``layout.py``)."""
        if self._layout is None:
            self._layout = Layout.of_settings(self.manifest)
        return self._layout

    @property
    def spec(self) -> Spec:
        """The spec of the engine and process that drew the bank: ``Engine.load(bank.spec)`` rebuilds it."""
        return self.layout.spec

    def check_engine(self, engine, tolerant: bool = False) -> None:
        """Raise unless ``engine`` is compatible with the one that drew this bank (``Spec.check``)."""
        engine.spec.check(self.spec, f"bank {str(self.path)!r}", tolerant=tolerant)

    # ------------------------------------------------------------------ what it holds

    @property
    def n(self) -> int:
        """The number of samples the bank is meant to hold (``complete`` says whether it does)."""
        return self.manifest["n"]

    @property
    def num_steps(self) -> int:
        return self.spec.num_steps

    @property
    def eta(self) -> list[float]:
        return list(self.spec.eta)

    @property
    def shard_size(self) -> int:
        return self.layout.shard_size

    @property
    def h_shape(self) -> tuple[int, ...]:
        """The engine's h shape (what directions of this bank apply to)."""
        return self.layout.h_shape

    @property
    def stored_h_shape(self) -> tuple[int, ...]:
        """The shape of h as the bank stores and reads it: ``h_shape``, or its grid pooled (``layout.h_pool``)."""
        return self.layout.stored_h_shape

    def lift(self, h: torch.Tensor) -> torch.Tensor:
        """A direction (or mean) found on the bank's stored h, on the engine's grid (``lift_h``; as it is when not pooled)."""
        return lift_h(h, self.layout.h_pool)

    @property
    def seeds(self) -> list[int]:
        base = self.layout.base_seed
        return list(range(base, base + self.n))

    @property
    def timesteps(self) -> torch.Tensor:
        """[T] the timesteps of the bank's steps."""
        return torch.tensor(self.layout.timesteps, dtype=torch.float64)

    @property
    def h_steps(self) -> list[int]:
        """The steps (indices into the process's T) whose h the bank stores: all, unless drawn with ``h_steps``."""
        return self.layout.stored_steps

    @property
    def h_timesteps(self) -> torch.Tensor:
        """[T'] the timesteps of the stored steps: what a direction found from the bank's h was found at."""
        return self.timesteps[self.h_steps]

    @property
    def prompts(self) -> list[str] | None:
        """The bank's prompts (one for a bank of one prompt); None for an unconditional model."""
        if self.layout.prompts is not None:
            return list(self.layout.prompts)
        return [self.spec.prompt] if self.spec.conditional else None

    def sample_prompts(self, indices: Sequence[int] | None = None) -> list[str] | None:
        """The prompt of each sample ``indices`` (default all); None for an unconditional model."""
        if not self.spec.conditional:
            return None
        return [self.layout.prompt_of(i) for i in (range(self.n) if indices is None else indices)]

    @classmethod
    def create(cls, path: str | Path, layout: Layout, n: int, adopt_shards: bool = False) -> "Bank":
        """A new bank folder with its manifest (``layout``); empty unless ``adopt_shards`` (shards of this layout whose
        bank.json was lost)."""
        path = Path(path)
        if not isinstance(layout, Layout):
            raise HspaceError(f"a bank is created from a Layout (hspace.layout), got {type(layout).__name__}")
        path.mkdir(parents=True, exist_ok=True)
        if (path / MANIFEST).exists() or (not adopt_shards and any(_SHARD.fullmatch(p.name) for p in path.iterdir())):
            raise HspaceError(f"{str(path)!r} already holds a bank or shard files; refusing to overwrite them")
        bank = cls(path, {"kind": "hspace.Bank", "format": layout.format, **layout.to_dict(), "n": n})
        write_json(path / MANIFEST, bank.manifest)
        return bank

    def write_shard(self, start: int, h: torch.Tensor, thumbs: torch.Tensor) -> Path:
        """Write samples start .. start+len(h)-1 atomically: h [b, T, *h_shape] (pooled and stored as the layout says:
        ``encode_h``) and uint8 thumbnails [b, 3, h, w], with the bank's fingerprint and a checksum of the contents."""
        count = h.shape[0]
        expected = (count, len(self.h_steps), *self.h_shape)
        if tuple(h.shape) != expected or thumbs.dtype != torch.uint8 or thumbs.shape[0] != count:
            raise HspaceError(f"a shard needs h of shape {expected} and {count} uint8 thumbnails, got {tuple(h.shape)} and {thumbs.dtype} {tuple(thumbs.shape)}")
        stored = encode_h(pool_h(h.detach().cpu().float(), self.layout.h_pool), self.layout.storage)
        base = self.layout.base_seed
        tensors = {
            "seeds": torch.arange(base + start, base + start + count, dtype=torch.int64),
            **{name: value.contiguous() for name, value in stored.items()},
            "thumbnails": thumbs.detach().cpu().contiguous(),
        }
        metadata = {
            "kind": "hspace.BankShard", "start": str(start), "bank": self.layout.digest,
            "identity": json.dumps(self.layout.to_dict()), "sha256": _checksum(tensors),
        }
        return save_safetensors(tensors, self.shard_path(start), metadata)

    def _scan(self) -> list[tuple[int, int]]:
        """(start, count) of every valid shard file, by start. A partial write never gets a shard's name;
        a file that cannot be read or holds other seeds than its name says is ignored (and drawn again);
        a shard of another bank (other settings) is an error naming it."""
        from safetensors import safe_open

        base, found, ours = self.layout.base_seed, [], self.layout.digest
        for path in sorted(self.path.glob("shard-*.safetensors")):
            match = _SHARD.fullmatch(path.name)
            if not match:
                continue
            start = int(match.group(1))
            try:
                with safe_open(str(path), framework="pt") as f:
                    theirs = (f.metadata() or {}).get("bank")
                    seeds = f.get_tensor("seeds").tolist()
            except Exception:
                continue
            if theirs != ours:
                raise HspaceError(
                    f"shard {str(path)!r} belongs to another bank (drawn with other settings, or by another hspace); "
                    f"move it out of {str(self.path)!r}"
                )
            if seeds and seeds == list(range(base + start, base + start + len(seeds))):
                found.append((start, len(seeds)))
        return found

    def shards(self) -> list[tuple[int, int]]:
        """(start, count) of the shards that make up samples 0 .. n-1, in order; raises if any is missing."""
        shards, end = [], 0
        for start, count in self._scan():
            if start == end and end < self.n:
                shards.append((start, count))
                end += count
        if end < self.n:
            raise HspaceError(
                f"bank {str(self.path)!r} is incomplete: it holds samples 0 to {end - 1} of {self.n} "
                f"(sample {end} is missing); run the same `hspace bank` command again to finish it"
            )
        return shards

    def missing(self) -> list[tuple[int, int]]:
        """(start, count) of the shards still to draw, shard_size samples each, filling every gap in 0 .. n-1."""
        todo, end = [], 0
        for start, count in self._scan() + [(self.n, 0)]:
            if start < end:  # overlaps what is already covered: not part of this bank's layout
                continue
            stop = min(start, self.n)
            todo += [(a, min(self.shard_size, stop - a)) for a in range(end, stop, self.shard_size)]
            end = max(end, start + count)
            if end >= self.n:
                break
        return todo

    @property
    def complete(self) -> bool:
        return not self.missing()

    def shard_path(self, start: int) -> Path:
        return self.path / f"shard-{start:012d}.safetensors"

    def read_shard(self, start: int, names: Sequence[str] = ("seeds", "h", "thumbnails")) -> dict[str, torch.Tensor]:
        """The shard's tensors, verified against its checksum (a damaged shard is an error naming it)."""
        path = self.shard_path(start)
        if not path.is_file():
            raise HspaceError(f"bank {str(self.path)!r} has no shard starting at sample {start}")
        metadata, tensors = read_safetensors(path, "hspace.BankShard", "bank shard")
        if metadata.get("sha256") != _checksum(tensors):
            raise HspaceError(
                f"shard {str(path)!r} is damaged (its contents do not match their checksum); delete it and run the same "
                "`hspace bank` command again to draw it anew"
            )
        if "h" in names:
            tensors = {**tensors, "h": decode_h(tensors)}
        return {name: tensors[name] for name in names}

    def _check_steps(self, steps) -> list[int] | None:
        """Indices into the stored steps (all T of the process, unless the bank was drawn with ``h_steps``)."""
        if steps is None:
            return None
        steps, stored = list(steps), len(self.h_steps)
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < stored:
                raise HspaceError(f"step {s!r} is out of range; valid: integers from 0 to {stored - 1} (the bank's {stored} stored steps)")
        return steps

    def h_chunks(self, steps: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> Callable[[], Iterator[torch.Tensor]]:
        """A callable that streams h [b, T', *h_shape] shard by shard (a fresh pass at every call).

        ``steps`` picks step indices (default: all T). This is what ``pca_per_timestep`` takes.
        """
        shards, steps = self.shards(), self._check_steps(steps)

        def chunks() -> Iterator[torch.Tensor]:
            for start, _ in shards:
                h = self.read_shard(start, ("h",))["h"]
                yield (h if steps is None else h[:, steps]).to(dtype)

        return chunks

    def h(self, indices: Sequence[int] | None = None, steps: Sequence[int] | None = None) -> torch.Tensor:
        """h of the given samples (default: all) as float32 [N, T', *h_shape]; mind the memory for big banks."""
        if indices is None:
            return torch.cat(list(self.h_chunks(steps)()))
        indices, steps = self.check_indices(indices), self._check_steps(steps)
        out = torch.empty(len(indices), len(steps) if steps else len(self.h_steps), *self.stored_h_shape)
        want = torch.tensor(indices)
        for start, count in self.shards():
            rows = ((want >= start) & (want < start + count)).nonzero()[:, 0]
            if len(rows):
                h = self.read_shard(start, ("h",))["h"][want[rows] - start]
                out[rows] = (h if steps is None else h[:, steps]).float()
        return out

    def thumbnails(self) -> torch.Tensor:
        """uint8 [n, 3, h, w] thumbnails of every sample's x_0 image."""
        return torch.cat([self.read_shard(start, ("thumbnails",))["thumbnails"] for start, _ in self.shards()])

    def check_indices(self, indices) -> list[int]:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.n]
        if bad:
            raise HspaceError(f"sample index {bad[0]} out of range; valid: 0 to {self.n - 1}")
        return indices

    def trajectory(self, engine, indices: Sequence[int], *, batch_size: int = 32, callback=None, progress: bool | None = None) -> Trajectory:
        """Draw the given samples again from their seeds (with noise and h), e.g. to edit them."""
        self.check_engine(engine)
        indices = self.check_indices(indices)
        seeds = [self.layout.base_seed + i for i in indices]
        return engine.sample(seeds, self.num_steps, self.eta, batch_size=batch_size, callback=callback, progress=progress,
                             prompts=self.sample_prompts(indices))

    # ------------------------------------------------------------------ scores and labels

    def scores_path(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise HspaceError(f"bad scores name {name!r}; valid: letters, digits, '_', '.', '-'")
        return self.path / "scores" / f"{name}.safetensors"

    def set_scores(self, name: str, scores: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Store per-sample scores (e.g. classifier outputs or labels): every value has n rows."""
        path = self.scores_path(name)
        tensors = {}
        for key, value in scores.items():
            value = torch.as_tensor(value)
            if value.ndim < 1 or value.shape[0] != self.n:
                raise HspaceError(f"scores {key!r} has shape {tuple(value.shape)}; valid: {self.n} rows, one per sample")
            tensors[key] = value.detach().cpu().contiguous()
        check_inside(path.parent, self.path, "the bank's scores folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        check_inside(path.parent, self.path, "the bank's scores folder")  # (a link planted while it was made)
        metadata = {"kind": "hspace.BankScores", "meta": json.dumps(meta or {}), "n": str(self.n)}
        return save_safetensors(tensors, path, metadata)

    def scores(self, name: str) -> dict[str, torch.Tensor]:
        """Stored scores, one row per sample; scores with another number of rows (stored before the bank
        was extended) are an error."""
        path = self.scores_path(name)
        if not path.is_file():
            have = sorted(p.stem for p in (self.path / "scores").glob("*.safetensors"))
            raise HspaceError(f"bank {str(self.path)!r} has no scores {name!r}; it has: {', '.join(have) or 'none'}")
        _, tensors = read_safetensors(path, "hspace.BankScores", "bank scores file")
        stale = {k: v.shape[0] for k, v in tensors.items() if v.ndim < 1 or v.shape[0] != self.n}
        if stale:
            key, rows = next(iter(stale.items()))
            raise HspaceError(
                f"scores {name!r} hold {rows} rows of {key!r} but the bank has {self.n} samples (scored before it was "
                f"extended); score it again: hspace annotate {self.path} --name {name}"
            )
        return tensors

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bank({str(self.path)!r}, n={self.n}, model={m['spec']['model']!r}, steps={self.num_steps}, h={self.h_shape})"


def build_bank(
    path: str | Path,
    engine,
    n: int,
    num_steps: int = 50,
    eta: float | Sequence[float] = 1.0,
    *,
    base_seed: int = 0,
    shard_size: int = 64,
    batch_size: int = 32,
    thumbnail_size: int = 64,
    callback: Callable | None = None,
    progress: bool | None = None,
    processes: "Processes | None" = None,
    prompts: str | Sequence[str] | None = None,
    prompt_order: str = "cycle",
    h_steps: Sequence[int] | None = None,
    h_pool: int | None = None,
    h_storage: str | None = None,
) -> Bank:
    """Create, resume or extend the bank at ``path`` so that it holds ``n`` samples; returns it.

    A conditional model's bank may hold samples of several ``prompts``: sample i gets prompts[i % P]
    (``prompt_order="cycle"``) or one drawn by its seed (``"random"``); None: the engine's prompt. ``h_steps``
    (step indices) stores h at those steps only (a bank of a big model: SDXL's h is 125 MiB per sample at 50
    steps); directions found from it record their timesteps and are resampled to every step where applied. ``h_pool``
    (2, 4: h averaged over cells of its grid) and ``h_storage`` (float16, bfloat16, float8) shrink it further
    (``layout.py``); the methods lift what they find on a pooled bank to the engine's grid (``Bank.lift``).

    Sample i has seed ``base_seed + i``. Missing shards are drawn in order, each in batches of
    ``batch_size`` (so a shard is the same whenever it is drawn) and written atomically; extending a
    bank keeps every shard it has and draws new ones from its old end. A bank that
    exists must have been drawn with the same engine, steps, eta, base seed, shard size and thumbnail
    size; otherwise it is an error naming what differs and nothing is written. ``callback`` gets the
    engine's ``StepEvent``s, counted over the whole bank (``done`` starts at the samples already drawn).

    Launched as several processes (``accelerate launch``, ``torchrun``; ``processes`` defaults to the
    launch's, see ``distributed.py``), each draws every num-th missing shard: the bank is the same as one
    process draws, and a bank interrupted on any process resumes with any number of processes. The main
    process alone writes the manifest and draws the progress bar (its own passes times the number of processes).
    """
    settings = dict(base_seed=base_seed, shard_size=shard_size, batch_size=batch_size, thumbnail_size=thumbnail_size, callback=callback,
                    progress=progress, processes=processes, prompts=prompts, prompt_order=prompt_order, h_steps=h_steps,
                    h_pool=h_pool, h_storage=h_storage)
    return build_banks({engine.h_location: path}, engine, n, num_steps, eta, **settings)[engine.h_location]


def build_banks(paths: dict[str, str | Path], engine, n: int, num_steps: int = 50, eta: float | Sequence[float] = 1.0, *,
                base_seed: int = 0, shard_size: int = 64, batch_size: int = 32, thumbnail_size: int = 64,
                callback: Callable | None = None, progress: bool | None = None, processes: "Processes | None" = None,
                prompts: str | Sequence[str] | None = None, prompt_order: str = "cycle", h_steps: Sequence[int] | None = None,
                h_pool: int | None = None, h_storage: str | None = None) -> dict[str, Bank]:
    """One bank per h location (``{location: path}``) from one draw: every sample is denoised once and h is
    recorded at all the locations (one ``Record``), so N locations cost one bank's sampling, not N. Each bank is
    an ordinary bank of ``engine.at(location)`` (the same as ``build_bank`` with that engine draws, bit for bit),
    and each resumes and extends as ``build_bank``'s (see there for the arguments)."""
    _positive_int("n", n)
    if n > MAX_SAMPLES:
        raise HspaceError(f"n = {n:,} samples; valid: at most {MAX_SAMPLES:,} in one bank (draw several banks for more)")
    for name, value, least in (("num_steps", num_steps, 1), ("shard_size", shard_size, 1), ("batch_size", batch_size, 1),
                               ("thumbnail_size", thumbnail_size, 1), ("base_seed", base_seed, 0)):
        _positive_int(name, value, least)
    if base_seed + n - 1 > MAX_SEED:
        raise HspaceError(f"base_seed + n - 1 = {base_seed + n - 1} exceeds the largest seed 2**63-1")
    if not paths:
        raise HspaceError("no h location to draw a bank at; valid: at least one {location: folder}")
    engines = {engine.model.check_location(name): engine if name == engine.h_location else engine.at(name) for name in paths}
    paths = {engine.model.check_location(name): Path(p) for name, p in paths.items()}
    for path in paths.values():
        if path.exists() and not path.is_dir():
            raise HspaceError(f"bank path {str(path)!r} exists and is not a folder")
    layouts = {name: Bank.layout_of(e, num_steps, eta, base_seed, shard_size, thumbnail_size, prompts, prompt_order, h_steps, h_pool, h_storage)
               for name, e in engines.items()}
    procs = processes or Processes.current(engine.device)
    procs.agree(" ".join(layout.digest for layout in layouts.values()) + f" n={n}", "the bank's settings (fingerprint and size)")
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    # The main process takes the banks' locks for the whole group and prepares the manifests; then every
    # process draws its share of the missing shards (each shard by exactly one process, the same shard
    # whoever draws it), and the main process checks that none is missing.
    with contextlib.ExitStack() as locks:
        if procs.is_main:
            for path in paths.values():
                locks.enter_context(_lock(path))
        banks = _draw_missing(paths, layouts, engine, n, num_steps, eta, batch_size, thumbnail_size, callback, progress, procs)
        procs.barrier()  # every process has written its shards
        for bank in banks.values():
            procs.main_first(_check_complete, bank)
    return banks


def _draw_missing(paths, layouts, engine, n, num_steps, eta, batch_size, thumbnail_size, callback, progress, procs) -> dict[str, Bank]:
    """Every bank opened for ``n`` samples and this process's share of the shards any of them misses drawn once,
    h recorded at every location and written to each bank that misses the shard."""
    from .interventions import Record

    missing = {name: dict(procs.main_first(_prepare, paths[name], layouts[name], n)) for name in paths}
    banks = {name: Bank.open(path) for name, path in paths.items()}
    first = next(iter(banks.values()))
    todo = sorted(set().union(*(m.items() for m in missing.values())))
    done = first.n - sum(count for _, count in todo)
    with Meter.job(callback, first.n * num_steps, progress if procs.is_main else False, "bank", done=done * num_steps, scale=procs.num) as meter:
        for start, count in procs.share(todo):
            (logger.info if procs.num > 1 else logger.debug)("process %d of %d draws samples %d..%d", procs.index, procs.num, start, start + count - 1)
            seeds = list(range(first.layout.base_seed + start, first.layout.base_seed + start + count))
            record = Record(locations=list(banks))
            trajectory = engine.sample(seeds, num_steps, eta, keep_noise=False, batch_size=batch_size, callback=meter, record_h=False,
                                       interventions=[record], prompts=first.sample_prompts(range(start, start + count)))
            thumbs = thumbnails(trajectory.images, thumbnail_size)
            for name, bank in banks.items():
                if start in missing[name]:
                    h = record.h_at(name)
                    bank.write_shard(start, h if bank.layout.h_steps is None else h[:, bank.h_steps], thumbs)
    return banks


def _prepare(path: Path, layout: Layout, n: int) -> list[tuple[int, int]]:
    """The bank opened (created, extended or recovered) for ``n`` samples; its missing shards. The disk space
    is checked by arithmetic before anything is written or listed, so a refused size leaves nothing behind."""
    remove_stale_temporaries(path)
    drawn = _drawn(path, layout)
    _check_space(path, layout, max(0, n - drawn))
    return _open_for(path, layout, n, drawn).missing()


def _drawn(path: Path, layout: Layout) -> int:
    """Samples already in shards of ``layout`` at ``path`` (0 for a new folder)."""
    if not (path / MANIFEST).is_file():
        return 0
    try:
        return sum(count for _, count in Bank(path, {**layout.to_dict(), "n": 0})._scan())
    except HspaceError:
        return 0  # another bank's shards: _open_for says so


def _check_complete(bank: "Bank") -> None:
    left = bank.missing()
    if left:
        raise HspaceError(f"bank {str(bank.path)!r} still misses {len(left)} shard(s) (from sample {left[0][0]}): a process "
                          "failed; run the same command again to draw them")


def _open_for(path: Path, layout: Layout, n: int, drawn: int = 0) -> Bank:
    """The bank at ``path`` ready to hold ``n`` samples of ``layout``: opened (and extended), created, or
    rebuilt from its shards when only bank.json was lost. A bank with no sample drawn yet (``drawn``) takes any
    ``n`` (a size declared by a run that was refused or killed at once is not binding)."""
    if not (path / MANIFEST).is_file():
        found = _shard_identity(path)
        if found is not None and _readable_digest(found) != layout.digest:
            raise HspaceError(
                f"{str(path)!r} holds shards of another bank ({_describe(found)}) and no {MANIFEST}; use another folder "
                "or that bank's settings"
            )
        if found is not None:
            logger.info("rebuilding %s from the shards in %s", MANIFEST, path)
            return Bank.create(path, layout, n, adopt_shards=True)
        return Bank.create(path, layout, n)
    bank = Bank.open(path)
    bad = bank.layout.differences(layout)
    if bad:
        raise HspaceError(
            f"bank {str(path)!r} exists with different settings, so it cannot be extended or resumed by this call "
            f"({'; '.join(bad)}; the bank's vs the requested); use another folder or the bank's settings"
        )
    if n < bank.n and drawn == 0:
        bank.manifest["n"] = n
        write_json(path / MANIFEST, bank.manifest)
    if n < bank.n:
        raise HspaceError(f"bank {str(path)!r} holds {bank.n} samples; --n {n} is smaller (valid: >= {bank.n}; read fewer samples by index instead)")
    if n > bank.n:
        bank.manifest["n"] = n
        write_json(path / MANIFEST, bank.manifest)
    return bank


def _readable_digest(settings) -> str | None:
    """The digest of settings read from a file, or None where they are not settings this hspace can read."""
    try:
        return Layout.of_settings(settings).digest
    except (KeyError, TypeError, AttributeError, ValueError, HspaceError):
        return None


def _shard_identity(path: Path) -> dict | None:
    """The settings recorded in the first readable shard of a folder (None: no shard)."""
    from safetensors import safe_open

    for shard in sorted(path.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                return json.loads((f.metadata() or {})["identity"])
        except Exception:
            continue
    return None


def _describe(settings: dict) -> str:
    try:
        return Layout.of_settings(settings).describe()
    except (HspaceError, KeyError, TypeError, AttributeError, ValueError):
        return "settings this hspace cannot read"


def _check_space(path: Path, layout: Layout, samples: int) -> None:
    """Log what the samples still to draw will take on disk, and refuse when the disk has less room."""
    stored = len(layout.stored_steps)
    need = samples * layout.bytes_per_sample
    free = shutil.disk_usage(path).free
    logger.info("bank %s: %d samples to draw, about %.1f MB on disk (%.1f MB free); h is %.2f MiB per sample (%d steps x %s in %s)",
                path, samples, need / 1e6, free / 1e6, layout.h_bytes_per_sample / 2**20, stored, "x".join(map(str, layout.stored_h_shape)),
                layout.storage)
    if need > free:
        raise HspaceError(
            f"bank {str(path)!r} needs about {need / 1e6:.1f} MB for {samples} more samples but the disk has "
            f"{free / 1e6:.1f} MB free; free space or draw fewer samples (--n)"
        )
