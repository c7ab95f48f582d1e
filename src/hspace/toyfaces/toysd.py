"""``toysd``: a Stable Diffusion pipeline of toy faces, trained here from scratch (``hspace toyfaces train --arch sd``).

Two stages in one run folder (and an optional third), each checkpointed and resumed by the same command:

1. ``vae.pt``: an ``AutoencoderKL`` (32 px RGB <-> 4 x 16 x 16 latents) trained on the rendered faces for
   ``vae_steps`` steps: L1 reconstruction plus ``VAE_KL_WEIGHT`` times the KL term per latent element;
2. ``checkpoint.pt``: a ``UNet2DConditionModel`` (cross-attention at 8 x 8 and in the mid block, h = mid-block output
   128 x 8 x 8) and a ``CLIPTextModel`` trained jointly from scratch on the latents (the VAE's posterior means,
   scaled to unit variance as SD scales them) with the epsilon loss under Stable Diffusion's own noise schedule
   (scaled-linear betas 0.00085 .. 0.012), weighted per timestep by ``v_weight_cap`` as the toy U-Net's (1: the plain
   epsilon loss), and captions from ``captions.caption`` (phrases dropped at random, the empty caption 10% of the time
   for classifier-free guidance);
3. ``decoder.pt`` (``decoder_steps`` > 0): the decoder alone fine-tuned, the mouth and eyes weighted (the latents, and so
   the U-Net, unchanged).

``export`` writes a folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads unchanged (DDIM scheduler,
no safety checker), float16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import HspaceError
from ..files import staged_folder, write_json
from . import captions
from .train import SD_TEXT_WIDTH as TEXT_WIDTH  # the text encoder's width: the U-Net's cross_attention_dim
from .train import sd_unet_config as unet_config

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=32,
)
VAE_KL_WEIGHT = 1e-5
SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}


def text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=captions.MAX_TOKENS, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=TEXT_WIDTH,
    )


NAMED_CLASSES = 3  # what a caption says of a binary attribute: 0 not named, 1 named true, 2 named false


class TextToImage(torch.nn.Module):
    """The two modules trained together: the U-Net and its text encoder; with ``text_attribute_weight`` > 0 also a linear
    head (not exported) that reads, from the encoder's pooled output, what the caption says of each binary attribute."""

    def __init__(self, config, vocab_size: int):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        super().__init__()
        self.unet = UNet2DConditionModel(**unet_config(config))
        self.text_encoder = CLIPTextModel(text_config(vocab_size))
        if config.text_attribute_weight:
            self.attribute_head = torch.nn.Linear(TEXT_WIDTH, NAMED_CLASSES * len(captions.BINARY_PHRASES))

    def forward(self, latents, t, ids, with_attributes: bool = False):
        text = self.text_encoder(ids)
        eps = self.unet(latents, t, encoder_hidden_states=text.last_hidden_state).sample
        if not with_attributes:
            return eps
        return eps, self.attribute_head(text.pooler_output).view(len(ids), len(captions.BINARY_PHRASES), NAMED_CLASSES)


def named_classes(text: str) -> list[int]:
    """Per binary attribute (``captions.BINARY_PHRASES``' order), what ``text`` says of it: 0 not named, 1 true, 2 false."""
    phrases = set(text.split(", ")[1:])
    return [1 if true in phrases else 2 if false in phrases else 0 for true, false in captions.BINARY_PHRASES.values()]


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def sd_alphas() -> torch.Tensor:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod.float()


