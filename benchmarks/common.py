"""Shared helpers for the benchmark scripts: models to time and an alternating median timer."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from hspace.engine import Engine
from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG, Components, tiny_unet_config


def celebahq_unet():
    """A U-Net built from the google/ddpm-ema-celebahq-256 config, random weights (h is 512x8x8)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def make_engine(name: str, device: str | None, speed=None) -> Engine:
    """'tiny' (the built-in 32x32 test model) or 'celebahq' (the 256 px config, random weights); ``speed``
    a ``hspace.speed.Speed``."""
    torch.manual_seed(0)
    if name == "celebahq":
        unet = celebahq_unet()
    else:
        from diffusers import UNet2DModel

        unet = UNet2DModel(**tiny_unet_config())
    return Engine(Components(unet, dict(CELEBAHQ_SCHEDULER_CONFIG), None, name), device=device, speed=speed)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=["tiny", "celebahq"], default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=5)
    return p


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, float]:
    """Median seconds of each function, run in alternation (after one warm-up each) so drift hits all."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def toyfaces_pipeline(scheduler: str):
    """The bundled toy faces as a diffusers ``DDPMPipeline`` with the scheduler class ``scheduler`` (a user's own
    pipeline, for hspace.steer), and its engine."""
    import diffusers

    engine = Engine.load("toyfaces")
    pipe = diffusers.DDPMPipeline(unet=engine.unet, scheduler=getattr(diffusers, scheduler).from_config(engine.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return engine, pipe


def child_json(code: str, *args) -> dict:
    """Run ``code`` in a fresh Python process (``sys.argv[1:]`` = ``args``), so that its peak RSS is its own; the JSON
    object on its last line of output."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
