"""A model's identity by content: a hash of its configs and weights, so that the same weights at another path
(or on another machine) are the same model, and weights changed in place are another (``spec.py``).

- a folder: SHA-256 over every config, tokenizer and weight file (its path inside the folder and its bytes).
  A file's digest is cached by its resolved path, size and modification time (``fingerprints.json`` in the
  cache folder: ``$HSPACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hspace``, else ``~/.cache/hspace``), so a 5 GB
  SDXL folder is read once, not on every command; a file saved over (a fused LoRA) changes size or time and
  is read again.
- a hub id: its id and revision (the snapshot's commit), as the hub names it.
- modules in memory (a model built in code, a loaded pipeline): SHA-256 over every tensor of their state
  dicts (name, dtype, shape, bytes) and the scheduler config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

MODEL_FILES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth", ".ckpt")  # what a diffusers folder loads
CACHE_FILE = "fingerprints.json"
LENGTH = 32  # hex digits kept: 128 bits


def cache_folder() -> Path:
    if os.environ.get("HSPACE_CACHE_DIR"):
        return Path(os.environ["HSPACE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hspace"


def _read_cache() -> dict:
    try:
        data = json.loads((cache_folder() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    from .files import write_json

    cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # forget files that are gone
    try:
        cache_folder().mkdir(parents=True, exist_ok=True)
        write_json(cache_folder() / CACHE_FILE, cache)
    except Exception as e:  # a read-only home: hash again next time
        logger.debug("cannot write the fingerprint cache: %s", e)


def file_digest(path: Path, cache: dict) -> str:
    """SHA-256 of a file's bytes, from ``cache`` when its size and modification time are unchanged."""
    real = path.resolve()
    stat = real.stat()
    entry = cache.get(str(real))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    cache[str(real)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that loading reads (configs, tokenizers, weights), hidden ones left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix in MODEL_FILES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def folder_fingerprint(folder: str | Path) -> str:
    """The content fingerprint of a model folder (module doc)."""
    folder = Path(folder)
    cache = _read_cache()
    before = dict(cache)
    digest = hashlib.sha256()
    for path in model_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_digest(path, cache)}\n".encode())
    if cache != before:
        _write_cache(cache)
    return "sha256:" + digest.hexdigest()[:LENGTH]


def hub_fingerprint(repo_id: str, snapshot: Path) -> str:
    """A hub model by id and revision (the snapshot folder is named by its commit)."""
    return f"hub:{repo_id}@{Path(snapshot).name}"


def stored_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """What a tensor stores: itself, or for a tensor subclass of a quantizer (torchao's ``Int8Tensor``: int8 data and
    scales) its inner tensors, as stored (hashing those identifies the quantized weights; a plain tensor is itself)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [inner for name in names for inner in stored_tensors(getattr(tensor, name))]
    return [tensor]


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a weight has to the model: its own, or for a GGUF-quantized one (diffusers' ``GGUFParameter``, stored
    as bytes per block) the shape it dequantizes to, so that a Q4 and a Q8 of one model share the architecture."""
    quant = getattr(tensor, "quant_type", None)
    if quant is None:
        return tuple(tensor.shape)
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[quant]
    return (*tensor.shape[:-1], tensor.shape[-1] // size * block)


def storage_of(module: torch.nn.Module) -> str:
    """How a denoiser stores its weights, in words: "gguf Q8_0", "torchao Int8Tensor", "float8_e4m3fn", "float32", ...
    (the kinds found, most common first): what a mismatch message says beside two fingerprints."""
    kinds: dict[str, int] = {}
    for _, tensor in module.state_dict().items():
        quant = getattr(tensor, "quant_type", None)
        kind = (f"gguf {getattr(quant, 'name', quant)}" if quant is not None else f"torchao {type(tensor).__name__}"
                if hasattr(tensor, "__tensor_flatten__") else str(tensor.dtype).replace("torch.", ""))
        kinds[kind] = kinds.get(kind, 0) + tensor.numel()
    return ", ".join(sorted(kinds, key=kinds.get, reverse=True))


def modules_fingerprint(modules: Iterable[torch.nn.Module | None], config: dict | None = None) -> str:
    """The fingerprint of models in memory: every tensor of their state dicts, and the scheduler config."""
    digest = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for index, module in enumerate(modules):
        if module is None:
            continue
        for name, whole in sorted(module.state_dict().items()):
            for tensor in stored_tensors(whole.detach()):
                tensor = tensor.cpu().contiguous()
                digest.update(f"{index}.{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:LENGTH]


# The denoiser's own identity, by its weights alone (``Spec.denoiser``): what ``steer`` compares, so that a direction
# found with hspace's loop applies in the user's pipeline whatever its scheduler, folder or text encoders.
LORA_KEYS = ("lora_", "lora_magnitude_vector")  # PEFT's adapter tensors (an adapter loaded but not fused)


def _base_weights(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The denoiser's state dict without PEFT's adapter tensors (``base_layer.`` named as the plain layer) and
    without ``torch.compile``'s ``_orig_mod.`` prefix, sorted by name."""
    weights = []
    for name, tensor in module.state_dict().items():
        if any(key in name for key in LORA_KEYS):
            continue
        weights.append((name.replace("_orig_mod.", "").replace(".base_layer.", "."), tensor))
    return sorted(weights, key=lambda item: item[0])


def has_unfused_lora(module: torch.nn.Module) -> bool:
    return any(any(key in name for key in LORA_KEYS) for name in module.state_dict())


def denoiser_fingerprint(module: torch.nn.Module) -> str:
    """``ARCH:WEIGHTS``: a digest of the denoiser's class and tensor names and shapes (its architecture; not its config,
    whose sample size or flags a pipeline may change), and
    one of its weights. Floating weights are hashed as float16, so one model loaded in float32 or float16 is one model
    (in bfloat16 it rounds differently: another, unless the user asks for ``check="architecture"``). PEFT adapters
    not fused are left out (the base model's identity); a fused LoRA changes the weights. Hashed on every call, not
    cached: a LoRA fuses in place through ``.data``, which no version counter sees (about a second for SD 1.5).
    Weights on the meta device (sequential offload) have no content here: ``ARCH:offloaded``."""
    weights = _base_weights(module)
    architecture = hashlib.sha256(type(getattr(module, "_orig_mod", module)).__name__.encode())
    content = hashlib.sha256()
    offloaded = any(t.is_meta for _, t in weights)
    for name, tensor in weights:
        architecture.update(f"{name}:{logical_shape(tensor)}\n".encode())
        if offloaded:
            continue
        content.update(f"{name}\n".encode())
        quantized = hasattr(tensor, "__tensor_flatten__")
        for part in stored_tensors(tensor.detach()):  # a quantized weight: its stored parts as stored, else float16
            if part.is_floating_point() and not quantized:
                part = part.to(torch.float16)
            content.update(part.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{architecture.hexdigest()[:16]}:{'offloaded' if offloaded else content.hexdigest()[:LENGTH]}"
