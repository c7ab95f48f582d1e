"""One identity: the Spec round trip, its compatibility rules, and engines rebuilt from it."""

import json

import pytest
import torch

from conftest import tiny_engine, tiny_unet
from hspace import Direction, Engine, HspaceError, Trajectory
from hspace.bank import Bank, build_bank
from hspace.cli import main
from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG
from hspace.spec import FREE, Space, Spec


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
    other_prompt = Spec("sd", prompt="a dog", negative_prompt="blur", guidance=5, guide_edit="cond")
    assert conditional.differences(other_prompt) == []  # a process's samples each record their own prompt
    assert conditional.differences(other_prompt, "exact") == ["prompt: 'a dog' vs 'a cat'"]  # a bank's first prompt
    assert conditional.differences(Spec("sd", prompt="a cat", negative_prompt="blur", guidance=6, guide_edit="cond")) == ["guidance: 6.0 vs 5.0"]
    conditional.space.check(Spec("sd", prompt="a dog").space, "a direction")  # a direction carries no prompt


def test_a_direction_carries_its_space_and_a_trajectory_its_process():
    engine_spec = Spec("m", fingerprint="sha256:a", prompt="a cat", guidance=5.0, guide_edit="cond", spacing="leading+1")
    drawn = engine_spec.with_process(3, [1, 0.5, 0], torch.tensor([999, 666, 333]))
    assert drawn.timesteps == (999, 666, 333) and drawn.process.timestep_tensor().dtype == torch.long
    assert drawn.process.prompt == "a cat" and drawn.process.eta == (1.0, 0.5, 0.0) and engine_spec.process is None
    flow = engine_spec.with_process(2, [0, 0], torch.tensor([1000.0, 500.0], dtype=torch.float64))
    assert flow.process.timestep_tensor().dtype == torch.float64 and Spec.from_json(flow.to_json()) == flow
    assert drawn.engine == engine_spec and "timesteps" not in engine_spec.to_dict()  # an engine's spec reads as before
    with pytest.raises(HspaceError, match=r"timesteps must be 3 finite numbers"):
        engine_spec.with_process(3, [1, 1, 1], [1, 2])
    space = drawn.space
    assert (space.model, space.fingerprint, space.h_location) == ("m", "sha256:a", "mid.out") and not hasattr(space, "prompt")
    # a direction file written with a whole spec (before spaces) reads as its space; the space round-trips
    assert Space.from_json(drawn.to_json()) == space and Space.from_json(space.to_json()) == space
    shaped = Space("m", fingerprint="sha256:a", h_shape=[4, 2, 2])
    with pytest.raises(HspaceError, match=r"has h shape \(4, 1, 1\) but the engine's h at 'mid.out' is \(4, 2, 2\)"):
        shaped.check(Space("m", fingerprint="sha256:a", h_shape=(4, 1, 1)), "a direction")
    with pytest.raises(HspaceError, match="h_location: 'mid.in' vs 'mid.out'"):
        shaped.check(Space("m", "mid.in", fingerprint="sha256:a"), "a direction")
    with pytest.raises(HspaceError, match="unknown spec field"):
        Space.from_dict({"model": "m", "colour": 1})


def test_compatibility_rules():
    base = Spec("m", fingerprint="sha256:a")
    base.check(Spec("m", dtype="float16", fingerprint="sha256:a"), "a float16 trajectory")  # dtype: compatible
    base.space.check(Spec("m", clip_sample=False, fingerprint="sha256:a").space, "a direction")  # a direction ignores clipping
    with pytest.raises(HspaceError, match="clip_sample: False vs None"):
        base.check(Spec("m", clip_sample=False, fingerprint="sha256:a"), "a trajectory")
    # the fingerprint is the model's identity: another path with the same one is the same model, and the same
    # path with another one is another model
    base.space.check(Spec("/elsewhere/m", fingerprint="sha256:a").space, "a direction")
    with pytest.raises(HspaceError, match="model fingerprint: sha256:b .m. vs sha256:a .m."):
        base.space.check(Spec("m", fingerprint="sha256:b").space, "a direction")
    # the process: an engine's spec runs any; two processes must agree
    drawn = base.with_process(3, [1, 1, 0])
    base.check(drawn, "a trajectory")
    with pytest.raises(HspaceError, match=r"eta: \(1.0, 1.0, 0.0\) vs \(1.0, 1.0, 1.0\)"):
        base.with_process(3, [1, 1, 1]).check(drawn, "a trajectory")
    with pytest.raises(HspaceError, match="spacing: 'trailing\\+0' vs 'leading\\+0'"):
        Spec("m", spacing="leading+0").check(Spec("m", spacing="trailing+0"), "a bank")
    Spec("m", spacing="leading+0").check(Spec("m"), "an old bank")  # spacing unknown in an old artefact: not compared
    # autocast: part of the process unless the reader asks for a tolerant replay
    with pytest.raises(HspaceError, match="autocast: 'bfloat16' vs None.*tolerant=True"):
        base.check(Spec("m", fingerprint="sha256:a", autocast="bfloat16"), "a trajectory")
    base.check(Spec("m", fingerprint="sha256:a", autocast="bfloat16"), "a trajectory", tolerant=True)
    # a direction without a spec is refused, FREE is explicit
    base.space.check(FREE, "a free direction")
    with pytest.raises(HspaceError, match="has no spec"):
        base.space.check(None, "a direction")
    with pytest.raises(HspaceError, match="has no spec"):
        base.check(None, "a trajectory")
    for bad in ({"num_steps": 2}, {"num_steps": 2, "eta": [1]}, {"autocast": "int8"}, {"fingerprint": ""}):
        with pytest.raises(HspaceError):
            Spec("m", **bad)


