"""Banks: sharded, atomic, resumable, tied to their engine."""

import json

import pytest
import torch

from hspace.bank import Bank, build_bank
from hspace.errors import HspaceError
from hspace.spec import FREE

from conftest import tiny_engine

STEPS = 4


class Interrupt(Exception):
    pass


def _all(bank: Bank) -> dict:
    shards = [bank.read_shard(start) for start, _ in bank.shards()]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_bank_holds_the_trajectories_of_its_seeds(tmp_path, engine):
    bank = build_bank(tmp_path / "b", engine, 7, STEPS, eta=1.0, base_seed=100, shard_size=3, batch_size=2)
    assert bank.complete and bank.shards() == [(0, 3), (3, 3), (6, 1)] and bank.seeds == list(range(100, 107))
    data = _all(bank)
    assert data["seeds"].tolist() == list(range(100, 107))
    assert data["h"].dtype == torch.float16 and data["h"].shape == (7, STEPS, *engine.h_shape)
    # The stored h is the h of sampling these seeds, to float16 precision.
    direct = engine.sample([100, 104, 106], STEPS, 1.0)
    stored = bank.h([0, 4, 6])
    assert torch.allclose(stored, direct.h, atol=2e-3, rtol=2e-3)
    thumbs = bank.thumbnails()
    assert thumbs.dtype == torch.uint8 and thumbs.shape == (7, 3, 16, 16)
    expected = ((direct.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (thumbs[[0, 4, 6]].int() - expected.int()).abs().max() <= 1
    # h_chunks streams the same numbers, shard by shard, optionally a subset of steps.
    chunks = list(bank.h_chunks(steps=[0, 3])())
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat(chunks), data["h"][:, [0, 3]].float())
    # Reopening reads the same bank; a replayed trajectory equals the stored one.
    again = Bank.open(tmp_path / "b")
    assert again.n == 7 and again.eta == [1.0] * STEPS
    replay = again.trajectory(engine, [4])
    assert torch.allclose(replay.h.half().float(), stored[1:2], atol=2e-3)


def test_interrupted_bank_resumed_equals_bank_drawn_in_one_go(tmp_path, engine):
    settings = dict(num_steps=STEPS, eta=[1.0, 0.0, 0.5, 1.0], base_seed=7, shard_size=4, batch_size=3)
    whole = build_bank(tmp_path / "whole", engine, 10, **settings)

    calls = {"n": 0}

    def kill(event):  # dies in the middle of the second shard (samples 4..7, seeds 11..14)
        calls["n"] += 1
        if event.done > 4 * STEPS and event.step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_bank(tmp_path / "part", engine, 10, callback=kill, **settings)
    part = Bank.open(tmp_path / "part")
    assert part.missing() == [(4, 4), (8, 2)]
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["bank.json", "bank.lock", "shard-000000000000.safetensors"]  # no partial shard
    with pytest.raises(HspaceError, match="incomplete"):
        part.h()

    seen = []
    resumed = build_bank(tmp_path / "part", engine, 10, callback=lambda e: seen.append((e.done, e.total)), **settings)
    assert len(seen) == 3 * STEPS  # three batches (shard 4..7 as 3 + 1 samples, shard 8..9 as 2), STEPS steps each
    assert seen[0] == (4 * STEPS + 3, 10 * STEPS)  # counting starts at the first shard, not drawn again
    assert seen[-1] == (10 * STEPS, 10 * STEPS)
    a, b = _all(whole), _all(resumed)
    for key in ("seeds", "h", "thumbnails"):
        assert torch.equal(a[key], b[key]), key

    # A lost shard in the middle is drawn again, and only that one.
    (tmp_path / "part" / "shard-000000000004.safetensors").unlink()
    assert Bank.open(tmp_path / "part").missing() == [(4, 4)]
    refilled = _all(build_bank(tmp_path / "part", engine, 10, **settings))
    assert torch.equal(refilled["h"], a["h"])


def test_bank_extends_and_refuses_other_settings_or_engines(tmp_path, engine):
    path = tmp_path / "b"
    build_bank(path, engine, 5, STEPS, shard_size=4)
    first = _all(Bank.open(path))
    bank = build_bank(path, engine, 9, STEPS, shard_size=4)
    assert bank.n == 9 and bank.complete
    data = _all(bank)
    assert torch.equal(data["h"][:5], first["h"])  # extending keeps what was drawn
    assert data["seeds"].tolist() == list(range(9))
    assert bank.shards() == [(0, 4), (4, 1), (5, 4)]

    manifest = json.loads((path / "bank.json").read_text())
    with pytest.raises(HspaceError, match="spec.num_steps: 4 vs 5"):
        build_bank(path, engine, 9, 5, shard_size=4)
    with pytest.raises(HspaceError, match="eta"):
        build_bank(path, engine, 9, STEPS, eta=0.0, shard_size=4)
    other = tiny_engine(h_location="mid.in")
    with pytest.raises(HspaceError, match="h_location"):
        build_bank(path, other, 12, STEPS, shard_size=4)
    with pytest.raises(HspaceError, match="different engine .h_location"):
        bank.check_engine(other)
    with pytest.raises(HspaceError, match="different engine"):
        bank.trajectory(other, [0])
    assert json.loads((path / "bank.json").read_text()) == manifest  # refused calls wrote nothing


def test_bank_scores_and_bad_input(tmp_path, engine):
    bank = build_bank(tmp_path / "b", engine, 3, STEPS, shard_size=2)
    bank.set_scores("labels", {"smile": torch.tensor([0.1, 0.9, 0.5])}, meta={"source": "test"})
    assert torch.equal(Bank.open(tmp_path / "b").scores("labels")["smile"], torch.tensor([0.1, 0.9, 0.5]))
    with pytest.raises(HspaceError, match="4 rows|3 rows"):
        bank.set_scores("labels", {"smile": torch.zeros(4)})
    with pytest.raises(HspaceError, match="has no scores 'clf'; it has: labels"):
        bank.scores("clf")
    with pytest.raises(HspaceError, match="out of range"):
        bank.h([3])
    with pytest.raises(HspaceError, match="n must be an integer >= 1"):
        build_bank(tmp_path / "c", engine, 0)
    with pytest.raises(HspaceError, match="not a bank"):
        Bank.open(tmp_path / "nothing")


def test_a_bank_of_some_steps_stores_exactly_those_and_its_directions_apply_at_every_step(tmp_path):
    from hspace.cli import main
    from hspace.directions.pca import pca
    from hspace.directions.regression import regression_directions
    from hspace.directions.supervised import direction_from_scores

    engine = tiny_engine()
    full = build_bank(tmp_path / "full", engine, 6, 10, 1.0, progress=False)
    part = build_bank(tmp_path / "part", engine, 6, 10, 1.0, progress=False, h_steps=[9, 0, 3, 6])
    assert part.h_steps == [0, 3, 6, 9] and part.h_timesteps.tolist() == full.timesteps[[0, 3, 6, 9]].tolist()
    assert torch.equal(part.h(), full.h()[:, [0, 3, 6, 9]])  # the same samples, h of those steps only
    assert sum(p.stat().st_size for p in (tmp_path / "part").glob("shard-*")) < 0.6 * sum(p.stat().st_size for p in (tmp_path / "full").glob("shard-*"))
    pc1 = pca(part, 1).directions[0]
    part.set_scores("s", {"a": torch.tensor([0.0, 1, 2, 3, 4, 5]), "b": torch.tensor([1.0, 0, 0, 1, 1, 0])})
    for direction in (pc1, direction_from_scores(part, "a", 2, scores="s"), regression_directions(part, ["a", "b"], scores="s")[0]):
        assert direction.num_steps == 4 and direction.timesteps.tolist() == part.h_timesteps.tolist()
        every = engine.direction_at(direction, 10)  # found at 4 of the 10 steps: those are its own, the rest interpolated
        assert torch.equal(every.delta[[0, 3, 6, 9]], direction.delta)
        assert torch.allclose(every.delta[1], (2 * direction.delta[0] + direction.delta[1]) / 3, atol=1e-6)
    with pytest.raises(HspaceError, match="h_steps: bank has"):
        build_bank(tmp_path / "part", engine, 8, 10, 1.0, progress=False, h_steps=[0, 9])
    with pytest.raises(HspaceError, match=r"h_steps \[0, 10\] must be distinct step indices from 0 to 9"):
        build_bank(tmp_path / "bad", engine, 2, 10, 1.0, progress=False, h_steps=[0, 10])
    assert main(["bank", str(tmp_path / "cli"), "--model", "tiny-random", "--n", "2", "--steps", "10", "--h-steps", "0-2", "9"]) == 0
    assert Bank.open(tmp_path / "cli").h_steps == [0, 1, 2, 9]


def test_a_pooled_bank_in_float8_or_bfloat16_stores_h_smaller_and_its_directions_are_lifted_to_the_full_grid(tmp_path):
    from hspace.bank import lift_h, pool_h
    from hspace.cli import main
    from hspace.directions.pca import pca, pca_from_h
    from hspace.directions.supervised import direction_from_scores

    engine = tiny_engine()  # h 32 x 8 x 8
    trajectory = engine.sample(list(range(8)), 4, 1.0, progress=False)
    build_bank(tmp_path / "full", engine, 8, 4, 1.0, progress=False)
    pooled = build_bank(tmp_path / "pooled", engine, 8, 4, 1.0, progress=False, h_pool=2)
    assert pooled.stored_h_shape == (32, 4, 4) and pooled.h_shape == (32, 8, 8)
    expected = pool_h(trajectory.h, 2)  # the mean of every 2 x 2 cell
    assert torch.allclose(expected[0, 0, :, 0, 0], trajectory.h[0, 0, :, :2, :2].mean(dim=(1, 2)))
    assert torch.allclose(pooled.h(), expected.half().float())  # float16, as a full bank
    assert torch.equal(pool_h(lift_h(expected, 2), 2), expected)
    # float8 (e4m3, a scale per sample and step) and bfloat16: the error bounded by their 3 and 7 mantissa bits
    for storage, bits in (("float8", 3), ("bfloat16", 7)):
        bank = build_bank(tmp_path / storage, engine, 8, 4, 1.0, progress=False, h_pool=2, h_storage=storage)
        error = (bank.h() - expected).abs().flatten(2).amax(2)
        assert float((error / expected.abs().flatten(2).amax(2)).max()) <= 2.0 ** -bits
        assert float(error.max()) > 0  # it is rounded: the test sees the storage
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / name).glob("shard-*")) for name in ("full", "pooled", "float8")}
    assert sizes["float8"] < 0.6 * sizes["pooled"] < 0.6 * 0.3 * sizes["full"]
    # PCA of the pooled bank is the PCA of pooled h, lifted: unit components on the full grid, one sigma the std of full h
    # along them (the pooled coordinate times the pool), so a delta of one sigma is the pooled delta upsampled
    found, direct = pca(pooled, 2), pca_from_h(pooled.h(), 2)
    assert found.h_shape == (32, 8, 8) and torch.allclose(found.components.flatten(2).norm(dim=2), torch.ones(2, 4))
    assert torch.allclose(found.components, lift_h(direct.components, 2) / 2) and torch.allclose(found.sigma, 2 * direct.sigma)
    along = (pooled.lift(pooled.h()) * found.components[0][None]).flatten(2).sum(2)  # [n, T] coordinates on the full grid
    assert torch.allclose(along.std(0).double(), found.sigma[0], rtol=1e-4)
    pc1 = found.directions[0]
    assert pc1.h_shape == (32, 8, 8) and torch.allclose(pc1.delta, lift_h(direct.directions_for(FREE)[0].delta, 2), atol=1e-6)
    engine.edit(trajectory[:1], pc1, [1.0], progress=False)  # it applies to the engine's h as it is
    pooled.set_scores("s", {"a": torch.arange(8.0)})
    assert direction_from_scores(pooled, "a", 2, scores="s").h_shape == (32, 8, 8)
    with pytest.raises(HspaceError, match="h_pool: bank has None, requested 2"):
        build_bank(tmp_path / "full", engine, 10, 4, 1.0, progress=False, h_pool=2)
    with pytest.raises(HspaceError, match=r"h_pool 3 must divide both sides of h's grid \[32, 8, 8\]"):
        build_bank(tmp_path / "three", engine, 2, 4, 1.0, progress=False, h_pool=3)
    with pytest.raises(HspaceError, match="unknown h_storage 'int4'; valid: 'float16', 'bfloat16', 'float8'"):
        build_bank(tmp_path / "int4", engine, 2, 4, 1.0, progress=False, h_storage="int4")
    assert main(["bank", str(tmp_path / "cli"), "--model", "tiny-random", "--n", "2", "--steps", "3", "--h-pool", "2", "--h-storage", "float8"]) == 0
    cli = Bank.open(tmp_path / "cli")
    assert (cli.layout.h_pool, cli.layout.h_storage) == (2, "float8") and cli.h().shape[2:] == cli.stored_h_shape
