"""Overhead of hspace.steer on a plain pipeline call: the bundled toy faces as a DDPMPipeline under DDIM, batch 16,
20 steps, unhooked and steered calls alternating in one run (the issue's target: at most 1.05x).

    python benchmarks/bench_steer.py [--batch 16] [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import toyfaces_pipeline


def main() -> int:
    import hspace
    from hspace import Direction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine, pipe = toyfaces_pipeline("DDIMScheduler")
    delta = torch.randn(50, *engine.h_shape, generator=torch.Generator().manual_seed(0))
    direction = Direction(delta, meta={"name": "random"}, spec=engine.spec, timesteps=engine.schedule(50).timesteps)

    def call():
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(batch_size=args.batch, generator=torch.Generator().manual_seed(0), num_inference_steps=args.steps, output_type="np")
        return time.perf_counter() - start

    call()  # warm-up
    plain, steered = [], []
    for _ in range(args.repeats):
        plain.append(call())
        with hspace.steer(pipe, direction, 1.0):
            steered.append(call())
    a, b = statistics.median(plain), statistics.median(steered)
    print(f"toy faces, DDPMPipeline + DDIM, batch {args.batch}, {args.steps} steps, median of {args.repeats} (threads {torch.get_num_threads()})")
    print(f"unhooked {a:.3f} s, steered {b:.3f} s: {b / a:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
