"""The three-way verdicts of `hspace reproduce` (holds / fails / undecided), judged off measured numbers, and the
bootstrap interval of repeated draws: each judge on sections built to sit on either side of its threshold and across it."""

import json

import pytest
import torch

from hspace.reproduce import asyrp, fig8, jacobian, pca_vs_random, sequential, swap, table1
from hspace.reproduce.runner import FULL, QUICK, Run, cluster_bootstrap, combine, verdict


def test_verdict_states_and_combination():
    assert verdict(True, False)["state"] == "holds" and verdict(True, False)["holds"] is True
    assert verdict(False, True)["state"] == "fails" and verdict(False, True)["holds"] is False
    assert verdict(False, False)["state"] == "undecided"
    with pytest.raises(ValueError, match="both hold and fail"):
        verdict(True, True)
    h, f, u = verdict(True, False), verdict(False, True), verdict(False, False)
    assert combine(h, h)["state"] == "holds" and combine(h, u)["state"] == "undecided" and combine(u, f)["state"] == "fails"


def test_cluster_bootstrap_matches_the_normal_interval_of_many_draws():
    generator = torch.Generator().manual_seed(3)
    # 400 draws of 10 outcomes, each draw with its own success rate (the draws differ, as pairs do)
    rates = torch.rand(400, generator=generator) * 0.6 + 0.2
    groups = [(torch.rand(10, generator=generator) < r).double().tolist() for r in rates]
    mean, (low, high) = cluster_bootstrap(groups)
    draw_means = torch.tensor([sum(g) / len(g) for g in groups], dtype=torch.float64)
    assert mean == pytest.approx(float(draw_means.mean()), abs=1e-12)  # equal group sizes: the pooled share
    normal = 1.959964 * float(draw_means.std()) / 400**0.5
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(normal, rel=0.15)
    # identical draws: no spread between them, a point interval
    assert cluster_bootstrap([[1.0, 0.0]] * 5) == (0.5, (0.5, 0.5))
    # one draw: no interval to be had
    assert cluster_bootstrap([[1.0, 0.0, 1.0]])[1] == (-float("inf"), float("inf"))


def _swap(follows: dict[str, tuple[int, int]]) -> dict:
    return {"attributes": {k: {"follows_h": s / n, "pairs_that_differ": n} for k, (s, n) in follows.items()}}


def test_share_judges_hold_fail_and_stay_undecided():
    # Wilson intervals of 20 pairs: 19/20 from 0.76, 12/20 [0.39, 0.78], 4/20 to 0.42
    assert swap.judge(_swap({"smile": (19, 20), "hat": (20, 20)}))["state"] == "holds"
    assert swap.judge(_swap({"smile": (19, 20), "hat": (12, 20)}))["state"] == "undecided"
    assert swap.judge(_swap({"smile": (19, 20), "hat": (4, 20)}))["state"] == "fails"
    rows = lambda p: [{"after": "all", "present": {"smile": 1.0, "glasses": 0.9, "hat": p}}]  # noqa: E731
    assert sequential.judge({"samples": 30, "rows": rows(0.9)})["state"] == "holds"
    assert sequential.judge({"samples": 30, "rows": rows(0.5)})["state"] == "undecided"
    assert sequential.judge({"samples": 30, "rows": rows(0.2)})["state"] == "fails"


def test_interval_judges_hold_fail_and_stay_undecided():
    gain = lambda *pairs: {"asyrp_gain_interval": {str(i): list(p) for i, p in enumerate(pairs)}}  # noqa: E731
    assert asyrp.judge(gain((0.01, 0.2), (0.1, 0.3)))["state"] == "holds"
    assert asyrp.judge(gain((0.01, 0.2), (-0.1, 0.3)))["state"] == "undecided"
    assert asyrp.judge(gain((0.01, 0.2), (-0.3, -0.1)))["state"] == "fails"

    best = lambda source, transfer, concentration: {"best": {"eyes": {  # noqa: E731
        "inside_source": source, "inside_transfer_interval": transfer, "concentration_transfer_interval": concentration}}}
    assert jacobian.judge(best(0.7, (0.55, 0.6), (4.2, 5)))["state"] == "holds"
    assert jacobian.judge(best(0.7, (0.45, 0.6), (4.2, 5)))["state"] == "undecided"
    assert jacobian.judge(best(0.7, (0.55, 0.6), (2.9, 3.2)))["state"] == "fails"  # the Fig. 7 run: 3x against 4x
    assert jacobian.judge(best(0.5, (0.55, 0.6), (4.2, 5)))["state"] == "fails"  # the source is one face: a point

    iv = lambda pcs, randoms: {"intervals": {**{f"pc{i}": v for i, v in enumerate(pcs)}, **{f"random{i}": v for i, v in enumerate(randoms)}},  # noqa: E731
                                "toy_fid_rise_at_large_scale": {"pc": 10.0}, "random_rise_interval": [30.0, 40.0]}
    assert pca_vs_random.judge(iv([(0.5, 1), (0.4, 2)], [(0, 0.3), (0.1, 0.35)]))["state"] == "holds"
    assert pca_vs_random.judge(iv([(0.5, 1), (0.3, 2)], [(0, 0.3), (0.1, 0.35)]))["state"] == "undecided"
    assert pca_vs_random.judge(iv([(0.5, 1), (0.1, 0.2)], [(0, 0.3), (0.25, 0.35)]))["state"] == "fails"
    # the realism half (random's FID rise >= 2x the PCs') is judged beside it, off the draws' interval
    assert pca_vs_random.judge(iv([(0.5, 1)], [(0, 0.3)]))["realism"] == "holds"
    assert pca_vs_random.judge({**iv([(0.5, 1)], [(0, 0.3)]), "random_rise_interval": [15.0, 25.0]})["realism"] == "undecided"
    assert pca_vs_random.judge({**iv([(0.5, 1)], [(0, 0.3)]), "random_rise_interval": [5.0, 15.0]})["realism"] == "fails"


