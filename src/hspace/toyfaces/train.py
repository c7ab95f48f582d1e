"""Train the bundled toy-faces diffusion models, with EMA, on faces rendered by ``render.py`` from seeds 0 .. pool-1.

- ``arch="unet"`` (the bundled ``toyfaces``): a small diffusers UNet2DModel, epsilon prediction, 1000 training steps and
  the noise schedule of google/ddpm-ema-celebahq-256 (linear betas 1e-4 .. 0.02).
- ``arch="dit"`` (``toydit``): a DiTTransformer2DModel (patch 2 on 32x32 RGB, one class: unconditional) trained with
  flow matching as SD3 trains: x_t = (1 - t) x_0 + t eps with t = sigmoid(u), u ~ N(0, 1) (logit-normal), the model
  predicting v = eps - x_0 from (x_t, 1000 t); exported as a pipeline folder with FlowMatchEulerDiscreteScheduler.

Checkpoints are written atomically every ``checkpoint_every`` steps; running the same command again resumes from the
last one (a session may end mid-run).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..files import staged_folder, write_atomic, write_json
from ..errors import HspaceError
from ..validate import check_int
from ..loading import CELEBAHQ_SCHEDULER_CONFIG
from .render import PARTS, region_mask, render_batch

# The base architecture (v1, 2.7M parameters), h = mid-block output of 128 x 8 x 8 at 32 px. The bundled
# model (v2, 3.9M) is this with two layers per block (docs/toyfaces.md has its three training stages).
TOYFACES_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)


ARCHES = ("unet", "dit", "sd")
DIT_HEAD_DIM = 48  # attention head size of the toy DiT: its width is a multiple of it


def dit_config(config: "TrainConfig") -> dict:
    """The DiTTransformer2DModel arguments of a run."""
    for name, value, low, high in (("dit_layers", config.dit_layers, 1, 64), ("dit_width", config.dit_width, DIT_HEAD_DIM, 4096)):
        check_int(name, value, low, high, valid=f"an integer from {low} to {high}")
    if config.dit_width % DIT_HEAD_DIM:
        raise HspaceError(f"dit_width {config.dit_width} must be a multiple of {DIT_HEAD_DIM} (the attention head size), e.g. 192 or 384")
    return dict(num_attention_heads=config.dit_width // DIT_HEAD_DIM, attention_head_dim=DIT_HEAD_DIM, in_channels=3, out_channels=3,
                num_layers=config.dit_layers, sample_size=config.size, patch_size=2, num_embeds_ada_norm=1, norm_num_groups=32)


SD_TEXT_WIDTH = 64  # toysd's text encoder width, the U-Net's cross_attention_dim

FLOW_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@dataclass
class TrainConfig:
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    pool: int = 60000  # training faces: seeds 0 .. pool-1
    size: int = 32
    seed: int = 0
    checkpoint_every: int = 200
    # Extra loss weight on fixed image regions, e.g. "mouth=3": the squared error of a pixel in the
    # mouth region (render.region_mask) counts 1 + 3 times. A fixed per-pixel weight leaves the optimum
    # (the conditional mean of the noise) unchanged and moves the small model's capacity to that part.
    region_weights: str = ""
    bf16: bool = False  # bfloat16 autocast for the forward and backward pass (about 1.5x on AVX512-BF16 CPUs)
    init: str = ""  # start from the weights (model and EMA) of this checkpoint; the optimizer starts fresh
    # The U-Net's width and depth: v1 is 32,64,128 with one layer per block, the bundled v2 has two.
    channels: str = "32,64,128"
    layers_per_block: int = 1
    # The epsilon loss at timestep t counts min(1 / alpha_bar_t, v_weight_cap) times, normalised to a mean
    # weight of 1 over t: the v-prediction loss (1 / alpha_bar_t times the epsilon loss) truncated at the cap.
    # 1 is the plain epsilon loss. Above 1 it moves the model's capacity to the noisy steps, where the
    # epsilon loss barely sees the predicted x_0 (its error counts SNR_t times) yet the sampler decides the
    # attributes. The optimum (the conditional mean of the noise) is unchanged: the model stays epsilon.
    v_weight_cap: float = 1.0
    arch: str = "unet"  # ARCHES: the U-Net (epsilon, DDPM schedule) or the DiT (flow matching)
    dit_layers: int = 8
    dit_width: int = 192
    # Training images at this resolution (0: size), area-averaged from the faces rendered at ``size``; the DiT keeps
    # its size (its sine-cosine positions span the same grid at any resolution), so a cheap low-resolution stage can
    # start a run at full resolution (--init), as SD3 and PixArt train from 256 px up. DiT only.
    resolution: int = 0
    # --arch sd (toysd, toysd.py): the autoencoder's training steps before the U-Net's, and the chance that a phrase
    # of a training caption is dropped (the attribute it names left free)
    vae_steps: int = 2000
    caption_drop: float = 0.3
    decoder_steps: int = 0  # --arch sd: then the decoder alone fine-tuned (the latents unchanged), after the U-Net
    # --arch sd: the text encoder's pooled output also predicts, for each binary attribute, whether the caption names it
    # true, false or not at all (a linear head trained with it, not exported); its cross-entropy counts this much in the
    # loss. It keeps phrases that the denoising loss barely rewards (a smile is a few pixels) apart from the empty caption.
    text_attribute_weight: float = 0.0
    # --arch sd: the autoencoder of this toysd folder ('toysd' is the bundled one) as the finished first stage; the U-Net
    # and the text encoder start from scratch (--init starts them from the folder's too)
    vae_init: str = ""

    def __post_init__(self):
        """Every number in its range, so that no value reaches the optimizer or the model unchecked."""
        if self.arch == "sd" and self.channels == TrainConfig.channels:
            self.channels = "64,128"  # the toysd U-Net's default width
        ranges = {"caption_drop": (0, True), "text_attribute_weight": (0, True), "lr": (0, True), "weight_decay": (0, True), "min_lr_ratio": (0, True), "ema_decay": (0, True)}
        for name, (low, inclusive) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (value >= low if inclusive else value > low)
            if not ok or (name in ("min_lr_ratio", "ema_decay", "caption_drop") and value > 1):
                bound = "from 0 to 1" if name in ("min_lr_ratio", "ema_decay", "caption_drop") else (">= 0" if inclusive else "> 0")
                raise HspaceError(f"{name} must be a finite number {bound}, got {value!r}")
        for name in ("steps", "batch_size", "pool", "size", "checkpoint_every", "warmup", "seed", "resolution", "vae_steps", "decoder_steps"):
            value, low = getattr(self, name), 0 if name in ("warmup", "seed", "resolution", "decoder_steps") else 1
            check_int(name, value, low, valid=f"an integer >= {low}")
        # the rest of the settings, checked here too: an error before the training faces are rendered
        parse_region_weights(self.region_weights)
        if self.arch not in ARCHES:
            raise HspaceError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHES)}")
        if self.arch != "sd" and (self.text_attribute_weight or self.vae_init):
            raise HspaceError(f"text_attribute_weight {self.text_attribute_weight!r} and vae_init {self.vae_init!r} are settings of --arch sd (toysd), not of --arch {self.arch}")
        if self.vae_init and self.init:
            raise HspaceError(f"vae_init {self.vae_init!r} and init {self.init!r} both give the autoencoder: --init takes the folder's autoencoder, U-Net and text encoder, --vae-init its autoencoder alone")
        if self.resolution and (self.arch != "dit" or self.resolution > self.size or self.size % self.resolution or self.resolution % 2):
            raise HspaceError(f"resolution {self.resolution!r} must be 0 (the size) or, for --arch dit only, an even divisor of the size {self.size} (e.g. {self.size // 2})")
        if self.arch == "dit":
            dit_config(self)
            if self.v_weight_cap != 1:
                raise HspaceError(f"v_weight_cap {self.v_weight_cap!r} weights the U-Net's epsilon loss; the DiT trains on v directly (leave it at 1)")
            return
        sd_unet_config(self) if self.arch == "sd" else unet_config(self)
        if not (isinstance(self.v_weight_cap, (int, float)) and self.v_weight_cap >= 1 and math.isfinite(self.v_weight_cap)):
            raise HspaceError(f"v_weight_cap must be a finite number >= 1 (1 = the plain epsilon loss), got {self.v_weight_cap!r}")


def unet_config(config: "TrainConfig") -> dict:
    """The UNet2DModel arguments of a run: TOYFACES_UNET_CONFIG with the run's channels and layers."""
    try:
        channels = tuple(int(c) for c in config.channels.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 3 or any(c <= 0 or c % 8 for c in channels):
        raise HspaceError(f"channels {config.channels!r} must be three positive multiples of 8 (8 groups per norm), e.g. 32,64,128")
    check_int("layers_per_block", config.layers_per_block, 1, valid="a positive integer")
    return {**TOYFACES_UNET_CONFIG, "block_out_channels": channels, "layers_per_block": config.layers_per_block}


def sd_unet_config(config) -> dict:
    """The UNet2DConditionModel arguments of a run (``--channels``, default 64,128; ``--layers-per-block``)."""
    try:
        channels = tuple(int(c) for c in config.channels.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 2 or any(c < 16 or c % 16 for c in channels):
        raise HspaceError(f"channels {config.channels!r} must be two multiples of 16 for --arch sd, e.g. 64,128")
    return dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SD_TEXT_WIDTH, norm_num_groups=16, attention_head_dim=8,
    )


def training_alphas() -> torch.Tensor:
    """alpha_bar_t of the 1000 training timesteps (the CelebA-HQ schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in CELEBAHQ_SCHEDULER_CONFIG.items() if not k.startswith("_")}).alphas_cumprod


def timestep_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Weight of each timestep's epsilon loss: min(1 / alpha_bar_t, cap), with mean 1 over the timesteps."""
    if not cap >= 1:
        raise HspaceError(f"v_weight_cap must be a number >= 1 (1 = the plain epsilon loss), got {cap!r}")
    w = (1 / alphas_cumprod.double()).clamp(max=cap)
    return (w / w.mean()).float()


def parse_region_weights(spec: str) -> dict[str, float]:
    """ "mouth=3,eyes=1" -> {"mouth": 3.0, "eyes": 1.0}; parts as in render.PARTS, weights >= 0."""
    weights = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if name not in PARTS or not (math.isfinite(weight) and weight >= 0):
            raise HspaceError(f"region weight {item!r} is not PART=WEIGHT with PART one of {', '.join(PARTS)} and WEIGHT a finite number >= 0")
        weights[name] = weight
    return weights


def loss_weight_map(spec: str, size: int) -> torch.Tensor | None:
    """[1, 1, size, size] per-pixel weight 1 + sum of the weights of the regions a pixel is in; None when empty."""
    weights = parse_region_weights(spec)
    if not weights:
        return None
    w = torch.ones(size, size)
    for name, weight in weights.items():
        w += weight * torch.from_numpy(region_mask(name, size)).float()
    return w[None, None]


def deepen(model, layers_per_block: int):
    """A copy of a trained UNet2DModel with more layers per block that computes exactly the same function.

    Each down block gets identity layers after its last one (a resnet whose conv2 is zero, and an
    attention whose output projection is zero), so the extra skip tensors repeat the last one. Each up
    block gets the same number of identity layers after its first one; these ignore their skip input
    (the 1x1 shortcut passes the hidden channels through and drops the skip channels), so every old up
    layer still receives the skip tensor it was trained with. Training then grows the new layers from
    zero: more capacity, starting from the trained model rather than from noise.
    """
    from diffusers import UNet2DModel

    old = model.config.layers_per_block
    check_int("layers_per_block", layers_per_block, old, valid=f"an integer >= the model's {old}")
    extra = layers_per_block - old
    with torch.random.fork_rng(devices=[]):  # the new layers' first convolutions: random, reproducible, global RNG untouched
        torch.manual_seed(0)
        new = UNet2DModel.from_config({**model.config, "layers_per_block": layers_per_block}).to(model.dtype)
    for name in ("conv_in", "time_proj", "time_embedding", "mid_block", "conv_norm_out", "conv_out"):
        getattr(new, name).load_state_dict(getattr(model, name).state_dict())

    def identity(resnet, attention):
        with torch.no_grad():
            resnet.conv2.weight.zero_()
            resnet.conv2.bias.zero_()
            if resnet.conv_shortcut is not None:  # hidden channels first, then the skip's: pass the hidden ones
                out = resnet.conv_shortcut.weight.shape[0]
                resnet.conv_shortcut.weight.zero_()
                resnet.conv_shortcut.weight[:, :out, 0, 0] = torch.eye(out)
                resnet.conv_shortcut.bias.zero_()
            if attention is not None:
                attention.to_out[0].weight.zero_()
                attention.to_out[0].bias.zero_()

    def copy(blocks_new, blocks_old, mapping):
        for block_new, block_old in zip(blocks_new, blocks_old):
            attentions = getattr(block_new, "attentions", None)
            for i, source in enumerate(mapping(len(block_new.resnets))):
                attention = attentions[i] if attentions is not None else None
                if source is None:
                    identity(block_new.resnets[i], attention)
                    continue
                block_new.resnets[i].load_state_dict(block_old.resnets[source].state_dict())
                if attention is not None:
                    attention.load_state_dict(block_old.attentions[source].state_dict())
            for sampler in ("downsamplers", "upsamplers"):
                if getattr(block_old, sampler, None) is not None:
                    getattr(block_new, sampler).load_state_dict(getattr(block_old, sampler).state_dict())

    copy(new.down_blocks, model.down_blocks, lambda n: [i if i < old else None for i in range(n)])
    copy(new.up_blocks, model.up_blocks, lambda n: [0] + [None] * extra + list(range(1, n - extra)))
    return new


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "generator", "step", "config")


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, read with ``weights_only=True``: tensors, numbers, strings and containers only,
    so a crafted file cannot run code (a pickle of anything else is refused)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HspaceError(f"{str(path)!r} is not an hspace training checkpoint that loads safely (weights only): {first}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise HspaceError(f"{str(path)!r} is not an hspace training checkpoint: it lacks {', '.join(missing)}")
    return state


def load_init(config: "TrainConfig"):
    """(model weights, EMA weights) to start a run from: a checkpoint.pt, or a diffusers model folder or
    built-in name (its weights serve as both), deepened to the run's layers per block."""
    from diffusers import UNet2DModel

    from ..loading import BUNDLED_FOLDERS

    source = BUNDLED_FOLDERS.get(config.init, Path(config.init))
    if source.is_file():
        init = load_checkpoint(source)
        return init["model"], init["ema"]
    if config.arch == "dit":
        return _dit_init(config, source)
    if not (source / "config.json").is_file():
        raise HspaceError(f"--init {config.init!r} is neither a checkpoint file, a diffusers model folder nor 'toyfaces'")
    unet = UNet2DModel.from_pretrained(source).float()
    architecture = unet_config(config)
    if tuple(unet.config.block_out_channels) != tuple(architecture["block_out_channels"]):
        raise HspaceError(
            f"--init {config.init!r} has channels {','.join(map(str, unet.config.block_out_channels))}, "
            f"the run {config.channels}; only the layers per block can grow"
        )
    state = deepen(unet, architecture["layers_per_block"]).state_dict()
    return state, state


def _dit_init(config: "TrainConfig", source: Path):
    """The weights of an exported DiT pipeline folder (``toydit`` or ``hspace toyfaces export``'s output) as both the
    model and its EMA: how a later session resumes the bundled model (the optimizer starts fresh)."""
    from diffusers import DiTTransformer2DModel

    if not (source / "transformer" / "config.json").is_file():
        raise HspaceError(f"--init {config.init!r} is neither a DiT checkpoint.pt, a DiT pipeline folder (with transformer/) nor 'toydit'")
    transformer = DiTTransformer2DModel.from_pretrained(source / "transformer").float()
    expected = dit_config(config)
    found = {k: transformer.config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size", "patch_size")}
    if any(found[k] != expected[k] for k in found):
        raise HspaceError(f"--init {config.init!r} is a DiT of {found}; the run asks for {({k: expected[k] for k in found})} (--dit-layers, --dit-width, --size)")
    state = transformer.state_dict()
    return state, state


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def render_pool(n: int, size: int, chunk: int = 5000) -> torch.Tensor:
    """uint8 [n, 3, size, size] faces of seeds 0 .. n-1."""
    parts = []
    for start in range(0, n, chunk):
        images, _, _ = render_batch(range(start, min(n, start + chunk)), size=size)
        parts.append(torch.from_numpy(((images + 1) * 127.5).round().clip(0, 255).astype(np.uint8)))
    return torch.cat(parts)


def _atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def train(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train (or resume) in ``run_dir``; returns the checkpoint path. ``callback`` gets each step's loss.

    Random numbers are drawn on the CPU, so a run may be resumed on another device.
    """
    device = torch.device(device)
    config = config or TrainConfig()
    if config.arch == "sd":
        raise HspaceError("--arch sd (toysd) is trained by hspace.toyfaces.toysd.train, in two stages")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    weight_map = loss_weight_map(config.region_weights, config.size)  # checks the specs before any work
    alphas = training_alphas()
    t_weights = timestep_weights(alphas, config.v_weight_cap)  # checks the cap before any work
    alphas = alphas.float()
    init = load_init(config) if state is None and config.init else None  # checked before any work
    _check_resume(state, config, ckpt_path)
    write_json(run_dir / "config.json", asdict(config))

    model, ema, optimizer, generator, step = _start(config, device, init, state)
    pool = render_pool(config.pool, config.size)
    if config.resolution and config.resolution != config.size:
        pool = torch.nn.functional.avg_pool2d(pool.float(), config.size // config.resolution).round().to(torch.uint8)
    if weight_map is not None:
        weight_map = weight_map.to(device)

    def save():
        _atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "config": asdict(config),
            },
            ckpt_path,
        )

    model.train()
    while step < config.steps:
        step_fn = _flow_training_step if config.arch == "dit" else _training_step
        loss = step_fn(model, ema, optimizer, generator, pool, alphas, t_weights, weight_map, config, step, device)
        if not math.isfinite(loss):
            kept = f"the last finite checkpoint, {ckpt_path}, is kept" if ckpt_path.exists() else "no checkpoint was written"
            raise HspaceError(f"training diverged: the loss at step {step + 1} is {loss}; {kept}. Resume with a lower --lr (or --bf16 off)")
        step += 1
        if callback is not None:
            callback({"step": step, "steps": config.steps, "loss": loss, "lr": learning_rate(config, step - 1)})
        if step % config.checkpoint_every == 0 or step == config.steps:
            save()
    return ckpt_path


def _check_resume(state: dict | None, config: TrainConfig, path: Path) -> None:
    """A checkpoint resumes only under its own settings: the run's total length may grow, nothing else may change."""
    if state is not None:
        saved = TrainConfig(**state["config"])
        if {**asdict(saved), "steps": 0} != {**asdict(config), "steps": 0}:
            raise HspaceError(f"{path} was trained with {asdict(saved)}; resume it with the same settings")


def _start(config: TrainConfig, device: torch.device, init, state):
    """The model, its EMA, the optimizer, the CPU generator and the step: new (from the seed, or ``init``'s weights)
    or as the checkpoint ``state`` left them."""
    torch.manual_seed(config.seed)
    model = build_model(config)
    ema = build_model(config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    model, ema = model.to(device), ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    if init is not None:
        model.load_state_dict(init[0])
        ema.load_state_dict(init[1])
    if state is not None:
        step = restore(state, model, ema, optimizer, generator)
    return model, ema, optimizer, generator, step


def restore(state: dict, model, ema, optimizer, generator) -> int:
    """A checkpoint's model, EMA, optimizer and generator put back where it left them; returns its step."""
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"]


def build_model(config: TrainConfig):
    """A freshly initialised model of the run's architecture (the global RNG draws its weights)."""
    if config.arch == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(**dit_config(config))
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config(config))


def _flow_training_step(model, ema, optimizer, generator, pool, alphas, t_weights, weight_map, config: TrainConfig, step: int, device) -> float:
    """One step of the flow-matching loss (module doc): ||v_theta(x_t, 1000 t) - (eps - x_0)||^2 with logit-normal t."""
    index = torch.randint(0, len(pool), (config.batch_size,), generator=generator)
    x0 = pool[index].float() / 127.5 - 1
    t = torch.sigmoid(torch.randn(config.batch_size, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    x_t = ((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise).to(device)
    target = (noise - x0).to(device)
    labels = torch.zeros(config.batch_size, dtype=torch.long, device=device)
    # DiT's label embedding drops 10% of the labels to its null class (diffusers' default) with the global RNG: seeded
    # from the run's generator, so that a resumed run draws what the run in one go draws.
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        prediction = model(x_t, timestep=(1000 * t).to(device), class_labels=labels).sample
    return _update(model, ema, optimizer, (prediction.float() - target) ** 2, weight_map, config, step)


def _update(model, ema, optimizer, error: torch.Tensor, weight_map, config: TrainConfig, step: int, extra: torch.Tensor | None = None) -> float:
    """The loss (the mean squared ``error``, per pixel weighted by ``weight_map`` when given, plus an ``extra`` term),
    the optimizer step (clipped gradients, the run's learning rate) and the EMA update."""
    loss = error.mean() if weight_map is None else (error * weight_map).mean() / weight_map.mean()
    if extra is not None:
        loss = loss + extra
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    # EMA with a warm-up so that early weights do not linger (as diffusers' EMAModel).
    decay = config.ema_decay if config.init else min(config.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
    return loss.item()


def _training_step(model, ema, optimizer, generator, pool, alphas, t_weights, weight_map, config: TrainConfig, step: int, device) -> float:
    """One step of the (weighted) epsilon loss on a batch drawn from ``generator``, then the EMA update."""
    index = torch.randint(0, len(pool), (config.batch_size,), generator=generator)
    x0 = pool[index].float() / 127.5 - 1
    t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
    noise = noise.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        prediction = model(x_t, t.to(device)).sample
    error = (prediction.float() - noise) ** 2
    if config.v_weight_cap != 1:
        error = error * t_weights[t].view(-1, 1, 1, 1).to(device)
    return _update(model, ema, optimizer, error, weight_map, config, step)


def export(checkpoint: str | Path, folder: str | Path) -> Path:
    """Write the EMA weights in float16 as a diffusers model folder, with the scheduler config beside them (a DiT: a
    pipeline folder, ``transformer/`` and ``scheduler/`` with ``model_index.json``, pixel space: no VAE)."""
    state = load_checkpoint(checkpoint)
    bad = [k for k, v in state["ema"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise HspaceError(f"{checkpoint} holds NaN or infinite weights ({bad[0]}, ...): it cannot be exported; train again from an earlier checkpoint")
    config = TrainConfig(**state["config"])
    model = build_model(config)
    model.load_state_dict(state["ema"])
    folder = Path(folder)
    with staged_folder(folder) as stage:  # all files or none: never a new config beside the old weights
        if config.arch == "dit":
            import diffusers

            model.to(torch.float16).save_pretrained(stage / "transformer", safe_serialization=True)
            (stage / "scheduler").mkdir()
            write_json(stage / "scheduler" / "scheduler_config.json", FLOW_SCHEDULER_CONFIG)
            write_json(stage / "model_index.json", {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
                                                    "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": [None, None]})
        else:
            model.to(torch.float16).save_pretrained(stage, safe_serialization=True)
            write_json(stage / "scheduler_config.json", CELEBAHQ_SCHEDULER_CONFIG)
        write_json(stage / "training.json", {"trained_steps": state["step"], "config": state["config"]})
    return folder
