"""Directions found on the full-precision toy U-Net, applied to the same U-Net stored in float8 (diffusers' layerwise
casting: float8_e4m3fn storage, float32 compute) and quantized int8 weight-only (torchao, where installed): the flip
rates at effect scale 1, side by side (issue 42, part 1).

Draws a bank of the bundled toy faces, finds regression directions for smile and hat, cards them (their effect unit,
on the float32 model), then edits the same held-out seeds with each direction at effect scale 1 on both models and
counts the flips with the one protocol (``card.flip_rate``: a sample that lacks the attribute and gains it). The
quantized models are other models (its fingerprint differs), so the direction is applied to it as a free direction, as
``check="architecture"`` does in steer.

    python benchmarks/bench_quantized.py [--bank 300] [--steps 10] [--card-n 48] [--n 96]
"""

import argparse
import copy

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=300)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--card-n", type=int, default=48)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--folder", default="/tmp/hspace-quantized-bank")
    args = p.parse_args()
    from diffusers import DDPMPipeline, DDPMScheduler

    from hspace import Engine
    from hspace.bank import build_bank
    from hspace.card import calibrated, card, present
    from hspace.directions.direction import Direction
    from hspace.directions.regression import regression_directions
    from hspace.directions.supervised import annotate_bank
    from hspace.reproduce.runner import share_interval
    from hspace.spec import FREE
    from hspace.toyfaces.classifier import classify

    full = Engine.load("toyfaces")
    bank = build_bank(args.folder, full, args.bank, args.steps, 1.0, progress=False)
    annotate_bank(bank)
    found = {d.name: d for d in regression_directions(bank, ["smile", "eyes_open", "glasses", "hat"])}
    directions = {name: calibrated(card(found[name], full, n=args.card_n, num_steps=args.steps, progress=False), found[name]) for name in ("smile", "hat")}
    unet = copy.deepcopy(full.unet)
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    scheduler = DDPMScheduler.from_config(full.scheduler_config)
    models = {"float32": full, "float8 storage": Engine.from_pipeline(DDPMPipeline(unet=unet, scheduler=scheduler), name="toyfaces-float8")}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        int8 = copy.deepcopy(full.unet)
        quantize_(int8, Int8WeightOnlyConfig())  # the linear layers (attention, time embedding); convolutions stay float32
        models["int8 weight-only (torchao)"] = Engine.from_pipeline(DDPMPipeline(unet=int8, scheduler=scheduler), name="toyfaces-int8")
    except ImportError:
        print("torchao is not installed: no int8 row")
    print(f"toy U-Net {sum(p.numel() for p in unet.parameters()):,} parameters; denoiser fingerprints: "
          + ", ".join(f"{label} {engine.spec.denoiser}" for label, engine in models.items()))
    seeds = list(range(900_000, 900_000 + args.n))
    print("| model | attribute | flips at effect 1 (of those lacking it) | 95% Wilson interval | unedited samples with it |")
    print("|---|---|---:|---:|---:|")
    for label, engine in models.items():
        held = engine.sample(seeds, args.steps, 1.0, progress=False)
        before = classify(held.images)
        for name, d in directions.items():
            free = Direction(d.delta, d.sigma, d.meta, d.spec if engine is full else FREE, d.timesteps)
            after = classify(engine.edit(held, [free], [1.0], units="effect", progress=False).images[0, 0])
            lacking = ~present(before[name])
            k = int((present(after[name]) & lacking).sum())
            low, high = share_interval(k, int(lacking.sum()))
            print(f"| {label} | {name} | {k / max(1, int(lacking.sum())):.0%} ({k}/{int(lacking.sum())}) | {low:.0%} to {high:.0%} | "
                  f"{float(present(before[name]).double().mean()):.0%} |")


if __name__ == "__main__":
    main()
