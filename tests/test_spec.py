"""One identity: the Spec round trip, its compatibility rules, and engines rebuilt from it."""

import json

import pytest
import torch

from conftest import tiny_engine
from hspace import Direction, Engine, HspaceError, Trajectory
from hspace.bank import Bank, build_bank
from hspace.spec import Spec


def test_spec_round_trip_and_validation():
    spec = Spec("toyfaces", "mid.in", "float16", False)
    assert Spec.from_json(spec.to_json()) == spec and Spec.from_dict(spec.to_dict()) == spec
    with pytest.raises(HspaceError, match="unknown h location 'mid'"):
        Spec("m", "mid")
    with pytest.raises(HspaceError, match="unknown dtype 'int8'"):
        Spec("m", dtype="int8")
    with pytest.raises(HspaceError, match="unknown spec field.s. seed"):
        Spec.from_dict({"model": "m", "seed": 3})
    conditional = Spec("sd", prompt="a cat", negative_prompt="blur", guidance=5, guide_edit="cond")
    assert Spec.from_json(conditional.to_json()) == conditional and conditional.guidance == 5.0 and conditional.guided
    with pytest.raises(HspaceError, match="needs a prompt"):
        Spec("m", guidance=3.0)
    with pytest.raises(HspaceError, match="prompt must be a string"):
        Spec("m", prompt=3)
    with pytest.raises(HspaceError, match="guide_edit 'both' needs guidance > 1"):
        Spec("m", prompt="", guidance=1.0, guide_edit="both")
    # another prompt is another process; a direction is not tied to its prompt
    assert conditional.differences(Spec("sd", prompt="a dog", negative_prompt="blur", guidance=5, guide_edit="cond")) == ["prompt: 'a dog' vs 'a cat'"]
    assert conditional.differences(Spec("sd", prompt="a dog"), "direction") == []


def test_compatibility_rules():
    base = Spec("m")
    base.check(Spec("m", dtype="float16"), "a float16 trajectory")  # dtype: compatible
    base.check(Spec("m", clip_sample=False), "a direction", "direction")  # a direction ignores clipping
    with pytest.raises(HspaceError, match="clip_sample: False vs None"):
        base.check(Spec("m", clip_sample=False), "a trajectory")
    with pytest.raises(HspaceError, match="model: 'other' vs 'm'"):
        base.check(Spec("other"), "a direction", "direction")


def test_every_artefact_stores_the_spec(tmp_path, engine, trajectory):
    trajectory.save(tmp_path / "t.safetensors")
    assert Trajectory.load(tmp_path / "t.safetensors").spec == engine.spec == Spec("tiny-test")
    d = Direction(trajectory.h[0] - trajectory.h[1], meta={"name": "d"}, spec=engine.spec)
    d.save(tmp_path / "d.safetensors")
    assert Direction.load(tmp_path / "d.safetensors").spec == engine.spec
    build_bank(tmp_path / "b", engine, 2, 3)
    assert Bank.open(tmp_path / "b").spec == engine.spec
    assert json.loads((tmp_path / "b" / "bank.json").read_text())["spec"]["model"] == "tiny-test"


def test_float16_trajectory_replays_in_float32_and_a_bank_reads_in_any_dtype(tmp_path):
    half = tiny_engine(dtype="float16")
    full = tiny_engine()
    t = half.sample([1, 2], num_steps=3)
    replay = full.replay(t)
    assert (replay.x0 - t.x0).abs().max() < 0.05
    bank = build_bank(tmp_path / "b", half, 2, 3)
    bank.check_engine(full)  # reading and editing: compatible
    with pytest.raises(HspaceError, match="spec.dtype: bank has 'float16', requested 'float32'"):
        build_bank(tmp_path / "b", full, 3, 3)  # extending: the same arithmetic only


def test_engine_load_of_a_bank_spec_rebuilds_its_engine(tmp_path):
    engine = Engine.load("tiny-random", h_location="mid.in", device="cpu", clip_sample=False)
    bank = build_bank(tmp_path / "b", engine, 2, 2)
    again = Engine.load(bank.spec, device="cpu")
    assert again.spec == engine.spec
    t = bank.trajectory(again, [1])
    assert torch.allclose(t.h.half().float(), bank.h([1]), atol=2e-3)
    with pytest.raises(HspaceError, match="a spec fixes h_location"):
        Engine.load(bank.spec, h_location="mid.out")
    with pytest.raises(HspaceError, match="made by a different engine .model: 'tiny-test' vs 'tiny-random'"):
        again.check_direction(Direction(torch.zeros(1, *again.h_shape), spec=Spec("tiny-test", "mid.in")), 2)
