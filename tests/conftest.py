"""Tiny random U-Nets built in the tests themselves (CPU, a few steps)."""

import os
import tempfile

os.environ.setdefault("HSPACE_NO_PROGRESS", "1")  # bars are tested on their own (test_progress.py)
os.environ.setdefault("HSPACE_CACHE_DIR", tempfile.mkdtemp(prefix="hspace-cache-"))  # model fingerprints: not the user's cache

import pytest
import torch

from hspace.engine import Engine
from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG, Components


def tiny_unet(seed: int = 0, sample_size: int = 16, in_channels: int = 3):
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=8,
        )


def tiny_engine(h_location: str = "mid.out", scheduler_config: dict | None = None, seed: int = 0, dtype=None, speed=None) -> Engine:
    config = dict(scheduler_config or CELEBAHQ_SCHEDULER_CONFIG)
    return Engine(Components(tiny_unet(seed), config, None, "tiny-test"), h_location=h_location, device="cpu", dtype=dtype, speed=speed)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def trajectory(engine):
    return engine.sample([3, 11, 42], num_steps=6, eta=1.0)


# Comparing runs of different batch composition (other batch sizes, other rows together): a convolution or
# matmul kernel may sum in another order for another batch shape, so the same sample differs by float
# rounding, by an amount that depends on the CPU (seen: 0 on one x86 CPU, 1.35e-5 on the bundled model on
# another). Tests that must compare across compositions derive their tolerance from the spread measured on
# the machine they run on, with a margin; tests that can, compare at equal composition, exactly.
COMPOSITION_MARGIN = 10  # the spread of an unedited replay bounds an edited one's up to this factor
COMPOSITION_FLOOR = 1e-6  # a CPU whose kernels do not depend on the batch shape: one float32 ulp of values ~4


def composition_tolerance(engine: Engine, trajectory, batch_sizes=(1, 2)) -> float:
    """The largest difference between ``trajectory``'s x_0 and its unedited replays in batches of
    ``batch_sizes`` on this machine, times COMPOSITION_MARGIN (at least COMPOSITION_FLOOR)."""
    spread = max(float((engine.replay(trajectory, batch_size=b, progress=False).x0 - trajectory.x0).abs().max()) for b in batch_sizes)
    return max(COMPOSITION_MARGIN * spread, COMPOSITION_FLOOR)
