"""Which block is h in a diffusion transformer? The paper's tests of h-space, measured at every block.

A transformer has no bottleneck, so h could be the output of any block. For every block N this runs four of
the report's claims with h at ``block.N`` (each with its own bank, since h differs; the samples do not), with
the same protocols and code as ``hspace reproduce``:

- **PCA vs random** (Sec. 4.1): the weakest of the top k PCs over the strongest random direction of the same
  per-timestep norm, on all attributes (their largest mean |change| at +-3 sigma). Above 1: every PC is a
  stronger edit than every random direction.
- **h-swap** (Fig. 3): the share of binary attributes' differing pairs that follow the h donor.
- **Regression directions' off-diagonal mass** (Table 1): the mean |off-diagonal| effect of the conditional
  directions over their mean |own| effect (lower: each direction moves its own attribute and less else).
- **Jacobian locality** (Fig. 7): the share of the pixel change that the top singular vector at a part makes
  inside that part on other rendered faces (the best protocol, mean over eyes and mouth).

The block that wins is the one with the best mean rank over the four; each section is cached
(``block.N/sections/*.json``), so an interrupted study resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from ..errors import HspaceError
from ..files import write_json, write_text
from . import jacobian, pca_vs_random, swap, table1
from .runner import BINARY, QUICK, Run, deciding_short

logger = logging.getLogger(__name__)

CLAIMS = (pca_vs_random, table1, swap, jacobian)
# (key, column title, True where higher is better)
METRICS = (
    ("pca_ratio", "weakest PC / strongest random", True),
    ("swap_follows", "swap: binary pairs following h", True),
    ("off_diagonal", "regression: off-diagonal / own", False),
    ("locality", "Jacobian: change inside the part", True),
)
# The study's counts: the quick report's protocol with 8 PCs against 8 random directions, and more samples.
STUDY = replace(QUICK, bank_n=96, pca_k=8, pca_samples=8, pca_random_per_pc=1, table_n=16, table_k=16, swap_pairs=16, jacobian_transfer=4)
STUDY_QUICK = replace(QUICK, bank_n=24, pca_k=2, pca_samples=3, pca_random_per_pc=1, pca_large_scales=[6.0], table_n=4, table_k=6, swap_pairs=4,
                      jacobian_transfer=1, jacobian_max_iter=3, steps=4)


def block_locations(engine) -> list[str]:
    """Every h location (hook point) of an engine, in forward order: a transformer's blocks of every kind
    (``block.N``; FLUX's ``joint.N`` and ``single.N``), a U-Net's ``mid.in`` and ``mid.out``."""
    return list(engine.model.locations())


def _chosen(engine, blocks: list[str] | None) -> list[str]:
    """The study's locations: every one, or ``blocks`` in their positive form (block.-1 -> block.5)."""
    names = block_locations(engine)
    if not blocks:
        return names
    chosen, unknown = [], []
    for b in blocks:
        try:
            chosen.append(engine.model.check_location(b))
        except HspaceError:
            unknown.append(b)
    if unknown:
        raise HspaceError(f"unknown block(s) {', '.join(unknown)}; valid: {', '.join(names)} (a negative N counts from the end)")
    return list(dict.fromkeys(chosen))


def metrics(results: dict) -> dict:
    """The four numbers of one block from its four claims' sections."""
    strongest = results["pca_vs_random"]["strongest_change_at_max_scale"]
    pcs = [v for k, v in strongest.items() if k.startswith("pc")]
    randoms = [v for k, v in strongest.items() if k.startswith("random")]
    swapped = [v["follows_h"] for k, v in results["swap"]["attributes"].items() if k in BINARY]
    regression = results["table1"]["regression"]
    best = results["jacobian"]["best"]
    return {
        "pca_ratio": min(pcs) / max(max(randoms), 1e-12),
        "swap_follows": sum(swapped) / len(swapped) if swapped else float("nan"),
        "off_diagonal": regression["mean_off_diagonal"] / max(regression["mean_own"], 1e-12),
        "locality": sum(b["inside_transfer"] for b in best.values()) / len(best),
        "verdicts": {claim.NAME: results[claim.NAME]["verdict"]["state"] for claim in CLAIMS},
        "decide_at": {claim.NAME: results[claim.NAME]["verdict"]["decide_at"] for claim in CLAIMS if "decide_at" in results[claim.NAME]["verdict"]},
    }


def ranking(per_block: dict[str, dict]) -> dict:
    """Each block's mean rank over the metrics (1 = best on every one), the winner and its margins."""
    names = list(per_block)
    ranks = {name: [] for name in names}
    for key, _, higher in METRICS:
        values = {n: per_block[n][key] if higher else -per_block[n][key] for n in names}
        for name in names:  # 1 + the blocks strictly better; tied blocks share the mean of their places
            better = sum(values[o] > values[name] for o in names)
            tied = sum(values[o] == values[name] for o in names) - 1
            ranks[name].append(1 + better + tied / 2)
    mean_rank = {name: sum(r) / len(r) for name, r in ranks.items()}
    # ties on the mean rank go to the stronger PCA ratio (the paper's first test of a semantic space)
    winner = min(names, key=lambda n: (mean_rank[n], -per_block[n]["pca_ratio"]))
    margins = {}
    for key, _, higher in METRICS:
        others = [per_block[n][key] for n in names if n != winner]
        best_other = (max if higher else min)(others) if others else float("nan")
        margins[key] = {"winner": per_block[winner][key], "best_other": best_other}
    return {"mean_rank": mean_rank, "ranks": ranks, "winner": winner, "margins": margins}


def run_blocks(out: str | Path, model: str = "toydit", quick: bool = False, blocks: list[str] | None = None, device: str | None = None,
               *, engine=None, any_model: bool = False) -> Path:
    """Measure every block of a transformer (or ``blocks``), write ``out/blocks.md``, ``out/blocks.json`` and a figure;
    returns the report's path. ``engine`` (instead of ``model`` and ``device``): a loaded one, with its prompt and size.
    ``any_model``: measure a model outside the toy-faces domain with that domain's classifier (``Run``)."""
    from ..engine import Engine

    config = STUDY_QUICK if quick else STUDY
    out = Path(out)
    first = engine or Engine.load(model, device=device)
    names = _chosen(first, blocks)
    start = time.perf_counter()
    runs = {name: Run(out / name, config, first.at(name), any_model=any_model) for name in names}
    _draw_banks(runs, config)
    per_block, seconds = {}, {}
    for name, run in runs.items():
        logger.info("block study: h at %s", name)
        results = {claim.NAME: run.section(claim.NAME, claim.measure, getattr(claim, "VERSION", None), claim.judge) for claim in CLAIMS}
        per_block[name] = metrics(results)
        seconds[name] = sum(run.timings.values())
    order = ranking(per_block)
    summary = {"model": first.name, "mode": "quick" if quick else "full", "steps": config.steps, "blocks": per_block, "ranking": order,
               "seconds": seconds, "this_invocation_seconds": time.perf_counter() - start, "default_before": first.h_location}
    write_json(out / "blocks.json", summary)
    figure = _figure(out, per_block, order["winner"])
    report = out / "blocks.md"
    write_text(report, "\n".join(render(summary, figure)))
    return report


def _draw_banks(runs: dict, config) -> None:
    """The bank of every block that has none yet, from one draw (h recorded at all of them in each pass)."""
    from ..bank import build_banks

    todo = {name: run for name, run in runs.items() if run.cached_bank() is None}
    if not todo:
        return
    logger.info("block study: one bank of %d samples for %d block(s)", config.bank_n, len(todo))
    start = time.perf_counter()
    engine = next(iter(todo.values())).engine
    banks = build_banks({name: run.out / "bank" for name, run in todo.items()}, engine, config.bank_n, config.steps, config.eta,
                        batch_size=config.batch_size)
    share = (time.perf_counter() - start) / len(todo)
    for name, run in todo.items():
        run.adopt_bank("bank", banks[name], share)


def _figure(out: Path, per_block: dict, winner: str) -> str:
    from matplotlib.figure import Figure

    names = list(per_block)
    fig = Figure(figsize=(3.2 * len(METRICS), 3))
    axes = fig.subplots(1, len(METRICS))
    for ax, (key, title, higher) in zip(axes, METRICS):
        ax.plot(range(len(names)), [per_block[n][key] for n in names], "o-")
        ax.axvline(names.index(winner), color="0.7", ls="--")
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0, fontsize=7)
        ax.set(title=title + (" (higher better)" if higher else " (lower better)"), xlabel="h location")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out / "blocks.png", dpi=100)
    return "blocks.png"


