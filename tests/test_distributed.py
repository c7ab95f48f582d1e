"""Several processes (torchrun with gloo on loopback, as `--num-processes` starts them): banks, annotation and
edits equal what one process makes, and an interrupted bank resumes with any number of processes.

Equality is bit for bit at the same number of CPU threads per process (1 here): a different thread
count changes the order of float sums (docs/scale.md)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hspace.bank import Bank, build_bank
from hspace.cli import main
from hspace.engine import Engine

BANK = ["--model", "tiny-random", "--steps", "6", "--shard-size", "2", "--batch-size", "2", "--eta", "1"]


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the launched processes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shards(path) -> dict:
    return {p.name: load_file(p) for p in sorted(path.glob("shard-*.safetensors"))}


def _assert_same_bank(a, b) -> None:
    sa, sb = _shards(a), _shards(b)
    assert sorted(sa) == sorted(sb) and sa
    for name in sa:
        for key in ("seeds", "h", "thumbnails"):
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)


def _draws(log: str) -> list[int]:
    """First samples of the shards the processes drew, from their log lines."""
    return [int(m) for m in re.findall(r"process \d+ of \d+ draws samples (\d+)\.\.", log)]


def _failure(result: subprocess.CompletedProcess) -> str:
    """What the processes printed: its start (their own messages) and its end (the launcher's summary)."""
    text = result.stderr
    return text if len(text) <= 8000 else text[:5000] + "\n[...]\n" + text[-3000:]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HSPACE_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "hspace", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_bank_by_two_processes_equals_one_and_resumes_with_any_number(tmp_path, one_thread):
    reference = build_bank(tmp_path / "one", Engine.load("tiny-random"), 16, 6, 1.0, shard_size=2, batch_size=2, progress=False)
    assert reference.complete

    two = _run(["bank", str(tmp_path / "two"), "--n", "16", *BANK, "--num-processes", "2"])
    assert two.returncode == 0, _failure(two)
    _assert_same_bank(tmp_path / "one", tmp_path / "two")
    assert sorted(_draws(two.stderr)) == list(range(0, 16, 2))  # every shard drawn once, by one process
    assert {int(i) for i in re.findall(r"process (\d+) of 2 draws", two.stderr)} == {0, 1}

    # killed in the middle (the whole process group, as a lost machine would be), then resumed with 1 process
    env = {**os.environ, "HSPACE_NO_PROGRESS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "hspace", "bank", str(tmp_path / "killed"), "--n", "16", *BANK[:3], "20",
                               *BANK[4:], "--num-processes", "2"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed").glob("shard-*.safetensors")):
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill the whole tree
    tree = psutil.Process(killed.pid).children(recursive=True) + [psutil.Process(killed.pid)]
    for process in tree:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    killed.wait()
    partial = Bank.open(tmp_path / "killed")
    assert partial.missing(), "the run finished before it was killed; nothing was resumed"
    resumed = build_bank(tmp_path / "killed", Engine.load("tiny-random"), 16, 20, 1.0, shard_size=2, batch_size=2, progress=False)
    assert resumed.complete
    reference20 = build_bank(tmp_path / "one20", Engine.load("tiny-random"), 16, 20, 1.0, shard_size=2, batch_size=2, progress=False)
    _assert_same_bank(tmp_path / "one20", tmp_path / "killed")

    # shards lost (and a half-written temporary left behind), resumed with 3 processes: only those are drawn
    for name in ("shard-000000000002.safetensors", "shard-000000000008.safetensors", "shard-000000000014.safetensors"):
        (tmp_path / "two" / name).unlink()
    (tmp_path / "two" / ".shard-000000000008.safetensors.99999.tmp").write_bytes(b"partial")
    three = _run(["bank", str(tmp_path / "two"), "--n", "16", *BANK, "--num-processes", "3"])
    assert three.returncode == 0, _failure(three)
    assert sorted(_draws(three.stderr)) == [2, 8, 14]
    _assert_same_bank(tmp_path / "one", tmp_path / "two")
    assert reference20.complete


@pytest.mark.slow
def test_annotate_and_edit_by_two_processes_equal_one(tmp_path, one_thread):
    bank = build_bank(tmp_path / "bank", Engine.load("toyfaces"), 6, 3, 1.0, shard_size=3, batch_size=3, progress=False)
    assert main(["annotate", str(bank.path), "--batch-size", "2"]) == 0
    two = _run(["annotate", str(bank.path), "--batch-size", "2", "--name", "two", "--num-processes", "2"])
    assert two.returncode == 0, _failure(two)
    one, other = bank.scores("classifier"), bank.scores("two")
    assert sorted(one) == sorted(other) and all(torch.equal(one[k], other[k]) for k in one)

    common = ["--model", "toyfaces", "--steps", "3", "--seeds", "0-4", "--batch-size", "2", "--scales", "-1", "1", "--save-each"]
    direction = tmp_path / "d.safetensors"
    assert main(["arith", "--model", "toyfaces", "--steps", "3", "--plus", "0", "--minus", "1", "-o", str(direction)]) == 0
    assert main(["edit", *common, "--direction", str(direction), "--out", str(tmp_path / "e1")]) == 0
    two = _run(["edit", *common, "--direction", str(direction), "--out", str(tmp_path / "e2"), "--num-processes", "2"])
    assert two.returncode == 0, _failure(two)
    files = sorted(p.name for p in (tmp_path / "e1").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "e2").glob("*.png")) and len(files) == 5 * 3
    for name in files:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e1" / name)), np.asarray(Image.open(tmp_path / "e2" / name))), name


@pytest.mark.slow
def test_jacobian_of_many_samples_by_two_processes_equals_one(tmp_path, one_thread):
    common = ["jacobian", "--model", "tiny-random", "--steps", "3", "--seeds", "0-2", "--k", "2", "--max-iter", "5", "--tol", "0", "--at", "1"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = _run([*common, "--out", str(tmp_path / "two"), "--num-processes", "2"])
    assert two.returncode == 0, _failure(two)
    for seed in range(3):
        one_dir, two_dir = tmp_path / "one" / f"seed{seed}", tmp_path / "two" / f"seed{seed}"
        files = sorted(p.name for p in one_dir.glob("*.safetensors"))
        assert files and files == sorted(p.name for p in two_dir.glob("*.safetensors"))
        for name in files:
            a, b = load_file(one_dir / name), load_file(two_dir / name)
            assert all(torch.equal(a[k], b[k]) for k in a), (seed, name)


def test_processes_share_the_cores_and_a_set_thread_count_is_kept():
    from hspace.cli.launch import thread_environment

    cores = len(os.sched_getaffinity(0))
    assert thread_environment({}, 1)["OMP_NUM_THREADS"] == str(cores)
    assert thread_environment({}, 2 * cores)["OMP_NUM_THREADS"] == "1"
    assert thread_environment({"OMP_NUM_THREADS": "3"}, 2)["OMP_NUM_THREADS"] == "3"
    # torch in a process reads it (hspace never sets its own thread count)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    info = subprocess.run([sys.executable, "-m", "hspace", "info", "--model", "tiny-random"], capture_output=True, text=True, env=env, timeout=120)
    assert '"cpu_threads": 1' in info.stdout, info.stderr[-2000:]


@pytest.mark.slow
def test_a_child_failure_is_its_own_message_and_status_not_the_launchers_traceback(tmp_path, one_thread):
    # every process meets the same bad input: one message, the child's exit status 2
    bad = _run(["bank", str(tmp_path / "bad"), "--model", str(tmp_path / "no-model"), "--n", "4", "--num-processes", "2"])
    assert bad.returncode == 2, _failure(bad)
    assert bad.stderr.count("hspace bank: error: model") == 1, bad.stderr
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr, bad.stderr

    # one process killed by a signal: exit 1, and the line says which process and which signal
    env = {**os.environ, "HSPACE_NO_PROGRESS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "hspace", "bank", str(tmp_path / "killed"), "--n", "16", *BANK[:3], "40",
                            *BANK[4:], "--num-processes", "2"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed").glob("shard-*.safetensors")):
        time.sleep(0.05)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if p.cmdline()[-2:] == ["-m", "hspace.cli.launched"] and "hspace.cli.torchrun" not in p.cmdline()]
    assert len(workers) == 2, workers
    workers[0].send_signal(signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert re.search(r"hspace: error: process [01] was stopped by SIGKILL", err), err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
