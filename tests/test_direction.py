"""The Direction type: save/load with metadata inside, compatibility checks, arithmetic."""

import pytest
import torch

from hspace import Direction, HspaceError
from hspace.spec import Spec


def make(steps=6, shape=(32, 8, 8), model="tiny-test", h_location="mid.out", **meta):
    return Direction(torch.randn(steps, *shape), sigma=torch.rand(steps), meta={"name": "d", **meta}, spec=Spec(model, h_location))


def test_save_load_round_trip(tmp_path):
    d = make(method="pca", params={"k": 3, "component": 1})
    d.save(tmp_path / "d.safetensors")
    loaded = Direction.load(tmp_path / "d.safetensors")
    assert torch.equal(loaded.delta, d.delta) and torch.equal(loaded.sigma, d.sigma)
    assert loaded.meta == d.meta and loaded.spec == d.spec and loaded.meta["params"] == {"k": 3, "component": 1}
    assert loaded.meta["num_steps"] == 6


def test_mismatches_are_clear_errors(engine, trajectory):
    with pytest.raises(HspaceError, match=r"h shape \(16, 8, 8\) but the engine's h at 'mid.out' is \(32, 8, 8\)"):
        engine.edit(trajectory, make(shape=(16, 8, 8)), [1.0]).images
    with pytest.raises(HspaceError, match="made by a different engine .h_location: 'mid.in' vs 'mid.out'"):
        engine.edit(trajectory, make(h_location="mid.in"), [1.0]).images
    with pytest.raises(HspaceError, match="scales is empty"):
        engine.edit(trajectory, make(), []).images
    with pytest.raises(HspaceError, match=r"scales must be a list of numbers, got \['big'\]"):
        engine.edit(trajectory, make(), ["big"]).images


def test_a_direction_found_at_one_step_count_applies_at_another_resampled_by_timestep(engine, trajectory, tmp_path):
    t50, t25, t7 = (engine.schedule(n).timesteps.double() for n in (50, 25, 7))
    found = Direction(torch.randn(50, *engine.h_shape), sigma=torch.rand(50), meta={"name": "d"}, spec=engine.spec, timesteps=t50)
    # every 25-step timestep is a 50-step one: the same vectors, exactly
    shared = [t50.tolist().index(t) for t in t25.tolist()]
    at25 = engine.direction_at(found, 25)
    assert torch.equal(at25.delta, found.delta[shared]) and torch.equal(at25.sigma, found.sigma[shared])
    assert torch.equal(at25.timesteps, t25)
    # linear in t between the enclosing found steps: a delta linear in t is resampled exactly
    slope = torch.randn(*engine.h_shape)
    linear = Direction(t50.float().view(-1, 1, 1, 1) * slope, meta={"name": "lin"}, spec=engine.spec, timesteps=t50)
    assert float((engine.direction_at(linear, 7).delta - t7.float().view(-1, 1, 1, 1) * slope).abs().max()) < 1e-3
    assert not set(t7.tolist()) <= set(t50.tolist())  # (7 steps: timesteps between the found ones)
    # a file without timesteps (older) was found on the engine's own schedule of its steps
    older = Direction(found.delta, found.sigma, {"name": "old"}, engine.spec)
    assert torch.equal(engine.direction_at(older, 25).delta, at25.delta)
    found.save(tmp_path / "d.safetensors")
    assert torch.equal(Direction.load(tmp_path / "d.safetensors").timesteps, t50)
    # an edit of the 6-step trajectory with the 50-step direction is the edit with it resampled by hand
    by_hand = Direction(found.at(engine.schedule(6).timesteps).delta, meta={"name": "d"}, spec=engine.spec)
    assert torch.equal(engine.edit(trajectory, found, [1.0], progress=False).images, engine.edit(trajectory, by_hand, [1.0], progress=False).images)
    with pytest.raises(HspaceError, match="no record of their timesteps"):
        older.at(t25)


def test_single_step_direction_applies_at_every_step(engine, trajectory):
    one = make(steps=1)
    repeated = Direction(one.delta.repeat(6, 1, 1, 1), meta=one.meta, spec=one.spec)
    a = engine.edit(trajectory, one, [1.5]).images
    b = engine.edit(trajectory, repeated, [1.5]).images
    assert torch.equal(a, b)


def test_arithmetic():
    a, b = make(), make()
    assert torch.allclose((a + b).delta, a.delta + b.delta)
    assert torch.allclose((a - 2 * b).delta, a.delta - 2 * b.delta)
    assert torch.allclose((-a).delta, -a.delta)
    with pytest.raises(HspaceError, match="cannot combine directions of h shapes"):
        a + make(shape=(4, 2, 2))


def test_load_errors(tmp_path):
    with pytest.raises(HspaceError, match="does not exist"):
        Direction.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HspaceError, match="is not a safetensors file"):
        Direction.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HspaceError, match="is not an hspace direction file"):
        Direction.load(tmp_path / "other.safetensors")


def test_method_results_share_one_interface(tmp_path, engine, trajectory):
    """Every method's result has .directions and save/load; load_result finds which one a folder holds."""
    import torch

    from hspace.directions import DirectionSet, load_result
    from hspace.directions.jacobian import JacobianDirections, jacobian_directions
    from hspace.directions.pca import PCAResult, pca, random_directions

    result = pca(trajectory, 2)
    jac = jacobian_directions(engine, trajectory, 0, 2, 2, max_iter=3, generator=torch.Generator().manual_seed(0))
    rnd = random_directions(result, 1, seed=3)
    for name, result, kind in (("pca", result, PCAResult), ("jac", jac, JacobianDirections), ("rnd", rnd, DirectionSet)):
        paths = result.save(tmp_path / name)
        loaded = load_result(tmp_path / name)
        assert isinstance(loaded, kind) and [p.name for p in paths] == [f"{d.name}.safetensors" for d in result.directions]
        for a, b in zip(loaded.directions, result.directions, strict=True):
            assert torch.equal(a.delta, b.delta) and a.meta == b.meta and a.spec == b.spec == engine.space
    assert torch.equal(load_result(tmp_path / "jac")[0].svd.S, jac[0].svd.S)
    assert (load_result(tmp_path / "rnd").method, load_result(tmp_path / "rnd").params["seed"]) == ("random", 3)
    import json

    # the kind recorded in result.json is what dispatches, not the files: a PCA folder recorded as a plain set loads as one
    record = json.loads((tmp_path / "pca" / "result.json").read_text())
    assert record["kind"] == "pca" and record["directions"] == ["pc1.safetensors", "pc2.safetensors"] and record["params"]["k"] == 2
    (tmp_path / "pca" / "result.json").write_text(json.dumps({**record, "kind": "directions"}))
    assert type(load_result(tmp_path / "pca")) is DirectionSet and len(load_result(tmp_path / "pca")) == 2
    (tmp_path / "pca" / "result.json").write_text(json.dumps({**record, "kind": "lora"}))
    with pytest.raises(HspaceError, match="records a result of kind 'lora'; valid: pca, jacobian, directions"):
        load_result(tmp_path / "pca")
    (tmp_path / "jac" / "result.json").unlink()  # a folder of an earlier version (no record): known by its files
    assert isinstance(load_result(tmp_path / "jac"), JacobianDirections)
