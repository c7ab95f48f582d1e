"""What a bank will take before it is drawn (``hspace bank --plan``): disk, memory and denoiser passes, from the model's
configs alone. The denoiser is built on the meta device (no weights are read or allocated), so a plan for FLUX.1-dev
needs its config files, not its 24 GB.

h's shape comes from the hook point itself: a U-Net's by one forward pass on the meta device (shapes only), a
transformer's as its blocks' width over the image-token grid (the latent size over the patch). Per sample the bank
stores h at every stored step in float16 (or pooled, or in float8: ``--h-pool``, ``--h-storage``), plus a uint8 thumbnail; drawing holds one batch's h at every step in the
engine's dtype, beside the denoiser's weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import HspaceError
from .files import read_json
from .layout import pooled_shape, sample_bytes

ONE_PASS = ("UNet2DModel", "FluxTransformer2DModel")  # unconditional, or embedded guidance: one denoiser pass per step


def _configs(model: str) -> tuple[dict, dict | None]:
    """(the denoiser's config, the VAE's or None) of a folder, a built-in name or a hub id (its config files only)."""
    from .loading import BUILTIN, BUNDLED_FOLDERS as folders

    if model in BUILTIN and model not in folders:
        raise HspaceError(f"{model!r} is built in code; plan a folder, a hub id, or one of {', '.join(folders)}")
    folder = folders.get(model) or Path(model).expanduser()
    if not folder.is_dir():
        folder = _hub_configs(model)
    for name in ("transformer", "unet", ""):
        if (folder / name / "config.json").is_file():
            denoiser = read_json(folder / name / "config.json", "model config")
            break
    else:
        raise HspaceError(f"{str(folder)!r} has no transformer/, unet/ or top-level config.json (the denoiser's config)")
    vaes = [folder / d / "config.json" for d in ("vae", "vqvae") if (folder / d / "config.json").is_file()]
    return denoiser, read_json(vaes[0], "model config") if vaes else None


def _hub_configs(repo_id: str) -> Path:
    if repo_id.count("/") != 1:
        raise HspaceError(f"model {repo_id!r} is not a folder, a built-in name or a hub id like 'black-forest-labs/FLUX.1-dev'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json"]))  # the configs only
    except Exception as e:
        raise HspaceError(f"the configs of {repo_id!r} could not be fetched from the hub ({type(e).__name__}); offline, copy the "
                          "model's *.json files into a folder and plan that folder") from None


def meta_denoiser(config: dict) -> torch.nn.Module:
    """The denoiser of ``config`` (its ``_class_name``) built on the meta device: structure and shapes, no memory."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise HspaceError(f"the denoiser's config names {name!r}, which is not a diffusers model class")
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def h_shape_at(call, location: str | None, latent: tuple[int, int, int]) -> tuple[str, tuple[int, ...]]:
    """(the location, h's [C, H, W]) of a family's ``call`` around its denoiser for samples of ``latent`` [C, H, W]
    (module doc)."""
    from .models import hook_points

    denoiser = call.denoiser
    location = call.check_location(denoiser, location)
    point = hook_points(denoiser)[location]
    if point.tokens is not None:  # a transformer block: its width over the token grid
        width = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
        return location, (width, latent[1] // call.patch(), latent[2] // call.patch())
    seen = []
    handle = point.attach(denoiser, lambda h: seen.append(tuple(h.shape[1:])) or h)  # h read, left as it is
    try:
        x = torch.zeros(1, *latent, device="meta")
        t = torch.zeros(1, device="meta")
        denoiser(x, t, **_meta_conditioning(denoiser))
    finally:
        handle.remove()
    return location, seen[0]


def _meta_conditioning(denoiser) -> dict:
    """Conditioning tensors of the right shapes (meta) for a text-conditioned U-Net (SD; SDXL's added embeddings)."""
    config = denoiser.config
    if "cross_attention_dim" not in config:
        return {}
    keywords = {"encoder_hidden_states": torch.zeros(1, 77, config.cross_attention_dim, device="meta")}
    if config.get("addition_embed_type") == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        keywords["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    return keywords


def _size(count: float) -> str:
    """Bytes for people: kB, MB or GB (powers of 1000, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:.0f} B"


@dataclass
class Plan:
    """A bank's size before it is drawn (module doc); bytes and counts."""

    model: str
    location: str
    h_shape: tuple[int, ...]
    n: int
    num_steps: int
    stored_steps: int
    batch_size: int
    dtype: str
    h_bytes_per_step: int  # one sample's h at one step on disk, as stored (pooled, in ``storage``)
    disk_per_sample: int
    disk_total: int
    ram_h_batch: int  # one batch's h at every step while drawing, in the engine's dtype
    ram_weights: int  # the denoiser's weights in the engine's dtype
    passes: int  # denoiser passes (x2 under classifier-free guidance)
    parameters: int
    h_pool: int = 1
    storage: str = "float16"

    def _total(self, pool: int, storage: str) -> int:
        """The bank's disk with h pooled over ``pool`` x ``pool`` cells and stored in ``storage`` (thumbnails as they are)."""
        ours = sample_bytes(pooled_shape(self.h_shape, self.h_pool), self.stored_steps, 0, self.storage)
        return self.n * (sample_bytes(pooled_shape(self.h_shape, pool), self.stored_steps, 0, storage) + self.disk_per_sample - ours)

    def lines(self, budget: float = 100e9, seconds_per_pass: float | None = None) -> list[str]:
        gb = _size
        out = [f"bank plan: {self.model}, h at {self.location} = {'x'.join(map(str, self.h_shape))} per sample per step",
               f"  disk: {gb(self.h_bytes_per_step)} per step, {gb(self.disk_per_sample)} per sample "
               f"({self.stored_steps} of {self.num_steps} steps, {self.storage}{f', pooled {self.h_pool}x{self.h_pool}' if self.h_pool > 1 else ''}, "
               f"with its thumbnail), {gb(self.disk_total)} for {self.n:,} samples",
               f"  memory while drawing: {gb(self.ram_h_batch)} for a batch of {self.batch_size}'s h ({self.dtype}) + {gb(self.ram_weights)} "
               f"of denoiser weights ({self.parameters / 1e6:,.1f} M parameters; text encoders and VAE not counted)",
               f"  time: {self.passes:,} denoiser passes" + (f", about {self.passes * seconds_per_pass / 3600:,.1f} h at {seconds_per_pass:g} s a pass"
                                                           if seconds_per_pass else " (give --pass-seconds, a pass's time on your device, for hours)")]
        if self.disk_total > budget:
            per_step = self.h_bytes_per_step * self.n
            steps = int(budget // per_step)
            out.append(f"  over {gb(budget)}: " + (f"--h-steps with at most {steps} of the {self.num_steps} steps ({gb(steps * per_step)})" if steps
                       else "no --h-steps choice fits") + f", or --n {max(1, int(budget // self.disk_per_sample)):,} at every stored step")
            grid = self.h_shape[1:] if len(self.h_shape) == 3 else ()
            options = [(pool, storage) for pool in (1, 2, 4) for storage in ("float16", "float8")
                       if (pool, storage) != (1, "float16") and all(side % pool == 0 for side in grid) and (pool == 1 or grid)]
            out.append("  or store h smaller: " + "; ".join(
                f"{' '.join(([f'--h-pool {pool}'] if pool > 1 else []) + ([f'--h-storage {storage}'] if storage != 'float16' else []))}: "
                f"{gb(self._total(pool, storage))}{' (fits)' if self._total(pool, storage) <= budget else ''}" for pool, storage in options))
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def plan_bank(model: str, n: int, num_steps: int, *, h_location: str | None = None, h_steps=None, height: int | None = None,
              width: int | None = None, batch_size: int = 32, dtype: str = "float32", thumbnail_size: int = 64, h_pool: int | None = None,
              h_storage: str | None = None) -> Plan:
    """The plan of a bank of ``n`` samples of ``num_steps`` (``h_steps``: the stored steps; ``h_pool``, ``h_storage``: how h
    is stored, ``layout.py``) of ``model`` (module doc)."""
    from .models import backbone_for
    from .models.backbone import sized_shape
    from .loading import resolve_dtype
    from .models.codec import vae_scale_factor

    denoiser_config, vae = _configs(model)
    denoiser = meta_denoiser(denoiser_config)
    call = backbone_for(denoiser)(denoiser)
    if (height is None) != (width is None):
        raise HspaceError("give --height and --width together (or neither: the model's default size)")
    latent = call.sample_shape() if height is None else sized_shape(call, vae_scale_factor(vae) if vae else 1, (height, width))
    location, shape = h_shape_at(call, h_location, latent)
    stored = num_steps if h_steps is None else len(h_steps)
    pool, storage = h_pool or 1, h_storage or "float16"
    stored_shape = pooled_shape(shape, pool)
    per_step = sample_bytes(stored_shape, 1, 0, storage) - 8
    per_sample = sample_bytes(stored_shape, stored, thumbnail_size, storage)
    element = resolve_dtype(dtype).itemsize
    parameters = sum(p.numel() for p in denoiser.parameters())
    passes = n * num_steps * (1 if type(denoiser).__name__ in ONE_PASS else 2)
    return Plan(model, location, shape, n, num_steps, stored, batch_size, dtype, per_step, per_sample, n * per_sample,
                batch_size * num_steps * math.prod(shape) * element, parameters * element, passes, parameters, pool, storage)
