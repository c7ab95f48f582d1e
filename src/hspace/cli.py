"""The `hspace` command line: sample, edit, swap, arith, demo, info."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import HspaceError


def parse_seeds(items: list[str]) -> list[int]:
    """Seeds from words like '0-7', '3', '1,5,9'."""
    seeds: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    lo, hi = int(lo), int(hi)
                    if hi < lo:
                        raise ValueError
                    seeds.extend(range(lo, hi + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise HspaceError(f"bad seed {part!r}; valid: an integer like 7, a range like 0-15, or a list like 1,5,9") from None
    return seeds


def parse_eta(text: str):
    """One number, or a comma-separated list with one value per step."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise HspaceError(f"bad --eta {text!r}; valid: a number like 1.0, or one number per step separated by commas") from None
    return values[0] if len(values) == 1 else values


def parse_window(text: str | None):
    if text is None:
        return None
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise HspaceError(f"bad --window {text!r}; valid: T_START:T_END in timesteps, e.g. 1000:500") from None
    return start, end


class Progress:
    """A tqdm bar fed by the engine's per-step callback."""

    def __init__(self, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, info: dict) -> None:
        total = info["num_steps"] * info.get("num_chunks", 1) * info.get("num_parts", 1)  # parts: several replays
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(1)

    def close(self):
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _engine(args):
    from .engine import Engine

    clip = False if getattr(args, "no_clip", False) else None
    return Engine.load(args.model, h_location=args.h_location, device=args.device, dtype=args.dtype, clip_sample=clip)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .hooks import DEFAULT_H_LOCATION
    from .loading import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, local diffusers folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--h-location", default=DEFAULT_H_LOCATION, help="where h lives: mid.out (the paper's h) or mid.in")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    p.add_argument("--batch-size", type=int, default=32, help="samples per U-Net batch")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 (the scheduler's clip_sample); DDIM inversion needs it")


def _add_process_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=50, help="number of generative steps (default 50)")
    p.add_argument("--eta", default="1.0", help="eta: 0 = DDIM, 1 = DDPM, or one value per step, comma-separated")


def _sample(engine, args, seeds, desc="sampling"):
    with Progress(desc) as progress:
        return engine.sample(seeds, args.steps, parse_eta(args.eta), batch_size=args.batch_size, callback=progress)


def cmd_sample(args) -> None:
    from .images import labelled_grid, save_images

    engine = _engine(args)
    trajectory = _sample(engine, args, parse_seeds(args.seeds))
    out = Path(args.out)
    save_images(trajectory.images, out, [f"seed{s}" for s in trajectory.seeds])
    labelled_grid(trajectory.images[None], col_labels=[str(s) for s in trajectory.seeds]).save(out / "grid.png")
    if args.save_trajectory:
        trajectory.save(args.save_trajectory)
    print(f"wrote {len(trajectory)} samples and grid.png to {out}")


