"""Peak memory of hspace sampling against the diffusers pipeline's own call, on FLUX- and SD3.5-shaped transformers
scaled down to run on this CPU, under each storage option (issue 42, part 4; goal: hspace within 1.1x of the pipeline).

Each row is two fresh processes (``common.child_json``) that build the same pipeline (tests/tiny_transformers.py's text
encoders, VAE and scheduler; the transformer at the real models' head size and width ratio, fewer blocks), apply the
option, and measure the largest resident memory over the process's own just before (sampled every millisecond,
``bench_transformer_memory.PeakSampler``): one the pipeline's call, the other ``Engine.from_pipeline`` plus
``Engine.sample`` with h recorded at the default location (what hspace adds: its loop, its hook, h of every step), the
same prompt, size, steps and guidance. The weights' resident size is reported beside (built before the baseline).

Options: float32 as built; float8 storage (diffusers' layerwise casting, float32 compute); int8 weight-only (torchao);
GGUF Q8_0 (FLUX: the transformer written with the ``gguf`` package and loaded by diffusers' ``from_single_file``).

    python benchmarks/bench_big_models.py [--steps 3] [--size 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    # FLUX.1-dev: head 128, 24 heads (3072 wide), 19 double + 38 single blocks; here 12 heads (1536), 1 + 2 blocks
    "FLUX-shaped": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=12,
                        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=True),
    # SD3.5-medium: head 64, 24 heads (1536 wide), 24 blocks; here 24 heads, 2 blocks
    "SD3.5-shaped": dict(sample_size=64, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=24,
                         caption_projection_dim=1536, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
}
OPTIONS = ("float32", "float8 storage", "int8 weight-only", "GGUF Q8_0")
GUIDANCE = {"FLUX-shaped": 3.5, "SD3.5-shaped": 5.0}

CHILD = r"""
import json, sys, tempfile
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/../tests"]
import torch
from bench_big_models import prepare, run
print(json.dumps(run(*prepare(sys.argv[2], sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
"""


def prepare(model: str, option: str):
    """The pipeline of ``model`` with ``option`` applied, and its resident weights (bytes)."""
    import psutil
    import torch

    import tiny_transformers
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    process = psutil.Process()
    torch.manual_seed(0)
    pipe = tiny_transformers.flux_pipeline() if model.startswith("FLUX") else tiny_transformers.sd3_pipeline()
    before = process.memory_info().rss
    cls = FluxTransformer2DModel if model.startswith("FLUX") else SD3Transformer2DModel
    pipe.transformer = cls(**MODELS[model]).eval().requires_grad_(False)
    if option == "float8 storage":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    elif option == "int8 weight-only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(pipe.transformer, Int8WeightOnlyConfig())
    elif option == "GGUF Q8_0":
        pipe.transformer = _gguf(pipe)
    import gc

    gc.collect()
    pipe.set_progress_bar_config(disable=True)
    return model, pipe, process.memory_info().rss - before


def _gguf(pipe):
    """The pipeline's transformer through a Q8_0 GGUF file (2-D weights of whole blocks quantized, the rest float32)."""
    import tempfile

    import gguf
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    import tiny_transformers

    folder = Path(tempfile.mkdtemp())
    pipe.transformer.save_config(folder / "transformer")
    tiny_transformers.write_gguf(pipe.transformer, folder / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    del pipe.transformer
    return FluxTransformer2DModel.from_single_file(str(folder / "q8.gguf"), config=str(folder), subfolder="transformer", torch_dtype=torch.float32,
                                                   quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


def run(model: str, pipe, weights: int, runner: str, steps: int, size: int) -> dict:
    """Peak resident memory over the baseline of one sample by ``runner`` ("pipeline" or "hspace")."""
    import torch

    from bench_transformer_memory import PeakSampler

    options = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE[model], output_type="pt")
    with torch.no_grad(), PeakSampler() as sampler:
        if runner == "pipeline":
            pipe("a cat", generator=torch.Generator().manual_seed(0), **options)
        else:
            from hspace import Engine

            engine = Engine.from_pipeline(pipe, prompt="a cat", guidance=GUIDANCE[model], height=size, width=size)
            trajectory = engine.sample([0], steps, 0.0, progress=False)
    out = {"peak": sampler.extra, "weights": weights}
    if runner == "hspace":
        out.update(h=list(trajectory.h.shape[2:]), h_bytes=trajectory.h.numel() * trajectory.h.element_size())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=128, help="image size in px (default 128: 1024 image tokens for the FLUX shape)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--options", nargs="+", default=list(OPTIONS))
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from common import child_json

    mib = 2**20
    print(f"{args.steps} steps at {args.size} px, one sample; peak resident memory over the process's own before the call (MiB)\n")
    print("| model | option | weights resident | pipeline's call | hspace: from_pipeline + sample (h recorded) | ratio | h recorded |")
    print("|---|---|---:|---:|---:|---:|---|")
    for model in args.models:
        for option in args.options:
            if option == "GGUF Q8_0" and not model.startswith("FLUX"):
                continue
            runs = {runner: child_json(CHILD, HERE, model, option, runner, args.steps, args.size) for runner in ("pipeline", "hspace")}
            pipe, ours = runs["pipeline"], runs["hspace"]
            print(f"| {model} | {option} | {pipe['weights'] / mib:,.0f} | {pipe['peak'] / mib:,.0f} | {ours['peak'] / mib:,.0f} | "
                  f"{ours['peak'] / max(pipe['peak'], 1):.2f}x | {'x'.join(map(str, ours['h']))} x {args.steps} steps, "
                  f"{ours['h_bytes'] / mib:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