def test_an_artefact_without_a_fingerprint_is_compared_by_name_and_said_once(caplog):
    import logging

    from hspace import spec as spec_module

    spec_module._warned.clear()
    engine = Spec("m", fingerprint="sha256:a")
    with caplog.at_level(logging.WARNING, logger="hspace.spec"):
        engine.check(Spec("m"), "old bank 'b'")
        engine.check(Spec("m"), "old bank 'b'")
    assert [r.getMessage().count("no model fingerprint") for r in caplog.records] == [1]
    with pytest.raises(HspaceError, match="model: 'other' vs 'm'"):
        engine.check(Spec("other"), "old bank 'c'")


def test_every_artefact_stores_the_spec(tmp_path, engine, trajectory):
    trajectory.save(tmp_path / "t.safetensors")
    process = engine.spec.with_process(6, [1.0] * 6, engine.schedule(6).timesteps)
    assert Trajectory.load(tmp_path / "t.safetensors").spec == trajectory.spec == process
    assert torch.equal(trajectory.timesteps, engine.schedule(6).timesteps) and trajectory.eta.tolist() == [1.0] * 6
    assert engine.spec.fingerprint.startswith("sha256:") and engine.spec.spacing == "leading+0" and engine.spec.num_steps is None
    d = Direction(trajectory.h[0] - trajectory.h[1], meta={"name": "d"}, spec=engine.spec)
    d.save(tmp_path / "d.safetensors")
    assert Direction.load(tmp_path / "d.safetensors").spec == engine.space  # a direction carries the space, no process
    Direction(d.delta, meta={"name": "free"}, spec=FREE).save(tmp_path / "free.safetensors")
    assert Direction.load(tmp_path / "free.safetensors").spec == FREE
    with pytest.raises(HspaceError, match="spec=FREE"):
        Direction(d.delta)
    build_bank(tmp_path / "b", engine, 2, 3)
    assert Bank.open(tmp_path / "b").spec == engine.spec.with_process(3, [1.0] * 3)
    assert json.loads((tmp_path / "b" / "bank.json").read_text())["spec"]["model"] == "tiny-test"


def _model_folder(folder, seed=0):
    tiny_unet(seed).save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(CELEBAHQ_SCHEDULER_CONFIG))
    return folder


