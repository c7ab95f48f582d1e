"""The block study's banks: one draw with h recorded at every block (``build_banks``) vs one bank per block
(``build_bank`` on ``engine.at(block)``, as ``hspace blocks`` drew them before), on the bundled toy DiT.

Prints both times, their ratio, and whether every block's bank is equal, bit for bit, between the two ways.
    python benchmarks/bench_blocks_bank.py [--n 96] [--steps 8] [--device cpu]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hspace import Engine
from hspace.bank import build_bank, build_banks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toydit")
    p.add_argument("--n", type=int, default=96, help="samples per bank (the full block study's count)")
    p.add_argument("--steps", type=int, default=8, help="steps (the study's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    engine = Engine.load(args.model, device=args.device)
    names = list(engine.model.locations())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        one = {name: build_bank(tmp / "each" / name, engine.at(name), args.n, args.steps, 1.0, progress=False) for name in names}
        each = time.perf_counter() - start
        start = time.perf_counter()
        shared = build_banks({name: tmp / "shared" / name for name in names}, engine, args.n, args.steps, 1.0, progress=False)
        together = time.perf_counter() - start
        equal = all(torch.equal(one[n].h(), shared[n].h()) and torch.equal(one[n].thumbnails(), shared[n].thumbnails()) for n in names)
    print(f"{args.model}: {len(names)} locations, {args.n} samples, {args.steps} steps on {args.device}")
    print(f"one bank per location: {each:.1f} s; one draw for all: {together:.1f} s; speed-up {each / together:.2f}x")
    print(f"every location's bank equal bit for bit: {equal}")


if __name__ == "__main__":
    main()
