"""A Trajectory: everything that makes a sample's generative process replayable (paper eq. 2).

seed, x_T, z_t, h_t at every step and x_0, and the spec of the engine and process that drew it; the timesteps and
eta_t per step are the process's (``Spec.process``), not copies beside it. A batch of samples in one
object (leading dimension B). Every sample owns its seed: its noise comes from its own generator,
never from the global RNG, so a sample drawn in a batch equals the same seed drawn alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from .errors import HspaceError
from .files import read_safetensors, save_safetensors
from .spec import Spec
from .validate import check_int, is_int

MAX_SEED = 2**63 - 1


def check_seeds(seeds) -> list[int]:
    if is_int(seeds):
        seeds = [seeds]
    try:
        seeds = list(seeds)
    except TypeError:
        raise HspaceError(f"seeds must be an integer or a list of integers, got {seeds!r}") from None
    if not seeds:
        raise HspaceError("seeds is empty; give at least one integer seed")
    for s in seeds:
        check_int("seed", s, 0, MAX_SEED, valid="an integer from 0 to 2**63-1")
    return seeds


def seeded_noise(seed: int, shape: Sequence[int], num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, z_{T..1}) of one sample, from a generator of its own seeded with ``seed``.

    x_T is drawn first, so it does not depend on the number of steps; z is [num_steps, *shape].
    Drawn on the CPU so that a seed gives the same noise on every device.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = torch.randn(tuple(shape), generator=generator)
    z = torch.randn((num_steps, *shape), generator=generator)
    return x_T, z


def seeded_x_T(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """x_T of ``seeded_noise`` alone (the first draw of the seed's generator)."""
    return torch.randn(tuple(shape), generator=torch.Generator(device="cpu").manual_seed(int(seed)))


@dataclass
class Trajectory:
    """The generative process of a batch of B samples, with T steps each."""

    seeds: list[int]  # one per sample; -1 where the sample did not come from a seed (an inverted image)
    x_T: torch.Tensor  # [B, C, H, W]
    x0: torch.Tensor  # [B, C, H, W], in the U-Net's space (latents for a latent model)
    spec: Spec  # the engine and the process that drew it: num_steps, eta and timesteps included
    h: torch.Tensor | None = None  # [B, T, *h_shape]: h_t as the decoder half of the U-Net saw it
    z: torch.Tensor | None = None  # [B, T, C, H, W]; None: regenerate from the seeds
    image: torch.Tensor | None = None  # [B, 3, H', W'] decoded images in [-1, 1]; None: x0 is the image
    prompts: list[str] | None = None  # each sample's prompt (a conditional model); None: every sample has the spec's prompt

    def __post_init__(self):
        if not isinstance(self.spec, Spec) or self.spec.timesteps is None:
            got = type(self.spec).__name__ if not isinstance(self.spec, Spec) else "an engine's spec without the process's timesteps"
            raise HspaceError(f"a trajectory's spec must be the Spec of the process that drew it (spec.with_process(num_steps, eta, "
                              f"timesteps)), got {got}")
        process = self.spec.process
        self._timesteps, self._eta = process.timestep_tensor(), process.eta_tensor()
        if self.x_T.ndim != 4:
            raise HspaceError(f"x_T must be [B, C, H, W], got shape {tuple(self.x_T.shape)}")
        if len(self.seeds) != self.x_T.shape[0]:
            raise HspaceError(f"{len(self.seeds)} seeds for a batch of {self.x_T.shape[0]} samples")
        if self.prompts is not None:
            if not isinstance(self.prompts, (list, tuple)) or not all(isinstance(p, str) for p in self.prompts) or len(self.prompts) != len(self.seeds):
                raise HspaceError(f"a trajectory's prompts must be {len(self.seeds)} strings, one per sample, got {str(self.prompts)[:80]}")
            if self.spec is not None and not self.spec.conditional:
                raise HspaceError("prompts were given for the samples of an unconditional model; valid: None")
            self.prompts = list(self.prompts)

    @property
    def sample_prompts(self) -> list[str] | None:
        """The prompt of every sample: recorded per sample, else the spec's; None for an unconditional model."""
        if self.prompts is not None:
            return self.prompts
        if self.spec is not None and self.spec.conditional:
            return [self.spec.prompt] * len(self)
        return None

    def __len__(self) -> int:
        return self.x_T.shape[0]

    @property
    def timesteps(self) -> torch.Tensor:
        """[T] descending, the process's: long (DDPM family) or float64 (flow matching: sigma * 1000)."""
        return self._timesteps

    @property
    def eta(self) -> torch.Tensor:
        """[T] float64, the process's eta per step."""
        return self._eta

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def images(self) -> torch.Tensor:
        """Decoded samples in [-1, 1], [B, 3, H, W]."""
        return self.x0 if self.image is None else self.image

    def __getitem__(self, index) -> "Trajectory":
        """The sub-batch at ``index`` (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise HspaceError(f"sample index {index} out of range for a trajectory of {len(self)} samples")
            index = [index % len(self)]
        pick = torch.arange(len(self))[index]
        take = lambda x: None if x is None else x[pick]  # noqa: E731
        return replace(
            self,
            seeds=[self.seeds[i] for i in pick.tolist()],
            prompts=None if self.prompts is None else [self.prompts[i] for i in pick.tolist()],
            x_T=self.x_T[pick],
            x0=self.x0[pick],
            h=take(self.h),
            z=take(self.z),
            image=take(self.image),
        )

    def noise(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """z [B, T, C, H, W] of the samples ``indices`` (default all): stored, or regenerated from the
        seeds (and checked against x_T)."""
        indices = range(len(self)) if indices is None else list(indices)
        if self.z is not None:
            return self.z[list(indices)]
        zs = []
        for b in indices:
            seed = self.seeds[b]
            if seed < 0:
                raise HspaceError(f"sample {b} has no seed and no stored noise z; it cannot be replayed")
            x_T, z = seeded_noise(seed, self.x_T.shape[1:], self.num_steps)
            if not torch.equal(x_T, self.x_T[b].cpu().float()):
                raise HspaceError(f"sample {b}: x_T does not come from seed {seed}; keep the noise z to replay it")
            zs.append(z)
        return torch.stack(zs)

    @staticmethod
    def cat(trajectories: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenate batches drawn with the same steps, eta and engine; their prompts may differ (each
        sample keeps its own)."""
        first = trajectories[0]
        for other in trajectories[1:]:
            if not torch.equal(other.timesteps, first.timesteps) or not torch.equal(other.eta, first.eta):
                raise HspaceError("cannot concatenate trajectories with different timesteps or eta")
            if first.spec.differences(other.spec, "samples"):
                raise HspaceError(f"cannot concatenate trajectories of different engines: {first.spec} vs {other.spec}")

        def cat(name):
            parts = [getattr(t, name) for t in trajectories]
            if any(p is None for p in parts):
                return None
            return torch.cat(parts)

        prompts = [t.sample_prompts for t in trajectories]
        return Trajectory(
            seeds=[s for t in trajectories for s in t.seeds],
            prompts=None if any(p is None for p in prompts) else [p for part in prompts for p in part],
            x_T=cat("x_T"),
            x0=cat("x0"),
            h=cat("h"),
            z=cat("z"),
            image=cat("image"),
            spec=first.spec,
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically to a safetensors file; the metadata (seeds, spec) goes inside it."""
        tensors = {"timesteps": self.timesteps, "eta": self.eta, "x_T": self.x_T, "x0": self.x0}
        tensors.update({name: getattr(self, name) for name in OPTIONAL if getattr(self, name) is not None})
        # The timesteps and eta are the spec's; the tensors beside it keep the file readable by an older hspace.
        meta = {"kind": "hspace.Trajectory", "seeds": json.dumps(self.seeds), "spec": self.spec.to_json()}
        if self.prompts is not None:
            meta["prompts"] = json.dumps(self.prompts)
        return save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        """A trajectory file, checked: its entries, their shapes against each other, its seeds and spec."""
        meta, tensors = read_safetensors(path, "hspace.Trajectory", "hspace trajectory file")
        where = f"trajectory file {str(path)!r}"
        missing = [k for k in REQUIRED if k not in tensors]
        extra = sorted(set(tensors) - set(REQUIRED) - set(OPTIONAL))
        if missing or extra:
            raise HspaceError(f"{where} lacks {', '.join(missing) or 'nothing'} and has unknown {', '.join(extra) or 'nothing'}; "
                              f"valid entries: {', '.join(REQUIRED + OPTIONAL)}")
        try:
            seeds = json.loads(meta.get("seeds", "null"))
            prompts = json.loads(meta["prompts"]) if "prompts" in meta else None
            spec = Spec.from_json(meta["spec"]) if "spec" in meta else None
        except (json.JSONDecodeError, HspaceError) as e:
            raise HspaceError(f"{where} has bad metadata: {e}") from None
        if not isinstance(seeds, list) or not all(is_int(x) for x in seeds):
            raise HspaceError(f"{where} must list its seeds as integers, got {str(meta.get('seeds'))[:80]!r}")
        _check_shapes(tensors, where)
        if spec is None:
            raise HspaceError(f"{where} has no spec (made before hspace 0.2): the engine that drew it is unknown, so it replays on "
                              "none; draw it again")
        timesteps, eta = tensors.pop("timesteps"), tensors.pop("eta")
        if spec.num_steps is not None and (spec.num_steps != len(timesteps) or spec.eta != tuple(eta.tolist())):
            raise HspaceError(f"{where}: its spec has {spec.num_steps} steps and another eta than its {len(timesteps)} steps")
        if spec.timesteps is None:  # a file from before the process held its timesteps: they are the tensor's
            spec = spec.with_process(len(timesteps), eta.tolist(), timesteps)
        elif not torch.equal(spec.process.timestep_tensor(), timesteps.to(spec.process.timestep_tensor().dtype)):
            raise HspaceError(f"{where}: its spec's timesteps differ from its timesteps entry")
        try:
            return cls(seeds=seeds, spec=spec, prompts=prompts, **tensors)
        except HspaceError as e:
            raise HspaceError(f"{where}: {e}") from None


REQUIRED = ("timesteps", "eta", "x_T", "x0")
OPTIONAL = ("h", "z", "image")


def _check_shapes(t: dict, where: str) -> None:
    """The entries of a trajectory file agree: B samples of T steps, x_0 and z in the shape of x_T."""
    T, x_T = t["timesteps"].numel(), t["x_T"]
    if t["timesteps"].ndim != 1 or t["eta"].shape != (T,) or T < 1:
        raise HspaceError(f"{where}: timesteps {tuple(t['timesteps'].shape)} and eta {tuple(t['eta'].shape)} must both be [T], T >= 1")
    if x_T.ndim != 4 or t["x0"].shape != x_T.shape:
        raise HspaceError(f"{where}: x_T {tuple(x_T.shape)} and x0 {tuple(t['x0'].shape)} must both be [B, C, H, W]")
    B = x_T.shape[0]
    if "z" in t and tuple(t["z"].shape) != (B, T, *x_T.shape[1:]):
        raise HspaceError(f"{where}: z has shape {tuple(t['z'].shape)}; valid: {(B, T, *x_T.shape[1:])} (B, T and x_T's shape)")
    if "h" in t and (t["h"].ndim < 3 or tuple(t["h"].shape[:2]) != (B, T)):
        raise HspaceError(f"{where}: h has shape {tuple(t['h'].shape)}; valid: [{B}, {T}, *h_shape]")
    if "image" in t and (t["image"].ndim != 4 or t["image"].shape[0] != B):
        raise HspaceError(f"{where}: image has shape {tuple(t['image'].shape)}; valid: [{B}, 3, H, W]")
    for name, value in t.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise HspaceError(f"{where}: {name} holds NaN or infinite values")