def _init_from_folder(config, vae_config, vae_path: Path, vocab_size: int) -> dict:
    """``--init``: a toysd pipeline folder (``toysd`` is the bundled one) to go on training. Its autoencoder becomes the
    run's finished first stage (``vae.pt``: the U-Net's latents must stay the ones it learnt); the U-Net and text
    encoder weights it returns start the second stage (the optimizer starts fresh, the EMA from the same weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    source = _toysd_folder("--init", config.init, ("unet", "text_encoder", "vae"))
    unet = UNet2DConditionModel.from_pretrained(str(source / "unet")).float()
    text_encoder = CLIPTextModel.from_pretrained(str(source / "text_encoder")).float()
    run_unet, run_text = unet_config(config), text_config(vocab_size)
    found = (list(unet.config.block_out_channels), unet.config.layers_per_block, text_encoder.config.vocab_size, text_encoder.config.hidden_size)
    expected = (list(run_unet["block_out_channels"]), run_unet["layers_per_block"], run_text.vocab_size, run_text.hidden_size)
    if found != expected:
        raise HspaceError(f"--init {config.init!r} has U-Net channels {found[0]}, {found[1]} layers per block, vocabulary {found[2]} and text width {found[3]}; "
                          f"the run builds {expected[0]}, {expected[1]}, {expected[2]} and {expected[3]} (--channels, --layers-per-block)")
    _vae_from_folder(source, vae_config, vae_path)
    return {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}}


def _toysd_folder(option: str, value: str, parts: tuple[str, ...]) -> Path:
    """The toysd pipeline folder ``value`` names ('toysd': the bundled one), checked to hold ``parts``."""
    from ..loading import BUNDLED_FOLDERS

    source = Path(BUNDLED_FOLDERS.get(value, value))
    missing = [part for part in parts if not (source / part / "config.json").is_file()]
    if missing:
        raise HspaceError(f"{option} {value!r} is not a toysd pipeline folder: it has no {', '.join(missing)} (use 'toysd' or a folder `hspace toyfaces export` wrote)")
    return source


def _vae_from_folder(source: Path, vae_config, vae_path: Path) -> None:
    """The folder's autoencoder written as the run's finished first stage (``vae.pt``), unless the run has one."""
    from diffusers import AutoencoderKL

    from .train import _atomic_save

    if vae_path.exists():
        return
    vae = AutoencoderKL.from_pretrained(str(source / "vae")).float()
    if dict(vae.config)["latent_channels"] != VAE_CONFIG["latent_channels"] or list(vae.config.block_out_channels) != VAE_CONFIG["block_out_channels"]:
        raise HspaceError(f"the autoencoder of {str(source)!r} has channels {list(vae.config.block_out_channels)} and {vae.config.latent_channels} latent channels; "
                          f"the run builds {VAE_CONFIG['block_out_channels']} and {VAE_CONFIG['latent_channels']}")
    weights = vae.state_dict()
    _atomic_save({"model": weights, "ema": weights, "optimizer": None, "generator": None, "step": vae_config.steps,
                  "config": asdict(vae_config)}, vae_path)


def _faces(config):
    """uint8 faces and their labels, seeds 0 .. pool-1."""
    from .quality import training_labels
    from .train import render_pool

    return render_pool(config.pool, config.size), training_labels(config.pool)


def train(run_dir: str | Path, config, callback: Callable[[dict], None] | None = None, device: str | torch.device = "cpu") -> Path:
    """Every stage (module doc) in ``run_dir``, each resumed where its checkpoint left it; returns the U-Net's checkpoint."""
    from .train import _check_resume, load_checkpoint

    device = torch.device(device)
    vae_source = _toysd_folder("--vae-init", config.vae_init, ("vae",)) if config.vae_init else None  # before any work
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = captions.write_tokenizer(run_dir / "tokenizer")
    vae_path, sd_path, decoder_path = run_dir / "vae.pt", run_dir / "checkpoint.pt", run_dir / "decoder.pt"
    vae_config = replace(config, steps=config.vae_steps)
    unet_init = None
    if config.init and not sd_path.exists():  # checked before any work; a resumed run has its own weights
        unet_init = _init_from_folder(config, vae_config, vae_path, len(tokenizer))
    if vae_source is not None:
        _vae_from_folder(vae_source, vae_config, vae_path)
    states = {path: load_checkpoint(path) if path.exists() else None for path in (vae_path, sd_path, decoder_path)}
    for path, state in states.items():  # the decoder's stage comes last: the earlier ones do not depend on its length
        saved = state and {**state, "config": {**state["config"], "decoder_steps": config.decoder_steps}}
        _check_resume(saved if path != decoder_path else state, config if path != decoder_path else _decoder_config(config), path)
    vae_state, sd_state, decoder_state = states.values()
    write_json(run_dir / "config.json", asdict(config))
    lengths = ((vae_state, config.vae_steps), (sd_state, config.steps), (decoder_state, config.decoder_steps))
    if all(length == 0 or (state is not None and state["step"] >= length) for state, length in lengths):
        return sd_path  # a finished run: nothing to render
    pool, labels = _faces(config)
    if vae_state is None or vae_state["step"] < config.vae_steps:
        _train_vae(vae_path, vae_config, vae_state, pool, callback, device)
    vae = build_vae()
    vae.load_state_dict(load_checkpoint(vae_path)["ema"])
    if sd_state is None or sd_state["step"] < config.steps:
        _train_unet(sd_path, config, sd_state, encode_pool(vae, pool, device), labels, tokenizer, callback, device, unet_init)
    if config.decoder_steps and (decoder_state is None or decoder_state["step"] < config.decoder_steps):
        _train_decoder(decoder_path, config, decoder_state, vae, pool, callback, device)
    return sd_path