def cmd_edit(args) -> None:
    from .directions.direction import Direction
    from .images import labelled_grid, to_pil

    # Check every input before the first U-Net pass.
    window, seeds = parse_window(args.window), parse_seeds(args.seeds)
    scales = _scales(args.scales)
    directions = [Direction.load(p) for p in direction_files(args.direction)]
    if args.sequential and len(scales) != len(directions):
        raise HspaceError(f"--sequential takes one scale per direction: {len(directions)} directions, {len(scales)} scales")
    saved = bank = None
    if args.trajectory and args.bank:
        raise HspaceError("give --trajectory or --bank, not both")
    if args.trajectory:
        saved = _saved_trajectory(args)
    if args.bank:
        from .bank import Bank

        bank = Bank.open(args.bank)
        args.steps, args.eta = bank.num_steps, ",".join(map(str, bank.eta))
        seeds = [bank.seeds[i] for i in bank.check_indices(parse_seeds(args.samples))]
    engine = _engine(args)
    if bank is not None:
        bank.check_engine(engine)
    for direction in directions:
        direction.check_compatible(engine.h_shape, args.steps, engine.h_location)
    trajectory = saved if saved is not None else _sample(engine, args, seeds)
    if args.sequential:
        return _sequential_edit(engine, trajectory, directions, scales, window, args)
    with Progress("editing") as progress:
        images = engine.edit(
            trajectory, directions, scales, window=window, asyrp=args.asyrp, batch_size=args.batch_size, callback=progress
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [d.name for d in directions]
    cols = [f"{s:g}" for s in scales]
    for b, seed in enumerate(trajectory.seeds):
        who = f"seed{seed}" if seed >= 0 else f"sample{b}"  # an inverted image has no seed
        labelled_grid(images[:, :, b], rows, cols).save(out / f"edit_{who}.png")
        if args.save_each:
            for d, direction in enumerate(directions):
                for s, scale in enumerate(scales):
                    to_pil(images[d, s, b]).save(out / f"{who}_{d}_{direction.name}_{scale:g}.png")
    print(f"wrote edit grids for {len(trajectory)} samples to {out}")


def _saved_trajectory(args):
    """A trajectory file's samples. The process follows the file: its step count, and no clipping when
    it was drawn without (e.g. an inverted image)."""
    from .trajectory import Trajectory

    saved = Trajectory.load(args.trajectory)
    args.steps = saved.num_steps
    args.no_clip = args.no_clip or saved.meta.get("clip_sample") is False
    return saved


def _sequential_edit(engine, trajectory, directions, scales, window, args) -> None:
    """Fig. 11: the directions added one after another, gamma_1 v_1, + gamma_2 v_2, ..., one grid."""
    import itertools

    import torch

    from .images import labelled_grid

    combos = list(itertools.accumulate(direction * scale for direction, scale in zip(directions, scales)))
    names = [f"+{direction.name} ({scale:g})" for direction, scale in zip(directions, scales)]
    with Progress("editing") as progress:
        images = engine.edit(trajectory, combos, [1.0], window=window, asyrp=args.asyrp, batch_size=args.batch_size, callback=progress)
    grid = torch.cat([trajectory.images[:, None], images[:, 0].transpose(0, 1)], dim=1)
    rows = [f"seed {s}" if s >= 0 else f"sample {b}" for b, s in enumerate(trajectory.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelled_grid(grid, rows, ["original"] + names).save(out / "sequential.png")
    print(f"wrote {out / 'sequential.png'}: {len(trajectory)} samples, each with {' then '.join(names)}")


def direction_files(items: list[str]) -> list[Path]:
    """Direction files from paths of files and folders (a folder gives its .safetensors files, pc2 before pc10)."""
    import re

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)])
            if not found:
                raise HspaceError(f"folder {item!r} holds no direction files (*.safetensors)")
            files += found
        else:
            files.append(path)
    return files


