"""Peak memory of per-timestep PCA over a bank on disk (paper Sec. 4.1), against a baseline in the same run.

Writes a synthetic bank of n samples x T steps of h (default 2,000 x 10 x 512x8x8, the CelebA-HQ h;
float16 on disk as ``hspace bank`` stores it: low-rank structure plus noise), then runs, each in a
fresh child process so that its peak RSS is its own:

  baseline  import hspace and stream the whole bank once (what any method reading it must do)
  pca       pca_per_timestep(bank.h_chunks(), k) with the default 2 GiB budget (the library's route)

and prints both peaks, the ratio pca / baseline, the float64 size of all h held at once (what a naive
PCA would start from) and the target (<= 2 GB).
    python benchmarks/bench_pca_memory.py [--n 2000] [--steps 10] [--k 10] [--folder /tmp/hspace-pca-bench]
"""

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time
from hspace.bank import Bank
from hspace.directions.pca import pca_per_timestep
bank = Bank.open(sys.argv[1])
start = time.perf_counter()
if sys.argv[2] == "baseline":
    total = sum(float(h.sum()) for h in bank.h_chunks()())
    out = {}
else:
    result = pca_per_timestep(bank.h_chunks(), int(sys.argv[3]), expected_n=bank.n)
    out = {"route": result.route, "variance_ratio_pc1": float(result.variance_ratio[0].mean())}
out["seconds"] = time.perf_counter() - start
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def write_bank(folder: Path, n: int, steps: int, h_shape: tuple[int, ...], shard_size: int) -> None:
    from hspace.bank import Bank, Layout
    from hspace.spec import Spec

    if folder.exists():
        shutil.rmtree(folder)
    spec = Spec("synthetic", "mid.out", num_steps=steps, eta=[1.0] * steps)
    layout = Layout.of(spec, list(range(999, -1, -1000 // steps))[:steps], 0, shard_size, h_shape, (3, 256, 256), 8)
    bank = Bank.create(folder, layout, n)
    generator = torch.Generator().manual_seed(0)
    D = math.prod(h_shape)
    basis = torch.randn(steps, 32, D, generator=generator) / math.sqrt(D)  # 32 directions per step
    scales = torch.logspace(1.5, 0, 32)
    for start in range(0, n, shard_size):
        b = min(shard_size, n - start)
        coef = torch.randn(b, steps, 32, generator=generator) * scales
        h = torch.einsum("bts,tsd->btd", coef, basis) + 0.05 * torch.randn(b, steps, D, generator=generator)
        bank.write_shard(start, h.reshape(b, steps, *h_shape), torch.zeros(b, 3, 8, 8, dtype=torch.uint8))


def child(folder: Path, mode: str, k: int) -> dict:
    from common import child_json

    return child_json(CHILD, folder, mode, k)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--h-shape", default="512,8,8")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--folder", default="/tmp/hspace-pca-bench")
    p.add_argument("--keep", action="store_true", help="keep the synthetic bank")
    args = p.parse_args()
    h_shape = tuple(int(v) for v in args.h_shape.split(","))
    folder = Path(args.folder)
    start = time.perf_counter()
    write_bank(folder, args.n, args.steps, h_shape, args.shard_size)
    print(f"synthetic bank: {args.n} samples x {args.steps} steps x h {h_shape}, float16, written in {time.perf_counter() - start:.0f} s")
    try:
        base = child(folder, "baseline", args.k)
        pca = child(folder, "pca", args.k)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    gib = 2**30
    naive = args.n * args.steps * math.prod(h_shape) * 8
    print(f"baseline (import + stream the bank once): peak RSS {base['peak_rss_bytes'] / gib:.2f} GiB, {base['seconds']:.0f} s")
    print(f"PCA ({pca['route']} route, k={args.k}): peak RSS {pca['peak_rss_bytes'] / gib:.2f} GiB, {pca['seconds']:.0f} s")
    print(f"ratio PCA / baseline peak: {pca['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x")
    print(f"all h at once in float64 (a naive PCA's input alone): {naive / gib:.2f} GiB")
    print(f"target: PCA peak <= 2 GB (2.00e9 bytes): {'met' if pca['peak_rss_bytes'] <= 2e9 else 'NOT met'} ({pca['peak_rss_bytes']:.3g} bytes)")


if __name__ == "__main__":
    main()
