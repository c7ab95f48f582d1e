"""SM A: Asyrp (delta-h into P_t only, two passes) amplifies an edit; the single pass reaches similar
edits at a larger scale."""

from __future__ import annotations

from .runner import Run, change, holds, mean_interval, verdict

NAME = "asyrp"


def measure(run: Run) -> dict:
    c = run.config
    test = run.test_samples(c.asyrp_samples, NAME)
    before = run.classify(test.images)
    direction = run.supervised(False)["smile"]
    changes = {}
    for mode, eps_pass in (("single", "edited"), ("asyrp", "clean")):
        scores, _ = run.edit_scores(test, [direction], c.asyrp_scales, eps_pass)
        changes[mode] = {f"{s:g}": change(before, {k: v[0, i] for k, v in scores.items()}, "smile") for i, s in enumerate(c.asyrp_scales)}
    rows = {mode: {s: float(x.mean()) for s, x in by_scale.items()} for mode, by_scale in changes.items()}
    # how much further Asyrp moves each sample than the single pass, in the edit's own direction (paired)
    gain = {s: mean_interval((changes["asyrp"][s] - changes["single"][s]) * (1.0 if rows["single"][s] >= 0 else -1.0)) for s in rows["single"]}
    return {"direction": "smile (supervised)", "mean_smile_change": rows, "asyrp_gain_interval": gain}


def judge(res: dict) -> dict:
    """Holds when Asyrp's paired gain is above 0 beyond its interval at every scale; fails when it is below 0 beyond
    its interval at some scale (Asyrp clearly weaker there)."""
    gain = res["asyrp_gain_interval"]
    amplifies = all(low > 0 for low, _ in gain.values())
    weaker = any(high < 0 for _, high in gain.values())
    return verdict(amplifies, weaker, {f"asyrp_gain_at_{s}": v for s, v in gain.items()}, gain=0.0)


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
        "| scale | single pass | Asyrp | Asyrp's gain, 95% interval |",
        "|---|---|---|---|",
    ]
    gain = res.get("asyrp_gain_interval", {})
    lines += [f"| {s} | {rows['single'][s]:+.2f} | {rows['asyrp'][s]:+.2f} | {_interval(gain.get(s))} |" for s in rows["single"]]
    lines += ["", f"Result: Asyrp stronger at every scale, beyond the 95% interval of the paired difference: {holds(res)}.", ""]
    return lines


def _interval(pair) -> str:
    return "n/a" if pair is None else f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def headline(res: dict) -> str:
    """One line for a side-by-side table."""
    return "Asyrp's gain " + ", ".join(f"at {s}: [{low:+.2f}, {high:+.2f}]" for s, (low, high) in res["asyrp_gain_interval"].items())