def render(summary: dict, figure: str) -> list[str]:
    order = summary["ranking"]
    lines = [
        f"# Which block is h? `{summary['model']}`, {summary['mode']} mode ({summary['steps']} steps)",
        "",
        "Every block's output on the image tokens taken as h in turn, and four of the report's claims measured there with the "
        "report's protocols (src/hspace/reproduce/blocks.py says what each number is).",
        "",
        "| h at | " + " | ".join(title + (" (up)" if higher else " (down)") for _, title, higher in METRICS) + " | mean rank | verdicts (pca, table1, swap, jacobian) |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for name, m in summary["blocks"].items():
        mark = f"**{name}**" if name == order["winner"] else name
        verdicts = ", ".join(m["verdicts"][c.NAME] + deciding_short(m.get("decide_at", {}).get(c.NAME)) for c in CLAIMS)
        lines.append(f"| {mark} | " + " | ".join(f"{m[key]:.2f}" for key, _, _ in METRICS) + f" | {order['mean_rank'][name]:.2f} | {verdicts} |")
    margins = "; ".join(f"{title}: {v['winner']:.2f} against the best other block's {v['best_other']:.2f}"
                        for (key, title, _), v in zip(METRICS, order["margins"].values()))
    lines += ["", f"Winner: **{order['winner']}** (best mean rank {order['mean_rank'][order['winner']]:.2f}; ties go to the higher PCA ratio). {margins}.",
              "", f"![per block]({figure})", "",
              "Seconds per block: " + ", ".join(f"{n} {s:.0f}" for n, s in summary["seconds"].items()), ""]
    return lines
