"""Memory of FLUX.1-dev- and SD3.5-medium-shaped transformers (random weights): weights, one pass's peak
with h recorded, and the size of h per bank sample; with an SD 1.5 U-Net's h per sample as the baseline.

- Weights: the full model built on the meta device (no memory), its parameters counted, priced in bfloat16.
- One pass: a model of the same width and image size with one block of each kind (blocks run one after
  another, so a pass's transient memory is one block's), built in a fresh process in float32 on the CPU;
  its peak resident memory (sampled every ms) over the same process's just before the pass (the baseline in the
  same run).
  CPU attention materialises the N x N matrix (the math kernel); CUDA's flash kernels do not, so on a GPU the
  transient is smaller: an upper bound.
- h per bank sample: D x (H/p)(W/p) per step, float16 on disk, 28 steps (the pipelines' default).

    python benchmarks/bench_transformer_memory.py [--size 1024] [--steps 28]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                   joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
MODELS = {"FLUX.1-dev": ("FluxTransformer2DModel", FLUX_DEV, 512), "SD3.5-medium": ("SD3Transformer2DModel", SD35_MEDIUM, 333)}
SD15_H = (1280, 8, 8)  # the baseline: an SD 1.5 U-Net's h per step at 512 px


def build(name: str, shallow: bool):
    import diffusers
    import torch

    cls_name, config, _ = MODELS[name]
    config = dict(config)
    if shallow:  # one block of each kind, the same width
        config.update(num_layers=1, **({"num_single_layers": 1} if "num_single_layers" in config else {"dual_attention_layers": ()}))
    with torch.device("meta") if not shallow else torch.device("cpu"):
        return getattr(diffusers, cls_name)(**config).eval().requires_grad_(False)


def one_pass(name: str, size: int) -> dict:
    """In this process: the shallow model, one pass at ``size`` px with h recorded, peak over baseline."""
    import torch

    torch.manual_seed(0)
    model = build(name, shallow=True)
    _, config, text_tokens = MODELS[name]
    latent = size // 8
    sampler = PeakSampler()
    kept = []
    with torch.no_grad(), sampler:
        if name.startswith("FLUX"):
            tokens = (latent // 2) ** 2
            ids = torch.zeros(tokens, 3)
            block = model.single_transformer_blocks[0]
            block.register_forward_hook(lambda m, a, out: kept.append(out[1].shape))
            model(hidden_states=torch.randn(1, tokens, 64), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  pooled_projections=torch.randn(1, 768), encoder_hidden_states=torch.randn(1, text_tokens, 4096),
                  txt_ids=torch.zeros(text_tokens, 3), img_ids=ids)
            rows = 1
        else:
            block = model.transformer_blocks[0]
            block.register_forward_hook(lambda m, a, out: kept.append(out[1].shape))
            model(hidden_states=torch.randn(2, 16, latent, latent), timestep=torch.tensor([500.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, text_tokens, 4096), pooled_projections=torch.randn(2, 2048))
            rows = 2  # guided: both passes in one batch
    return {"rows": rows, "pass_gib": sampler.extra / 2**30, "h_tokens_shape": list(kept[0])}


class PeakSampler:
    """The largest resident memory over the one at entry, sampled every millisecond in a thread (the
    high-water mark of the process would include building the model)."""

    def __enter__(self):
        import gc
        import threading

        import psutil

        gc.collect()
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.extra = self.peak - self.base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="image size in px (default 1024)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one_pass(args.one, args.size)))
        return
    baseline = SD15_H[0] * SD15_H[1] * SD15_H[2] * 50 * 2  # bytes of h per SD 1.5 sample, 50 steps, float16
    print(f"baseline: an SD 1.5 U-Net's h per bank sample (1280x8x8, 50 steps, float16) = {baseline / 2**20:.1f} MiB")
    print("| model | parameters | weights (bfloat16) | one pass, float32 CPU (upper bound) | h per step | h per bank sample "
          f"({args.steps} steps, float16) | vs SD 1.5 |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        params = sum(t.numel() for t in build(name, shallow=False).parameters())
        out = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(args.size)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        _, tokens, width = measured["h_tokens_shape"]
        side = int(round(tokens**0.5))
        h_bytes = width * tokens * args.steps * 2
        print(f"| {name} | {params / 1e9:.2f} B | {params * 2 / 2**30:.1f} GiB | {measured['pass_gib']:.2f} GiB ({measured['rows']} row(s)) | "
              f"{width}x{side}x{side} | {h_bytes / 2**20:.0f} MiB | {h_bytes / baseline:.0f}x |")


if __name__ == "__main__":
    main()
