"""Tiny Stable Diffusion and SDXL pipelines built from small configs (as diffusers' own pipeline tests
build their dummy components), saved as pipeline folders; no download. The tokenizer has a vocabulary
of single letters (written here), since diffusers' tests fetch theirs from the hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer(folder: Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_encoder(projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=52, eos_token_id=53, pad_token_id=53, hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=54, max_position_embeddings=16, projection_dim=32,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=32,
    )


def scheduler(prediction_type: str = "epsilon", timestep_spacing: str = "leading"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
    )


def sd_pipeline(folder: Path | None = None, seed: int = 0, **scheduler_options):
    """A tiny StableDiffusionPipeline (16x16 latents, 32 px images); saved to ``folder`` when given."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler(**scheduler_options), vae=_vae(), text_encoder=_text_encoder(),
        tokenizer=tokenizer(Path(folder or "/tmp") / "_vocab"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def sdxl_pipeline(folder: Path | None = None, seed: int = 0, **scheduler_options):
    """A tiny StableDiffusionXLPipeline (two text encoders, added text/time conditioning)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=4,
    )
    vocab = Path(folder or "/tmp") / "_vocab"
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler(**scheduler_options), vae=_vae(), text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder(projection=True), tokenizer=tokenizer(vocab), tokenizer_2=tokenizer(vocab),
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe
