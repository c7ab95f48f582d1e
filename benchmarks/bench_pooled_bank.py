"""A bank that stores h pooled and in float8 against the full float16 bank of the same seeds (issue 42, part 2): the
size on disk, the storage error, and what it changes in the PCA directions found from it, on the toy DiT and the toy
U-Net.

For each model: one bank drawn at full size (float16) and one per variant (``h_pool``:``h_storage``; default pooled
2x2 in float8, pooled in float16, full in float8, to tell pooling from float8 apart), the same seeds; the top-k PCs of each (the pooled one lifted to the full grid, ``PCAResult.lifted``); every PC applied at
+``scale`` sigma to the same held-out seeds; per PC and binary attribute the flip rate (``card.flip_rate``: the share
of samples whose label changes) under each bank's PC, and the difference in points. Also the principal angles between
the two top-k subspaces at the middle step.

    python benchmarks/bench_pooled_bank.py [--models toydit toyfaces] [--bank 300] [--steps 10] [--k 4] [--n 96] [--scale 3]
        [--variants 2:float8 2:float16 1:float8]
"""

import argparse
import shutil
from pathlib import Path

import torch


def _angles(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Principal angles (degrees) between the spans of the rows of a and b."""
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cosines)).tolist()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*"))


def measure(model: str, args) -> None:
    from hspace import Engine
    from hspace.bank import build_bank, pool_h
    from hspace.card import flip_rate
    from hspace.directions.pca import pca
    from hspace.toyfaces.classifier import BINARY, classify

    engine = Engine.load(model)
    root = Path(args.folder) / model
    shutil.rmtree(root, ignore_errors=True)
    full = build_bank(root / "full", engine, args.bank, args.steps, args.eta, progress=False)
    h_full = full.h()
    print(f"\n## {model} (h {'x'.join(map(str, engine.h_shape))} at {engine.h_location}; bank of {args.bank}, {args.steps} steps)")
    pcs, middle = {"full": pca(full, args.k)}, args.steps // 2
    for variant in args.variants:
        pool, storage = variant.split(":")
        pool = int(pool)
        label = f"{'pooled ' + str(pool) + 'x' + str(pool) if pool > 1 else 'full grid'} {storage}"
        bank = build_bank(root / label.replace(" ", "-"), engine, args.bank, args.steps, args.eta, progress=False, h_pool=pool, h_storage=storage)
        exact = pool_h(h_full, pool if pool > 1 else None)
        error = (bank.h() - exact).abs().flatten(2).amax(2) / exact.abs().flatten(2).amax(2)
        pcs[label] = pca(bank, args.k)
        angles = _angles(pcs["full"].components[:, middle].flatten(1), pcs[label].components[:, middle].flatten(1))
        print(f"- {label}: {_size(bank.path) / 1e6:.1f} MB on disk ({_size(bank.path) / _size(full.path):.3f}x the full float16 bank's "
              f"{_size(full.path) / 1e6:.1f} MB); largest |error| per sample and step against the float16 bank's (pooled) h "
              f"{float(error.max()):.4f} of its largest |h|; principal angles to the full bank's top-{args.k} at step {middle}: "
              + ", ".join(f"{a:.1f}" for a in angles) + " degrees")
    test = engine.sample(list(range(900_000, 900_000 + args.n)), args.steps, args.eta, batch_size=args.batch_size, progress=False)
    before = classify(test.images)
    rates = {}
    for label, result in pcs.items():
        images = engine.edit(test, result.directions, [args.scale], batch_size=args.batch_size, progress=False).images[:, 0]
        for j in range(args.k):
            after = classify(images[j])
            for name in BINARY:
                rates[label, j, name] = flip_rate(before[name], after[name])
    others = [label for label in pcs if label != "full"]
    print("\n| PC | attribute | flips, full float16 bank | " + " | ".join(f"{label} (difference)" for label in others) + " |")
    print("|---|---|---:|" + "---:|" * len(others))
    worst = dict.fromkeys(others, 0.0)
    for j in range(args.k):
        for name in BINARY:
            a = rates["full", j, name]
            cells = []
            for label in others:
                b = rates[label, j, name]
                worst[label] = max(worst[label], abs(a - b))
                cells.append(f"{b:.0%} ({100 * (b - a):+.0f})")
            print(f"| pc{j + 1} | {name} | {a:.0%} | " + " | ".join(cells) + " |")
    print(f"\nlargest difference over {args.k} PCs x {len(BINARY)} attributes ({args.n} held-out seeds, scale {args.scale:g} sigma): "
          + ", ".join(f"{label} {100 * w:.0f} points" for label, w in worst.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["toydit", "toyfaces"])
    p.add_argument("--bank", type=int, default=300)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eta", type=float, default=None, help="default: 0 for the DiT (its ODE sampler), 1 for the U-Net")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["2:float8", "2:float16", "1:float8"], help="POOL:STORAGE of each bank to compare")
    p.add_argument("--folder", default="/tmp/hspace-pooled-bank")
    args = p.parse_args()
    for model in args.models:
        eta = args.eta if args.eta is not None else (0.0 if model == "toydit" else 1.0)
        measure(model, argparse.Namespace(**{**vars(args), "eta": eta}))


if __name__ == "__main__":
    main()
