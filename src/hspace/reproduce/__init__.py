"""`hspace reproduce`: the paper's claims as numbers on a bundled toy-faces model (the U-Net ``toyfaces`` by default,
or the diffusion transformer ``toydit``), written as a report.

One module per claim (``CLAIMS``, in report order): each measures its numbers with their intervals, judges
them against its thresholds (``judge``: holds, fails or undecided; the ``verdict`` stored in
``sections/NAME.json``) and renders its Markdown apart. The runner
(``runner.py``) does the caching, timing, seed ranges and shared building blocks.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import HspaceError
from ..files import read_json, write_json, write_text
from . import asyrp, fig8, jacobian, pca_vs_random, sequential, swap, table1
from .runner import FULL, HELD_OUT, QUICK, TABLE_ATTRIBUTES, Config, Run, deciding_short, judged

CLAIMS = (pca_vs_random, table1, fig8, jacobian, swap, asyrp, sequential)
SECTIONS = tuple(claim.NAME for claim in CLAIMS)

TITLES = {
    "pca_vs_random": "PCs are semantic, random directions not (Sec. 4.1, Fig. 5-6)",
    "table1": "conditional directions less entangled (Sec. 5, Table 1)",
    "fig8": "supervised h directions from few pairs, not x_T (Fig. 8)",
    "jacobian": "Jacobian directions are local and transfer (Sec. 4.2, Fig. 7)",
    "swap": "h-swap carries the content (Fig. 3)",
    "asyrp": "Asyrp amplifies an edit (SM A)",
    "sequential": "sequential edits add up (Fig. 11)",
}

__all__ = ["CLAIMS", "SECTIONS", "TABLE_ATTRIBUTES", "Config", "QUICK", "FULL", "run_reproduce", "compare"]


def run_reproduce(out: str | Path, quick: bool = False, engine=None, claims: list[str] | None = None, render_only: bool = False) -> Path:
    """Measure every claim, or the ``claims`` named (``SECTIONS``), cached and resumable, and write ``out/report.md``
    with them; returns its path. ``render_only``: measure nothing, write the report from the cached sections with
    today's verdict rules (an error names a section that is missing or was measured with other settings)."""
    chosen = _chosen(claims)
    config = QUICK if quick else FULL
    run = Run(out, config, engine, render_only=render_only)
    start = time.perf_counter()
    if render_only:
        run.timings.update({name: read_json(Path(out) / "sections" / f"{name}.json", "reproduce section")["seconds"]
                            for name in ("bank", "ddim_bank") if (Path(out) / "sections" / f"{name}.json").is_file()})
    else:
        run.bank  # drawn (or resumed) and annotated first, so that their time is their own stage
        if fig8 in chosen:
            run.ddim_bank
    results = {claim.NAME: run.section(claim.NAME, claim.measure, getattr(claim, "VERSION", None), claim.judge) for claim in chosen}
    total = time.perf_counter() - start
    lines = [
        f"# hspace reproduce: the paper's claims measured on the bundled toy-faces model `{run.engine.name}` (h at {run.engine.h_location})",
        "",
        f"Mode: {'quick' if quick else 'full'}; {config.steps} generative steps, eta {config.eta:g}, {_clipping(run.engine)}; bank of "
        f"{config.bank_n} samples (seeds 0..{config.bank_n - 1}; and one of {config.fig8_bank_n} under DDIM for Fig. 8), held-out samples from seed {HELD_OUT}. "
        "Attributes are read by the bundled classifier (binary: probability; hair colour: value in [0, 1]).",
        "",
    ]
    if len(chosen) < len(CLAIMS):
        lines += [f"Claims measured: {', '.join(c.NAME for c in chosen)} (of {', '.join(SECTIONS)}).", ""]
    for claim in chosen:
        lines += claim.render(results[claim.NAME], config)
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in run.timings.items()]
    lines += [f"| sum of stages | {sum(run.timings.values()):.1f} |", f"| this invocation (cached stages are not re-run) | {total:.1f} |", ""]
    report = Path(out) / "report.md"
    write_text(report, "\n".join(lines))
    write_json(Path(out) / "timings.json", run.timings)
    return report


def _chosen(claims: list[str] | None) -> tuple:
    if not claims:
        return CLAIMS
    unknown = [c for c in claims if c not in SECTIONS]
    if unknown:
        raise HspaceError(f"unknown claim(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")
    return tuple(claim for claim in CLAIMS if claim.NAME in claims)


def _clipping(engine) -> str:
    on = engine.scheduler_config.get("clip_sample")
    chosen = "the model's setting" if engine.spec.clip_sample is None else "--no-clip" if not engine.spec.clip_sample else "forced on"
    return f"predicted x_0 {'clipped to [-1, 1]' if on else 'not clipped'} ({chosen})"


def compare(outs: list[str | Path]) -> str:
    """A side-by-side Markdown table of finished reports (their folders), claim by claim: each verdict (judged again by
    today's rule) with its headline numbers, and what each report measured with."""
    reports = []
    for out in outs:
        sections = {}
        for claim in CLAIMS:
            path = Path(out) / "sections" / f"{claim.NAME}.json"
            if not path.is_file():
                raise HspaceError(f"{str(out)!r} has no {claim.NAME} section; run `hspace reproduce --out {out}` (with its --model) first")
            result = read_json(path, "reproduce section")
            sections[claim.NAME] = {**result, "verdict": judged(claim.NAME, result, claim.judge)}
        key = sections[CLAIMS[0].NAME]["config"]
        spec = key["spec"]
        reports.append((f"`{spec['model']}` (h at {spec['h_location']}; {key['steps']} steps, bank {key['bank_n']})", sections))
    lines = ["| claim | " + " | ".join(label for label, _ in reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for claim in CLAIMS:
        cells = [f"**{s[claim.NAME]['verdict']['state']}**{deciding_short(s[claim.NAME]['verdict'].get('decide_at'))}: {claim.headline(s[claim.NAME])}" for _, s in reports]
        lines.append(f"| {TITLES[claim.NAME]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
