"""Time of each stage of `hspace reproduce`, as seconds and as a ratio to drawing the bank in the same run.

    python benchmarks/bench_reproduce.py            # the quick mode, in a fresh temporary folder
    python benchmarks/bench_reproduce.py --full     # the full run (about half an hour on a 2-core CPU)
    python benchmarks/bench_reproduce.py --from out/reproduce   # read the timings of a finished run
"""

import argparse
import json
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--from", dest="source", default=None, help="a finished reproduce folder: print its timings")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    if args.source:
        timings = json.loads((Path(args.source) / "timings.json").read_text())
        total = None
    else:
        from hspace.engine import Engine
        from hspace.reproduce import run_reproduce

        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            run_reproduce(folder, quick=not args.full, engine=Engine.load("toyfaces", device=args.device))
            total = time.perf_counter() - start
            timings = json.loads((Path(folder) / "timings.json").read_text())
    base = timings.get("bank")
    print(f"{'stage':16s} {'seconds':>9s} {'/ bank':>8s}")
    for name, seconds in timings.items():
        ratio = f"{seconds / base:8.2f}" if base else "       -"
        print(f"{name:16s} {seconds:9.1f} {ratio}")
    print(f"{'sum of stages':16s} {sum(timings.values()):9.1f}")
    if total is not None:
        print(f"{'wall clock':16s} {total:9.1f}")


if __name__ == "__main__":
    main()
