"""Fig. 8: a direction from a few labelled pairs edits reliably in h-space, while the same mean
difference in x_T needs far more pairs."""

from __future__ import annotations

import torch

from .runner import Run, holds, pct, verdict

NAME = "fig8"
SUCCESS, MAX_PAIRS, RATIO = 0.9, 10, 10  # h reaches 90% with <= 10 pairs and >= 10x fewer than x_T


def measure(run: Run) -> dict:
    from ..directions.supervised import bank_difference, edit_x_T, x_T_difference

    c = run.config
    bank, attr = run.bank, c.fig8_attribute
    positives, negatives = _shuffled_sides(bank.scores("classifier")[attr])
    pool = run.test_samples(c.fig8_test * 3, NAME)
    lacking = (run.classify(pool.images)[attr] <= 0.5).nonzero()[:, 0].tolist()[: c.fig8_test]
    test = pool[lacking]
    rows = []
    for n in c.fig8_pairs:
        if n > min(len(positives), len(negatives)):
            break
        pos, neg = positives[:n], negatives[:n]
        h_images = run.engine.edit(test, bank_difference(bank, pos, neg, attr), [1.0], batch_size=c.batch_size)[0, 0]
        x_delta = x_T_difference(_x_T(run, bank, pos), _x_T(run, bank, neg)).float()
        x_images = edit_x_T(run.engine, test, x_delta, [1.0], batch_size=c.batch_size)[0]
        rows.append({
            "pairs": n,
            "h_success": float((run.classify(h_images)[attr] > 0.5).float().mean()),
            "x_T_success": float((run.classify(x_images)[attr] > 0.5).float().mean()),
        })
    run.plot(lambda fig: _plot(fig, rows, attr), "fig8_h_vs_xT.png")
    first_h = next((r["pairs"] for r in rows if r["h_success"] >= SUCCESS), None)
    first_x = next((r["pairs"] for r in rows if r["x_T_success"] >= SUCCESS), None)
    ok = first_h is not None and first_h <= MAX_PAIRS and (first_x is None or first_x >= RATIO * first_h)
    return {
        "attribute": attr, "test_samples": len(lacking), "rows": rows, "first_h": first_h, "first_x_T": first_x,
        "verdict": verdict(ok, success=SUCCESS, max_pairs=MAX_PAIRS, ratio=RATIO),
    }


def _shuffled_sides(scores: torch.Tensor) -> tuple[list[int], list[int]]:
    """Bank indices with and without the attribute, each in a fixed random order (seed 0)."""
    positives = (scores > 0.5).nonzero()[:, 0].tolist()
    negatives = (scores <= 0.5).nonzero()[:, 0].tolist()
    generator = torch.Generator().manual_seed(0)
    positives = [positives[i] for i in torch.randperm(len(positives), generator=generator).tolist()]
    negatives = [negatives[i] for i in torch.randperm(len(negatives), generator=generator).tolist()]
    return positives, negatives


def _x_T(run: Run, bank, indices):
    """A bank's samples as trajectories with x_T only (what eq. 10 in x_T needs), from their seeds."""
    from ..trajectory import Trajectory, seeded_x_T

    x_T = torch.stack([seeded_x_T(bank.seeds[i], run.engine.sample_shape) for i in indices])
    steps = run.engine.schedule(bank.num_steps)
    return Trajectory([bank.seeds[i] for i in indices], steps.timesteps, torch.tensor(bank.eta), x_T, x_T)


def _plot(fig, rows, attr) -> None:
    ax = fig.subplots()
    ax.plot([r["pairs"] for r in rows], [r["h_success"] for r in rows], "o-", label="h-space")
    ax.plot([r["pairs"] for r in rows], [r["x_T_success"] for r in rows], "s--", label="x_T")
    ax.set(xscale="log", xlabel="labelled pairs n", ylabel=f"share gaining {attr}", ylim=(-0.02, 1.02))
    ax.legend()


def render(res: dict, config) -> list[str]:
    rows, t = res["rows"], res["verdict"]["thresholds"]
    lines = [
        "## h-space vs x_T (Fig. 8)",
        "",
        "Claim: a direction from a few labelled pairs edits reliably in h-space, while the same mean difference in x_T needs "
        "far more pairs.",
        "",
        f"Edit success: the share of {res['test_samples']} held-out samples without {res['attribute']} that have it after "
        f"adding the mean difference of n positive and n negative bank samples (scale 1). Target: h reaches {pct(t['success'])} "
        f"with <= {t['max_pairs']} pairs and needs >= {t['ratio']}x fewer pairs than x_T.",
        "",
        "| pairs | h-space | x_T |",
        "|---|---|---|",
    ]
    lines += [f"| {r['pairs']} | {pct(r['h_success'])} | {pct(r['x_T_success'])} |" for r in rows]
    first_x = res["first_x_T"]
    x_text = f"{first_x}" if first_x is not None else f"not within {rows[-1]['pairs'] if rows else 0}"
    lines += ["", f"Result: {pct(t['success'])} reached with {res['first_h']} pairs in h-space, {x_text} in x_T: {holds(res)}"
              + ("" if first_x is not None else f" (x_T never reached {pct(t['success'])}, so the ratio is at least the range tested)") + ".", "",
              "![fig8](figures/fig8_h_vs_xT.png)", ""]
    return lines
