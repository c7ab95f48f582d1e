"""The cards of the bundled model's directions side by side (docs/directions.md): eq. 10 (top k minus bottom k), the
joint regression, both for smile, glasses and hat, and the top 3 principal components, each carded on the same
held-out samples.

    python benchmarks/bench_cards_side_by_side.py [--steps 10] [--n 64] [--bank 400] [--out out/cards]

For every direction it prints one row: its target (its own attribute, else the one it moves most), its effect unit
(the raw scale at which half the samples that could flip do), and at that scale (linear between the card's measured
scales, one of which was measured next to the unit): the
target's mean change, the mean |change| of the other binary attributes, the two largest side effects, the mean absolute
pixel change and the toy FID of the edited samples. The cards themselves (card.md, plots) are written to --out.
"""

import argparse
import time
from pathlib import Path

from hspace.bank import build_bank
from hspace.card import card, write_card
from hspace.directions.pca import pca
from hspace.directions.regression import regression_directions
from hspace.directions.supervised import annotate_bank, direction_from_scores
from hspace.domains import domain_of
from hspace.engine import Engine

ATTRIBUTES = ("smile", "glasses", "hat")
FITTED = ("smile", "eyes_open", "glasses", "hat", "hair_color")  # the regression holds these fixed (as in docs/reproduce.md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--bank", type=int, default=400)
    p.add_argument("--k", type=int, default=40, help="eq. 10: top k minus bottom k of the bank (default 40, as the report)")
    p.add_argument("--out", default="out/cards")
    args = p.parse_args()
    out = Path(args.out)
    engine = Engine.load("toyfaces")
    domain = domain_of("toyfaces")
    bank = build_bank(out / "bank", engine, args.bank, args.steps, 1.0, progress=False)
    if not bank.scores_path("classifier").is_file():
        annotate_bank(bank)
    regression = {d.name: d for d in regression_directions(bank, list(FITTED))}
    directions = []
    for a in ATTRIBUTES:
        eq10 = direction_from_scores(bank, a, args.k)
        directions += [(f"eq. 10 {a}", eq10), (f"regression {a}", regression[a].renamed(a, norm_of=eq10))]
    pcs = pca(bank, 3).directions
    directions += [(f"PCA {d.name}", d) for d in pcs]
    held_out = engine.sample(list(range(700_000, 700_000 + args.n)), args.steps, 1.0, progress=False)
    print(f"{args.n} held-out samples (seeds 700000 on), {args.steps} steps, eta 1; bank of {args.bank}; eq. 10 with k = {args.k}; "
          "the regression at the norm of eq. 10's direction\n")
    print("| direction | target | unit (raw scale) | target change at the unit | mean abs other binary | largest side effects | "
          "pixel change | toy FID (unedited) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, d in directions:
        start = time.perf_counter()
        result = card(d, engine, trajectory=held_out, domain=domain, progress=False)
        seconds = time.perf_counter() - start
        write_card(result, d, out / label.replace(" ", "_").replace(".", ""))
        unit = result.calibration.get("scale")
        zero = result.scales.index(0.0)
        if unit is None:
            print(f"| {label} | {result.target} | not reached | | | | | | {seconds:.0f} |")
            continue
        at = lambda values: _at(result.scales, values, unit)  # noqa: E731
        others = [a for a in result.binary if a != result.target]
        off = sum(abs(at(result.change[a])) for a in others) / len(others)
        sides = sorted(((a, at(v)) for a, v in result.change.items() if a != result.target), key=lambda item: -abs(item[1]))[:2]
        print(f"| {label} | {result.target} | {unit:.2f} | {at(result.change[result.target]):+.2f} +- {at(result.change_se[result.target]):.2f} | "
              f"{off:.3f} | {', '.join(f'{a} {v:+.2f}' for a, v in sides)} | {at(result.pixel_change):.3f} | {at(result.realism):.1f} "
              f"({result.realism[zero]:.1f}) | {seconds:.0f} |")


def _at(scales, values, x):
    """values at scale x, linear between the card's measured scales (the unit is one of them or lies between two)."""
    for (a, u), (b, v) in zip(zip(scales, values), zip(scales[1:], values[1:])):
        if a <= x <= b:
            return u + (v - u) * (x - a) / (b - a)
    return values[0] if x < scales[0] else values[-1]


if __name__ == "__main__":
    main()
