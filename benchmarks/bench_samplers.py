"""The toy smile and hat directions under each of diffusers' samplers, steered into the user's own pipeline.

Directions: regression smile and hat from a bank of --bank toy faces drawn with hspace's own DDIM loop, carded
there (``card``: effect scale 1 is the raw scale that flips half of the samples lacking the attribute under DDIM).
Each sampler of ``hspace.steering.SAMPLERS`` (and the Karras variants) then draws --n held-out faces with the toy faces'
U-Net (of a ``DDPMPipeline``, steer's handle) in that scheduler's loop, --steps steps, plain and with ``hspace.steer(pipe, d, 1, units="effect")``;
same seeds, so the stochastic samplers draw the same noise in both. Printed per sampler and direction: the flip rate
(the share of the faces lacking the attribute that have it when steered) with a 95% Wilson interval, and the largest
mean change of another binary attribute's probability (a side effect).

``--resize PX`` also steers at another image size (PX x PX; the directions resized bilinear on h's grid,
``resize=True``) under DDIM, its images downsampled to the model's 32 px for the classifier, and prints the same row.

    python benchmarks/bench_samplers.py [--bank 300] [--n 128] [--steps 20] [--card-n 48] [--resize 48]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from common import toyfaces_pipeline


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def directions(bank_size: int, card_n: int, steps: int):
    from hspace.bank import build_bank
    from hspace.card import card
    from hspace.directions.regression import regression_directions
    from hspace.directions.supervised import annotate_bank
    from hspace.engine import Engine

    engine = Engine.load("toyfaces")
    with tempfile.TemporaryDirectory() as folder:
        bank = build_bank(folder, engine, bank_size, steps, 0.0, progress=False)
        annotate_bank(bank)
        found = {d.name: d for d in regression_directions(bank, ["smile", "eyes_open", "glasses", "hat", "hair_color"])}
    chosen = {}
    for name in ("smile", "hat"):
        d = found[name]
        d.meta["calibration"] = card(d, engine, n=card_n, num_steps=steps, progress=False).calibration
        chosen[name] = d
    return chosen


def flip_row(before: dict, after: dict, attribute: str, binary) -> tuple[int, int, str, float]:
    lacking = before[attribute] <= 0.5
    flipped = int((after[attribute][lacking] > 0.5).sum())
    side = {a: float((after[a] - before[a]).mean()) for a in binary if a != attribute}
    worst = max(side, key=lambda a: abs(side[a]))
    return flipped, int(lacking.sum()), worst, side[worst]


def loop(unet, scheduler, n: int, steps: int, size: int, seed: int = 700_000) -> torch.Tensor:
    """n faces [-1, 1] in the scheduler's own loop around the U-Net (``scale_model_input`` for the sigma-based
    samplers, which DDPMPipeline leaves out); one generator for x_T and every step's noise, so the plain and steered
    draws of a stochastic sampler share their noise."""
    import inspect

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, unet.config.in_channels, size, size), generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **extra).prev_sample
    return x.clamp(-1, 1)


def main() -> int:
    import hspace
    from hspace.steering import KARRAS, SAMPLERS
    from hspace.toyfaces.classifier import classify
    from hspace.toyfaces.render import BINARY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=300)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--card-n", type=int, default=48)
    parser.add_argument("--resize", type=int, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    found = directions(args.bank, args.card_n, args.steps)
    units = ", ".join(f"{k} {d.meta['calibration']['scale']:.3f}" for k, d in found.items())
    print(f"directions: regression on a {args.bank}-sample DDIM bank, carded at {args.steps} steps on {args.card_n} samples "
          f"({time.perf_counter() - start:.0f} s); effect scale 1 = raw {units}")
    engine, pipe = toyfaces_pipeline("DDIMScheduler")  # the user's pipeline; its U-Net is run in each scheduler's loop
    native = pipe.unet.config.sample_size
    runs = [(s, False) for s in SAMPLERS] + [(s, True) for s in KARRAS]
    if args.resize:
        runs.append(("ddim", args.resize))
    print(f"\n{args.n} held-out faces per sampler, {args.steps} steps, steered at effect scale 1 (hspace.steer, units='effect')\n")
    print("| sampler | direction | flip rate | 95% interval | lacking | largest side effect |")
    print("|---|---|---|---|---|---|")
    for sampler, option in runs:
        size = option if isinstance(option, int) and not isinstance(option, bool) else None
        pipe.scheduler = hspace.steering.scheduler_for(sampler, engine.scheduler_config, karras=option is True)

        def draw() -> dict:
            images = loop(pipe.unet, pipe.scheduler, args.n, args.steps, size or native)
            if size:
                images = F.interpolate(images, size=(native, native), mode="bilinear", antialias=True, align_corners=False)
            return classify(images)

        before = draw()
        label = sampler + (" karras" if option is True else f" at {size} px (resize=True)" if size else "")
        for name, d in found.items():
            with hspace.steer(pipe, d, 1.0, units="effect", resize=bool(size)):
                after = draw()
            k, n, worst, change = flip_row(before, after, name, BINARY)
            lo, hi = wilson(k, n)
            print(f"| {label} | {name} | {100 * k / max(n, 1):.0f}% | {100 * lo:.0f}-{100 * hi:.0f}% | {n} | {worst} {change:+.2f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