def _loop(path: Path, config, state, build: Callable, step_fn: Callable, callback, device, stage: str, init: dict | None = None) -> None:
    """The shared training loop of a stage: the model (new, or ``init``'s weights), its EMA, AdamW, the CPU generator,
    atomic checkpoints."""
    from .train import _atomic_save, restore

    torch.manual_seed(config.seed)
    model, ema = build().to(device), build().to(device).requires_grad_(False)
    if init is not None:  # a pipeline folder's weights; a head of the run's own (not exported) starts fresh
        model.load_state_dict({**model.state_dict(), **init})
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator, step = torch.Generator().manual_seed(config.seed), 0
    if state is not None:
        step = restore(state, model, ema, optimizer, generator)
    model.train()
    while step < config.steps:
        loss = step_fn(model, ema, optimizer, generator, step)
        if not math.isfinite(loss):
            raise HspaceError(f"training diverged in the {stage} stage: the loss at step {step + 1} is {loss}; the last finite checkpoint, {path}, is kept. Resume with a lower --lr")
        step += 1
        if callback is not None:
            callback({"stage": stage, "step": step, "steps": config.steps, "loss": loss, "lr": optimizer.param_groups[0]["lr"]})
        if step % config.checkpoint_every == 0 or step == config.steps:
            _atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                          "generator": generator.get_state(), "step": step, "config": asdict(config)}, path)


def _train_vae(path: Path, config, state, pool: torch.Tensor, callback, device) -> None:
    from .train import _update

    def step_fn(model, ema, optimizer, generator, step):
        x = (pool[torch.randint(0, len(pool), (config.batch_size,), generator=generator)].float() / 127.5 - 1).to(device)
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        error = (model.decode(z).sample - x).abs() + VAE_KL_WEIGHT * posterior.kl().mean() / z[0].numel()
        return _update(model, ema, optimizer, error, None, config, step)

    _loop(path, config, state, build_vae, step_fn, callback, device, "vae")


DECODER_REGION_WEIGHTS = "mouth=4,eyes=1"  # the decoder's fine-tuning counts the small parts more (train.loss_weight_map)


def _decoder_config(config):
    """The decoder stage's own settings: its steps, a fifth of the learning rate, at most 50 warm-up steps."""
    return replace(config, steps=max(1, config.decoder_steps), lr=config.lr / 5, warmup=min(config.warmup, 50))


def _train_decoder(path: Path, config, state, vae, pool: torch.Tensor, callback, device) -> None:
    """The autoencoder's decoder fine-tuned alone (Stable Diffusion's ft-MSE decoder does the same): the encoder, and so the
    latents the U-Net was trained on, stay as they are; the L1 loss on the mouth and eyes counts more. ``decoder_steps``
    steps at a fifth of the learning rate."""
    from .train import _update, loss_weight_map

    stage_config = _decoder_config(config)
    weights = loss_weight_map(DECODER_REGION_WEIGHTS, VAE_CONFIG["sample_size"]).to(device)

    def step_fn(model, ema, optimizer, generator, step):
        x = (pool[torch.randint(0, len(pool), (config.batch_size,), generator=generator)].float() / 127.5 - 1).to(device)
        with torch.no_grad():
            z = model.encode(x).latent_dist.mean
        return _update(model, ema, optimizer, (model.decode(z).sample - x).abs(), weights, stage_config, step)

    _loop(path, stage_config, state, build_vae, step_fn, callback, device, "decoder", init=vae.state_dict())


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, device, batch_size: int = 500) -> torch.Tensor:
    """The posterior means of the faces, float32 [n, 4, 16, 16] (unscaled)."""
    vae = vae.to(device).eval()
    parts = [vae.encode((pool[i:i + batch_size].float() / 127.5 - 1).to(device)).latent_dist.mean.cpu() for i in range(0, len(pool), batch_size)]
    return torch.cat(parts)


def scaling_factor(latents: torch.Tensor) -> float:
    """SD's latent scale: 1 / the latents' standard deviation, so that the diffusion sees unit-variance latents."""
    return float(1.0 / latents.std())


