"""Every heavy path against the device's FLOP peak, measured in one run.

- peak: a large float32 matmul (GFLOP/s), measured here;
- FLOPs per U-Net sample-pass (torch's FlopCounterMode), and per Jacobian vector-iteration (a JVP and a
  VJP of the decoder half, counted the same way);
- measured passes per second of sampling with h recorded, a batched edit, bank drawing, DDPM
  inversion and one Jacobian vector-iteration; each as a share of the peak, and as a ratio to a plain
  batch-1 diffusers loop (how research code runs);
- the same table with the engine's speed options that keep results within 1e-4, channels_last +
  torch.compile (skipped with ``--no-fast``; the first call of each shape compiles and is not timed);
- every speed option alone on sampling, with its difference to the default (hspace.speed);
- sampling throughput against the batch size (``--batches``), the evidence for ``--batch-size auto``'s cap.

    python benchmarks/bench_peak.py [--model toyfaces|tiny|celebahq] [--batch 32] [--steps 10] [--device cuda]
"""

import argparse
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


def engine_of(name: str, device, speed=None):
    if name == "toyfaces":
        from hspace.engine import Engine

        return Engine.load("toyfaces", device=device, speed=speed)
    return make_engine(name, device, speed)


def paths_of(engine, B: int, S: int) -> dict:
    """The heavy paths, each a (function, sample-passes it runs)."""
    from hspace.bank import build_bank
    from hspace.directions.direction import Direction
    from hspace.inversion import invert

    seeds = list(range(B))
    trajectory = engine.sample(seeds, S, 1.0, progress=False)
    d = Direction(trajectory[[0]].h[0] - trajectory[[1]].h[0], meta={"name": "d"}, spec=engine.spec)
    scales = [float(s) for s in torch.linspace(-2, 2, B)]
    images = trajectory.images[: min(8, B)]
    folder = tempfile.mkdtemp()
    bank_count = [0]

    def bank():
        bank_count[0] += 1
        build_bank(f"{folder}/bank{bank_count[0]}", engine, B, S, 1.0, shard_size=B, batch_size=B, progress=False)

    inversion_passes = [0]
    invert(engine, images, S, 1.0, batch_size=B, progress=False, callback=lambda e: inversion_passes.__setitem__(0, e.total))
    return {
        "sampling (h recorded)": (lambda: engine.sample(seeds, S, 1.0, batch_size=B, progress=False), B * S),
        "edit (1 sample x B scales)": (lambda: engine.edit(trajectory[[0]], [d], scales, batch_size=B, progress=False).images, B * S),
        "bank drawing": (bank, B * S),
        f"DDPM inversion ({len(images)} images)": (lambda: invert(engine, images, S, 1.0, batch_size=B, progress=False), inversion_passes[0]),
    }, trajectory


