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

from ..files import write_json, write_text
from . import asyrp, fig8, jacobian, pca_vs_random, sequential, swap, table1
from .runner import FULL, HELD_OUT, QUICK, TABLE_ATTRIBUTES, Config, Run

CLAIMS = (pca_vs_random, table1, fig8, jacobian, swap, asyrp, sequential)
SECTIONS = tuple(claim.NAME for claim in CLAIMS)

__all__ = ["CLAIMS", "SECTIONS", "TABLE_ATTRIBUTES", "Config", "QUICK", "FULL", "run_reproduce"]


def run_reproduce(out: str | Path, quick: bool = False, engine=None) -> Path:
    """Measure every claim (cached, resumable) and write ``out/report.md``; returns its path."""
    config = QUICK if quick else FULL
    run = Run(out, config, engine)
    start = time.perf_counter()
    run.bank, run.ddim_bank  # drawn (or resumed) and annotated first, so that their time is their own stage
    results = {claim.NAME: run.section(claim.NAME, claim.measure, getattr(claim, "VERSION", None), claim.judge) for claim in CLAIMS}
    total = time.perf_counter() - start
    lines = [
        f"# hspace reproduce: the paper's claims measured on the bundled toy-faces model `{run.engine.name}` (h at {run.engine.h_location})",
        "",
        f"Mode: {'quick' if quick else 'full'}; {config.steps} generative steps, eta {config.eta:g}, {_clipping(run.engine)}; bank of "
        f"{config.bank_n} samples (seeds 0..{config.bank_n - 1}; and one of {config.fig8_bank_n} under DDIM for Fig. 8), held-out samples from seed {HELD_OUT}. "
        "Attributes are read by the bundled classifier (binary: probability; hair colour: value in [0, 1]).",
        "",
    ]
    for claim in CLAIMS:
        lines += claim.render(results[claim.NAME], config)
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in run.timings.items()]
    lines += [f"| sum of stages | {sum(run.timings.values()):.1f} |", f"| this invocation (cached stages are not re-run) | {total:.1f} |", ""]
    report = Path(out) / "report.md"
    write_text(report, "\n".join(lines))
    write_json(Path(out) / "timings.json", run.timings)
    return report


def _clipping(engine) -> str:
    on = engine.scheduler_config.get("clip_sample")
    chosen = "the model's setting" if engine.spec.clip_sample is None else "--no-clip" if not engine.spec.clip_sample else "forced on"
    return f"predicted x_0 {'clipped to [-1, 1]' if on else 'not clipped'} ({chosen})"
