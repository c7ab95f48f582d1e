"""Which block is h: the per-block study's ranking, and its quick mode on the bundled toy DiT, pinned."""

import json

import pytest

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


def test_the_study_refuses_a_u_net_and_an_unknown_block(tmp_path):
    from hspace.reproduce.blocks import run_blocks

    with pytest.raises(HspaceError, match="has no transformer blocks"):
        run_blocks(tmp_path / "u", model="tiny-random")
    with pytest.raises(HspaceError, match=r"unknown block\(s\) block.9; valid: block.0, block.1"):
        run_blocks(tmp_path / "d", model="toydit", blocks=["block.9"])
    assert not (tmp_path / "d").exists() and not (tmp_path / "u").exists()