def _train_unet(path: Path, config, state, latents: torch.Tensor, labels: dict, tokenizer, callback, device, init: dict | None = None) -> None:
    from .train import _update, loss_weight_map, timestep_weights

    scale, alphas = scaling_factor(latents), sd_alphas()
    t_weights = timestep_weights(alphas, config.v_weight_cap)  # 1: the plain epsilon loss
    # --region-weights at the latents' resolution: a latent cell counts as the image pixels under it
    region = loss_weight_map(config.region_weights, latents.shape[-1])
    region = None if region is None else region.to(device)
    names = captions.ORDER
    rows = [{n: labels[n][i] for n in names} for i in range(len(latents))]
    cache: dict[str, list[int]] = {}

    def ids_of(texts):
        for text in texts:
            if text not in cache:
                cache[text] = tokenizer(text, padding="max_length", max_length=captions.MAX_TOKENS, truncation=True).input_ids
        return torch.tensor([cache[t] for t in texts])

    def step_fn(model, ema, optimizer, generator, step):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        texts = [captions.caption(_typed(rows[i]), rng, drop=config.caption_drop) for i in index.tolist()]
        z0 = latents[index] * scale
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        named = config.text_attribute_weight > 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = model((a.sqrt() * z0 + (1 - a).sqrt() * noise).to(device), t.to(device), ids_of(texts).to(device), with_attributes=named)
        prediction, logits = out if named else (out, None)
        error = (prediction.float() - noise.to(device)) ** 2
        if config.v_weight_cap != 1:
            error = error * t_weights[t].view(-1, 1, 1, 1).to(device)
        extra = None
        if named:
            target = torch.tensor([named_classes(text) for text in texts], device=device)
            extra = config.text_attribute_weight * torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        return _update(model, ema, optimizer, error, region, config, step, extra=extra)

    _loop(path, config, state, lambda: TextToImage(config, len(tokenizer)), step_fn, callback, device, "unet", init=init)


def _typed(row: dict) -> dict:
    """Labels as the caption grammar reads them: binaries as bools."""
    return {k: bool(v) if k in captions.BINARY_PHRASES else float(v) for k, v in row.items()}


def export(run_dir: str | Path, folder: str | Path) -> Path:
    """The EMA weights of both stages in float16 as a StableDiffusionPipeline folder (module doc)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .train import TrainConfig, load_checkpoint, render_pool

    run_dir = Path(run_dir)
    for name in ("vae.pt", "checkpoint.pt"):
        if not (run_dir / name).is_file():
            raise HspaceError(f"{str(run_dir)!r} has no {name}: train it with `hspace toyfaces train --arch sd --run {run_dir}` first")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    config = TrainConfig(**state["config"])
    tokenizer = CLIPTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    vae = build_vae()  # the fine-tuned decoder where there is one (the encoder is the autoencoder stage's either way)
    vae.load_state_dict(load_checkpoint(run_dir / ("decoder.pt" if (run_dir / "decoder.pt").is_file() else "vae.pt"))["ema"])
    scale = scaling_factor(encode_pool(vae, render_pool(min(config.pool, 5000), config.size), "cpu"))
    vae.register_to_config(scaling_factor=scale)
    model = TextToImage(config, len(tokenizer))
    model.load_state_dict(state["ema"])
    pipe = StableDiffusionPipeline(
        unet=model.unet, text_encoder=model.text_encoder, vae=vae, tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    folder = Path(folder)
    with staged_folder(folder) as stage:
        pipe.save_pretrained(str(stage), safe_serialization=True)
        write_json(stage / "training.json", {"trained_steps": state["step"], "vae_steps": config.vae_steps,
                                             "decoder_steps": config.decoder_steps, "config": state["config"]})
    return folder


@torch.no_grad()
def autoencoder_agreement(vae, n: int = 2000, batch_size: int = 500) -> dict[str, float]:
    """Per binary attribute, the share of ``n`` faces (held-out seeds 100,000 on) whose classifier label survives the
    autoencoder's round trip (encode to the posterior mean, decode)."""
    from .classifier import classify
    from .render import BINARY, render_batch

    images = torch.from_numpy(render_batch(range(100_000, 100_000 + n), size=VAE_CONFIG["sample_size"])[0])
    parameter = next(vae.parameters())
    parts = [vae.decode(vae.encode(images[i:i + batch_size].to(parameter)).latent_dist.mean).sample.float().cpu().clamp(-1, 1)
             for i in range(0, len(images), batch_size)]
    before, after = classify(images), classify(torch.cat(parts))
    agreement = {name: float(((before[name] > 0.5) == (after[name] > 0.5)).float().mean()) for name in BINARY}
    agreement["mean_abs_error"] = float((torch.cat(parts) - images).abs().mean())
    return agreement