def plain_rate(engine, S: int) -> float:
    """Sample-passes per second of research code: one sample at a time, a diffusers scheduler."""
    config = {k: v for k, v in engine.scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    x1 = torch.randn(1, *engine.sample_shape, device=engine.device)

    def loop():
        scheduler.set_timesteps(S)
        generator = torch.Generator().manual_seed(0)
        x = x1
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(engine.unet(x, t).sample, t, x, eta=1.0, generator=generator).prev_sample

    return S / timed(loop, engine.device)


def table(title: str, engine, B: int, S: int, peak: float, per_pass: float, plain: float):
    print(f"\n{title}\n\n| path | sample-passes/s | GFLOP/s | share of peak | ratio to a plain batch-1 loop |")
    print("|---|---|---|---|---|")
    print(f"| plain diffusers loop, batch 1 | {plain:.3g} | {plain * per_pass:.1f} | {plain * per_pass / peak:.0%} | 1.00 |")
    paths, trajectory = paths_of(engine, B, S)
    for name, (fn, passes) in paths.items():
        rate = passes / timed(fn, engine.device)
        print(f"| {name} | {rate:.3g} | {rate * per_pass:.1f} | {rate * per_pass / peak:.0%} | {rate / plain:.2f} |")
    return trajectory


def jacobian_row(engine, trajectory, S: int, k: int, peak: float) -> None:
    """One Jacobian vector-iteration (J V and J^T U for k vectors on the decoder half) against 3 decoder passes."""
    from hspace.directions.jacobian import JacobianProducts

    device = engine.device
    half = engine.decoder_half(engine.x_t(trajectory[[0]], S // 2), int(engine.schedule(S).timesteps[S // 2]))
    with half.forward_mode():
        products = JacobianProducts(half, half.h[0])
        V = torch.randn(k, *half.h.shape[1:], device=device)
        U = torch.randn(k, *products.out_shape, device=device)
        iteration = lambda: (products.jvp(V), products.vjp(U))  # noqa: E731
        iteration_flops = flops(iteration) / 1e9
        seconds = timed(iteration, device)
        decoder = lambda: half(half.h.expand(k, *half.h.shape[1:]))  # noqa: E731
        with torch.no_grad():
            decoder_seconds = timed(decoder, device)
        decoder_flops = flops(lambda: torch.no_grad()(decoder)()) / 1e9
    print(f"\n| Jacobian vector-iteration, k={k} | {iteration_flops:.2f} GFLOP, {seconds * 1e3:.1f} ms | "
          f"{iteration_flops / seconds:.1f} GFLOP/s | {iteration_flops / seconds / peak:.0%} of peak | "
          f"{seconds / (3 * decoder_seconds):.2f}x the time of 3 decoder-half passes ({3 * decoder_flops:.2f} GFLOP) |")


def variants(args, B: int, S: int, peak: float, per_pass: float) -> None:
    """Each speed option alone (and the fastest combinations) on sampling, against the default."""
    from hspace.speed import Speed

    print("\n| sampling with | sample-passes/s | share of peak (float32 FLOPs) | ratio to default | max abs diff of x_0 to default |")
    print("|---|---|---|---|---|")
    seeds = list(range(B))
    options = {
        "default": Speed(), "channels_last": Speed(channels_last=True), "compile": Speed(compile=True),
        "channels_last + compile": Speed(channels_last=True, compile=True), "bfloat16 autocast": Speed(autocast="bfloat16"),
        "bfloat16 autocast + channels_last + compile": Speed(channels_last=True, compile=True, autocast="bfloat16"),
    }
    reference, base = None, None
    for name, speed in options.items():
        engine = engine_of(args.model, args.device, speed)
        run = lambda: engine.sample(seeds, S, 1.0, batch_size=B, progress=False)  # noqa: E731
        x0 = run().x0  # (compiles)
        rate = B * S / timed(run, engine.device)
        reference = x0 if reference is None else reference
        base = rate if base is None else base
        print(f"| {name} | {rate:.3g} | {rate * per_pass / peak:.0%} | {rate / base:.2f} | {float((x0 - reference).abs().max()):.2g} |")


def batches(engine, S: int, sizes: list[int]) -> None:
    print("\n| batch size | sampling sample-passes/s |\n|---|---|")
    for size in sizes:
        seeds = list(range(max(size, 32)))
        rate = len(seeds) * S / timed(lambda: engine.sample(seeds, S, 1.0, batch_size=size, progress=False), engine.device, repeats=2)
        print(f"| {size} | {rate:.3g} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toyfaces", choices=["toyfaces", "tiny", "celebahq"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--k", type=int, default=8, help="vectors of the Jacobian iteration")
    p.add_argument("--no-fast", action="store_true", help="skip the table with channels_last + compile")
    p.add_argument("--no-variants", action="store_true", help="skip the speed options one by one")
    p.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32, 64, 128], help="batch sizes to sweep (none: skip)")
    args = p.parse_args()
    from hspace.speed import Speed

    engine = engine_of(args.model, args.device)
    device, B, S = engine.device, args.batch, args.steps
    peak = peak_gflops(device)
    per_pass = flops(lambda: engine.model.output(torch.randn(1, *engine.sample_shape, device=device), 500)) / 1e9
    plain = plain_rate(engine, S)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads): peak {peak:.1f} GFLOP/s (float32 matmul); "
          f"U-Net {per_pass:.3f} GFLOP per sample-pass; batch {B}, {S} steps")
    trajectory = table("default engine", engine, B, S, peak, per_pass, plain)
    jacobian_row(engine, trajectory, S, args.k, peak)
    if not args.no_fast:
        fast = engine_of(args.model, args.device, Speed(channels_last=True, compile=True))
        table("channels_last + compile (within 1e-4 of the default)", fast, B, S, peak, per_pass, plain)
    if not args.no_variants:
        variants(args, B, S, peak, per_pass)
    if args.batches:
        batches(engine, S, args.batches)


if __name__ == "__main__":
    main()