def _save_directions(directions, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for direction in directions:
        path = out / f"{direction.name}.safetensors"
        direction.save(path)
        paths.append(path)
    return paths


def cmd_bank(args) -> None:
    from tqdm.auto import tqdm

    from .bank import build_bank

    eta = parse_eta(args.eta)
    engine = _engine(args)
    bar = tqdm(desc="bank", unit="sample", file=sys.stderr, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")

    def progress(info):
        bar.total = info["n"]
        first = info["chunk"] * args.batch_size  # the chunk's first sample within the shard
        batch = min(args.batch_size, info["count"] - first)
        bar.n = min(info["n"], info["done"] + first + batch * (info["step"] + 1) / info["num_steps"])
        bar.update(0)  # redraws at tqdm's usual rate

    with bar:
        bank = build_bank(
            args.out, engine, args.n, args.steps, eta,
            base_seed=args.base_seed, shard_size=args.shard_size, batch_size=args.batch_size,
            thumbnail_size=args.thumbnail_size, callback=progress,
        )
    print(f"{bank}: complete, seeds {bank.seeds[0]}..{bank.seeds[-1]}")


def cmd_pca(args) -> None:
    from .bank import Bank
    from .directions.pca import pca_per_timestep, random_directions

    bank = Bank.open(args.bank)
    if args.memory_gb <= 0:
        raise HspaceError(f"--memory-gb must be positive, got {args.memory_gb}")
    result = pca_per_timestep(
        bank.h_chunks(),
        args.k,
        per_timestep=not args.concat,
        method=args.method,
        memory_budget_bytes=int(args.memory_gb * 2**30),
        expected_n=bank.n,
    )
    model, location = bank.manifest["model"], bank.manifest["h_location"]
    directions = result.directions(model, location)
    if args.random:
        directions += random_directions(result, args.random, args.random_seed, model, location)
    out = Path(args.out)
    paths = _save_directions(directions, out)
    summary = {
        "bank": str(bank.path),
        "n": result.n,
        "per_timestep": result.per_timestep,
        "route": result.route,
        "steps": bank.num_steps,
        "variance_ratio_mean_over_steps": [float(v) for v in result.variance_ratio.mean(1)],
        "sigma_mean_over_steps": [float(v) for v in result.sigma.mean(1)],
        "directions": [p.name for p in paths],
    }
    (out / "pca.json").write_text(json.dumps(summary, indent=2))
    for j, ratio in enumerate(summary["variance_ratio_mean_over_steps"]):
        print(f"pc{j + 1}: {100 * ratio:.2f}% of the variance (mean over steps)")
    print(f"wrote {len(paths)} directions to {out}; render them with: hspace edit --bank {bank.path} --direction {out}")


def load_mask(spec: str, engine):
    """A Jacobian output mask: a toy-faces part name, or an image (.png/.jpg) or .npy file over the U-Net output."""
    import numpy as np
    import torch

    size = engine.sample_shape[1:]
    from .toyfaces.render import PARTS

    if spec in PARTS:
        if engine.name != "toyfaces":
            raise HspaceError(f"part masks like {spec!r} exist for the bundled toyfaces model only; give a mask image or .npy file")
        from .toyfaces.render import region_mask

        if size[0] != size[1]:
            raise HspaceError(f"toy-faces part masks are square; the U-Net output is {size}")
        return torch.from_numpy(region_mask(spec, size[0])).float()
    path = Path(spec)
    if not path.is_file():
        raise HspaceError(f"--mask {spec!r} is neither a part name ({', '.join(PARTS)}) nor a file")
    if path.suffix == ".npy":
        mask = torch.from_numpy(np.load(path)).float()
    else:
        from PIL import Image

        image = Image.open(path).convert("L")
        if image.size != (size[1], size[0]):  # documented: a mask image is resized to the U-Net output
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        mask = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return mask


def cmd_jacobian(args) -> None:
    import torch
    from tqdm.auto import tqdm

    from .directions.jacobian import jacobian_directions
    from .images import labelled_grid

    saved = _saved_trajectory(args) if args.trajectory else None
    at = parse_seeds(args.at) if args.at else None
    if at and max(at) >= args.steps:
        raise HspaceError(f"--at {max(at)} is out of range; valid: step indices from 0 to {args.steps - 1} (the process has {args.steps} steps)")
    scales = _scales(args.scales)
    engine = _engine(args)
    mask = load_mask(args.mask, engine) if args.mask else None
    trajectory = saved[args.sample] if saved is not None else _sample(engine, args, [args.seed])
    bar = tqdm(desc="jacobian", unit="it", file=sys.stderr, dynamic_ncols=True)

    def progress(info):
        bar.set_description(f"jacobian step {info['step']} block {info['block'] + 1}/{info['num_blocks']}")
        bar.update(1)
        bar.set_postfix(change=f"{info['change']:.1e}")

    with bar:
        results = jacobian_directions(
            engine, trajectory, 0, at, args.k,
            mask=mask, mask_name=args.mask, method=args.method, b=args.b, max_iter=args.max_iter, tol=args.tol,
            oversample=args.oversample, generator=torch.Generator().manual_seed(args.vector_seed), callback=progress,
        )
    out = Path(args.out)
    directions = [d for r in results for d in r.directions]
    paths = _save_directions(directions, out)
    summary = [
        {
            "step": r.step, "timestep": r.timestep, "singular_values": [float(v) for v in r.singular_values],
            "iterations": r.svd.iterations, "converged": r.svd.converged, "h_norm": r.h_norm,
        }
        for r in results
    ]
    (out / "jacobian.json").write_text(json.dumps({"seed": trajectory.seeds[0], "mask": args.mask, "results": summary}, indent=2))
    with Progress("editing") as bar:
        images = engine.edit(trajectory, directions, scales, batch_size=args.batch_size, callback=bar)
    labelled_grid(images[:, :, 0], [d.name for d in directions], [f"{s:g}" for s in scales]).save(out / "grid.png")
    for r in summary:
        state = "converged" if r["converged"] else "NOT converged"
        print(f"step {r['step']} (t={r['timestep']}): singular values {', '.join(f'{v:.3g}' for v in r['singular_values'])}; iterations {r['iterations']} ({state})")
    print(f"wrote {len(paths)} directions, jacobian.json and grid.png to {out}")


def cmd_annotate(args) -> None:
    from .bank import Bank
    from .directions.supervised import annotate_bank

    bank = Bank.open(args.bank)
    scorer = None
    if args.clip:
        from .directions.supervised import clip_scorer

        if not args.prompt:
            raise HspaceError("--clip needs at least one --prompt NAME='with the attribute|without it'")
        prompts = {}
        for item in args.prompt:
            name, _, pair = item.partition("=")
            texts = pair.split("|")
            if not name or len(texts) != 2 or not all(t.strip() for t in texts):
                raise HspaceError(f"bad --prompt {item!r}; valid: NAME='a photo of a smiling person|a photo of a person'")
            prompts[name.strip()] = (texts[0].strip(), texts[1].strip())
        scorer = clip_scorer(args.clip, prompts)
    elif args.prompt:
        raise HspaceError("--prompt needs --clip MODEL_DIR (a local CLIP model)")
    scores = annotate_bank(bank, scorer, name=args.name)
    for key, value in scores.items():
        print(f"{key}: mean {float(value.mean()):.3f}, min {float(value.min()):.3f}, max {float(value.max()):.3f}")
    print(f"stored {len(scores)} scores of {bank.n} samples as {bank.scores_path(args.name)}")


def cmd_supervised(args) -> None:
    from .directions.supervised import direction_from_scores, mean_difference, read_labels

    if (args.bank is None) == (args.labels is None):
        raise HspaceError("give a bank (with --attribute) or --labels FILE.csv, one of the two")
    if args.labels:
        kind, items, labels = read_labels(args.labels)
        engine = _engine(args)
        if kind == "seed":
            trajectory = _sample(engine, args, items)
        else:
            from .inversion import invert, load_images

            images = load_images(items, engine.image_size, resize=args.resize)
            with Progress("inverting") as progress:
                trajectory = invert(engine, images, args.steps, parse_eta(args.eta), batch_size=args.batch_size, callback=progress)
        pos = [i for i, label in enumerate(labels) if label]
        neg = [i for i, label in enumerate(labels) if not label]
        name = args.name or Path(args.labels).stem
        direction = mean_difference(trajectory[pos], trajectory[neg], name=name)
        direction.meta["params"]["labels"] = str(args.labels)
        print(f"{name}: mean h of {len(pos)} positive minus {len(neg)} negative {kind}s")
        directions = [direction]
    else:
        from .bank import Bank

        if not args.attribute:
            raise HspaceError("with a bank, give --attribute NAME ... (the stored scores to sort by)")
        bank = Bank.open(args.bank)
        directions = [direction_from_scores(bank, attribute, args.k, scores=args.scores) for attribute in args.attribute]
        for d in directions:
            p = d.meta["params"]
            print(f"{d.name}: top {args.k} (mean score {p['positive_mean_score']:.3f}) minus bottom {args.k} (mean score {p['negative_mean_score']:.3f})")
    paths = _save_directions(directions, Path(args.out))
    print(f"wrote {', '.join(str(p) for p in paths)}")


def cmd_disentangle(args) -> None:
    from .directions.direction import Direction
    from .directions.disentangle import disentangle

    direction = Direction.load(args.direction)
    # A folder given to --remove may hold the direction itself: it is skipped, not projected out of itself.
    own = Path(args.direction).resolve()
    others = [Direction.load(p) for p in direction_files(args.remove) if p.resolve() != own]
    out = disentangle(direction, others, per_timestep=args.per_timestep, name=args.name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    before, after = direction.delta.flatten().norm(), out.delta.flatten().norm()
    print(f"{out.name}: removed the span of {', '.join(o.name for o in others)}; norm {float(before):.4g} -> {float(after):.4g}; wrote {args.output}")


def cmd_invert(args) -> None:
    import torch

    from .images import labelled_grid, save_images
    from .inversion import invert, load_images

    eta = parse_eta(args.eta)
    engine = _engine(args)
    images = load_images(args.images, engine.image_size, resize=args.resize)
    deterministic = not any(e > 0 for e in (eta if isinstance(eta, list) else [eta]))
    if deterministic and engine.scheduler_config.get("clip_sample") and not args.no_clip:
        print("note: this model clips the predicted x_0; DDIM inversion cannot undo clipped steps, pass --no-clip for a far better one", file=sys.stderr)
    with Progress("inverting") as progress:
        trajectory = invert(
            engine, images, args.steps, eta, seed=args.seed, fixed_point_iterations=args.fixed_point,
            batch_size=args.batch_size, callback=progress,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trajectory.save(out / "trajectory.safetensors")
    names = [Path(p).stem for p in args.images]
    save_images(trajectory.images, out, [f"{n}_reconstruction" for n in names])
    labelled_grid(torch.stack([images, trajectory.images], 1), names, ["image", "reconstruction"]).save(out / "inversion.png")
    mse = ((trajectory.images - images) ** 2).mean(dim=(1, 2, 3))
    for name, m, err in zip(names, mse, (trajectory.images - images).abs().flatten(1).max(1).values):
        print(f"{name}: PSNR {float(10 * torch.log10(4 / m.clamp_min(1e-20))):.1f} dB, max |error| {float(err):.2g}")
    flag = " --no-clip" if engine.clip_override is False else ""
    print(f"wrote {out / 'trajectory.safetensors'}; edit it with: hspace edit --trajectory {out / 'trajectory.safetensors'}{flag} --direction ...")


def _scales(items: list[str]) -> list[float]:
    try:
        return [float(s) for s in items]
    except ValueError:
        raise HspaceError(f"bad --scales {items}; valid: numbers like -2 0 2") from None


def cmd_swap(args) -> None:
    import torch

    from .images import labelled_grid

    seeds, donors, window = parse_seeds(args.seeds), parse_seeds(args.donors), parse_window(args.window)
    if len(seeds) != len(donors):
        raise HspaceError(f"{len(seeds)} seeds but {len(donors)} donors; swap pairs them one to one")
    engine = _engine(args)
    both = _sample(engine, args, seeds + donors)
    a, b = both[list(range(len(seeds)))], both[list(range(len(seeds), len(both)))]
    with Progress("swapping") as progress:
        swapped = engine.swap(a, b, window=window, batch_size=args.batch_size, callback=progress)
    grid = torch.stack([a.images, b.images, swapped.images], dim=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelled_grid(grid, [f"{s}<-h{d}" for s, d in zip(seeds, donors)], ["sample", "h donor", "swapped"]).save(out / "swap.png")
    print(f"wrote {out / 'swap.png'}")


def cmd_arith(args) -> None:
    from .directions.supervised import mean_difference

    engine = _engine(args)
    plus, minus = parse_seeds(args.plus), parse_seeds(args.minus)
    trajectory = _sample(engine, args, plus + minus)
    positive = trajectory[list(range(len(plus)))]
    negative = trajectory[list(range(len(plus), len(trajectory)))]
    direction = mean_difference(positive, negative, name=args.name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    direction.save(args.output)
    print(f"wrote direction {args.name!r} ({direction.num_steps} steps, h {direction.h_shape}) to {args.output}")


def cmd_info(args) -> None:
    from .hooks import H_LOCATIONS

    engine = _engine(args)
    info = {
        "model": engine.name,
        "sample_shape": engine.sample_shape,
        "h_location": engine.h_location,
        "h_shape": engine.h_shape,
        "h_locations": H_LOCATIONS,
        "latent": engine.decoder is not None,
        "device": str(engine.device),
        "dtype": str(engine.dtype),
        "scheduler": engine.scheduler_config,
    }
    print(json.dumps(info, indent=2, default=str))


def cmd_demo(args) -> None:
    from .demo import run_demo

    paths = run_demo(args.out, model=args.model, steps=args.steps, device=args.device, progress_factory=Progress)
    for path in paths:
        print(path)


def cmd_toyfaces_train(args) -> None:
    from dataclasses import fields

    from tqdm.auto import tqdm

    from .loading import resolve_device
    from .toyfaces.train import TrainConfig, train

    if args.steps < 1:
        raise HspaceError(f"--steps must be a positive integer, got {args.steps}")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None})
    bar = tqdm(desc="training", total=config.steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(info):
        if bar.n == 0:
            bar.update(info["step"] - 1)  # resumed runs start past zero
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}")

    try:
        checkpoint = train(args.run, config, callback=progress, device=resolve_device(args.device))
    finally:
        bar.close()
    print(f"checkpoint: {checkpoint}")


def cmd_toyfaces_export(args) -> None:
    from .toyfaces.train import export

    checkpoint = Path(args.run) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise HspaceError(f"no checkpoint at {str(checkpoint)!r}; train first with `hspace toyfaces train --run {args.run}`")
    print(f"exported to {export(checkpoint, args.out)}")


def cmd_toyfaces_train_classifier(args) -> None:
    from tqdm.auto import tqdm

    from .toyfaces.classifier import ClassifierConfig, train_classifier

    config = ClassifierConfig(epochs=args.epochs, train_faces=args.faces)
    bar = tqdm(desc="classifier", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(info):
        bar.total = info["steps"]
        bar.update(1)
        bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.4f}")

    try:
        metrics = train_classifier(config, args.out, callback=progress)
    finally:
        bar.close()
    print(json.dumps(metrics, indent=2))


def cmd_toyfaces_evaluate(args) -> None:
    from .images import labelled_grid
    from .toyfaces.quality import evaluate_model

    engine = _engine(args)
    with Progress("sampling") as progress:
        report = evaluate_model(engine, args.n, args.steps, parse_eta(args.eta), batch_size=args.batch_size, callback=progress)
    images = report.pop("images")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        labelled_grid(images[:64].reshape(8, 8, *images.shape[1:]), min_cell=32, pad=1).save(args.grid)
    _write_json(args.json, report)
    print(json.dumps(report, indent=2))


def _write_json(path: str | None, report: dict) -> None:
    """Write a report as indented JSON (creating its folder); nothing when no path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def cmd_toyfaces_renoise(args) -> None:
    from .toyfaces.quality import renoise_flips

    engine = _engine(args)
    with Progress("renoised faces") as progress:
        report = renoise_flips(
            engine, args.attribute, args.start, args.n, args.steps, parse_eta(args.eta), args.seed, args.batch_size, progress
        )
    for row in report["starts"]:
        print(
            f"start step {row['start_step']:3d} (t = {row['timestep']:4d}): {args.attribute} {100 * row['frequency']:.1f}% "
            f"(balanced input: 50%); lost {100 * row['lost']:.1f}%, gained {100 * row['gained']:.1f}%"
        )
    _write_json(args.json, report)


def cmd_toyfaces_edit_success(args) -> None:
    from .bank import Bank
    from .directions.disentangle import disentangle_each
    from .directions.supervised import direction_from_scores
    from .evaluate import flip_rates, mean_off_target
    from .toyfaces.classifier import classify
    from .toyfaces.render import BINARY

    bank = Bank.open(args.bank)
    args.steps, args.eta = bank.num_steps, ",".join(map(str, bank.eta))
    engine = _engine(args)
    bank.check_engine(engine)
    supervised = {n: direction_from_scores(bank, n, args.k) for n in BINARY}
    sets = {"supervised": supervised, "disentangled": disentangle_each(supervised)}
    held_out = list(range(args.first_seed, args.first_seed + args.n))
    bank_seeds = set(bank.seeds)
    if any(s in bank_seeds for s in held_out):
        raise HspaceError(f"held-out seeds {held_out[0]}..{held_out[-1]} overlap the bank's seeds; pass another --first-seed")
    trajectory = _sample(engine, args, held_out, desc="held-out samples")
    report = {"bank": str(bank.path), "k": args.k, "n": args.n, "first_seed": args.first_seed, "scale": args.scale}
    for label, directions in sets.items():
        with Progress(f"{label} edits") as progress:
            r = flip_rates(engine, trajectory, directions, args.scale, classify, batch_size=args.batch_size, callback=progress)
        r["mean_off_target"] = mean_off_target(r)
        report[label] = r
        for name, a in r["attributes"].items():
            others = ", ".join(f"{k} {100 * v:.0f}%" for k, v in a["others_flipped"].items())
            print(f"{label:12s} {name:9s}: flipped {100 * a['flipped']:.0f}% (others: {others})")
        print(f"{label:12s} mean share of other attributes flipped: {100 * r['mean_off_target']:.1f}%")
    _write_json(args.json, report)


def cmd_reproduce(args) -> None:
    from .reproduce import run_reproduce

    engine = _engine(args)
    report = run_reproduce(args.out, quick=args.quick, engine=engine, progress=Progress)
    print(f"wrote {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hspace", description="Discover and apply editing directions in the h-space of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="draw samples, recording h at every step")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--seeds", nargs="+", default=["0-7"], help="seeds: 7, 0-15, 1,5,9 (default 0-7)")
    p.add_argument("--out", default="out/samples", help="output folder for PNGs")
    p.add_argument("--save-trajectory", default=None, help="also save the trajectories (safetensors)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="edit samples along directions at several scales (one batched replay)")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--direction", nargs="+", required=True, help="direction files (.safetensors) or folders of them")
    p.add_argument("--seeds", nargs="+", default=["0-3"], help="seeds of the samples to edit")
    p.add_argument("--trajectory", default=None, help="edit the samples of a saved trajectory file instead of --seeds")
    p.add_argument("--bank", default=None, help="edit samples of this bank (its steps, eta and seeds) instead of --seeds")
    p.add_argument("--samples", nargs="+", default=["0-3"], help="with --bank: sample indices (default 0-3)")
    p.add_argument("--scales", nargs="+", default=["-2", "-1", "0", "1", "2"], help="edit scales gamma")
    p.add_argument("--window", default=None, help="only edit at timesteps T_START:T_END, e.g. 1000:500")
    p.add_argument("--asyrp", action="store_true", help="inject into P_t only (Asyrp, two U-Net passes per step)")
    p.add_argument("--save-each", action="store_true", help="also save every edited image on its own")
    p.add_argument("--sequential", action="store_true", help="add the directions one after another (paper Fig. 11), one scale per direction")
    p.add_argument("--out", default="out/edits", help="output folder")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("bank", help="draw (or resume, or extend) a bank of samples with h at every step, sharded on disk")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("out", help="bank folder (the same command resumes an interrupted bank)")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--base-seed", type=int, default=0, help="sample i has seed base_seed + i (default 0)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    p.add_argument("--thumbnail-size", type=int, default=64, help="longest side of the stored x_0 thumbnails (default 64)")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("pca", help="per-timestep PCA of a bank's h (paper Sec. 4.1), plus matched-norm random directions")
    p.add_argument("bank", help="bank folder")
    p.add_argument("--k", type=int, default=10, help="number of principal components (default 10)")
    p.add_argument("--concat", action="store_true", help="one PCA over all timesteps concatenated instead of one per timestep")
    p.add_argument("--method", default="auto", help="auto, covariance or gram (default auto)")
    p.add_argument("--memory-gb", type=float, default=2.0, help="memory budget of the accumulators (default 2)")
    p.add_argument("--random", type=int, default=0, help="also write this many random directions of matched per-step norm (Fig. 6)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--out", default="out/pca", help="folder for pc1..pcK.safetensors and pca.json")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("jacobian", help="image-specific directions: top singular vectors of d eps / d h_t (paper Sec. 4.2)")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--trajectory", default=None, help="take the sample from a saved trajectory file instead")
    p.add_argument("--sample", type=int, default=0, help="with --trajectory: which sample (default 0)")
    p.add_argument("--at", nargs="+", default=None, help="step indices to decompose at, e.g. 25 or 10,25,40 (default: the middle step)")
    p.add_argument("--k", type=int, default=4, help="number of singular vectors (default 4)")
    p.add_argument("--method", default="batched", help="batched (Alg. 1) or sequential (Alg. 2)")
    p.add_argument("--b", type=int, default=None, help="mini-batch size of Alg. 2")
    p.add_argument("--mask", default=None, help="only this region of the output counts: a toy-faces part (eyes, mouth, hair, face, glasses, hat) or a mask image/.npy (resized to the U-Net output)")
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-4, help="stop when no singular value changes by more than this (relative)")
    p.add_argument("--oversample", type=int, default=None, help="extra vectors iterated alongside (default: the block size; 0 = the paper's algorithm)")
    p.add_argument("--vector-seed", type=int, default=0, help="seed of the random initial vectors")
    p.add_argument("--scales", nargs="+", default=["-0.3", "-0.15", "0", "0.15", "0.3"], help="scales of the preview grid (units of ||h_t||)")
    p.add_argument("--out", default="out/jacobian", help="folder for the directions, jacobian.json and grid.png")
    p.set_defaults(func=cmd_jacobian)

    p = sub.add_parser("annotate", help="score every sample of a bank (toy-faces classifier or a local CLIP); stored in the bank")
    p.add_argument("bank", help="bank folder")
    p.add_argument("--name", default="classifier", help="name of the stored scores (default classifier)")
    p.add_argument("--clip", default=None, help="score with a local CLIP model folder instead (zero-shot; needs transformers)")
    p.add_argument("--prompt", nargs="+", default=None, help="with --clip: NAME='prompt with it|prompt without it', one per attribute")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("supervised", help="eq. 10 directions: a bank's top-k minus bottom-k by a score, or labelled seeds/images")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("bank", nargs="?", default=None, help="bank folder with scores (hspace annotate)")
    p.add_argument("--attribute", nargs="+", default=None, help="with a bank: score names, e.g. smile glasses")
    p.add_argument("--labels", default=None, help="instead of a bank: a CSV 'seed,label' or 'image,label' (images are inverted)")
    p.add_argument("--name", default=None, help="with --labels: the direction's name (default: the CSV's name)")
    p.add_argument("--resize", action="store_true", help="with image labels: centre-crop and resize images to the model's size")
    p.add_argument("--k", type=int, default=20, help="samples on each side (default 20)")
    p.add_argument("--scores", default="classifier", help="which stored scores (default classifier)")
    p.add_argument("--out", default="out/supervised", help="folder for ATTRIBUTE.safetensors")
    p.set_defaults(func=cmd_supervised)

    p = sub.add_parser("disentangle", help="eq. 11: remove from a direction its projection onto other directions")
    p.add_argument("direction", help="direction file")
    p.add_argument("--remove", nargs="+", required=True, help="direction files or folders whose span is removed")
    p.add_argument("--per-timestep", action="store_true", help="project at every step separately (default: over all of h_{T:1})")
    p.add_argument("--name", default=None, help="name of the result (default NAME-disentangled)")
    p.add_argument("-o", "--output", required=True, help="direction file to write")
    p.set_defaults(func=cmd_disentangle)

    p = sub.add_parser("invert", help="real images into trajectories: DDIM inversion (eta 0) or edit-friendly DDPM inversion (eta > 0)")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("images", nargs="+", help="image files (the model's size, or pass --resize)")
    p.add_argument("--resize", action="store_true", help="centre-crop and resize images of another size to the model's")
    p.add_argument("--fixed-point", type=int, default=3, help="fixed-point refinements per deterministic step (0: classic DDIM inversion)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh noise of DDPM inversion")
    p.add_argument("--out", default="out/invert", help="folder for trajectory.safetensors and the reconstructions")
    p.set_defaults(func=cmd_invert, eta="0", batch_size=16)

    p = sub.add_parser("swap", help="replay samples with h taken from other samples (paper Fig. 3)")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--seeds", nargs="+", required=True, help="seeds whose noise x_T, z is kept")
    p.add_argument("--donors", nargs="+", required=True, help="seeds whose h is swapped in (one per seed)")
    p.add_argument("--window", default=None, help="only swap at timesteps T_START:T_END")
    p.add_argument("--out", default="out/swap", help="output folder")
    p.set_defaults(func=cmd_swap)

    p = sub.add_parser("arith", help="a direction from h of positive minus negative samples (paper Fig. 4, eq. 10)")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--plus", nargs="+", required=True, help="seeds of samples with the attribute")
    p.add_argument("--minus", nargs="+", required=True, help="seeds of samples without it")
    p.add_argument("--name", default="difference", help="name stored in the direction")
    p.add_argument("-o", "--output", required=True, help="direction file to write (.safetensors)")
    p.set_defaults(func=cmd_arith)

    p = sub.add_parser("info", help="model, h location and h shape")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    toy = sub.add_parser("toyfaces", help="the bundled toy-faces domain: train and export its diffusion model")
    toy_sub = toy.add_subparsers(dest="toyfaces_command", required=True)
    p = toy_sub.add_parser("train", help="train (or resume) the toy-faces U-Net with EMA; checkpoints in --run")
    p.add_argument("--run", default="runs/toyfaces", help="run folder (checkpoint.pt; the same command resumes)")
    p.add_argument("--steps", type=int, default=8000, help="total training steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--pool", type=int, default=None, help="number of rendered training faces")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps of the learning rate")
    p.add_argument(
        "--region-weights", dest="region_weights", default=None,
        help="extra loss weight on fixed face regions, e.g. mouth=3 (parts: eyes, mouth, hair, face, glasses, hat)",
    )
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast (faster on CPUs with AVX512-BF16)")
    p.add_argument(
        "--v-weight-cap", dest="v_weight_cap", type=float, default=None,
        help="weight the epsilon loss at step t by min(1/alpha_bar_t, CAP) (the v loss, truncated; mean weight 1): "
        "capacity moves to the noisy steps, where attributes are decided (default 1: the plain epsilon loss)",
    )
    p.add_argument("--init", default=None, help="start a new run from the weights of a checkpoint.pt, a diffusers model folder or toyfaces (the bundled model); a folder or toyfaces is deepened, function unchanged, to --layers-per-block")
    p.add_argument("--channels", default=None, help="block channels of the U-Net (default 32,64,128, the bundled model)")
    p.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=None, help="layers per U-Net block (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present); a run may resume on another device")
    p.set_defaults(func=cmd_toyfaces_train)
    p = toy_sub.add_parser("train-classifier", help="train the attribute classifier; prints held-out accuracy and R^2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--faces", type=int, default=40000, help="training faces (independent attributes)")
    p.add_argument("--out", default="src/hspace/toyfaces/classifier.safetensors")
    p.set_defaults(func=cmd_toyfaces_train_classifier)
    p = toy_sub.add_parser("evaluate", help="sample n images and compare classifier statistics with the training data")
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--grid", default=None, help="write an 8x8 sample grid here (PNG)")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=cmd_toyfaces_evaluate, batch_size=100)
    p = toy_sub.add_parser(
        "renoise",
        help="where the model loses an attribute: training faces noised to a step and generated back (SDEdit), flip rates",
    )
    _add_model_args(p)
    _add_process_args(p)
    p.add_argument("--attribute", default="smile", help="binary attribute (default smile)")
    p.add_argument("--start", type=int, nargs="+", default=[10, 20, 30, 40], help="start steps (0 = pure noise; default 10 20 30 40)")
    p.add_argument("--n", type=int, default=400, help="training faces, half with the attribute (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the forward noise")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=cmd_toyfaces_renoise, batch_size=100)
    p = toy_sub.add_parser("edit-success", help="share of held-out samples whose attribute flips under its supervised and disentangled direction")
    _add_model_args(p)
    p.add_argument("bank", help="a bank of the toyfaces model with classifier scores (hspace annotate)")
    p.add_argument("--k", type=int, default=20, help="top/bottom k of the bank per attribute (default 20)")
    p.add_argument("--scale", type=float, default=1.0, help="edit scale (default 1)")
    p.add_argument("--n", type=int, default=100, help="held-out samples (default 100)")
    p.add_argument("--first-seed", type=int, default=10000, help="seeds of the held-out samples start here")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=cmd_toyfaces_edit_success, batch_size=100)

    p = toy_sub.add_parser("export", help="write the EMA weights in float16 as a diffusers folder")
    p.add_argument("--run", default="runs/toyfaces")
    p.add_argument("--out", default="src/hspace/toyfaces/model", help="model folder to write")
    p.set_defaults(func=cmd_toyfaces_export)

    p = sub.add_parser("reproduce", help="measure the paper's claims on the bundled model; a Markdown report with figures")
    _add_model_args(p)
    p.add_argument("--quick", action="store_true", help="small counts and 8 steps: minutes instead of half an hour")
    p.add_argument("--out", default="out/reproduce", help="report folder (an interrupted run resumes from it)")
    p.set_defaults(func=cmd_reproduce, batch_size=64)

    p = sub.add_parser("demo", help="the main job: samples, swaps and edits of the bundled model into a folder")
    p.add_argument("--model", default=None, help="model (default: the bundled model)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="out/demo", help="output folder")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HspaceError as e:
        print(f"hspace {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
