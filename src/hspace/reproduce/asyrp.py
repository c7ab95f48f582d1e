"""SM A: Asyrp (delta-h into P_t only, two passes) amplifies an edit; the single pass reaches similar
edits at a larger scale."""

from __future__ import annotations

from .runner import Run, change, holds, verdict

NAME = "asyrp"


def measure(run: Run) -> dict:
    c = run.config
    test = run.test_samples(c.asyrp_samples, NAME)
    before = run.classify(test.images)
    direction = run.supervised(False)["smile"]
    rows = {}
    for mode, eps_pass in (("single", "edited"), ("asyrp", "clean")):
        scores, _ = run.edit_scores(test, [direction], c.asyrp_scales, eps_pass)
        rows[mode] = {f"{s:g}": float(change(before, {k: v[0, i] for k, v in scores.items()}, "smile").mean()) for i, s in enumerate(c.asyrp_scales)}
    amplifies = all(abs(rows["asyrp"][s]) >= abs(rows["single"][s]) for s in rows["single"])
    return {"direction": "smile (supervised)", "mean_smile_change": rows, "verdict": verdict(amplifies)}


def render(res: dict, config) -> list[str]:
    rows = res["mean_smile_change"]
    lines = [
        "## Asyrp vs single-pass injection (SM A)",
        "",
        "Claim: Asyrp (delta-h into P_t only, two passes) amplifies an edit; the single pass reaches similar edits at a "
        "larger scale.",
        "",
        f"Mean change of smile probability, {res['direction']} direction:",
        "",
        "| scale | single pass | Asyrp |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {rows['single'][s]:+.2f} | {rows['asyrp'][s]:+.2f} |" for s in rows["single"]]
    lines += ["", f"Result: Asyrp at least as strong at every scale: {holds(res)}.", ""]
    return lines
