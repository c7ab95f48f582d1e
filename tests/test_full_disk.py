"""A real full disk (a small tmpfs mounted for the test, filled up) for every writer: the error names the file
and says the disk is full, nothing half-written is left, and what was there before is intact.

Mounting needs root (as in CI); elsewhere the tests are skipped with that reason."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from hspace import Direction, HspaceError, Trajectory
from hspace.bank import build_bank
from hspace.directions.pca import PCAResult, pca

FULL = "the disk is full"


def _mounted(folder, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {mounted.stderr.strip()}")
    return folder


@pytest.fixture
def disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    yield _mounted(tmp_path / "disk", "2m")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


@pytest.fixture
def big_disk(tmp_path):
    """A 24 MiB tmpfs: room for one exported toy-faces model (8 MB) and a little more."""
    yield _mounted(tmp_path / "disk", "24m")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


def fill(folder, leave: int = 0) -> None:
    """Take every free byte of ``folder``'s filesystem but ``leave``."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / ".filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            f.write(b"\0" * max(0, free - leave))
            while leave == 0:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging"))


def test_trajectory_and_direction_on_a_full_disk(disk, engine, trajectory):
    path, dpath = disk / "t.safetensors", disk / "d.safetensors"
    small = trajectory[[0]]
    small.save(path)
    d = Direction(trajectory.h[0] - trajectory.h[1], meta={"name": "d"}, spec=engine.spec)
    Direction(d.delta[:1], meta={"name": "d"}, spec=engine.spec).save(dpath)
    fill(disk)
    for write, target in ((lambda: trajectory.save(path), path), (lambda: d.save(dpath), dpath)):
        with pytest.raises(HspaceError, match=f"{FULL}: cannot write '{target}'"):
            write()
    assert Trajectory.load(path).seeds == small.seeds and Direction.load(dpath).num_steps == 1  # the old files, intact
    assert _leftovers(disk) == []


def test_pca_result_on_a_full_disk_appears_whole_or_not_at_all(disk, trajectory):
    result = pca(trajectory, 2)
    fill(disk)
    with pytest.raises(HspaceError, match=FULL):
        result.save(disk / "pca")
    assert not (disk / "pca").exists() or list((disk / "pca").iterdir()) == []
    assert _leftovers(disk) == []
    with pytest.raises(HspaceError):
        PCAResult.load(disk / "pca")


def test_a_bank_on_a_full_disk_says_so_and_resumes(disk, engine, tmp_path):
    fill(disk, leave=200_000)  # room for the manifest and a shard or two, not for 40 samples
    with pytest.raises(HspaceError, match="disk is full|needs about"):
        build_bank(disk / "bank", engine, 40, 3, shard_size=4)
    assert _leftovers(disk) == []
    (disk / ".filler").unlink()
    bank = build_bank(disk / "bank", engine, 40, 3, shard_size=4)  # the same call finishes it
    assert bank.complete and torch.equal(bank.h([0]), build_bank(tmp_path / "ref", engine, 4, 3, shard_size=4).h([0]))


def test_the_editors_save_on_a_full_disk_is_a_message(disk):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hspace.engine import Engine
    from hspace.ui.server import Editor, create_app

    engine = Engine.load("tiny-random")
    direction = Direction(torch.randn(3, *engine.h_shape), meta={"name": "pc1", "method": "pca"}, spec=engine.spec)
    editor = Editor(engine, [direction], disk / "saved", steps=3, eta=1.0)
    client = TestClient(create_app(editor, token="t"), base_url="http://127.0.0.1:7860", headers={"X-Hspace-Token": "t"})
    (disk / "saved").mkdir()
    fill(disk)
    response = client.post("/api/save", json={"name": "mine", "parts": [{"name": "pc1", "scale": 1.0, "window": None}]})
    assert response.status_code == 400 and FULL in response.json()["error"]
    assert list((disk / "saved").iterdir()) == []


def test_exporting_over_a_model_on_a_full_disk_leaves_the_old_model_whole(big_disk, tmp_path):
    from hspace.engine import Engine
    from hspace.toyfaces.train import TrainConfig, export, train

    train(tmp_path / "run", TrainConfig(steps=2, batch_size=4, pool=32, warmup=2, checkpoint_every=2))
    export(tmp_path / "run" / "checkpoint.pt", big_disk / "model")
    before = {p.name: p.read_bytes() for p in (big_disk / "model").iterdir()}
    train(tmp_path / "run", TrainConfig(steps=4, batch_size=4, pool=32, warmup=2, checkpoint_every=2))  # new weights
    fill(big_disk)
    with pytest.raises(HspaceError, match=FULL):
        export(tmp_path / "run" / "checkpoint.pt", big_disk / "model")
    assert {p.name: p.read_bytes() for p in (big_disk / "model").iterdir()} == before
    assert Engine.load(str(big_disk / "model"), device="cpu").h_shape == (128, 8, 8)
    assert _leftovers(big_disk) == []
