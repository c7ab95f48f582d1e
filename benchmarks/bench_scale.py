"""Throughput of bank drawing on 1 process and on N processes (hspace bank --num-processes N), as a ratio
measured in the same run. On a CPU every process gets the same number of threads (--threads, default 1),
so the ratio shows how the work spreads, not how threads do; on a GPU machine, N defaults to all GPUs.

Usage: python benchmarks/bench_scale.py [--model toyfaces] [--n 64] [--steps 20] [--processes 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def draw(folder: Path, args, processes: int) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HSPACE_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "hspace", "bank", str(folder), "--model", args.model, "--n", str(args.n), "--steps", str(args.steps),
               "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "--num-processes", str(processes)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toyfaces")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--processes", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    startup = draw(root / "empty", argparse.Namespace(**{**vars(args), "n": 1, "steps": 1}), 1)  # launch + imports + model
    one = draw(root / "one", args, 1)
    many = draw(root / "many", args, args.processes)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {args.threads} thread(s) per process)"
    samples = args.n * args.steps
    print(f"{args.model}: bank of {args.n} samples x {args.steps} steps, shard {args.shard_size}, batch {args.batch_size}, on {device}")
    print("| processes | seconds (whole command) | sample-steps per second | ratio to 1 process |")
    print("|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {samples / one:.0f} | 1.00 |")
    print(f"| {args.processes} | {many:.1f} | {samples / many:.0f} | {one / many:.2f} |")
    print(f"(one process drawing 1 sample of 1 step, i.e. start-up, imports and model loading: {startup:.1f} s)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
