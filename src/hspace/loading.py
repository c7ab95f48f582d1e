"""Find and load a model: a built-in name, a local diffusers folder, or a Hugging Face hub id.

Layouts understood (what diffusers writes):
- a U-Net folder: config.json (UNet2DModel) + weights, scheduler_config.json beside it or in scheduler/
  (e.g. google/ddpm-ema-celebahq-256);
- a pipeline folder: model_index.json with unet/, scheduler/ and optionally vqvae/ or vae/
  (a latent model, e.g. CompVis/ldm-celebahq-256);
- a text-to-image pipeline folder whose unet/ is a UNet2DConditionModel (Stable Diffusion 1.x/2.x,
  SDXL): loaded as the diffusers pipeline (without its safety checker), whose text encoders and
  ``encode_prompt`` become the engine's conditioner (``models.conditioning``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import HspaceError

# The noise schedule of google/ddpm-ema-celebahq-256 (and the church and bedroom models).
CELEBAHQ_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": True,
    "variance_type": "fixed_small",
    "prediction_type": "epsilon",
}

DECODER_FOLDERS = ("vqvae", "vae")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Components:
    unet: torch.nn.Module
    scheduler_config: dict
    decoder: torch.nn.Module | None  # VQModel or AutoencoderKL of a latent model
    name: str
    conditioner: object | None = None  # models.conditioning: the prompt encoding of a conditional model
    fingerprint: str | None = None  # the model's content (fingerprint.py); None: hashed from the modules in memory

    def content_fingerprint(self) -> str:
        """The fingerprint of the files it was loaded from, else of its modules and scheduler config."""
        if self.fingerprint is None:
            from .fingerprint import modules_fingerprint

            pipeline = getattr(self.conditioner, "pipeline", None)
            encoders = [getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")]
            self.fingerprint = modules_fingerprint([self.unet, self.decoder, *encoders], self.scheduler_config)
        return self.fingerprint


def tiny_unet_config(sample_size: int = 32, channels=(32, 64, 64)) -> dict:
    """A small UNet2DModel config: attention at the lowest resolution, mid block at sample_size/4."""
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def _tiny_random() -> Components:
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**tiny_unet_config())
    return Components(unet, dict(CELEBAHQ_SCHEDULER_CONFIG), None, "tiny-random")


TOYFACES_FOLDER = Path(__file__).parent / "toyfaces" / "model"
TOYDIT_FOLDER = Path(__file__).parent / "toyfaces" / "toydit"
TOYSD_FOLDER = Path(__file__).parent / "toyfaces" / "toysd"
BUNDLED_FOLDERS = {"toyfaces": TOYFACES_FOLDER, "toydit": TOYDIT_FOLDER, "toysd": TOYSD_FOLDER}  # the toy-faces models' folders


def _bundled(folder: Path, name: str, arch: str) -> Callable[[], Components]:
    def load() -> Components:
        if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            raise HspaceError(
                f"the bundled {name} weights are missing from {str(folder)!r}; "
                f"train and export them with `hspace toyfaces train --arch {arch}` and `hspace toyfaces export`"
            )
        return load_folder(folder, name)

    return load


# Built-in models, loadable by name wherever a model id is accepted: the toy-faces U-Net (the default) and the
# toy-faces diffusion transformer trained with flow matching and the text-to-image toy, a Stable Diffusion pipeline of
# toy faces (docs/toyfaces.md).
BUILTIN: dict[str, Callable[[], Components]] = {
    "toyfaces": _bundled(TOYFACES_FOLDER, "toyfaces", "unet"),
    "toydit": _bundled(TOYDIT_FOLDER, "toydit", "dit"),
    "toysd": _bundled(TOYSD_FOLDER, "toysd", "sd"),
    "tiny-random": _tiny_random,
}
DEFAULT_MODEL = "toyfaces"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise HspaceError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HspaceError(f"device {str(device)!r} requested but CUDA is not available here; use 'cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise HspaceError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise HspaceError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _read_json(path: Path) -> dict:
    from .files import read_json

    return read_json(path, "model config")


def _scheduler_config(folder: Path) -> dict:
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return _read_json(candidate)
    raise HspaceError(
        f"no scheduler_config.json in {str(folder)!r} or its scheduler/ folder; the noise schedule is needed to sample"
    )


def _load_unet(folder: Path):
    from diffusers import UNet2DModel

    cls_name = _read_json(folder / "config.json").get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise HspaceError(
            f"{str(folder)!r} holds a {cls_name}; valid: a UNet2DModel (unconditional) folder, or a pipeline folder "
            "(model_index.json) whose unet/ is a UNet2DModel or a UNet2DConditionModel with its text encoder"
        )
    # Weights may be stored in float16 (the bundled model is); the engine casts to its own dtype.
    return _from_pretrained(UNet2DModel, folder)


def _from_pretrained(cls, folder: Path):
    """diffusers' from_pretrained, with every way a folder can be broken (a config of the wrong shape or
    types, missing or truncated weights) turned into an error that names the folder."""
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HspaceError(f"cannot load the {cls.__name__} in {str(folder)!r}: {first}") from None


def _load_decoder(folder: Path):
    from diffusers import AutoencoderKL, VQModel

    cls_name = _read_json(folder / "config.json").get("_class_name")
    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    if cls_name not in classes:
        raise HspaceError(f"decoder in {str(folder)!r} is a {cls_name!r}; valid: {', '.join(classes)}")
    return _from_pretrained(classes[cls_name], folder)


def load_folder(folder: Path, name: str, fingerprint: str | None = None) -> Components:
    """Load a U-Net folder or a pipeline folder (see the module docstring), identified by ``fingerprint``
    (default: the content fingerprint of the folder's files)."""
    from dataclasses import replace

    from .fingerprint import folder_fingerprint

    components = _load_folder(folder, name)
    return replace(components, fingerprint=fingerprint or folder_fingerprint(folder))


def _load_folder(folder: Path, name: str) -> Components:
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        if (folder / "transformer" / "config.json").is_file():
            return _load_text_pipeline(folder, name)
        if not (folder / "unet" / "config.json").is_file():
            raise HspaceError(f"pipeline folder {str(folder)!r} has no unet/config.json or transformer/config.json (the denoiser)")
        if _read_json(folder / "unet" / "config.json").get("_class_name") == "UNet2DConditionModel":
            return _load_text_pipeline(folder, name)
        unet = _load_unet(folder / "unet")
        decoders = [folder / d for d in DECODER_FOLDERS if (folder / d / "config.json").is_file()]
        decoder = _load_decoder(decoders[0]) if decoders else None
        return Components(unet, _scheduler_config(folder), decoder, name)
    if (folder / "config.json").is_file():
        return Components(_load_unet(folder), _scheduler_config(folder), None, name)
    raise HspaceError(
        f"{str(folder)!r} is not a diffusers model folder: expected config.json (a UNet2DModel) or model_index.json"
    )


def _load_text_pipeline(folder: Path, name: str) -> Components:
    """A conditional pipeline folder (Stable Diffusion, SDXL, DiT, SD3): its denoiser (``unet/`` or
    ``transformer/``), VAE, scheduler config and the conditioner its backbone plug-in makes of it."""
    import importlib.util

    from diffusers import DiffusionPipeline

    if importlib.util.find_spec("transformers") is None and not (folder / "transformer").is_dir():
        raise HspaceError(f"{str(folder)!r} is a text-conditioned pipeline; its text encoders need transformers: pip install 'hspace[sd]'")

    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    skip = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in index}
    # components saved as absent (SD3 without T5: text_encoder_3 [null, null]) are passed as absent
    skip.update({k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None})
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None and k not in skip]
    missing = [k for k in listed if not (folder / k).is_dir()]
    if missing:
        raise HspaceError(f"pipeline folder {str(folder)!r} lists {', '.join(missing)} in model_index.json but has no "
                          f"{', '.join(m + '/' for m in missing)} folder; copy the whole pipeline (every component's folder)")
    if "safety_checker" in index:
        skip["requires_safety_checker"] = False
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, **skip)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HspaceError(f"cannot load the pipeline in {str(folder)!r}: {first}") from None
    pipeline.set_progress_bar_config(disable=True)
    return components_of_pipeline(pipeline, name)


