"""Peak memory of one guided U-Net pass of a Stable Diffusion 1.5-shaped U-Net (random weights, 512 px:
64x64 latents, h 1280x8x8) with h recorded, per batch size; and what h costs per sample.

Each batch size runs in a fresh process and reports its peak resident memory (CPU) or the CUDA
allocator's peak (GPU), against the same process after the model is built (the baseline in the
same run). Usage: python benchmarks/bench_sd_memory.py [--device cuda] [--dtype float16] [--batch 1 2 4]

``--vae`` measures the decode of the SD/SDXL-shaped VAE (random weights) instead: a batch decoded at once, one image
per call (``--vae-slicing``: hspace splits the batch into single images) and in tiles (``--vae-tiling``: the VAE's
``enable_tiling``), each in a fresh process: ``--vae --batch 4 --size 512`` (SD 1.5), ``--size 1024`` (SDXL).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def one(batch: int, device: str, dtype: str, sdxl: bool = False) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from hspace.hooks import h_hook

    torch.manual_seed(0)
    config = SDXL_UNET if sdxl else SD15_UNET
    unet = UNet2DConditionModel(**config).to(device, getattr(torch, dtype)).eval().requires_grad_(False)
    side = config["sample_size"]
    x = torch.randn(2 * batch, 4, side, side, device=device, dtype=unet.dtype)  # conditional + unconditional rows
    text = torch.randn(2 * batch, 77, config["cross_attention_dim"], device=device, dtype=unet.dtype)
    extra = {}
    if sdxl:  # the pooled text embedding and the size/crop time ids
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * batch, 1280, device=device, dtype=unet.dtype),
                                      "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2 * batch, device=device, dtype=unet.dtype)}
    kept = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad(), h_hook(unet, "mid.out", lambda h: kept.append(h.float().cpu()) or h):
        unet(x, torch.tensor(500, device=device), encoder_hidden_states=text, **extra)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {"batch": batch, "rows": 2 * batch, "weights_gib": params / 2**30, "after_model_gib": base / 2**30,
            "peak_gib": peak / 2**30, "pass_gib": (peak - base) / 2**30, "seconds": seconds, "h_shape": list(kept[0].shape[1:])}


SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)


def one_vae(batch: int, size: int, mode: str, device: str, dtype: str) -> dict:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).to(device, getattr(torch, dtype)).eval().requires_grad_(False)
    if mode == "tiling":
        vae.enable_tiling()
    z = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=vae.dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        parts = z.split(1) if mode == "slicing" else [z]  # what hspace's decode does with vae_slicing
        images = torch.cat([vae.decode(p).sample.float().cpu() for p in parts])
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batch": batch, "size": size, "mode": mode, "after_model_gib": base / 2**30, "peak_gib": peak / 2**30,
            "decode_gib": (peak - base) / 2**30, "seconds": seconds, "shape": list(images.shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vae", action="store_true", help="measure the VAE's decode: at once, sliced, tiled")
    p.add_argument("--sdxl", action="store_true", help="an SDXL-shaped U-Net (1024 px: 128x128 latents, h 1280x32x32) instead of SD 1.5's")
    p.add_argument("--size", type=int, default=512, help="with --vae: the image size (512: SD 1.5, 1024: SDXL)")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vae:
        if args.one is not None:
            print(json.dumps(one_vae(args.one, args.size, args.mode, args.device, args.dtype)))
            return
        print(f"SD-shaped VAE (random weights), {args.size} px, {args.device}, {args.dtype}: the decode's peak memory beyond the model")
        print("| batch | decode | peak GiB | of it the decode | seconds |")
        print("|---|---|---|---|---|")
        for b in args.batch:
            for mode in ("batched", "slicing", "tiling"):
                out = subprocess.run([sys.executable, __file__, "--vae", "--one", str(b), "--mode", mode, "--size", str(args.size),
                                      "--device", args.device, "--dtype", args.dtype], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {b} | {mode} | {r['peak_gib']:.2f} | {r['decode_gib']:.2f} | {r['seconds']:.1f} |", flush=True)
        return
    if args.one is not None:
        print(json.dumps(one(args.one, args.device, args.dtype, args.sdxl)))
        return
    rows = []
    for b in args.batch:
        out = subprocess.run([sys.executable, __file__, "--one", str(b), "--device", args.device, "--dtype", args.dtype] + (["--sdxl"] if args.sdxl else []),
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    h = rows[0]["h_shape"]
    per_step = 4 * h[0] * h[1] * h[2]
    print(f"{'SDXL' if args.sdxl else 'SD 1.5'}-shaped U-Net, {args.device}, {args.dtype}: weights {rows[0]['weights_gib']:.2f} GiB; h {h} = {per_step / 2**10:.0f} KiB "
          f"per sample and step in float32 (50 steps: {50 * per_step / 2**20:.1f} MiB in RAM, half that in a bank on disk)")
    print("| batch (rows under guidance) | peak GiB | of it the pass | pass s | ratio of pass memory to batch 1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} ({r['rows']}) | {r['peak_gib']:.2f} | {r['pass_gib']:.2f} | {r['seconds']:.1f} | {r['pass_gib'] / max(rows[0]['pass_gib'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