def _table(off_regression: float, own: float = 0.6, se: float = 0.01) -> dict:
    """Effect matrices of 5 attributes: eq. 10 with 0.12 off the diagonal, the regression with ``off_regression``."""
    def variant(off):
        matrix = [[own if i == j else off for j in range(5)] for i in range(5)]
        return {"matrix": matrix, "standard_error": [[se] * 5 for _ in range(5)], "mean_off_diagonal": off}

    res = {v: variant(0.12 if v != "regression" else off_regression) for v in table1.VARIANTS}
    for v in res.values():
        v["off_diagonal_interval"] = table1._off_diagonal_interval(v)
    return res


def test_table1_judge():
    # eq. 10's interval is 0.12 +- 0.0044 (20 entries of se 0.01): the target is <= 0.7 x its lower end, 0.081
    assert table1.judge(_table(0.07))["state"] == "holds"
    assert table1.judge(_table(0.082))["state"] == "undecided"
    assert table1.judge(_table(0.1))["state"] == "fails"
    assert table1.judge(_table(0.07, own=0.03))["state"] == "fails"  # every row's own effect clearly weaker than the others


def _fig8_rows(h_split, x_split, h_success, random=(0.0, 0.1)):
    rows = []
    for n, hs, xs, succ in zip((1, 2, 5, 10, 20, 50), h_split, x_split, h_success):
        rows.append({"pairs": n, "h_split_half": sum(hs) / 2, "h_split_half_interval": list(hs), "x_T_split_half": sum(xs) / 2,
                     "x_T_split_half_interval": list(xs), "h_success": sum(succ) / 2, "h_success_interval": list(succ),
                     "random_success": sum(random) / 2, "random_success_interval": list(random)})
    return rows


def test_fig8_judge_reads_both_halves_off_their_intervals():
    h = [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.35, 0.45), (0.5, 0.6)]
    never = [(0.0, 0.02)] * 6
    reach = [(0.0, 0.02)] * 5 + [(0.42, 0.5)]  # x_T clearly reaches the reference (0.4) at 50 pairs, 5x h's 10 at most
    good = [(0.5, 0.7), (0.6, 0.8), (0.8, 0.95), (0.92, 1.0), (0.95, 1.0), (1.0, 1.0)]
    poor = [(0.1, 0.3), (0.2, 0.4), (0.3, 0.5), (0.5, 0.7), (0.6, 0.8), (0.7, 0.9)]
    some = [(0.1, 0.3), (0.2, 0.4), (0.3, 0.5), (0.85, 0.95), (0.9, 1.0), (1.0, 1.0)]
    judged = lambda hs, xs, succ: fig8.judge({"rows": _fig8_rows(hs, xs, succ), "reference_cosine": 0.4})  # noqa: E731
    v = judged(h, never, good)
    assert (v["state"], v["convergence"], v["edits"]) == ("holds", "holds", "holds")
    v = judged(h, reach, good)
    assert (v["state"], v["convergence"]) == ("fails", "fails")
    v = judged(h, [(0.0, 0.02)] * 5 + [(0.38, 0.5)], good)  # x_T may or may not reach it at 50 pairs
    assert (v["state"], v["convergence"]) == ("undecided", "undecided")
    v = judged(h, never, poor)
    assert (v["state"], v["edits"]) == ("fails", "fails")
    v = judged(h, never, some)  # at 10 pairs h's interval reaches 0.9 but does not clear it
    assert (v["state"], v["edits"]) == ("undecided", "undecided")
    v = fig8.judge({"rows": _fig8_rows(h, never, good), "reference_cosine": None})  # a bank too small for the reference
    assert (v["state"], v["convergence"], v["edits"]) == ("undecided", "undecided", "holds")


