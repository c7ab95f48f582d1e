"""`hspace reproduce --quick`: the report is produced, every section is there, its numbers are pinned."""

import json
import re

import pytest

from hspace import HspaceError
from hspace.cli import main
from hspace.reproduce import SECTIONS, TABLE_ATTRIBUTES, run_reproduce


@pytest.mark.slow
def test_quick_reproduce_writes_a_sane_report_and_resumes(tmp_path):
    out = tmp_path / "r"
    assert main(["reproduce", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for title in ("PCA vs random", "Table 1", "Fig. 8", "Fig. 7", "Fig. 3", "SM A", "Fig. 11", "Timings"):
        assert title in report, title
    assert len(re.findall(r"\*\*(holds|fails|undecided)\*\*", report)) == 8  # 7 claims + the realism half of Fig. 6
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).stat().st_size > 1000, image

    sections = {name: json.loads((out / "sections" / f"{name}.json").read_text()) for name in SECTIONS}
    share = lambda x: 0.0 <= x <= 1.0  # noqa: E731
    pca = sections["pca_vs_random"]
    assert all(v >= 0 for v in pca["strongest_change_at_max_scale"].values())
    assert sum(pca["variance_ratio"]) < 1 and sorted(pca["variance_ratio"], reverse=True) == pca["variance_ratio"]
    for label in ("supervised", "disentangled", "disentangled_per_step", "regression"):
        matrix = sections["table1"][label]["matrix"]
        assert len(matrix) == len(TABLE_ATTRIBUTES) and all(len(r) == len(TABLE_ATTRIBUTES) for r in matrix)
        assert all(-1 <= v <= 1 for r in matrix for v in r)
    assert all(share(r["h_success"]) and share(r["x_T_success"]) and -1 <= r["h_split_half"] <= 1 for r in sections["fig8"]["rows"])
    assert all(share(r["inside_source"]) and share(r["inside_transfer"]) and r["concentration_transfer"] > 0 for r in sections["jacobian"]["rows"])
    assert all(share(v["follows_h"]) for v in sections["swap"]["attributes"].values())
    assert all(share(v) for r in sections["sequential"]["rows"] for v in r["present"].values())
    _assert_pinned(sections)
    timings = json.loads((out / "timings.json").read_text())
    assert set(SECTIONS) <= set(timings) and all(t > 0 for t in timings.values())

    # Run again: every section comes from its cache (same numbers, the bank is not drawn again).
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "sections").iterdir()}
    assert main(["reproduce", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sections").iterdir()} == stamp
    assert (out / "report.md").read_text().split("## Timings")[0] == report.split("## Timings")[0]

    # --render-only: the same report from the cached sections, measuring nothing; a missing section is named, not measured
    assert main(["reproduce", "--quick", "--render-only", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "report.md").read_text().split("## Timings")[0] == report.split("## Timings")[0]
    moved = out / "swap.json.away"
    (out / "sections" / "swap.json").rename(moved)
    with pytest.raises(HspaceError, match="section swap of .* cannot be read: there is none"):
        run_reproduce(out, quick=True, render_only=True)
    assert not (out / "sections" / "swap.json").exists()
    moved.rename(out / "sections" / "swap.json")

    # the side-by-side table of finished reports: one row per claim, each cell its report's verdict and headline
    from hspace.reproduce import TITLES, compare

    rows = compare([out, out]).splitlines()
    assert rows[0] == "| claim | `toyfaces` (h at mid.out; 8 steps, bank 64) | `toyfaces` (h at mid.out; 8 steps, bank 64) |" and len(rows) == 2 + len(SECTIONS)
    for name, row in zip(SECTIONS, rows[2:]):
        cells = row.split(" | ")
        assert cells[0] == f"| {TITLES[name]}" and cells[1] == cells[2].rstrip(" |")
        assert cells[1].startswith(f"**{sections[name]['verdict']['state']}**")
        more = sections[name]["verdict"].get("decide_at")  # an undecided verdict: the samples that would decide it
        assert (more is not None) == (sections[name]["verdict"]["state"] == "undecided")
        assert more is None or cells[1].startswith(f"**undecided** ({more['factor']:g}x n: {more['state']}): " if more["factor"] else "**undecided** (>1000x n): ")
    with pytest.raises(HspaceError, match="has no pca_vs_random section"):
        compare([out, tmp_path / "nothing"])


# The quick mode's numbers on the bundled model. A regression in any method, the engine or the seeds
# turns this red. Every verdict is three-way with a margin (runner.py): on the quick mode's few samples most
# intervals straddle their thresholds (undecided); the Jacobian's source face misses its share (fails).
PINNED_VERDICTS = {
    "pca_vs_random": "undecided", "table1": "undecided", "fig8": "undecided", "jacobian": "fails", "swap": "undecided", "asyrp": "undecided",
    "sequential": "undecided",
}
# Tolerances. Measured: the whole quick run with OMP_NUM_THREADS=1 and with 2 threads on this project's CPU
# (hspace reproduce --quick twice, sections compared number by number) differs by at most 4.1e-6 relative
# (the Jacobian's transfer shares and concentrations) and 2e-8 absolute elsewhere; another CPU sums floats in
# another order too (conftest: up to ~1e-5 on a sample). rel 1e-3 leaves a factor 250 over the measured spread;
# shares of 6-16 samples move in steps of 1/16 or more, so they are pinned exactly.
RELATIVE = 1e-3


def share(value: float, n: int):
    """A share of n classifier calls: which sample is borderline (a score near 0.5) is fixed on this CPU and the same
    at 1 and 2 threads, but another CPU's rounding may tip one, so it is pinned give or take one sample (1/n)."""
    return pytest.approx(value, abs=1 / n + 1e-9)


def _assert_pinned(sections):
    near = lambda x: pytest.approx(x, rel=RELATIVE, abs=1e-4)  # noqa: E731
    assert {name: s["verdict"]["state"] for name, s in sections.items()} == PINNED_VERDICTS
    pca = sections["pca_vs_random"]
    assert (pca["verdict"]["semantic"], pca["verdict"]["realism"]) == ("undecided", "fails")
    # R = 6 random directions (2 per PC; random1-3 are seed 0's, as with one per PC)
    assert pca["strongest_change_at_max_scale"] == {
        "pc1": near(1.5621), "pc2": near(1.53178), "pc3": near(0.84645), "random1": near(0.13932), "random2": near(0.11203), "random3": near(0.07789),
        "random4": near(0.166893), "random5": near(0.166636), "random6": near(0.083555),
    }
    assert (pca["random_strongest_mean"], *pca["random_strongest_interval"]) == (near(0.124386), near(0.092789), near(0.155983))
    assert pca["random_rise_interval"] == [pytest.approx(-11.575, rel=1e-3), pytest.approx(57.965, rel=1e-3)]
    assert pca["variance_ratio"] == [near(0.136382), near(0.081174), near(0.055175)]
    assert pca["toy_fid_unedited"] == pytest.approx(193.7206, rel=1e-3)
    assert pca["toy_fid_rise_at_large_scale"] == {"pc": pytest.approx(89.345, rel=1e-3), "random": pytest.approx(23.1947, rel=1e-3), "scale": 8.0}
    offs = {v: sections["table1"][v]["mean_off_diagonal"] for v in ("supervised", "disentangled", "disentangled_per_step", "regression")}
    assert offs == {"supervised": near(0.105834), "disentangled": near(0.067233), "disentangled_per_step": near(0.06202), "regression": near(0.084861)}
    fig8 = [(r["pairs"], r["h_split_half"], r["x_T_split_half"]) for r in sections["fig8"]["rows"]]
    # the cosines are means over 20 draws of the pairs (fig8.DRAWS); their intervals' centres are the means
    expected = [(1, 0.06182, 0.00358), (2, 0.15884, 0.00536), (4, 0.24391, 0.00198), (8, 0.32071, 0.01057)]
    assert fig8 == [tuple(near(v) for v in row) for row in expected] and sections["fig8"]["calibrated_scale"] == 1.5
    # The edits: 5 draws x 4 samples per n, pooled (shares of 20: steps of 0.05, give or take one sample), and their
    # bootstrap intervals (percentiles of 2000 resamples of the draws with a fixed generator: exact given the outcomes,
    # so one tipped sample moves them by a step too).
    edits = [(r["h_success"], *r["h_success_interval"], r["x_T_success"], *r["x_T_success_interval"]) for r in sections["fig8"]["rows"]]
    expected = [(0.65, 0.55, 0.75, 0.45, 0.35, 0.5), (0.75, 0.6, 0.9, 0.5, 0.35, 0.65), (0.9, 0.8, 1.0, 0.55, 0.4, 0.7), (0.95, 0.85, 1.0, 0.8, 0.75, 0.9)]
    assert edits == [tuple(share(v, 20) for v in row) for row in expected]
    assert all((r["random_success"], *r["random_success_interval"]) == (share(0.3, 20), share(0.25, 20), share(0.4, 20)) for r in sections["fig8"]["rows"])
    assert (sections["fig8"]["verdict"]["convergence"], sections["fig8"]["verdict"]["edits"]) == ("undecided", "undecided")
    to_all = [(r["h_to_all"], r["h_floor"], r["x_T_to_all"]) for r in sections["fig8"]["rows"]]
    expected = [(0.31427, 0.24702, 0.1756), (0.39743, 0.26018, 0.25325), (0.53838, 0.17669, 0.35933), (0.73498, 0.23311, 0.50659)]
    assert to_all == [tuple(near(v) for v in row) for row in expected]
    assert all(r[f"{k}_interval"][0] < r[k] < r[f"{k}_interval"][1] for r in sections["fig8"]["rows"] for k in ("h_split_half", "h_to_all", "x_T_floor"))
    assert (sections["fig8"]["h_pairs_to_half"], sections["fig8"]["x_T_pairs_to_half"], sections["fig8"]["draws"]) == (8, 8, 20)
    # The Jacobian directions come from 10 iterations (the quick mode's budget), not converged: they are pinned as what
    # this iteration computes from these seeds; the spread between thread counts is the 4.1e-6 above.
    jac = [(r["part"], r["output_mask"], r["window"], r["h_cells"], r["inside_source"], r["inside_transfer"], r["concentration_transfer"]) for r in sections["jacobian"]["rows"]]
    expected = [
        ("eyes", True, "all", False, 0.44267, 0.50144, 2.9125), ("eyes", True, "all", True, 0.44406, 0.50533, 2.935),
        ("eyes", True, "from_step", False, 0.41442, 0.49697, 2.8996), ("eyes", True, "from_step", True, 0.41783, 0.50244, 2.9315),
        ("eyes", False, "all", False, 0.31353, 0.43744, 2.5097), ("eyes", False, "all", True, 0.32025, 0.42416, 2.428),
        ("eyes", False, "from_step", False, 0.26161, 0.34658, 1.9849), ("eyes", False, "from_step", True, 0.2899, 0.40822, 2.3326),
        ("mouth", True, "all", False, 0.36281, 0.36691, 2.9872), ("mouth", True, "all", True, 0.36561, 0.36721, 2.9882),
        ("mouth", True, "from_step", False, 0.39647, 0.46794, 3.8018), ("mouth", True, "from_step", True, 0.39911, 0.46576, 3.7874),
        ("mouth", False, "all", False, 0.29683, 0.34783, 2.8337), ("mouth", False, "all", True, 0.32851, 0.35612, 2.8993),
        ("mouth", False, "from_step", False, 0.34889, 0.45521, 3.7029), ("mouth", False, "from_step", True, 0.37387, 0.46135, 3.7544),
    ]
    assert jac == [(*row[:4], *(near(v) for v in row[4:])) for row in expected]
    follows = {k: v["follows_h"] for k, v in sections["swap"]["attributes"].items()}
    assert follows == {"smile": share(1.0, 8), "eyes_open": share(0.75, 8), "glasses": share(2 / 3, 3), "hat": share(1.0, 8), "hair_color": share(0.875, 8),
                       "skin_tone": share(0.75, 8), "yaw": share(1.0, 8), "background": share(0.0, 8)}
    # Asyrp's mean smile changes are ~1e-5 of a probability: noise, not an effect. What is pinned is that the paired
    # intervals of Asyrp's gain contain 0 (so the claim does not hold here), and the changes to 1e-6 absolute (the
    # measured spread between thread counts is 2e-8).
    asyrp = sections["asyrp"]
    assert all(low < 0 < high for low, high in asyrp["asyrp_gain_interval"].values())
    assert asyrp["mean_smile_change"] == {
        "single": {"0.5": pytest.approx(1.4295e-05, abs=1e-6), "1": pytest.approx(6.0121e-05, abs=1e-6)},
        "asyrp": {"0.5": pytest.approx(4.2955e-05, abs=1e-6), "1": pytest.approx(8.2970e-05, abs=1e-6)},
    }
    # the margins themselves: Wilson intervals of 8/8 and 6/8 pairs, normal intervals over the PCA's 6 samples
    swap = sections["swap"]["verdict"]["intervals"]
    assert swap["smile"] == [near(0.60967), 1.0] and swap["eyes_open"] == [near(0.40928), near(0.92852)]
    pca = sections["pca_vs_random"]["intervals"]
    assert pca["pc3"] == [near(0.37551), near(1.31739)] and pca["random1"] == [near(0.077925), near(0.200705)]
    present = [r["present"] for r in sections["sequential"]["rows"]]
    assert present == [
        {"smile": 0.5, "glasses": near(1 / 3), "hat": 0.0},
        {"smile": near(1 / 3), "glasses": 0.5, "hat": 0.0},
        {"smile": near(1 / 6), "glasses": near(5 / 6), "hat": near(2 / 3)},
    ]


def test_the_committed_full_fig8_curves_rise_within_their_intervals():
    """docs/reproduce (full mode, 20 draws of the pairs per n): no cosine or edit-success curve falls from one n to the
    next by more than its intervals allow (the one-split curves before dipped from 0.339 at 1 pair to -0.265 at 2), and
    the committed verdicts are what the judges read off the committed numbers."""
    from pathlib import Path

    rows = json.loads((Path(__file__).parent.parent / "docs/reproduce/sections/fig8.json").read_text())["rows"]
    assert [r["pairs"] for r in rows] == [1, 2, 5, 10, 20, 50, 100, 200]
    for space, key in (("h", "split_half"), ("h", "to_all"), ("x_T", "to_all"), ("h", "success"), ("x_T", "success")):
        for before, after in zip(rows, rows[1:]):
            assert after[f"{space}_{key}_interval"][1] >= before[f"{space}_{key}_interval"][0], (space, key, before["pairs"])
        assert rows[-1][f"{space}_{key}"] > rows[0][f"{space}_{key}"]
    from hspace.reproduce import CLAIMS
    from hspace.reproduce.runner import judged

    folder = Path(__file__).parent.parent / "docs/reproduce/sections"
    for claim in CLAIMS:  # the verdict with its power analysis where it is undecided
        section = json.loads((folder / f"{claim.NAME}.json").read_text())
        assert json.loads(json.dumps(judged(claim.NAME, section, claim.judge))) == section["verdict"], claim.NAME


# The same quick report on the bundled toy DiT (h at its default, the last block), pinned with the same tolerances.
DIT_PINNED_VERDICTS = {
    "pca_vs_random": "holds", "table1": "undecided", "fig8": "fails", "jacobian": "holds", "swap": "undecided", "asyrp": "undecided",
    "sequential": "undecided",
}


# The DiT's table1, fig8, asyrp and sequential run the same code as the U-Net's above, whose numbers that test pins
# (and the block study pins the regression's off-diagonal mass at block.5): this test measures the claims whose
# numbers are the transformer's own (its PCA and realism, h-swap of a residual stream), in a fifth of the whole
# report's time (docs/reproduce-toydit-quick/ holds the whole report). Its Jacobian (17 s more here) is pinned at the
# same block by test_blocks.py's quick study (locality 0.79 at block.5) through the same claim's code.
DIT_CLAIMS = ["pca_vs_random", "swap"]


@pytest.mark.slow
def test_quick_reproduce_on_the_toy_dit_runs_its_claims_and_pins_their_numbers(tmp_path):
    out = tmp_path / "dit"
    assert main(["reproduce", "--quick", "--model", "toydit", "--device", "cpu", "--claims", *DIT_CLAIMS, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# hspace reproduce: the paper's claims measured on the bundled toy-faces model `toydit` (h at block.5)")
    assert f"Claims measured: {', '.join(DIT_CLAIMS)}" in report
    assert len(re.findall(r"\*\*(holds|fails|undecided)\*\*", report)) == len(DIT_CLAIMS) + 1  # + the realism half of Fig. 6
    sections = {name: json.loads((out / "sections" / f"{name}.json").read_text()) for name in DIT_CLAIMS}
    assert not (out / "sections" / "table1.json").exists() and not (out / "ddim_bank").exists()
    near = lambda x: pytest.approx(x, rel=RELATIVE, abs=1e-4)  # noqa: E731
    assert {name: s["verdict"]["state"] for name, s in sections.items()} == {name: DIT_PINNED_VERDICTS[name] for name in DIT_CLAIMS}
    pca = sections["pca_vs_random"]
    assert (pca["verdict"]["semantic"], pca["verdict"]["realism"]) == ("holds", "fails")
    assert pca["strongest_change_at_max_scale"] == {
        "pc1": near(1.69055), "pc2": near(1.240846), "pc3": near(1.135533), "random1": near(0.342219), "random2": near(0.176098),
        "random3": near(0.209861), "random4": near(0.341115), "random5": near(0.341272), "random6": near(0.10299),
    }
    assert pca["variance_ratio"] == [near(0.116841), near(0.10259), near(0.083153)]
    assert pca["toy_fid_unedited"] == pytest.approx(156.4693, rel=1e-3)
    # h-swap in a transformer: the block's output is the whole stream, so the swapped sample is the donor's velocity
    # integrated from the other noise (docs/transformers.md); its shares of a few pairs, pinned exactly
    assert {k: (v["pairs_that_differ"], v["follows_h"]) for k, v in sections["swap"]["attributes"].items() if k in ("smile", "eyes_open", "glasses", "hat")} == {
        "smile": (3, share(1.0, 3)), "eyes_open": (4, share(0.5, 4)), "glasses": (3, share(1 / 3, 3)), "hat": (4, share(1.0, 4))}
