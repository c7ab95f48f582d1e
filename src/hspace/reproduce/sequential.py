"""Fig. 11: directions add up: applying several in turn changes each attribute in turn."""

from __future__ import annotations

import itertools

import torch

from ..images import labelled_grid
from .runner import Run, holds, pct, share_interval, verdict

NAME = "sequential"
STEPS = ("smile", "glasses", "hat")
PRESENT = 0.5  # every attribute present in at least this share of samples at the end


def measure(run: Run) -> dict:
    c = run.config
    pool = run.test_samples(c.sequential_samples * 3, NAME)
    s = run.classify(pool.images)
    lacking = ((s["smile"] <= 0.5) & (s["glasses"] <= 0.5) & (s["hat"] <= 0.5)).nonzero()[:, 0].tolist()[: c.sequential_samples]
    test = pool[lacking]
    directions = run.supervised(True)
    combos = list(itertools.accumulate(directions[name] for name in STEPS))
    scores, images = run.edit_scores(test, combos, [c.table_scale])
    rows = [{"after": "+".join(STEPS[: i + 1]), "present": {a: float((scores[a][i, 0] > 0.5).float().mean()) for a in STEPS}} for i in range(len(STEPS))]
    grid = run.figure(
        labelled_grid(torch.cat([test.images[:4, None], images[:, 0, :4].transpose(0, 1)], 1), [str(i) for i in range(min(4, len(lacking)))], ["original"] + [f"+{n}" for n in STEPS]),
        "sequential.png",
    )
    return {"samples": len(lacking), "rows": rows, "grid": grid}


def judge(res: dict) -> dict:
    """Holds when every attribute is present at the end beyond its Wilson interval (lower end >= PRESENT); fails
    when one is clearly missing in most samples (upper end below PRESENT)."""
    last = res["rows"][-1]["present"] if res["rows"] else {}
    intervals = {a: share_interval(p * res["samples"], res["samples"]) for a, p in last.items()}
    ok = bool(intervals) and min(low for low, _ in intervals.values()) >= PRESENT
    return verdict(ok, any(high < PRESENT for _, high in intervals.values()), intervals, present=PRESENT)


def render(res: dict, config) -> list[str]:
    lines = [
        "## Sequential edits (Fig. 11)",
        "",
        "Claim: directions add up: applying several in turn changes each attribute in turn.",
        "",
        f"{res['samples']} held-out samples with no smile, glasses or hat; disentangled directions added one after another. "
        "Share with each attribute present:",
        "",
        "| after | smile | glasses | hat |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['after']} | {pct(r['present']['smile'])} | {pct(r['present']['glasses'])} | {pct(r['present']['hat'])} |" for r in res["rows"]]
    lines += ["", f"Result: all three present in most samples at the end (the lower end of each 95% interval >= {pct(res['verdict']['thresholds']['present'])}): "
              f"{holds(res)}.", "", f"![sequential]({res['grid']})", ""]
    return lines


def headline(res: dict) -> str:
    """One line for a side-by-side table."""
    last = res["rows"][-1]["present"] if res["rows"] else {}
    return "present at the end: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in last.items())
