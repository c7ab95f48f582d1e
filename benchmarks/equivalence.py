"""Bit-for-bit equivalence of two versions of hspace on the same seeds: zero-delta samples, replays, edits,
banks, PCA, Jacobian directions, the block study's sections and the quick report's sections, on the bundled
models and tiny random SD, SD3 and FLUX pipelines.

Run it once per version (``PYTHONPATH=OTHER_CHECKOUT/src`` for the other one), then compare:

    python benchmarks/equivalence.py --out /tmp/before.json      # (on the old checkout)
    python benchmarks/equivalence.py --out /tmp/after.json
    python benchmarks/equivalence.py --compare /tmp/before.json /tmp/after.json

Each figure is the SHA-256 of a tensor's bytes (or of a JSON section), so "equal" means bit for bit. Only the
public API that both versions share is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny pipelines of the tests


def digest(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        return hashlib.sha256(str(tuple(x.shape)).encode() + str(x.dtype).encode() + x.numpy().tobytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unconditional(figures: dict, model: str, work: Path) -> None:
    from hspace import Engine
    from hspace.bank import build_bank
    from hspace.directions.jacobian import jacobian_directions
    from hspace.directions import pca as methods

    engine = Engine.load(model, device="cpu")
    t = engine.sample([0, 1, 2], num_steps=8, eta=1.0, progress=False)
    figures[f"{model}/sample.x0"] = digest(t.x0)
    figures[f"{model}/sample.h"] = digest(t.h)
    figures[f"{model}/replay.x0"] = digest(engine.replay(t, progress=False).x0)
    bank = build_bank(work / f"{model}-bank", engine, 12, num_steps=8, eta=1.0, shard_size=4, progress=False)
    figures[f"{model}/bank.h"] = digest(bank.h())
    from safetensors import safe_open

    with safe_open(str(bank.shard_path(0)), framework="pt") as f:  # the bank's digest, as every shard carries it
        figures[f"{model}/bank.digest"] = f.metadata()["bank"]
    if hasattr(methods, "pca"):  # this version's one call: pca(bank, k)
        pca = methods.pca(bank, 3)
    else:  # the version before it
        pca = methods.pca_per_timestep(bank.h_chunks(), 3, spec=bank.spec, timesteps=bank.h_timesteps)
    directions = pca.directions() if callable(getattr(pca, "directions", None)) else pca.directions
    figures[f"{model}/pca.components"] = digest(pca.components)
    figures[f"{model}/pca.sigma"] = digest(pca.sigma)
    first = directions[0] if isinstance(directions, (list, tuple)) else list(directions)[0]
    images = engine.edit(t, [first], [-2.0, 0.0, 2.0], progress=False)
    images = getattr(images, "images", images)  # labelled Edited results here, a bare tensor before
    figures[f"{model}/edit.images"] = digest(images)
    jac = jacobian_directions(engine, t, 0, steps=[3], k=2, max_iter=4, progress=False)
    figures[f"{model}/jacobian.singular_values"] = digest(torch.stack([s.singular_values for s in jac.steps]))


def text_to_image(figures: dict, name: str, pipe, work: Path, **condition) -> None:
    from hspace import Engine

    engine = Engine.from_pipeline(pipe, device="cpu", dtype="float32", **condition)
    t = engine.sample([0, 1], num_steps=4, eta=0.0, progress=False)
    figures[f"{name}/sample.x0"] = digest(t.x0)
    figures[f"{name}/sample.h"] = digest(t.h)
    delta = torch.randn(t.num_steps, *engine.h_shape, generator=torch.Generator().manual_seed(0))
    figures[f"{name}/replay.delta.x0"] = digest(engine.replay(t, delta, scale=0.5, progress=False).x0)


def blocks(figures: dict, work: Path) -> None:
    from hspace.reproduce.blocks import run_blocks

    out = work / "blocks"
    run_blocks(out, "toydit", quick=True, blocks=["block.2", "block.5"], device="cpu")
    for section in sorted(out.glob("block.*/sections/*.json")):
        data = json.loads(section.read_text())
        data.pop("seconds", None)
        data.pop("elapsed", None)
        data.pop("checksum", None)  # of the seconds too
        figures[f"blocks/{section.parent.parent.name}/{section.stem}"] = digest(data)


def reproduce(figures: dict, work: Path) -> None:
    """Every section of the quick report on the bundled toy faces (timings left out)."""
    from hspace.cli import main

    out = work / "reproduce"
    assert main(["reproduce", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    for section in sorted((out / "sections").glob("*.json")):
        data = json.loads(section.read_text())
        for key in ("seconds", "elapsed", "checksum"):
            data.pop(key, None)
        figures[f"reproduce/{section.stem}"] = digest(data)


def measure(skip_blocks: bool, skip_reproduce: bool = False) -> dict:
    import tiny_sd
    import tiny_transformers

    torch.manual_seed(0)
    figures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in ("toyfaces", "toydit"):
            unconditional(figures, model, work)
        text_to_image(figures, "tiny-sd", tiny_sd.sd_pipeline(), work, prompt="a face", guidance=3.0)
        text_to_image(figures, "tiny-sd-cond", tiny_sd.sd_pipeline(), work, prompt="a face", guidance=3.0, guide_edit="cond")
        text_to_image(figures, "tiny-sd3", tiny_transformers.sd3_pipeline(work / "sd3"), work, prompt="a face", guidance=2.0)
        text_to_image(figures, "tiny-flux", tiny_transformers.flux_pipeline(work / "flux"), work, prompt="a face", height=64, width=64)
        if not skip_blocks:
            blocks(figures, work)
        if not skip_reproduce:
            reproduce(figures, work)
    return figures


def compare(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    names = sorted(set(before) | set(after))
    differ = [n for n in names if before.get(n) != after.get(n)]
    for n in names:
        print(f"{'equal ' if n not in differ else 'DIFFER'}  {n}")
    print(f"{len(names) - len(differ)} of {len(names)} figures equal bit for bit")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write this version's figures here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar="JSON")
    parser.add_argument("--no-blocks", action="store_true", help="skip the block study's sections (the slowest part)")
    parser.add_argument("--no-reproduce", action="store_true", help="skip the quick report on the toy faces")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    figures = measure(args.no_blocks, args.no_reproduce)
    text = json.dumps(figures, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