def denoiser_of(pipeline):
    """A pipeline's denoiser: its unet or its transformer (None: neither). (Not ``a or b``: a compiled module has no truth value.)"""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else getattr(pipeline, "transformer", None)


def components_of_pipeline(pipeline, name: str) -> Components:
    """The components of a loaded diffusers pipeline: its denoiser, scheduler config, VAE and conditioner."""
    from .models import backbone_for

    denoiser = denoiser_of(pipeline)
    if denoiser is None:
        raise HspaceError(f"the {type(pipeline).__name__} has neither a unet nor a transformer")
    conditioner = backbone_for(denoiser).conditioner_for(pipeline)
    config = dict(pipeline.scheduler.config)
    config.setdefault("_class_name", type(pipeline.scheduler).__name__)
    return Components(denoiser, config, getattr(pipeline, "vae", None), name, conditioner)


# What a snapshot needs: configs, tokenizer files and one weight file per component. The big single-file
# checkpoints at the top of some repositories (e.g. v1-5-pruned.safetensors) and weight variants (fp16,
# non_ema) are left out; .bin weights are fetched only for a component without safetensors (older repositories).
HUB_FILES = ["*.json", "*.txt", "*.model", "diffusion_pytorch_model.safetensors", "model.safetensors", "*/*.json", "*/*.txt",
             "*/*.model", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
HUB_BIN_FILES = ["diffusion_pytorch_model.bin", "pytorch_model.bin"]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    def download(patterns, local: bool) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local))

    try:
        folder = download(HUB_FILES, True)
    except Exception:
        folder = None
    try:
        folder = folder or download(HUB_FILES, False)
        unweighted = [c.parent for c in folder.glob("**/config.json") if not any(c.parent.glob("*.safetensors"))]
        if unweighted:
            prefixes = ["" if d == folder else f"{d.relative_to(folder).as_posix()}/" for d in unweighted]
            folder = download([p + f for p in prefixes for f in HUB_BIN_FILES], False)
        return folder
    except Exception as e:
        raise HspaceError(
            f"model {repo_id!r} is not a built-in name ({', '.join(BUILTIN)}), not a local folder, and could not "
            f"be fetched from the Hugging Face hub ({type(e).__name__}). Offline? On a machine with internet run "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and pass --model DIR."
        ) from None


def load_components(model: str | Path) -> Components:
    """A built-in name, a local folder, or a hub id (from the local cache first)."""
    model = str(model)
    if model in BUILTIN:
        return BUILTIN[model]()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HspaceError(f"model {model!r} is a file; pass a diffusers model folder, a hub id or one of {', '.join(BUILTIN)}")
        # Named by its absolute path (where Engine.load(spec) looks first); identified by its fingerprint.
        return load_folder(path, str(path.resolve()))
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise HspaceError(
            f"model {model!r} is not a built-in name ({', '.join(BUILTIN)}), an existing folder, or a hub id like 'google/ddpm-ema-celebahq-256'"
        )
    from .fingerprint import hub_fingerprint

    snapshot = _hub_snapshot(model)
    return load_folder(snapshot, model, hub_fingerprint(model, snapshot))
