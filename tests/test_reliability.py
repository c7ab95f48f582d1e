"""Nothing a user can type or a disk can do produces a traceback, silent garbage or lost work.

One section per class of defect; every case asserts exit status 2 (CLI) or HspaceError (API), a
message that names the bad value, and that nothing already computed was lost or overwritten.
"""

import errno
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_engine
from hspace.spec import FREE
from hspace import Direction, HspaceError, Trajectory
from hspace.bank import Bank, build_bank
from hspace.cli import main
from hspace.spec import Spec

SRC = Path(__file__).resolve().parents[1] / "src" / "hspace"
TINY = ["--model", "tiny-random", "--device", "cpu", "--steps", "2"]


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trajectory and a direction of the tiny-random model on disk."""
    from hspace.engine import Engine

    folder = tmp_path_factory.mktemp("saved")
    engine = Engine.load("tiny-random", device="cpu")
    t = engine.sample([0, 1], 2, 1.0)
    t.save(folder / "t.safetensors")
    Direction(t.h[0] - t.h[1], meta={"name": "d"}, spec=engine.spec).save(folder / "d.safetensors")
    return folder


# ------------------------------------------------------------------ 1. code execution from a file


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/hspace-pwned",))


@pytest.mark.parametrize("where", ["init", "resume", "export"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys, where):
    marker = Path("/tmp/hspace-pwned")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Boom(), "ema": {}, "optimizer": {}, "generator": None, "step": 0, "config": {}}))
    run = tmp_path / "run"
    run.mkdir()
    if where == "init":
        argv = ["toyfaces", "train", "--run", run, "--steps", "1", "--init", evil]
    else:
        (run / "checkpoint.pt").write_bytes(evil.read_bytes())
        argv = ["toyfaces", "train", "--run", run, "--steps", "1"] if where == "resume" else ["toyfaces", "export", "--run", run, "--out", tmp_path / "m"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "loads safely (weights only)" in err and not marker.exists()


def test_no_unsafe_loader_in_the_package():
    """torch.load without weights_only=True, pickle loading and eval/exec on anything must not come back."""
    bad = []
    for path in SRC.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{path}:{number}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(|\bnp\.load\([^)]*allow_pickle=True|(?<![\w.])(eval|exec)\(", code):
                bad.append(f"{path}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ 2. non-finite and out-of-range numbers


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scales", "inf"], "--scales inf"),
        (["--scales", "nan"], "--scales nan"),
        (["--scales=-inf"], "--scales -inf"),
        (["--eta", "2"], "eta 2.0 is out of range; valid: numbers from 0 (DDIM) to 1"),
        (["--eta", "1e6"], "eta 1000000.0 is out of range"),
        (["--eta", "-0.5"], "eta -0.5 is out of range"),
        (["--eta", "nan"], "eta nan is out of range"),
        (["--eta", "1,7"], "eta 7.0 is out of range"),
    ],
)
def test_edit_refuses_non_finite_and_out_of_range_numbers(tmp_path, capsys, saved, extra, message):
    code, err = run_cli(["edit", "--direction", saved / "d.safetensors", "--seeds", "0", "--out", tmp_path / "e", *TINY, *extra], capsys)
    assert code == 2 and message in err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_direction_file_with_non_finite_values_is_refused(tmp_path, saved, value):
    from safetensors.torch import save_file

    d = Direction.load(saved / "d.safetensors")
    delta = d.delta.clone()
    delta[0, 0, 0, 0] = value
    save_file({"delta": delta}, str(tmp_path / "bad.safetensors"), metadata={"kind": "hspace.Direction", "meta": "{}"})
    with pytest.raises(HspaceError, match="NaN or infinite"):
        Direction.load(tmp_path / "bad.safetensors")
    with pytest.raises(HspaceError, match="NaN or infinite"):
        Direction(delta)


@pytest.mark.parametrize("scales, message", [([float("nan")], "scale nan"), ("12", "got the string '12'"), ([1, "x"], "list of numbers"), ([], "scales is empty")])
def test_api_scales(engine, trajectory, scales, message):
    d = Direction(torch.zeros(6, *engine.h_shape), spec=engine.spec)
    with pytest.raises(HspaceError, match=message):
        engine.edit(trajectory, d, scales).images


@pytest.mark.parametrize("eta", [1.5, -1.0, float("nan"), [0.5, 2.0, 0, 0, 0, 0]])
def test_api_eta(engine, eta):
    with pytest.raises(HspaceError, match="out of range"):
        engine.sample([0], 6, eta)


# ------------------------------------------------------------------ 3. incompatible data


def test_a_shard_of_another_bank_is_refused(tmp_path, engine):
    build_bank(tmp_path / "a", engine, 4, 3, eta=0.0, shard_size=4)
    build_bank(tmp_path / "b", engine, 8, 3, eta=1.0, shard_size=4)
    foreign = tmp_path / "b" / "shard-000000000004.safetensors"
    foreign.write_bytes((tmp_path / "a" / "shard-000000000000.safetensors").read_bytes())
    foreign.rename(tmp_path / "b" / "shard-000000000000.safetensors")
    with pytest.raises(HspaceError, match=r"shard-000000000000.safetensors' belongs to another bank"):
        Bank.open(tmp_path / "b").h()


@pytest.mark.parametrize("other", [Spec("tiny-test", "mid.in"), Spec("another-model")])
def test_directions_of_other_engines_do_not_mix(engine, other):
    from hspace.directions.disentangle import disentangle

    a = Direction(torch.randn(2, 4), meta={"name": "a"}, spec=engine.spec)
    b = Direction(torch.randn(2, 4), meta={"name": "b"}, spec=other)
    for combine in (lambda: a + b, lambda: a - b, lambda: disentangle(a, [b])):
        with pytest.raises(HspaceError, match="made by a different engine"):
            combine()


def test_stale_scores_are_refused(tmp_path, engine):
    bank = build_bank(tmp_path / "b", engine, 3, 3, shard_size=2)
    bank.set_scores("labels", {"smile": torch.tensor([0.1, 0.9, 0.5])})
    bank = build_bank(tmp_path / "b", engine, 5, 3, shard_size=2)
    with pytest.raises(HspaceError, match="hold 3 rows of 'smile' but the bank has 5 samples"):
        bank.scores("labels")


# ------------------------------------------------------------------ 4. outputs and full disks


@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable"])
@pytest.mark.parametrize("command", ["sample", "swap", "bank", "arith"])
def test_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch, kind, command):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    # unwritable for real, even to root: /proc takes no new files (permissions alone would not stop root)
    target = {"a file": blocker, "under a file": blocker / "out", "unwritable": Path("/proc/hspace-test/out")}[kind]
    sampled = []
    monkeypatch.setattr("hspace.engine.Engine.run", lambda *a, **k: sampled.append(1))
    argv = {
        "sample": ["sample", "--seeds", "0", "--out", target],
        "swap": ["swap", "--seeds", "0", "--donors", "1", "--out", target],
        "bank": ["bank", target, "--n", "2"],
        "arith": ["arith", "--plus", "0", "--minus", "1", "-o", target / "d.safetensors" if kind != "a file" else tmp_path],
    }[command]
    code, err = run_cli([*argv, *TINY], capsys)
    assert code == 2 and ("is a file" in err or "is a folder" in err or "lies under the file" in err or "cannot be written" in err), err
    assert not sampled and blocker.read_text() == "keep me"


def _full_disk(monkeypatch, after: int = 0) -> None:
    """Every atomic write after the first ``after`` fails as on a full disk (injected at the one writer)."""
    import hspace.files as files

    count, original = {"n": 0}, files.os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            count["n"] += 1
            if count["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)


def test_full_disk_during_a_bank_keeps_the_finished_shards(tmp_path, capsys, monkeypatch):
    assert main(["bank", str(tmp_path / "b"), "--n", "4", "--shard-size", "2", *TINY]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    _full_disk(monkeypatch, after=1)  # the manifest update goes through, the first new shard does not
    code, err = run_cli(["bank", tmp_path / "b", "--n", "8", "--shard-size", "2", *TINY], capsys)
    assert code == 2 and "the disk is full" in err and "shard-000000000004.safetensors" in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    assert {k: v for k, v in after.items() if k != "bank.json"} == {k: v for k, v in before.items() if k != "bank.json"}
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(["bank", str(tmp_path / "b"), "--n", "8", "--shard-size", "2", *TINY]) == 0
    assert Bank.open(tmp_path / "b").complete


@pytest.mark.parametrize("after", [0, 1, 2])
def test_full_disk_during_pca_leaves_no_partial_set(tmp_path, capsys, monkeypatch, after):
    assert main(["bank", str(tmp_path / "b"), "--n", "6", "--shard-size", "3", *TINY]) == 0
    _full_disk(monkeypatch, after=after)
    code, err = run_cli(["pca", tmp_path / "b", "--k", "2", "--random", "1", "--out", tmp_path / "pca"], capsys)
    assert code == 2 and "the disk is full" in err
    assert not list((tmp_path / "pca").glob("*.safetensors")) if (tmp_path / "pca").exists() else True


def test_full_disk_during_edit_keeps_earlier_files_whole(tmp_path, capsys, monkeypatch, saved):
    out = tmp_path / "e"
    assert main(["edit", "--direction", str(saved / "d.safetensors"), "--seeds", "0", "1", "--scales", "0", "--out", str(out), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _full_disk(monkeypatch, after=1)
    code, err = run_cli(["edit", "--direction", saved / "d.safetensors", "--seeds", "0", "1", "--scales", "1", "--out", out, *TINY], capsys)
    assert code == 2 and "the disk is full" in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) and all(len(v) > 100 for v in after.values())  # no 0-byte PNG


def test_an_unreadable_reproduce_section_is_measured_again(tmp_path):
    from hspace.reproduce.runner import Run, QUICK

    run = Run(tmp_path, QUICK, tiny_engine_as_toyfaces())
    (tmp_path / "sections" / "x.json").write_text("")
    assert run.section("x", lambda r: {"value": 1})["value"] == 1
    assert json.loads((tmp_path / "sections" / "x.json").read_text())["value"] == 1


@pytest.mark.parametrize("tamper", ["a number edited", "a key removed", "a list instead", "the seconds as text", "the checksum removed"])
def test_a_changed_reproduce_section_is_measured_again_never_reported(tmp_path, tamper, caplog):
    from hspace.reproduce.runner import QUICK, Run

    run = Run(tmp_path, QUICK, tiny_engine_as_toyfaces())
    calls = []
    measure = lambda r: calls.append(1) or {"value": 0.25, "verdict": {"holds": False}}  # noqa: E731
    run.section("x", measure)
    assert run.section("x", measure)["value"] == 0.25 and len(calls) == 1  # cached
    path = tmp_path / "sections" / "x.json"
    saved = json.loads(path.read_text())
    changed = {
        "a number edited": lambda d: {**d, "value": 0.99},
        "a key removed": lambda d: {k: v for k, v in d.items() if k != "verdict"},
        "a list instead": lambda d: [d],
        "the seconds as text": lambda d: {**d, "seconds": "fast"},
        "the checksum removed": lambda d: {k: v for k, v in d.items() if k != "checksum"},
    }[tamper](saved)
    path.write_text(json.dumps(changed))
    assert run.section("x", measure)["value"] == 0.25 and len(calls) == 2  # measured again, not the edited value
    assert json.loads(path.read_text())["value"] == 0.25


def tiny_engine_as_toyfaces():
    from hspace.engine import Engine
    from hspace.loading import load_components

    components = load_components("tiny-random")
    components.name = "toyfaces"
    return Engine(components, device="cpu")


def test_a_bank_says_how_much_space_it_needs(tmp_path, monkeypatch, engine):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(HspaceError, match=r"needs about [\d.]+ MB for 10 more samples but the disk has 0.0 MB free"):
        build_bank(tmp_path / "b", engine, 10, 3)
    assert not list((tmp_path / "b").glob("shard-*"))


# ------------------------------------------------------------------ 5. file readers


def _trajectory_variants(saved: Path, tmp: Path):
    from safetensors.torch import load_file, save_file

    good = saved / "t.safetensors"
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "is not a safetensors file"),
        "a png": (b"\x89PNG\r\n\x1a\n" + b"0" * 100, "is not a safetensors file"),
        "empty": (b"", "is not a safetensors file"),
    }
    for name, (blob, message) in cases.items():
        (tmp / f"{name}.safetensors").write_bytes(blob)
        yield tmp / f"{name}.safetensors", message

    def variant(name, t, m, message):
        save_file(t, str(tmp / f"{name}.safetensors"), metadata=m)
        return tmp / f"{name}.safetensors", message

    yield variant("no x_T", {k: v for k, v in tensors.items() if k != "x_T"}, meta, "lacks x_T")
    yield variant("extra", {**tensors, "junk": torch.zeros(1)}, meta, "has unknown junk")
    yield variant("bad seeds", tensors, {**meta, "seeds": "not json"}, "bad metadata")
    yield variant("seed strings", tensors, {**meta, "seeds": '["a", "b"]'}, "must list its seeds as integers")
    yield variant("bad spec", tensors, {**meta, "spec": '{"model": "m", "h_location": "nowhere"}'}, "unknown h location 'nowhere'")
    yield variant("z batch", {**tensors, "z": tensors["z"][:1]}, meta, "z has shape")
    yield variant("h steps", {**tensors, "h": tensors["h"][:, :1].contiguous()}, meta, "h has shape")
    yield variant("eta", {**tensors, "eta": tensors["eta"][:1]}, meta, "timesteps .* and eta .* must both be")
    yield variant("nan", {**tensors, "x_T": tensors["x_T"] * float("nan")}, meta, "x_T holds NaN")
    yield variant("a direction", {"delta": torch.zeros(2, 2)}, {"kind": "hspace.Direction"}, "expected 'hspace.Trajectory'")


def test_trajectory_files_that_are_wrong_in_every_way(tmp_path, saved, capsys):
    count = 0
    for path, message in _trajectory_variants(saved, tmp_path):
        with pytest.raises(HspaceError, match=message):
            Trajectory.load(path)
        code, err = run_cli(["edit", "--trajectory", path, "--direction", saved / "d.safetensors", "--out", tmp_path / "e", *TINY], capsys)
        assert code == 2 and str(path) in err, (path, err)
        count += 1
    assert count == 13


@pytest.mark.parametrize(
    "meta, message",
    [('["a list"]', "must be a JSON object"), ("{not json", "is not valid JSON"), ("[" * 100 + "]" * 100, "must be a JSON object"),
     ('{"a": ' * 80 + "1" + "}" * 80, "nested deeper than 64"), ('{"name": 5}', "name must be a string")],
)
def test_direction_metadata_that_is_not_a_json_object(tmp_path, meta, message):
    from safetensors.torch import save_file

    save_file({"delta": torch.zeros(2, 3)}, str(tmp_path / "d.safetensors"), metadata={"kind": "hspace.Direction", "meta": meta})
    with pytest.raises(HspaceError, match=message):
        Direction.load(tmp_path / "d.safetensors")


@pytest.mark.parametrize(
    "config, message",
    [("[1, 2]", "must hold a JSON object"), ("{broken", "is not valid JSON"), ('{"_class_name": "UNet2DModel", "block_out_channels": "wide"}', "cannot load the UNet2DModel"),
     ("", "is not valid JSON")],
)
def test_model_folders_with_bad_configs(tmp_path, capsys, config, message):
    from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(config)
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps(CELEBAHQ_SCHEDULER_CONFIG))
    code, err = run_cli(["info", "--model", tmp_path / "m"], capsys)
    assert code == 2 and message in err and str(tmp_path / "m") in err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_model_folders_with_missing_or_truncated_weights(tmp_path, capsys, damage):
    from hspace.loading import load_components

    load_components("tiny-random").unet.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(["info", "--model", tmp_path / "m"], capsys)
    assert code == 2 and "cannot load the UNet2DModel" in err


@pytest.mark.parametrize(
    "manifest, message",
    [("[]", "must hold a JSON object"), ("{", "is not valid JSON"), ('{"kind": "hspace.Bank", "format": 2}', "lacks spec"),
     (None, "lacks n"), ("nan", "is not valid JSON")],
)
def test_bank_manifests_that_are_wrong(tmp_path, engine, manifest, message):
    build_bank(tmp_path / "b", engine, 2, 3)
    path = tmp_path / "b" / "bank.json"
    if manifest is None:
        data = json.loads(path.read_text())
        del data["n"]
        manifest = json.dumps(data)
    path.write_text(manifest)
    with pytest.raises(HspaceError, match=message):
        Bank.open(tmp_path / "b")


@pytest.mark.parametrize("encoding, ok", [("utf-8", True), ("utf-8-sig", True), ("utf-16", False), ("latin-1", False)])
def test_label_csvs_in_several_encodings(tmp_path, encoding, ok):
    from hspace.directions.supervised import read_labels

    (tmp_path / "l.csv").write_text("seed,label\n1,1\n2,0\n3,yes # café\n" if not ok else "seed,label\n1,1\n2,0\n", encoding=encoding)
    if ok:
        assert read_labels(tmp_path / "l.csv") == ("seed", [1, 2], [True, False])
    else:
        with pytest.raises(HspaceError, match="is not UTF-8 text"):
            read_labels(tmp_path / "l.csv")


# ------------------------------------------------------------------ 6. unbounded requests


@pytest.mark.parametrize(
    "seeds, message",
    [("0-1000000000", "are 1,000,000,001 samples; one command takes at most 1,000,000"), ("", "no seeds"), (",", "no seeds"),
     ("5-3", "bad seed '5-3'"), ("-1", "bad seed '-1'"), ("x", "bad seed 'x'"), ("0-999999,0-10", "takes at most 1,000,000")],
)
def test_seed_lists_are_bounded_before_they_are_expanded(capsys, tmp_path, seeds, message):
    start = time.perf_counter()
    code, err = run_cli(["sample", "--seeds", seeds, "--out", tmp_path / "s", *TINY], capsys)
    assert code == 2 and message in err and time.perf_counter() - start < 5


@pytest.mark.parametrize("command, hint", [
    (["sample", "--seeds", "0", "--batch-size", "4096", "--out", "S"], "try a smaller --batch-size (it is 4096)"),
    (["bank", "S", "--n", "4", "--batch-size", "7"], "try a smaller --batch-size (it is 7)"),
    (["jacobian", "--seeds", "0", "--k", "9", "--at", "1", "--out", "S"], "try a smaller --k (it is 9), or Alg. 2 with a --b below it"),
])
def test_out_of_memory_is_a_message_naming_the_option_that_bounds_it(tmp_path, capsys, monkeypatch, command, hint):
    # Running out for real takes minutes under a memory limit (a 3000-vector Jacobian: 2 minutes); this is
    # the allocator's own message, raised by the first model call.
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9999999999 bytes")

    monkeypatch.setattr("torch.nn.Module.__call__", oom)
    code, err = run_cli([str(tmp_path / "s") if a == "S" else a for a in command] + TINY, capsys)
    assert code == 2 and f"out of memory; {hint}" in err, err


# ------------------------------------------------------------------ 7. names into paths


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a/b", "..", "", "x" * 300, "nul\x00byte"])
def test_names_never_leave_the_output_folder(tmp_path, name):
    from hspace.directions.direction import save_directions

    out = tmp_path / "deep" / "out"
    (path,) = save_directions([Direction(torch.ones(1, 2), meta={"name": name}, spec=FREE)], out)
    assert path.parent == out and path.is_file() and len(path.name) <= 140
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [path.name]


def test_save_each_with_a_hostile_direction_name(tmp_path, saved):
    d = Direction.load(saved / "d.safetensors")
    d.meta["name"] = "../../../evil/name"
    d.save(tmp_path / "hostile.safetensors")
    out = tmp_path / "e"
    assert main(["edit", "--direction", str(tmp_path / "hostile.safetensors"), "--seeds", "0", "--scales", "0", "--save-each", "--out", str(out), *TINY]) == 0
    assert all(p.parent == out for p in out.iterdir()) and not (tmp_path / "evil").exists()


# ------------------------------------------------------------------ 8. bank housekeeping


def test_a_lost_manifest_is_rebuilt_from_the_shards(tmp_path, engine):
    whole = build_bank(tmp_path / "b", engine, 6, 3, shard_size=4)
    h = whole.h()
    (tmp_path / "b" / "bank.json").unlink()
    with pytest.raises(HspaceError, match="has shard files but no bank.json: run `hspace bank"):
        Bank.open(tmp_path / "b")
    with pytest.raises(HspaceError, match="holds shards of another bank"):
        build_bank(tmp_path / "b", engine, 6, 4, shard_size=4)
    rebuilt = build_bank(tmp_path / "b", engine, 6, 3, shard_size=4, callback=lambda e: pytest.fail("drew a sample again"))
    assert torch.equal(rebuilt.h(), h)


def test_a_smaller_n_is_refused(tmp_path, engine):
    build_bank(tmp_path / "b", engine, 4, 3)
    with pytest.raises(HspaceError, match="holds 4 samples; --n 2 is smaller"):
        build_bank(tmp_path / "b", engine, 2, 3)


def test_a_damaged_shard_is_noticed(tmp_path, engine):
    build_bank(tmp_path / "b", engine, 4, 3, shard_size=2)
    shard = tmp_path / "b" / "shard-000000000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # zero the end of the tensor data, keep the header
    shard.write_bytes(bytes(data))
    with pytest.raises(HspaceError, match="shard-000000000002.safetensors' is damaged"):
        Bank.open(tmp_path / "b").h()


def test_stale_temporaries_of_a_dead_process_are_removed(tmp_path, engine):
    build_bank(tmp_path / "b", engine, 2, 3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    junk = tmp_path / "b" / f".shard-000000000002.safetensors.{dead}-0123abcd.tmp"
    junk.write_bytes(b"partial")
    build_bank(tmp_path / "b", engine, 3, 3)
    assert not junk.exists()


@pytest.mark.slow
def test_two_processes_on_one_bank(tmp_path):
    """The second writer is refused while the first draws, and told which process holds the bank."""
    code = (
        "import sys; from hspace.cli import main; "
        f"sys.exit(main(['bank', {str(tmp_path / 'b')!r}, '--n', '64', '--shard-size', '8', '--batch-size', '8', "
        "'--model', 'tiny-random', '--device', 'cpu', '--steps', '20']))"
    )
    env = {**os.environ, "HSPACE_NO_PROGRESS": "1"}
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "b" / "bank.lock"
    for _ in range(600):
        if lock.exists() or first.poll() is not None:
            break
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2 and f"is being drawn by process {first.pid}" in second.stderr
    assert Bank.open(tmp_path / "b").complete and lock.read_text() == ""  # released, and no stale pid left


@pytest.mark.parametrize("content", ["", "999999999", "{parent}", "not a pid"])
def test_the_bank_lock_is_held_exactly_as_long_as_its_writer_lives(tmp_path, engine, content):
    """The lock is the OS's (flock), whatever the file says: a live holder refuses (even with an empty or foreign
    pid in the file), a file whose holder is gone (a dead pid, a live unrelated pid, garbage) is taken."""
    build_bank(tmp_path / "b", engine, 2, 2)
    lock = tmp_path / "b" / "bank.lock"
    lock.write_text(content.format(parent=os.getppid()))  # the parent: a live process that holds no lock
    build_bank(tmp_path / "b", engine, 3, 2)  # nobody holds it: taken
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time; fd = os.open({str(lock)!r}, os.O_RDWR); os.write(fd, {content.format(parent=os.getppid())!r}.encode()); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HspaceError, match="is being drawn by (process|another process)"):
            build_bank(tmp_path / "b", engine, 4, 2)
    finally:
        holder.kill()
        holder.wait()
    assert build_bank(tmp_path / "b", engine, 4, 2).n == 4  # the holder died: the kernel released its lock


# ------------------------------------------------------------------ 9. messages


MODEL = ["--model", "tiny-random", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pca", "{bank}", "--random", "-2"], "argument --random: -2 is out of range"),
        (["edit", "--direction", "{d}", "--steps", "0", "--out", "{out}", *MODEL], "argument --steps: 0 is out of range"),
        (["arith", "--plus", "", "--minus", "1", "-o", "{out}/d.safetensors", *MODEL], "no seeds"),
        (["sample", "--seeds", "0", "--batch-size", "0", "--out", "{out}", *MODEL], "argument --batch-size: 0 is out of range"),
        (["jacobian", "--k", "two", "--out", "{out}", *MODEL], "argument --k: 'two' is not an integer"),
        (["pca", "{bank}", "--memory-gb", "nan"], "argument --memory-gb: 'nan' is not a finite number"),
        (["swap", "--seeds", "0", "1", "--donors", "2", "--out", "{out}", *MODEL], "2 seeds but 1 donors"),
    ],
)
def test_messages_name_the_option_and_come_before_any_work(tmp_path, capsys, monkeypatch, saved, argv, message):
    sampled = []
    monkeypatch.setattr("hspace.engine.Engine.run", lambda *a, **k: sampled.append(1))
    names = {"bank": tmp_path / "nobank", "out": tmp_path / "o", "d": saved / "d.safetensors"}
    code, err = run_cli([a.format(**names) for a in argv], capsys)
    assert code == 2 and message in err and not sampled


def test_ctrl_c_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("hspace.engine.Engine.run", interrupt)
    code, err = run_cli(["sample", "--seeds", "0", "--out", tmp_path / "s", *TINY], capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, t: e.edit("not a trajectory", [], [1.0]).images, "expected a Trajectory"),
        (lambda e, t: e.edit(t, ["not a direction"], [1.0]).images, "directions must be Direction objects"),
        (lambda e, t: e.replay(t, source=[7]), "source indices must lie in 0..2"),
        (lambda e, t: e.swap(t, "x"), "expected a Trajectory"),
        (lambda e, t: e.sample("abc", 2), "seed must be an integer from 0 to 2..63-1, got 'a'"),
        (lambda e, t: e.replay(t, torch.zeros(6, *e.h_shape), scale="big"), "scales must be a list of numbers"),
        (lambda e, t: Direction("not a tensor"), "must be a non-empty tensor"),
        (lambda e, t: Direction(torch.zeros(2, 3), meta="name"), "meta must be a dict"),
    ],
)
def test_api_calls_with_wrong_types(engine, trajectory, call, message):
    with pytest.raises(HspaceError, match=message):
        call(engine, trajectory)


def test_an_atomic_write_reaches_the_disk_before_its_name_and_the_name_after(tmp_path, monkeypatch):
    """fsync of the temporary file, then the rename, then fsync of the folder (so that a power loss leaves the
    old file or the whole new one under the name). The calls are recorded, not replaced: the writes happen."""
    from hspace import files

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(files.os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "d.json"
    files.write_json(target, {"a": 1})
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".d.json.")) and calls[1][1] == str(target) and calls[2][1] == str(tmp_path)
    assert json.loads(target.read_text()) == {"a": 1}


@pytest.mark.parametrize("plant", ["folder link out", "folder link out (relative)", "file link out", "folder link inside"])
def test_a_received_bank_cannot_make_hspace_write_outside_it(tmp_path, engine, plant):
    """A link planted in a bank folder: a scores folder (or scores file) that points outside the bank is never
    written through; one that stays inside is harmless."""
    bank = build_bank(tmp_path / "b", engine, 2, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "classifier.safetensors"
    victim.write_bytes(b"precious")
    scores = tmp_path / "b" / "scores"
    if plant == "folder link out":
        scores.symlink_to(outside)
    elif plant == "folder link out (relative)":
        scores.symlink_to("../outside")
    elif plant == "file link out":
        scores.mkdir()
        (scores / "classifier.safetensors").symlink_to(victim)
    else:
        (tmp_path / "b" / "real-scores").mkdir()
        scores.symlink_to(tmp_path / "b" / "real-scores")
    values = {"smile": torch.tensor([0.1, 0.9])}
    if plant.startswith("folder link out"):
        with pytest.raises(HspaceError, match="leads outside .* through a link"):
            bank.set_scores("classifier", values)
    else:
        bank.set_scores("classifier", values)  # replaces the link itself (a rename), never the file it named
        assert torch.equal(bank.scores("classifier")["smile"], values["smile"])
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in outside.iterdir()) == ["classifier.safetensors"]


@pytest.mark.parametrize(
    "run, message",
    [
        (lambda e, t: e.edit(t, Direction(torch.ones(6, *e.h_shape), spec=e.spec), [1e39]).images, "not a finite float32 number"),
        (lambda e, t: e.edit(t, Direction(torch.ones(6, *e.h_shape), spec=e.spec), [3e38]).images, "produced NaN or infinite values"),
        (lambda e, t: e.edit(t, Direction(torch.full((6, *e.h_shape), 1e38), spec=e.spec), [10.0]).images, "produced NaN or infinite values"),
        (lambda e, t: e.replay(t, interventions=[lambda h, ctx: h * 1e30]), "produced NaN or infinite values"),
    ],
)
def test_finite_input_that_overflows_is_an_error_not_a_black_image(engine, trajectory, run, message):
    with pytest.raises(HspaceError, match=message):
        run(engine, trajectory)


def test_a_schedule_that_cannot_be_sampled_is_an_error():
    """Zero betas: alpha_bar 1 everywhere, eq. 3 divides by sqrt(1 - a_t) = 0 (a black image before)."""
    from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG

    engine = tiny_engine(scheduler_config={**CELEBAHQ_SCHEDULER_CONFIG, "beta_start": 0.0, "beta_end": 0.0})
    with pytest.raises(HspaceError, match="produced NaN or infinite values"):
        engine.sample([1], 3, 1.0, progress=False)


@pytest.mark.parametrize("n", [10**12, 10**8 + 1])
def test_an_absurd_bank_size_is_refused_at_once_and_binds_nothing(tmp_path, engine, n):
    start = time.perf_counter()
    with pytest.raises(HspaceError, match="at most 100,000,000"):
        build_bank(tmp_path / "b", engine, n, 2)
    assert time.perf_counter() - start < 5 and not (tmp_path / "b" / "bank.json").exists()


def test_a_size_the_disk_cannot_hold_is_refused_before_anything_is_written_and_a_bank_without_samples_is_redeclared(tmp_path, engine):
    with pytest.raises(HspaceError, match="needs about .* MB .* but the disk has"):
        build_bank(tmp_path / "b", engine, 90_000_000, 6)  # ~3 TB of h
    assert not (tmp_path / "b" / "bank.json").exists()
    # a manifest left by a run killed before its first shard (as the old code left one) binds nothing
    build_bank(tmp_path / "b", engine, 2, 2)
    manifest = json.loads((tmp_path / "b" / "bank.json").read_text())
    for shard in (tmp_path / "b").glob("shard-*"):
        shard.unlink()
    (tmp_path / "b" / "bank.json").write_text(json.dumps({**manifest, "n": 10**12}))
    assert build_bank(tmp_path / "b", engine, 3, 2).n == 3
    with pytest.raises(HspaceError, match="holds 3 samples; --n 2 is smaller"):  # once drawn, a bank keeps its size
        build_bank(tmp_path / "b", engine, 2, 2)


def test_file_names_keep_their_extension_and_never_collide(tmp_path):
    from hspace.images import save_images

    names = ["face", "face", "a/b", "a_b", "y" * 300, "y" * 300]
    paths = save_images(torch.zeros(6, 3, 4, 4), tmp_path / "imgs", names)
    assert len({p.name for p in paths}) == 6 and all(p.suffix == ".png" and len(p.name) <= 122 for p in paths)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == sorted(p.name for p in paths)


def test_invert_of_two_images_of_one_name_keeps_both(tmp_path):
    from PIL import Image

    for folder, value in (("a", 40), ("b", 200)):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), (value, value, value)).save(tmp_path / folder / "face.png")
    argv = ["invert", str(tmp_path / "a" / "face.png"), str(tmp_path / "b" / "face.png"), "--steps", "2", "--model", "tiny-random",
            "--device", "cpu", "--out", str(tmp_path / "inv")]
    assert main(argv) == 0
    kept = sorted(p.name for p in (tmp_path / "inv").glob("*_reconstruction.png"))
    assert kept == ["face-2_reconstruction.png", "face_reconstruction.png"]
    dark, light = (np.asarray(Image.open(tmp_path / "inv" / n)).mean() for n in ("face_reconstruction.png", "face-2_reconstruction.png"))
    assert dark < light  # each file holds its own image


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bank", "B", "--n", "1000", "--num-processes", "1000"], "valid: 1 to"),
        (["toyfaces", "evaluate", "--n", "10000000"], "valid: 1 to 1,000,000 in one command"),
        (["toyfaces", "renoise", "--n", "2000000"], "valid: 1 to 1,000,000 in one command"),
        (["toyfaces", "edit-success", "B", "--n", "99999999"], "valid: 1 to 1,000,000 in one command"),
    ],
)
def test_unbounded_work_is_refused_before_it_starts(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert main(argv) == 2 and message in capsys.readouterr().err
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
        (["train", "--region-weights", "mouth=-1"], "region weight 'mouth=-1' is not PART=WEIGHT"),
        (["train", "--region-weights", "nose=2"], "PART one of eyes, mouth"),
        (["train", "--region-weights", "mouth=inf"], "WEIGHT a finite number >= 0"),
        (["train", "--channels", "7,9,11"], "must be three positive multiples of 8"),
        (["train", "--v-weight-cap", "0"], "v_weight_cap must be a finite number >= 1"),
        (["train", "--v-weight-cap", "inf"], "not a finite number"),
        (["evaluate", "--n", "4", "--steps", "100000"], "num_steps must be an integer from 1 to 1000, got 100000"),
        (["evaluate", "--n", "4", "--eta", "nan"], "eta nan is out of range"),
        (["export", "--run", "R", "--out", "M"], "no checkpoint at"),
    ],
)
def test_toyfaces_settings_are_checked_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        argv = [*argv, "--run", "R", "--steps", "1"]
    start = time.perf_counter()
    assert main(["toyfaces", *argv]) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 15 and not (tmp_path / "R" / "checkpoint.pt").exists() and not (tmp_path / "M").exists()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["sample", "--out", "/proc/hspace-out"], {}, "cannot be written"),
        (["sample", "--out", "/sys/hspace-out"], {}, "cannot be written"),
        (["sample", "--out", "o", "--save-trajectory", "/proc/t.safetensors"], {}, "cannot be written"),
        (["sample", "--out", "dangling/x"], {}, "which does not exist"),
        (["bank", "o", "--n", "2", "--model", "tiny-random", "--steps", "1"], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 says this is one of several processes"),
        (["sample", "--out", "o"], {"WORLD_SIZE": "2"}, "does not share its work between processes, but WORLD_SIZE=2"),
        (["ui", "--port", "0"], {"WORLD_SIZE": "3", "RANK": "0"}, "(commands that share their work: annotate, bank, edit, jacobian)"),
        (["ui", "--port", "99999"], {}, "is not a port; valid: 0 (a free one) to 65535"),
    ],
)
def test_outputs_and_environments_that_cannot_work_are_a_message(argv, env, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main([*argv, "--model", "tiny-random", "--seeds", "0", "--steps", "1"] if argv[0] == "sample" else argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated png", "bomb png", "3-d npy", "nan npy", "pickled npy", "text as png"])
def test_a_broken_mask_file_is_a_message(tmp_path, capsys, kind):
    from PIL import Image

    path = tmp_path / ("mask.npy" if "npy" in kind else "mask.png")
    if kind == "truncated png":
        Image.new("L", (32, 32), 255).save(path)
        path.write_bytes(path.read_bytes()[:40])
    elif kind == "bomb png":
        Image.new("1", (20000, 20000)).save(path)  # 400 megapixels, a few KB on disk
    elif kind == "3-d npy":
        np.save(path, np.ones((2, 8, 8), dtype=np.float32))
    elif kind == "nan npy":
        np.save(path, np.full((8, 8), np.nan, dtype=np.float32))
    elif kind == "pickled npy":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_text("not an image")
    argv = ["jacobian", "--model", "tiny-random", "--steps", "2", "--seed", "0", "--at", "1", "--k", "1", "--mask", str(path), "--out", str(tmp_path / "j")]
    assert main(argv) == 2
    assert "--mask" in capsys.readouterr().err


@pytest.mark.parametrize("identity", [{"spec": 5}, [], {"spec": {"model": "m", "h_location": "nowhere"}}, {"num_steps": "x", "spec": {}}, "null"])
def test_shards_of_unreadable_settings_without_a_manifest_are_a_message(tmp_path, engine, identity):
    from safetensors.torch import save_file

    (tmp_path / "b").mkdir()
    tensors = {"seeds": torch.arange(2), "h": torch.zeros(2, 1, 4), "thumbnails": torch.zeros(2, 3, 2, 2, dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "b" / "shard-000000000000.safetensors"), {"kind": "hspace.BankShard", "identity": json.dumps(identity), "bank": "x"})
    with pytest.raises(HspaceError, match="holds shards of another bank"):
        build_bank(tmp_path / "b", engine, 2, 2)
    with pytest.raises(HspaceError, match="has shard files but no bank.json"):
        Bank.open(tmp_path / "b")


@pytest.mark.parametrize("option", [["--steps", "7"], ["--eta=0"], ["--h-location", "mid.in"], ["--no-clip"], ["--dtype", "float16"], ["--prompt", "a cat"]])
def test_options_a_trajectory_fixes_are_refused_not_ignored(tmp_path, capsys, option):
    common = ["--model", "tiny-random", "--device", "cpu"]
    path = tmp_path / "t.safetensors"
    assert main(["sample", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "s"), "--save-trajectory", str(path), *common]) == 0
    assert main(["arith", "--plus", "0", "--minus", "0", "--steps", "2", "-o", str(tmp_path / "d.safetensors"), *common]) == 0
    capsys.readouterr()
    argv = ["edit", "--trajectory", str(path), "--direction", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "e"), *common]
    assert main([*argv, *option]) == 2
    assert f"{option[0].split('=')[0]} is fixed by the trajectory's spec" in capsys.readouterr().err
    assert main(argv) == 0


def test_a_taken_port_is_a_message_before_any_work(capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.perf_counter()
        argv = ["ui", "--port", str(port), "--model", "tiny-random", "--workdir", str(tmp_path / "w"), "--save-dir", str(tmp_path / "s")]
        assert main(argv) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and time.perf_counter() - start < 10  # refused before the starter set is drawn
