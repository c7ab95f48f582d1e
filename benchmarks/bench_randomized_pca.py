"""The streamed randomized PCA route against the exact route on the bundled toy U-Net's bank (issue 42, part 3).

Draws (or reuses) a bank of the toy faces, then runs per-timestep PCA by the exact route ("auto": Gram or covariance)
and by the randomized route (``randomized.py``), each in a fresh child process so that its peak RSS is its own, beside
a baseline child that only streams the bank once. Prints, per component j of the top k: the largest principal angle
between the exact and randomized top-j subspaces over the timesteps (median and max), the exact component's share of
the variance (its place above the noise floor), and the variance both top-k subspaces capture.

    python benchmarks/bench_randomized_pca.py [--n 400] [--steps 20] [--k 10] [--folder /tmp/hspace-rpca-bank]
"""

import argparse
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time
from hspace.bank import Bank
from hspace.directions.pca import pca
bank = Bank.open(sys.argv[1])
start = time.perf_counter()
if sys.argv[2] == "baseline":
    total = sum(float(h.sum()) for h in bank.h_chunks()())
    out = {}
else:
    result = pca(bank, int(sys.argv[3]), method=sys.argv[2])
    result.save(sys.argv[4])
    out = {"route": result.route}
out["seconds"] = time.perf_counter() - start
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def child(bank: Path, method: str, k: int, out: Path) -> dict:
    from common import child_json

    return child_json(CHILD, bank, method, k, out)


def angles(a, b, j: int) -> torch.Tensor:
    """[T] the largest principal angle (degrees) between the top-j subspaces of two PCAResults at every timestep."""
    out = []
    for t in range(a.components.shape[1]):
        A = torch.linalg.qr(a.components[:j, t].reshape(j, -1).double().T).Q
        B = torch.linalg.qr(b.components[:j, t].reshape(j, -1).double().T).Q
        out.append(torch.rad2deg(torch.acos(torch.linalg.svdvals(A.T @ B).clamp(max=1.0)).max()))
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--folder", default="/tmp/hspace-rpca-bank")
    args = p.parse_args()
    from hspace import Engine
    from hspace.bank import build_bank
    from hspace.directions.pca import PCAResult

    folder = Path(args.folder)
    bank = build_bank(folder / "bank", Engine.load("toyfaces"), args.n, args.steps, 1.0)
    runs = {name: child(bank.path, name if name != "exact" else "auto", args.k, folder / name) for name in ("baseline", "exact", "randomized")}
    exact, fast = PCAResult.load(folder / "exact"), PCAResult.load(folder / "randomized")
    print(f"bank: {bank.n} toy faces x {bank.num_steps} steps, h {'x'.join(map(str, bank.h_shape))} (D = {exact.components[0, 0].numel()})")
    for name, run in runs.items():
        route = f" ({run['route']} route)" if "route" in run else ""
        print(f"{name}{route}: peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB, {run['seconds']:.1f} s")
    print("\n| top-j | largest angle, median over steps | max over steps | exact PC j's variance share (mean over steps) |")
    print("|---:|---:|---:|---:|")
    for j in range(1, args.k + 1):
        a = angles(exact, fast, j)
        print(f"| {j} | {float(a.median()):.2f} deg | {float(a.max()):.2f} deg | {float(exact.variance_ratio[j - 1].mean()):.4f} |")
    captured = lambda r: float(r.variance_ratio.sum(0).mean())  # noqa: E731
    print(f"\nvariance captured by the top {args.k} (mean over steps): exact {captured(exact):.4f}, randomized {captured(fast):.4f}")


if __name__ == "__main__":
    main()
