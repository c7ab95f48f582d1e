"""Fig. 3: swapping h between samples carries the semantic content; the noise keeps the rest."""

from __future__ import annotations

import torch

from ..images import labelled_grid
from .runner import BINARY, CONTINUOUS, Run, change, holds, pct, share_interval, verdict

NAME = "swap"
FOLLOWS = 0.5  # every binary attribute follows the h donor in at least this share of differing pairs


def measure(run: Run) -> dict:
    c = run.config
    a = run.test_samples(2 * c.swap_pairs, NAME)
    first, second = a[list(range(c.swap_pairs))], a[list(range(c.swap_pairs, 2 * c.swap_pairs))]
    swapped = run.engine.swap(first, second, batch_size=c.batch_size)
    s_noise, s_h, s_out = run.classify(first.images), run.classify(second.images), run.classify(swapped.images)
    result = {}
    for name in BINARY:
        differ = (s_noise[name] > 0.5) != (s_h[name] > 0.5)
        if differ.any():
            follows_h = ((s_out[name] > 0.5) == (s_h[name] > 0.5)) & differ
            result[name] = {"pairs_that_differ": int(differ.sum()), "follows_h": float(follows_h.sum() / differ.sum())}
    for name in CONTINUOUS:
        closer = change(s_h, s_out, name).abs() < change(s_noise, s_out, name).abs()
        result[name] = {"pairs_that_differ": c.swap_pairs, "follows_h": float(closer.float().mean())}
    shown = min(6, c.swap_pairs)
    grid = run.figure(
        labelled_grid(torch.stack([first.images[:6], second.images[:6], swapped.images[:6]], 1), [str(i) for i in range(shown)], ["noise of", "h of", "swapped"]),
        "swap.png",
    )
    return {"attributes": result, "grid": grid}


def judge(res: dict) -> dict:
    """Holds when every binary attribute follows h beyond its Wilson interval (lower end >= FOLLOWS); fails when one
    follows it in clearly fewer (upper end below FOLLOWS)."""
    found = res["attributes"]
    intervals = {k: share_interval(found[k]["follows_h"] * found[k]["pairs_that_differ"], found[k]["pairs_that_differ"]) for k in BINARY if k in found}
    ok = bool(intervals) and min(low for low, _ in intervals.values()) >= FOLLOWS
    return verdict(ok, any(high < FOLLOWS for _, high in intervals.values()), intervals, follows=FOLLOWS)


def render(res: dict, config) -> list[str]:
    lines = [
        "## h-swap (Fig. 3)",
        "",
        "Claim: swapping h between samples carries the semantic content; the noise keeps the rest (e.g. the background).",
        "",
        "Share of swapped samples whose attribute matches the h donor rather than the noise donor (binary: among pairs "
        "that differ; continuous: closer to the h donor).",
        "",
        "| attribute | follows h | pairs |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {pct(v['follows_h'])} | {v['pairs_that_differ']} |" for k, v in res["attributes"].items()]
    lines += ["", f"Result: every binary attribute follows h in most pairs (the lower end of its 95% interval >= {pct(res['verdict']['thresholds']['follows'])}): "
              f"{holds(res)}.", "", f"![swap]({res['grid']})", ""]
    return lines


def headline(res: dict) -> str:
    """One line for a side-by-side table."""
    found = {k: v["follows_h"] for k, v in res["attributes"].items() if k in BINARY}
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in found.items()) + " of differing pairs follow h"
