"""Tiny diffusion-transformer pipelines built from small configs (as diffusers' own pipeline tests build
their dummy components), saved as pipeline folders; no download: DiT (class labels, DDIM) and SD3 (two
CLIP text encoders without T5, flow matching). The tokenizers are tiny_sd's single-letter vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_sd import LETTERS, _text_encoder, tokenizer


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **extra,
    )


def dit_pipeline(folder: Path | None = None, seed: int = 0, layers: int = 4):
    """A tiny DiTPipeline: 16x16x4 latents, patch 2 (64 tokens), ``layers`` blocks, learned variance, DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=layers, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000,
    )
    # adaLN-Zero starts at zero: give the modulations weights so that every block acts
    with torch.no_grad():
        for p in transformer.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_vae().eval(), scheduler=DDIMScheduler(clip_sample=False), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def sd3_pipeline(folder: Path | None = None, seed: int = 0, layers: int = 3, **scheduler_options):
    """A tiny StableDiffusion3Pipeline without T5: 16x16x4 latents, patch 2, ``layers`` joint blocks,
    FlowMatchEulerDiscreteScheduler (shift 3 as SD3's own config, unless ``scheduler_options`` say otherwise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    vocab = Path(folder or "/tmp") / "_vocab"
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler_options}),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=_text_encoder(projection=True),
        text_encoder_2=_text_encoder(projection=True), text_encoder_3=None, tokenizer=tokenizer(vocab),
        tokenizer_2=tokenizer(vocab), tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def t5_tokenizer(folder: Path, max_length: int = 32):
    """A T5 tokenizer from a tiny ``tokenizers`` unigram model: one piece per letter, with and without the
    word-start mark, as T5's SentencePiece vocabulary spells them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in LETTERS] + [("\u2581" + c, -2.5) for c in LETTERS]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                                model_max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    return tokenizer


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(LETTERS) * 2 + 4, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def pixart_pipeline(folder: Path | None = None, seed: int = 0, layers: int = 3):
    """A tiny PixArtAlphaPipeline: 16x16x4 latents, patch 2, ``layers`` blocks, T5 text, learned variance, DDIM."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=layers, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    with torch.no_grad():  # adaLN-single's modulation starts at zero: give it weights so that every block acts
        for p in transformer.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
    pipe = PixArtAlphaPipeline(transformer=transformer, vae=_vae().eval(), scheduler=DDIMScheduler(clip_sample=False),
                               text_encoder=_t5_encoder(), tokenizer=t5_tokenizer(Path(folder or "/tmp") / "_t5"))
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def flux_pipeline(folder: Path | None = None, seed: int = 0, guidance_embeds: bool = True):
    """A tiny FluxPipeline: 128x128x4 latents (its default 1024-px size through this 2x VAE: 256 px), packed
    2x2 into 4096 tokens, one double-stream and one single-stream block, CLIP + T5 text, the dynamic shift
    of FLUX.1-dev's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    folder_or_tmp = Path(folder or "/tmp")
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611).eval(), text_encoder=_text_encoder().eval(),
        tokenizer=tokenizer(folder_or_tmp / "_vocab"), text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer(folder_or_tmp / "_t5"),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def write_gguf(transformer, path, qtype):
    """``transformer``'s weights as a GGUF checkpoint at ``path`` (diffusers' key names): 2-D weights whose rows fill whole
    blocks quantized to ``qtype`` (a ``gguf.GGMLQuantizationType``), the rest float32."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, tensor in transformer.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