def _change_one_weight(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 0.5
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")


def test_artefacts_travel_with_a_copy_of_the_model_and_are_refused_after_a_weight_changes(tmp_path, capsys):
    import shutil

    original = _model_folder(tmp_path / "model")
    engine = Engine.load(str(original), device="cpu")
    trajectory = engine.sample([1, 2], num_steps=3)
    trajectory.save(tmp_path / "t.safetensors")
    direction = Direction(trajectory.h[0] - trajectory.h[1], meta={"name": "d"}, spec=engine.spec)
    bank = build_bank(tmp_path / "bank", engine, 2, 3, shard_size=2)

    copy = shutil.copytree(original, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(original)  # the spec's path is gone: only the copy is left
    moved = Engine.load(str(copy), device="cpu")
    assert moved.spec.fingerprint == engine.spec.fingerprint and moved.spec.model != engine.spec.model
    saved = Trajectory.load(tmp_path / "t.safetensors")
    assert torch.equal(moved.replay(saved).x0, trajectory.x0)  # exact
    assert torch.equal(moved.edit(saved, direction, [1.0]).images[0, 0], engine.edit(trajectory, direction, [1.0]).images[0, 0])
    extended = build_bank(tmp_path / "bank", moved, 4, 3, shard_size=2)  # the copy extends the bank
    assert extended.n == 4 and torch.equal(extended.h([0, 1]), bank.h([0, 1]))
    with pytest.raises(HspaceError, match="cannot be loaded from .*pass where it is now"):
        Engine.load(bank.spec, device="cpu")
    assert Engine.load(bank.spec, device="cpu", folder=str(copy)).spec == moved.spec
    direction.save(tmp_path / "d.safetensors")
    edit = ["edit", "--bank", str(tmp_path / "bank"), "--samples", "0", "--direction", str(tmp_path / "d.safetensors"), "--scales", "1",
            "--device", "cpu", "--out", str(tmp_path / "edits")]
    assert main(edit) == 2 and "--model DIR" in capsys.readouterr().err
    assert main([*edit, "--model", str(copy)]) == 0  # the command line says where the model is now

    _change_one_weight(copy)
    changed = Engine.load(str(copy), device="cpu")
    assert changed.spec.fingerprint != engine.spec.fingerprint
    for use in (lambda: changed.replay(saved), lambda: changed.edit(saved, direction, [1.0]).images, lambda: Bank.open(tmp_path / "bank").check_engine(changed),
                lambda: Engine.load(bank.spec, device="cpu", folder=str(copy)), lambda: build_bank(tmp_path / "bank", changed, 6, 3, shard_size=2)):
        with pytest.raises(HspaceError, match=f"fingerprint: {engine.spec.fingerprint}"):
            use()


def test_the_fingerprint_of_a_file_is_cached_by_size_and_modification_time(tmp_path):
    import os

    from hspace.fingerprint import CACHE_FILE, cache_folder, folder_fingerprint

    folder = _model_folder(tmp_path / "model")
    first = folder_fingerprint(folder)
    cache = json.loads((cache_folder() / CACHE_FILE).read_text())
    weights = str((folder / "diffusion_pytorch_model.safetensors").resolve())
    assert cache[weights]["size"] == os.path.getsize(weights)
    # the cache is what is read while size and time are unchanged (a planted digest shows through) ...
    cache[weights]["sha256"] = "0" * 64
    (cache_folder() / CACHE_FILE).write_text(json.dumps(cache))
    assert folder_fingerprint(folder) != first
    # ... and a file saved again (a new modification time) is read again
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert folder_fingerprint(folder) == first


def test_an_autocast_trajectory_records_it_and_replays_only_with_it(tmp_path):
    from hspace.speed import Speed

    fast = tiny_engine()
    fast = Engine(fast.components, device="cpu", speed=Speed(autocast="bfloat16"))
    trajectory = fast.sample([1, 2], num_steps=3)
    assert trajectory.spec.autocast == "bfloat16"
    trajectory.save(tmp_path / "t.safetensors")
    saved = Trajectory.load(tmp_path / "t.safetensors")
    plain = Engine(fast.components, device="cpu")
    with pytest.raises(HspaceError, match="autocast: 'bfloat16' vs None.*tolerant=True"):
        plain.replay(saved)
    assert (plain.replay(saved, tolerant=True).x0 - trajectory.x0).abs().max() > 0  # approximate, as asked
    again = Engine(fast.components, device="cpu", speed=Speed(autocast=saved.spec.autocast))
    assert torch.equal(again.replay(saved).x0, trajectory.x0)
    build_bank(tmp_path / "b", fast, 2, 3)
    with pytest.raises(HspaceError, match="autocast"):
        Bank.open(tmp_path / "b").check_engine(plain)


def test_a_format_2_bank_is_read_with_its_process_in_the_spec(tmp_path, engine):
    """A bank written before the process moved into the spec (format 2: steps, eta and autocast beside it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hspace.layout import Layout

    bank = build_bank(tmp_path / "b", engine, 2, 3)
    h = bank.h()
    manifest = json.loads((tmp_path / "b" / "bank.json").read_text())
    spec = manifest["spec"]
    num_steps, eta = spec.pop("num_steps"), spec.pop("eta")
    for key in ("fingerprint", "spacing", "autocast"):
        spec.pop(key)
    legacy = {**manifest, "format": 2, "num_steps": num_steps, "eta": eta}
    (tmp_path / "b" / "bank.json").write_text(json.dumps(legacy))
    shard = bank.shard_path(0)
    with safe_open(str(shard), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layout = Layout.of_settings(legacy)
    assert layout.format == 2 and layout.spec.num_steps == 3
    save_file(tensors, str(shard), {**metadata, "bank": layout.digest, "identity": json.dumps(layout.to_dict())})
    old = Bank.open(tmp_path / "b")
    assert (old.spec.num_steps, old.spec.eta, old.spec.fingerprint) == (3, (1.0, 1.0, 1.0), None)
    assert torch.equal(old.h(), h)
    old.check_engine(engine)  # by name, with a warning


def test_float16_trajectory_replays_in_float32_and_a_bank_reads_in_any_dtype(tmp_path):
    half = tiny_engine(dtype="float16")
    full = tiny_engine()
    t = half.sample([1, 2], num_steps=3)
    replay = full.replay(t)
    assert (replay.x0 - t.x0).abs().max() < 0.05
    bank = build_bank(tmp_path / "b", half, 2, 3)
    bank.check_engine(full)  # reading and editing: compatible
    with pytest.raises(HspaceError, match="spec.dtype: 'float16' vs 'float32'"):
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
