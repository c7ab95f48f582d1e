"""Which block is h: the per-block study's ranking, and its quick mode on the bundled toy DiT, pinned."""

import json

import pytest
import torch

from hspace import Engine, HspaceError
from hspace.cli import main
from hspace.reproduce.blocks import METRICS, ranking


def _block(pca, swap, off, locality):
    return {"pca_ratio": pca, "swap_follows": swap, "off_diagonal": off, "locality": locality}


def test_the_winner_has_the_best_mean_rank_with_each_metric_in_its_own_direction():
    per_block = {
        "block.0": _block(0.5, 0.9, 0.1, 0.2),  # ranks 3, 1, 1, 3 -> 2.0
        "block.1": _block(2.0, 0.8, 0.3, 0.5),  # ranks 1, 2, 3, 1 -> 1.75
        "block.2": _block(1.0, 0.7, 0.2, 0.4),  # ranks 2, 3, 2, 2 -> 2.25
    }
    order = ranking(per_block)
    assert order["ranks"] == {"block.0": [3, 1, 1, 3], "block.1": [1, 2, 3, 1], "block.2": [2, 3, 2, 2]}
    assert order["mean_rank"] == {"block.0": 2.0, "block.1": 1.75, "block.2": 2.25}
    assert order["winner"] == "block.1"
    # the margins: the winner's value against the best of the other blocks, in each metric's own direction
    assert order["margins"]["pca_ratio"] == {"winner": 2.0, "best_other": 1.0}
    assert order["margins"]["off_diagonal"] == {"winner": 0.3, "best_other": 0.1}
    assert [key for key, _, _ in METRICS] == list(order["margins"])
    # a tie on the mean rank goes to the higher PCA ratio
    tied = ranking({"block.0": _block(1.0, 0.9, 0.1, 0.5), "block.1": _block(2.0, 0.8, 0.2, 0.6)})
    assert tied["mean_rank"] == {"block.0": 1.5, "block.1": 1.5} and tied["winner"] == "block.1"
    # blocks equal on a metric share the mean of their places
    shared = ranking({"block.0": _block(1.0, 0.5, 0.1, 0.5), "block.1": _block(2.0, 0.5, 0.2, 0.4), "block.2": _block(3.0, 0.5, 0.3, 0.3)})
    assert [r[1] for r in shared["ranks"].values()] == [2.0, 2.0, 2.0]


def test_the_study_takes_every_hook_point_and_refuses_an_unknown_one_or_a_model_outside_the_domain(tmp_path):
    from hspace.reproduce.blocks import block_locations, run_blocks

    assert block_locations(Engine.load("tiny-random")) == ["mid.out", "mid.in"]  # a U-Net's two locations
    with pytest.raises(HspaceError, match="toy-faces classifier; the engine is 'tiny-random'.*any_model=True"):
        run_blocks(tmp_path / "u", model="tiny-random")
    with pytest.raises(HspaceError, match=r"unknown block\(s\) block.9; valid: block.0, block.1"):
        run_blocks(tmp_path / "d", model="toydit", blocks=["block.9"])
    assert not (tmp_path / "d").exists() and not (tmp_path / "u").exists()


@pytest.mark.slow
def test_the_block_study_measures_a_tiny_fluxs_joint_and_single_blocks_from_one_bank(tmp_path, capsys):
    import tiny_transformers
    from hspace.bank import Bank

    tiny_transformers.flux_pipeline(tmp_path / "flux")
    out = tmp_path / "study"
    argv = ["blocks", "--model", str(tmp_path / "flux"), "--prompt", "a face", "--height", "64", "--width", "64", "--quick",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2 and "--any-model" in capsys.readouterr().err
    assert main([*argv, "--any-model"]) == 0
    summary = json.loads((out / "blocks.json").read_text())
    assert list(summary["blocks"]) == ["joint.0", "single.0"] and summary["ranking"]["winner"] in summary["blocks"]
    banks = {name: Bank.open(out / name / "bank") for name in summary["blocks"]}
    assert {name: bank.spec.h_location for name, bank in banks.items()} == {"joint.0": "joint.0", "single.0": "single.0"}
    assert torch.equal(banks["joint.0"].thumbnails(), banks["single.0"].thumbnails())  # the same samples, drawn once
    assert not torch.equal(banks["joint.0"].h(), banks["single.0"].h())
    engine = Engine.load(str(tmp_path / "flux"), prompt="a face", height=64, width=64)
    alone = engine.at("single.0").sample([0], 4, 1.0, progress=False).h
    # the bank drew sample 0 in a batch of 24, this in a batch of 1 (float32 differs in its last bits), and stores float16
    assert float((banks["single.0"].h([0]) - alone).abs().max()) < 2e-3 * float(alone.abs().max())


# The quick study on the bundled toy DiT, first and last block (all six take six times as long; the full study's
# table is docs/blocks/blocks.md). Tolerances as tests/test_reproduce.py's (measured there: 1 vs 2 threads differ
# by at most 4.1e-6 relative): rel 1e-3 on every ratio; the swap shares of a few pairs are pinned exactly.
QUICK_PINNED = {
    "block.0": {"pca_ratio": 1.572613, "swap_follows": 0.75, "off_diagonal": 0.445376, "locality": 0.464180,
                "verdicts": {"pca_vs_random": "undecided", "table1": "undecided", "swap": "undecided", "jacobian": "fails"}},
    "block.5": {"pca_ratio": 1.232818, "swap_follows": 0.75, "off_diagonal": 0.428708, "locality": 0.794766,
                "verdicts": {"pca_vs_random": "undecided", "table1": "fails", "swap": "undecided", "jacobian": "undecided"}},
}


@pytest.mark.slow
def test_the_quick_block_study_on_the_bundled_dit_writes_its_table_and_resumes(tmp_path):
    out = tmp_path / "blocks"
    assert main(["blocks", "--quick", "--blocks", "block.0", "block.-1", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "blocks.json").read_text())
    assert list(summary["blocks"]) == ["block.0", "block.5"] and summary["default_before"] == Engine.load("toydit").h_location
    report = (out / "blocks.md").read_text()
    assert report.count("| block.") + report.count("| **block.") == 2 and (out / "blocks.png").stat().st_size > 5000
    for name, pinned in QUICK_PINNED.items():
        m = summary["blocks"][name]
        assert m["swap_follows"] == pinned["swap_follows"], name
        for key in ("pca_ratio", "off_diagonal", "locality"):
            assert m[key] == pytest.approx(pinned[key], rel=1e-3, abs=1e-4), (name, key)
        assert m["verdicts"] == pinned["verdicts"], name
    assert summary["ranking"]["winner"] == "block.5"  # more local (0.79 vs 0.46) and less entangled; block.0's PCA ratio is higher
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("sections/*.json")}
    assert len(stamp) == 2 * 5  # four claims and the bank's record per block
    assert main(["blocks", "--quick", "--blocks", "block.0", "block.5", "--device", "cpu", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("sections/*.json")} == stamp  # resumed: nothing measured again
    assert json.loads((out / "blocks.json").read_text())["blocks"] == summary["blocks"]
