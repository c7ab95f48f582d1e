"""Every heavy path against the device's FLOP peak, measured in one run.

- peak: a large float32 matmul (GFLOP/s), measured here;
- FLOPs per U-Net sample-pass (torch's FlopCounterMode), and per Jacobian vector-iteration (a JVP and a
  VJP of the decoder half, counted the same way);
- measured passes per second of sampling with h recorded, a batched edit, bank drawing, DDPM
  inversion and one Jacobian vector-iteration; each as a share of the peak, and as a ratio to a plain
  batch-1 diffusers loop (how research code runs);
- variants of the U-Net's memory format and precision (channels_last, bfloat16 autocast) on sampling.

    python benchmarks/bench_peak.py [--model toyfaces|tiny|celebahq] [--batch 32] [--steps 10] [--device cuda]
"""

import argparse
import contextlib
import tempfile
import time

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from common import make_engine, sync


def peak_gflops(device, seconds: float = 3.0) -> float:
    n = 4096 if torch.device(device).type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def engine_of(name: str, device):
    if name == "toyfaces":
        from hspace.engine import Engine

        return Engine.load("toyfaces", device=device)
    return make_engine(name, device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toyfaces", choices=["toyfaces", "tiny", "celebahq"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--k", type=int, default=8, help="vectors of the Jacobian iteration")
    args = p.parse_args()
    from hspace.bank import build_bank
    from hspace.directions.jacobian import JacobianProducts
    from hspace.inversion import invert

    engine = engine_of(args.model, args.device)
    device, B, S = engine.device, args.batch, args.steps
    peak = peak_gflops(device)
    x1 = torch.randn(1, *engine.sample_shape, device=device)
    per_pass = flops(lambda: engine.model.output(x1, 500)) / 1e9  # GFLOP per sample-pass
    seeds = list(range(B))
    trajectory = engine.sample(seeds, S, 1.0, progress=False)
    direction = trajectory[[0]].h[0] - trajectory[[1]].h[0]
    from hspace.directions.direction import Direction

    d = Direction(direction, meta={"name": "d"}, spec=engine.spec)
    scales = [float(s) for s in torch.linspace(-2, 2, B)]
    images = trajectory.images[: min(8, B)]
    folder = tempfile.mkdtemp()

    config = {k: v for k, v in engine.scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)

    def plain_batch1():  # research code: one sample at a time, a diffusers scheduler
        scheduler.set_timesteps(S)
        generator = torch.Generator().manual_seed(0)
        x = x1
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(engine.unet(x, t).sample, t, x, eta=1.0, generator=generator).prev_sample

    bank_count = [0]

    def bank():
        bank_count[0] += 1
        build_bank(f"{folder}/bank{bank_count[0]}", engine, B, S, 1.0, shard_size=B, batch_size=B, progress=False)

    paths = {
        "sampling (h recorded)": (lambda: engine.sample(seeds, S, 1.0, batch_size=B, progress=False), B * S),
        "edit (1 sample x B scales)": (lambda: engine.edit(trajectory[[0]], [d], scales, batch_size=B, progress=False), B * S),
        "bank drawing": (bank, B * S),
        "DDPM inversion (8 images)": (lambda: invert(engine, images, S, 1.0, batch_size=B, progress=False), None),
    }
    inversion_passes = [0]

    def count(event):
        inversion_passes[0] = event.total

    invert(engine, images, S, 1.0, batch_size=B, progress=False, callback=count)
    paths["DDPM inversion (8 images)"] = (paths["DDPM inversion (8 images)"][0], inversion_passes[0])

    plain = timed(plain_batch1, device)
    plain_rate = S / plain
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads): peak {peak:.1f} GFLOP/s (float32 matmul); "
          f"U-Net {per_pass:.3f} GFLOP per sample-pass; batch {B}, {S} steps")
    print("| path | sample-passes/s | GFLOP/s | share of peak | ratio to a plain batch-1 loop |")
    print("|---|---|---|---|---|")
    print(f"| plain diffusers loop, batch 1 | {plain_rate:.1f} | {plain_rate * per_pass:.1f} | {plain_rate * per_pass / peak:.0%} | 1.00 |")
    for name, (fn, passes) in paths.items():
        rate = passes / timed(fn, device)
        print(f"| {name} | {rate:.1f} | {rate * per_pass:.1f} | {rate * per_pass / peak:.0%} | {rate / plain_rate:.2f} |")

    # one Jacobian vector-iteration: J V and J^T U for k vectors on the decoder half
    half = engine.decoder_half(engine.x_t(trajectory[[0]], S // 2), int(engine.schedule(S).timesteps[S // 2]))
    with half.forward_mode():
        products = JacobianProducts(half, half.h[0])
        V = torch.randn(args.k, *half.h.shape[1:], device=device)
        U = torch.randn(args.k, *products.out_shape, device=device)
        iteration = lambda: (products.jvp(V), products.vjp(U))  # noqa: E731
        iteration_flops = flops(iteration) / 1e9
        seconds = timed(iteration, device)
        decoder = lambda: half(half.h.expand(args.k, *half.h.shape[1:]))  # noqa: E731
        with torch.no_grad():
            decoder_seconds = timed(decoder, device)
        decoder_flops = flops(lambda: torch.no_grad()(decoder)()) / 1e9
    print(f"| Jacobian vector-iteration, k={args.k} | {iteration_flops:.2f} GFLOP, {seconds * 1e3:.1f} ms | "
          f"{iteration_flops / seconds:.1f} | {iteration_flops / seconds / peak:.0%} | "
          f"{seconds / (3 * decoder_seconds):.2f}x the time of 3 decoder-half passes ({3 * decoder_flops:.2f} GFLOP) |")

    # memory format and precision variants, on sampling
    print("\n| sampling variant | sample-passes/s | share of peak (float32 FLOPs) | max abs diff of x_0 to float32 |")
    print("|---|---|---|---|")
    reference = engine.sample(seeds, S, 1.0, batch_size=B, progress=False).x0
    variants = {"float32 (default)": contextlib.nullcontext, "bfloat16 autocast": lambda: torch.autocast(torch.device(device).type, torch.bfloat16)}
    for name, context in variants.items():
        def run():
            with context():
                return engine.sample(seeds, S, 1.0, batch_size=B, progress=False)
        rate = B * S / timed(run, device)
        print(f"| {name} | {rate:.1f} | {rate * per_pass / peak:.0%} | {float((run().x0 - reference).abs().max()):.2g} |")
    engine.unet.to(memory_format=torch.channels_last)
    rate = B * S / timed(lambda: engine.sample(seeds, S, 1.0, batch_size=B, progress=False), device)
    diff = float((engine.sample(seeds, S, 1.0, batch_size=B, progress=False).x0 - reference).abs().max())
    print(f"| channels_last | {rate:.1f} | {rate * per_pass / peak:.0%} | {diff:.2g} |")


if __name__ == "__main__":
    main()
