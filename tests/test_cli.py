"""The command line, end to end on the built-in tiny model with 2 steps."""

import numpy as np
import pytest
import torch
from PIL import Image

from hspace import Direction, Trajectory
from hspace.cli import main, parse_seeds
from hspace.images import labelled_grid, to_uint8


def test_parse_seeds():
    assert parse_seeds(["0-3", "7", "9,11"]) == [0, 1, 2, 3, 7, 9, 11]


def test_sample_edit_swap_arith(tmp_path):
    common = ["--steps", "2", "--device", "cpu", "--model", "tiny-random"]
    assert main(["sample", "--seeds", "0-2", "--out", str(tmp_path / "s"), "--save-trajectory", str(tmp_path / "t.safetensors"), *common]) == 0
    traj = Trajectory.load(tmp_path / "t.safetensors")
    assert traj.seeds == [0, 1, 2] and traj.h.shape == (3, 2, 64, 8, 8)
    png = np.asarray(Image.open(tmp_path / "s" / "seed1.png"))
    assert np.array_equal(png, to_uint8(traj.images[1]))

    direction = tmp_path / "d.safetensors"
    assert main(["arith", "--plus", "0", "--minus", "1", "-o", str(direction), "--name", "zero-minus-one", *common]) == 0
    d = Direction.load(direction)
    assert d.name == "zero-minus-one" and torch.allclose(d.delta, traj.h[0] - traj.h[1], atol=1e-5)

    assert main(["edit", "--direction", str(direction), "--seeds", "2", "--scales", "0", "1", "--out", str(tmp_path / "e"), "--save-each", *common]) == 0
    assert (tmp_path / "e" / "edit_seed2.png").is_file()
    unedited = np.asarray(Image.open(tmp_path / "e" / "seed2_0_zero-minus-one_0.png"))
    assert np.array_equal(unedited, to_uint8(traj.images[2]))

    assert main(["edit", "--direction", str(direction), "--trajectory", str(tmp_path / "t.safetensors"), "--scales", "0", "--out", str(tmp_path / "e2"), "--save-each", "--device", "cpu", "--model", "tiny-random"]) == 0
    unedited = np.asarray(Image.open(tmp_path / "e2" / "seed1_0_zero-minus-one_0.png"))
    assert np.array_equal(unedited, to_uint8(traj.images[1]))

    assert main(["swap", "--seeds", "0", "--donors", "1", "--out", str(tmp_path / "w"), *common]) == 0
    assert (tmp_path / "w" / "swap.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--seeds", "x"], "bad seed 'x'"),
        (["sample", "--eta", "1,0,1", "--steps", "2"], "eta has 3 values but the process has 2 steps"),
        (["sample", "--h-location", "mid.bottom"], "unknown h location 'mid.bottom'"),
        (["sample", "--model", "no-such-model"], "'no-such-model'"),
        (["swap", "--seeds", "0", "1", "--donors", "2"], "2 seeds but 1 donors"),
        (["edit", "--direction", "missing.safetensors"], "'missing.safetensors' does not exist"),
        (["edit", "--direction", "x", "--window", "10-5"], "bad --window '10-5'"),
    ],
)
def test_bad_input_exits_2_naming_the_value(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_labelled_grid_layout():
    images = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    grid = labelled_grid(images, ["a", "b"], ["-1", "0", "1"], min_cell=32, pad=2)
    array = np.asarray(grid)
    assert array.shape[0] > 2 * 32 and array.shape[1] > 3 * 32
    # the last cell holds the last image, enlarged 4x by nearest neighbour
    tile = to_uint8(images[1, 2]).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(array[-2 - 32 : -2, -2 - 32 : -2], tile)