def test_a_claim_own_counts_key_only_its_section():
    assert "fig8_edit_draws" not in FULL.key() and "pca_random_per_pc" not in FULL.key()
    assert FULL.key("fig8")["fig8_edit_draws"] == 20 and "pca_random_per_pc" not in FULL.key("fig8")
    assert QUICK.key() != FULL.key() and set(FULL.key()) < set(FULL.key("pca_vs_random"))


def test_a_section_is_judged_at_every_run_and_a_failing_judge_loses_nothing(tmp_path):
    run = Run(tmp_path, QUICK)
    calls = []

    def measure(run):
        calls.append(1)
        return {"value": 3}

    def broken(result):
        raise RuntimeError("a judge with a bug")

    with pytest.raises(RuntimeError, match="a judge with a bug"):
        run.section("demo", measure, judge=broken)
    path = tmp_path / "sections" / "demo.json"
    assert json.loads(path.read_text())["value"] == 3  # written before judging

    strict = lambda result: verdict(result["value"] > 5, result["value"] < 1)  # noqa: E731
    lenient = lambda result: verdict(result["value"] > 2, result["value"] < 1)  # noqa: E731
    assert run.section("demo", measure, judge=strict)["verdict"]["state"] == "undecided"
    assert calls == [1]  # read from the cache, judged there
    assert json.loads(path.read_text())["verdict"]["state"] == "undecided"
    stamp = path.stat().st_mtime_ns
    assert run.section("demo", measure, judge=strict)["verdict"]["state"] == "undecided" and path.stat().st_mtime_ns == stamp
    assert run.section("demo", measure, judge=lenient)["verdict"]["state"] == "holds" and calls == [1]
    assert Run(tmp_path, QUICK).section("demo", measure, judge=lenient)["verdict"]["state"] == "holds" and calls == [1]  # the checksum follows


def test_an_undecided_verdict_names_the_samples_that_would_decide_it():
    from hspace.reproduce.runner import GROWTH, decide_at, holds, judged, with_more_samples

    # PC [0.5, 1.0] against random [0.3, 0.6]: apart once both narrow by s < 0.3 / 0.4 (they overlap by 0.1 now), i.e.
    # more than 1 / 0.75**2 = 1.78 times the samples: the first factor tried above that is 2
    res = {"intervals": {"pc1": [0.5, 1.0], "random1": [0.3, 0.6]}, "toy_fid_rise_at_large_scale": {"pc": 10.0},
           "random_rise_interval": [30.0, 40.0], "config": {"pca_samples": 32}}
    assert pca_vs_random.judge(res)["state"] == "undecided"
    assert with_more_samples(res, 4)["intervals"] == {"pc1": pytest.approx([0.625, 0.875]), "random1": pytest.approx([0.375, 0.525])}
    assert with_more_samples(res, 4)["random_rise_interval"] == [32.5, 37.5] and res["intervals"]["pc1"] == [0.5, 1.0]
    assert decide_at(res, pca_vs_random.judge, "pca_samples") == {"factor": 2, "state": "holds",
                                                                   "samples": {"field": "pca_samples", "now": 32, "needed": 64}}
    assert pca_vs_random.judge(with_more_samples(res, 1.5))["state"] == "undecided"  # 1.5x is not enough (s = 0.82)
    text = holds({"verdict": judged("pca_vs_random", res, pca_vs_random.judge)})
    assert text == "**undecided** (about 2x the samples would decide it, as holds, if the means stay: pca_samples 32 -> 64)"
    # Wilson intervals of counts: 12 of 20 pairs follow h (60%, against 50%); more pairs keep the share and narrow it
    shares = _swap({"smile": (20, 20), "hat": (12, 20)})
    more = decide_at(shares, swap.judge)
    assert more["state"] == "holds" and swap.judge(_swap({"smile": (20, 20), "hat": (12 * more["factor"], 20 * more["factor"])}))["state"] == "holds"
    smaller = GROWTH[GROWTH.index(more["factor"]) - 1]
    assert swap.judge(_swap({"smile": (20, 20), "hat": (12 * smaller, 20 * smaller)}))["state"] == "undecided"
    # a mean on the threshold: no number of samples decides it; a decided verdict needs none
    assert decide_at({"asyrp_gain_interval": {"1": [-0.1, 0.1]}}, asyrp.judge) == {"factor": None, "state": "undecided", "tried_up_to": 1000}
    assert decide_at({"asyrp_gain_interval": {"1": [0.1, 0.2]}}, asyrp.judge) is None
    assert "decide_at" not in judged("asyrp", {"asyrp_gain_interval": {"1": [0.1, 0.2]}}, asyrp.judge)
    # standard errors narrow too: table 1's own-effect test reads them
    table = _table(0.082)
    assert with_more_samples(table, 4)["regression"]["standard_error"][0][1] == pytest.approx(table["regression"]["standard_error"][0][1] / 2)
    assert decide_at(table, table1.judge, "table_n")["state"] in ("holds", "fails")
