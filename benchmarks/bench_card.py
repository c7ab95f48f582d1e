"""A direction card on the bundled model: its time against sampling the same number of sample-steps (the baseline,
measured in the same run), and the calibration error on other held-out samples.

    python benchmarks/bench_card.py [--steps 25] [--n 64] [--check 96]

Prints the card's seconds, the ratio card / plain sampling of n x 10 samples (the card's 9 grid scales plus its
measured 50% scale), and for the regression smile and hat directions the flip rate of each at effect scale 1 on
--check held-out samples that lack the attribute (target 50%).
"""

import argparse
import tempfile
import time

from hspace.bank import build_bank
from hspace.card import card
from hspace.directions.regression import regression_directions
from hspace.directions.supervised import annotate_bank
from hspace.domains import domain_of
from hspace.engine import Engine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--check", type=int, default=96)
    p.add_argument("--bank", type=int, default=400)
    args = p.parse_args()
    engine = Engine.load("toyfaces")
    with tempfile.TemporaryDirectory() as folder:
        bank = build_bank(folder, engine, args.bank, args.steps, 1.0, progress=False)
        annotate_bank(bank)
        found = {d.name: d for d in regression_directions(bank, ["smile", "eyes_open", "glasses", "hat", "hair_color"])}
    start = time.perf_counter()
    engine.sample(list(range(900_000, 900_000 + 10 * args.n)), args.steps, 1.0, progress=False)
    baseline = time.perf_counter() - start
    cards = {}
    for name in ("smile", "hat"):
        start = time.perf_counter()
        cards[name] = card(found[name], engine, n=args.n, num_steps=args.steps, progress=False)
        seconds = time.perf_counter() - start
        print(f"card {name}: {seconds:.1f} s for {args.n} samples x {len(cards[name].scales)} scales at {args.steps} steps; "
              f"plain sampling of {10 * args.n} samples: {baseline:.1f} s; ratio {seconds / baseline:.2f}; unit {cards[name].calibration}")
    test = engine.sample(list(range(800_000, 800_000 + args.check)), args.steps, 1.0, progress=False)
    score = domain_of("toyfaces").scorer()
    before = score(test.images)
    for name, result in cards.items():
        calibrated = found[name]
        calibrated.meta["calibration"] = result.calibration
        images = engine.edit(test, calibrated, [1.0], units="effect", progress=False).images[0, 0]
        lacking = before[name] <= 0.5
        rate = float((score(images)[name][lacking] > 0.5).double().mean())
        print(f"{name}: effect scale 1 (raw {result.calibration['scale']:.3f}) flips {100 * rate:.1f}% of {int(lacking.sum())} held-out "
              f"samples lacking it (target 50%; error {100 * (rate - 0.5):+.1f} points)")


if __name__ == "__main__":
    main()
