"""Direction commands: bank, pca, jacobian, annotate, supervised, disentangle."""

from __future__ import annotations

import argparse

from pathlib import Path

from ..errors import HspaceError, check_choice
from ..files import save_image, write_json
from .common import (
    add_model_args, add_process_args, add_processes_arg, processes_of, engine_from, finite_float, nonnegative_int, parse_eta, parse_scales, parse_seeds,
    positive_int, prompts_of, saved_trajectory, scorer_from,
)
from .generation import sample

PROMPT_ORDERS = ("cycle", "random")  # bank.PROMPT_ORDERS (not imported here: the CLI starts without torch)
H_STORAGE = ("float16", "bfloat16", "float8")  # layout.H_STORAGE (not imported here: the CLI starts without torch)

OVER = ("timestep", "trajectory")
SUPERVISED_METHODS = ("mean-difference", "regression")  # per timestep, or over the whole concatenated h_{T:1}


def register(sub) -> None:
    _register_bank(sub)
    _register_pca(sub)
    _register_jacobian(sub)
    _register_annotate(sub)
    _register_supervised(sub)
    _register_disentangle(sub)


def _register_pca(sub) -> None:
    p = sub.add_parser("pca", help="per-timestep PCA of a bank's h (paper Sec. 4.1), plus matched-norm random directions")
    p.add_argument("bank", help="bank folder")
    p.add_argument("--k", type=positive_int, default=10, help="number of principal components (default 10)")
    p.add_argument("--over", default="timestep", help="timestep: one PCA per timestep (default); trajectory: one over all timesteps concatenated")
    p.add_argument("--method", default="auto", help="auto, covariance, gram (exact) or randomized (streamed, O(D k) memory a step: FLUX-sized h; auto takes it above 1 M numbers a step) (default auto)")
    p.add_argument("--memory-gb", type=finite_float, default=2.0, help="memory budget of the accumulators (default 2)")
    p.add_argument("--random", type=nonnegative_int, default=0, help="also write this many random directions of matched per-step norm (Fig. 6)")
    p.add_argument("--random-seed", type=nonnegative_int, default=0)
    p.add_argument("--out", default="out/pca", help="folder for pc1..pcK.safetensors, pca.safetensors (the whole result) and pca.json")
    p.set_defaults(func=run_pca)


def _register_jacobian(sub) -> None:
    p = sub.add_parser("jacobian", help="image-specific directions: top singular vectors of d eps / d h_t (paper Sec. 4.2)")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--seeds", nargs="+", default=None, help="many samples instead (e.g. 0-99): each into OUT/seedN/; shared between processes with --num-processes")
    p.add_argument("--trajectory", default=None, help="take the sample from a saved trajectory file (its engine and steps) instead")
    p.add_argument("--sample", type=nonnegative_int, default=0, help="with --trajectory: which sample (default 0)")
    p.add_argument("--at", nargs="+", default=None, help="step indices to decompose at, e.g. 25 or 10,25,40 (default: the middle step)")
    p.add_argument("--k", type=positive_int, default=4, help="number of singular vectors (default 4)")
    p.add_argument("--method", default="batched", help="batched (Alg. 1) or sequential (Alg. 2)")
    p.add_argument("--b", type=positive_int, default=None, help="mini-batch size of Alg. 2")
    p.add_argument("--mask", default=None, help="only this region of the output counts: a part of the model's domain (toyfaces: eyes, mouth, hair, face, glasses, hat) or a mask image/.npy (resized to the U-Net output)")
    p.add_argument("--h-cells", action="store_true", help="with --mask: keep delta-h only on the cells of h over the mask (more local edits; renormalised)")
    p.add_argument("--max-iter", type=positive_int, default=50)
    p.add_argument("--tol", type=finite_float, default=1e-4, help="stop when no singular value changes by more than this (relative); 0: exactly --max-iter iterations")
    p.add_argument("--oversample", type=nonnegative_int, default=None, help="extra vectors iterated alongside (default: the block size; 0 = the paper's algorithm)")
    p.add_argument("--vector-seed", type=nonnegative_int, default=0, help="seed of the random initial vectors")
    p.add_argument("--scales", nargs="+", default=["-0.3", "-0.15", "0", "0.15", "0.3"], help="scales of the preview grid (units of ||h_t||)")
    p.add_argument("--out", default="out/jacobian", help="folder for the directions, jacobian.json and grid.png")
    add_processes_arg(p)
    p.set_defaults(func=run_jacobian)


def _register_annotate(sub) -> None:
    p = sub.add_parser("annotate", help="score every sample of a bank (the model's domain classifier or a local CLIP); stored in the bank")
    p.add_argument("bank", help="bank folder")
    p.add_argument("--name", default="classifier", help="name of the stored scores (default classifier)")
    p.add_argument("--scorer", default="domain", help="domain (the classifier of the bank's model's domain; default), a domain name, or clip:DIR (a local CLIP model)")
    p.add_argument("--clip", default=None, help="the same as --scorer clip:DIR")
    p.add_argument("--prompt", nargs="+", default=None, help="with a CLIP scorer: NAME='prompt with it|prompt without it', one per attribute")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per scorer batch (default 256)")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    add_processes_arg(p)
    p.set_defaults(func=run_annotate)


def _register_supervised(sub) -> None:
    p = sub.add_parser("supervised", help="eq. 10 directions: a bank's top-k minus bottom-k by a score, or labelled seeds/images")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("bank", nargs="?", default=None, help="bank folder with scores (hspace annotate)")
    p.add_argument("--attribute", nargs="+", default=None, help="with a bank: score names, e.g. smile glasses")
    p.add_argument("--labels", default=None, help="instead of a bank: a CSV 'seed,label' or 'image,label' (images are inverted)")
    p.add_argument("--name", default=None, help="with --labels: the direction's name (default: the CSV's name)")
    p.add_argument("--resize", action="store_true", help="with image labels: centre-crop and resize images to the model's size")
    p.add_argument("--k", type=positive_int, default=20, help="samples on each side (default 20)")
    p.add_argument("--scores", default="classifier", help="which stored scores (default classifier)")
    p.add_argument("--method", default="mean-difference", help="with a bank: mean-difference (eq. 10, top k minus bottom k; default) or "
                   "regression (all attributes at once, each direction its partial effect with the others held fixed)")
    p.add_argument("--out", default="out/supervised", help="folder for ATTRIBUTE.safetensors")
    p.set_defaults(func=run_supervised)


def _register_disentangle(sub) -> None:
    p = sub.add_parser("disentangle", help="eq. 11: remove from a direction its projection onto other directions")
    p.add_argument("direction", help="direction file")
    p.add_argument("--remove", nargs="+", required=True, help="direction files or folders whose span is removed")
    p.add_argument("--over", default="trajectory", help="trajectory: project over all of h_{T:1} (default, the paper's); timestep: at every step separately")
    p.add_argument("--name", default=None, help="name of the result (default NAME-disentangled)")
    p.add_argument("-o", "--output", required=True, help="direction file to write")
    p.set_defaults(func=run_disentangle)


def _register_bank(sub) -> None:
    p = sub.add_parser("bank", help="draw (or resume, or extend) a bank of samples with h at every step, sharded on disk")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("out", help="bank folder (the same command resumes an interrupted bank)")
    p.add_argument("--n", type=positive_int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--base-seed", type=nonnegative_int, default=0, help="sample i has seed base_seed + i (default 0)")
    p.add_argument("--shard-size", type=positive_int, default=64, help="samples per shard file (default 64)")
    p.add_argument("--thumbnail-size", type=positive_int, default=64, help="longest side of the stored x_0 thumbnails (default 64)")
    p.add_argument("--h-steps", nargs="+", default=None, metavar="STEPS",
                   help="store h at these step indices only, e.g. 0-9 or 0,10,20 (default: every step); a big model's bank: "
                        "directions found from it are resampled to every step where applied")
    p.add_argument("--h-pool", type=int, choices=(1, 2, 4), default=1,
                   help="store h averaged over 2x2 or 4x4 cells of its grid (default 1: the full grid); directions found from "
                        "it are applied as their nearest upsampling")
    p.add_argument("--h-storage", choices=H_STORAGE, default="float16",
                   help="how h is stored: float16 (default), bfloat16, or float8 (e4m3 with a scale per sample and step)")
    p.add_argument("--prompt-order", choices=PROMPT_ORDERS, default="cycle",
                   help="with several prompts: sample i gets prompt i mod P (cycle, default) or one drawn by its seed (random)")
    p.add_argument("--plan", action="store_true", help="print the disk, memory and denoiser passes the bank will take, from the model's "
                   "configs alone (no weights loaded), and draw nothing")
    p.add_argument("--pass-seconds", type=finite_float, default=None, help="with --plan: one denoiser pass's time on your device, for hours")
    add_processes_arg(p)
    p.set_defaults(func=run_bank)


def run_bank(args) -> None:
    from ..bank import build_bank

    if args.plan:
        return run_plan(args)
    eta = parse_eta(args.eta)
    engine = engine_from(args)
    bank = build_bank(
        args.out, engine, args.n, args.steps, eta,
        base_seed=args.base_seed, shard_size=args.shard_size, batch_size=args.batch_size, thumbnail_size=args.thumbnail_size,
        processes=processes_of(args), prompts=prompts_of(args) if engine.spec.conditional else None, prompt_order=args.prompt_order,
        h_steps=None if args.h_steps is None else parse_seeds(args.h_steps), h_pool=args.h_pool, h_storage=args.h_storage,
    )
    if processes_of(args).is_main:
        print(f"{bank}: complete, seeds {bank.seeds[0]}..{bank.seeds[-1]}")


def run_plan(args) -> None:
    from ..loading import DEFAULT_MODEL
    from ..plan import plan_bank

    if args.pass_seconds is not None and not args.pass_seconds > 0:
        raise HspaceError(f"--pass-seconds must be positive, got {args.pass_seconds}")
    plan = plan_bank(args.model or DEFAULT_MODEL, args.n, args.steps, h_location=args.h_location,
                     h_steps=None if args.h_steps is None else parse_seeds(args.h_steps), height=args.height, width=args.width,
                     batch_size=args.batch_size if isinstance(args.batch_size, int) else 32, dtype=args.dtype or "float32",
                     thumbnail_size=args.thumbnail_size, h_pool=args.h_pool, h_storage=args.h_storage)
    print("\n".join(plan.lines(seconds_per_pass=args.pass_seconds)))


def run_pca(args) -> None:
    from ..bank import Bank
    from ..directions.direction import save_directions
    from ..directions.pca import pca, random_directions

    check_choice("--over", args.over, OVER)
    bank = Bank.open(args.bank)
    if not args.memory_gb > 0:
        raise HspaceError(f"--memory-gb must be positive, got {args.memory_gb}")
    result = pca(bank, args.k, per_timestep=args.over == "timestep", method=args.method, memory_budget_bytes=int(args.memory_gb * 2**30))
    out = Path(args.out)
    paths = result.save(out)
    if args.random:
        paths += save_directions(random_directions(result, args.random, args.random_seed), out)  # beside the PCs
    summary = {
        "bank": str(bank.path), "n": result.n, "over": args.over, "route": result.route, "steps": bank.num_steps,
        "variance_ratio_mean_over_steps": [float(v) for v in result.variance_ratio.mean(1)],
        "sigma_mean_over_steps": [float(v) for v in result.sigma.mean(1)],
        "directions": [p.name for p in paths],
    }
    write_json(out / "pca.json", summary)
    for j, ratio in enumerate(summary["variance_ratio_mean_over_steps"]):
        print(f"pc{j + 1}: {100 * ratio:.2f}% of the variance (mean over steps)")
    print(f"wrote {len(paths)} directions to {out}; render them with: hspace edit --bank {bank.path} --direction {out}")


def run_jacobian(args) -> None:
    from ..domains import domain_of, load_mask

    scales = parse_scales(args.scales)
    if args.trajectory:
        engine, saved = saved_trajectory(args)
        steps = saved.num_steps
    else:
        saved, engine, steps = None, None, args.steps
    at = parse_seeds(args.at) if args.at else None
    if at and max(at) >= steps:
        raise HspaceError(f"--at {max(at)} is out of range; valid: step indices from 0 to {steps - 1} (the process has {steps} steps)")
    engine = engine or engine_from(args)
    mask = load_mask(args.mask, engine.sample_shape[1:], domain_of(engine.spec, required=False), "--mask") if args.mask else None
    if args.h_cells and mask is None:
        raise HspaceError("--h-cells needs --mask (the region whose cells of h the directions keep)")
    if args.seeds and saved is not None:
        raise HspaceError("give --seeds or --trajectory, not both")
    if not args.seeds:
        trajectory = saved[args.sample] if saved is not None else sample(engine, args, [args.seed])
        return _jacobian_of(engine, trajectory, mask, at, scales, args, Path(args.out))
    procs = processes_of(args)  # several processes: each takes every num-th seed
    for seed in procs.share(parse_seeds(args.seeds)):
        _jacobian_of(engine, sample(engine, args, [seed]), mask, at, scales, args, Path(args.out) / f"seed{seed}")


def _jacobian_of(engine, trajectory, mask, at, scales, args, out: Path) -> None:
    """Jacobian directions of one sample into ``out`` (directions, jacobian.json, grid.png)."""
    import torch

    from ..directions.jacobian import jacobian_directions
    from ..images import labelled_grid

    result = jacobian_directions(
        engine, trajectory, 0, at, args.k,
        mask=mask, mask_name=args.mask, method=args.method, b=args.b, max_iter=args.max_iter, tol=args.tol,
        oversample=args.oversample, generator=torch.Generator().manual_seed(args.vector_seed),
    )
    if args.h_cells:
        from ..directions.jacobian import restrict_to_region

        for step in result:
            step.directions = [restrict_to_region(d, mask) for d in step.directions]
    paths = result.save(out, {"seed": trajectory.seeds[0], "mask": args.mask, "h_cells": args.h_cells})
    images = engine.edit(trajectory, result.directions, scales, batch_size=args.batch_size).images
    save_image(labelled_grid(images[:, :, 0], [d.name for d in result.directions], [f"{s:g}" for s in scales]), out / "grid.png")
    for r in result.summary():
        state = "converged" if r["converged"] else "NOT converged"
        print(f"seed {trajectory.seeds[0]}, step {r['step']} (t={r['timestep']}): singular values {', '.join(f'{v:.3g}' for v in r['singular_values'])}; "
              f"iterations {r['iterations']} ({state})")
    print(f"wrote {len(paths)} directions, jacobian.json and grid.png to {out}")


def run_annotate(args) -> None:
    from ..bank import Bank
    from ..directions.supervised import annotate_bank

    bank = Bank.open(args.bank)
    scorer = scorer_from(f"clip:{args.clip}" if args.clip else args.scorer, args.prompt, bank.spec)
    procs = processes_of(args)
    scores = annotate_bank(bank, scorer, name=args.name, batch_size=args.batch_size, processes=procs)
    if not procs.is_main:
        return
    for key, value in scores.items():
        print(f"{key}: mean {float(value.mean()):.3f}, min {float(value.min()):.3f}, max {float(value.max()):.3f}")
    print(f"stored {len(scores)} scores of {bank.n} samples as {bank.scores_path(args.name)}")


def _labelled_direction(args):
    from ..directions.supervised import mean_difference, read_labels

    kind, items, labels = read_labels(args.labels)
    engine = engine_from(args)
    if kind == "seed":
        trajectory = sample(engine, args, items)
    else:
        from ..inversion import invert, load_images

        images = load_images(items, engine.image_size, resize=args.resize)
        trajectory = invert(engine, images, args.steps, parse_eta(args.eta), batch_size=args.batch_size)
    pos = [i for i, label in enumerate(labels) if label]
    neg = [i for i, label in enumerate(labels) if not label]
    name = args.name or Path(args.labels).stem
    direction = mean_difference(trajectory[pos], trajectory[neg], name=name)
    direction.meta["params"]["labels"] = str(args.labels)
    print(f"{name}: mean h of {len(pos)} positive minus {len(neg)} negative {kind}s")
    return direction


def run_supervised(args) -> None:
    from ..directions.direction import DirectionSet
    from ..directions.supervised import supervised_directions

    if (args.bank is None) == (args.labels is None):
        raise HspaceError("give a bank (with --attribute) or --labels FILE.csv, one of the two")
    if args.labels:
        directions = DirectionSet([_labelled_direction(args)], "mean_difference", {"labels": str(args.labels)})
    else:
        from ..bank import Bank

        if not args.attribute:
            raise HspaceError("with a bank, give --attribute NAME ... (the stored scores to sort by)")
        check_choice("--method", args.method, SUPERVISED_METHODS)
        bank = Bank.open(args.bank)
        if args.method == "regression":
            from ..directions.regression import regression_directions

            directions = regression_directions(bank, args.attribute, scores=args.scores)
            print(f"regression of h on {', '.join(args.attribute)} over {bank.n} samples: one partial effect per attribute")
        else:
            directions = supervised_directions(bank, args.attribute, args.k, scores=args.scores)
        for d in (d for d in directions if d.meta["method"] == "mean_difference"):
            p = d.meta["params"]
            print(f"{d.name}: top {args.k} (mean score {p['positive_mean_score']:.3f}) minus bottom {args.k} (mean score {p['negative_mean_score']:.3f})")
    paths = directions.save(Path(args.out))
    print(f"wrote {', '.join(str(p) for p in paths)}")


def run_disentangle(args) -> None:
    from ..directions.direction import Direction, direction_files
    from ..directions.disentangle import disentangle

    check_choice("--over", args.over, OVER)
    direction = Direction.load(args.direction)
    # A folder given to --remove may hold the direction itself: it is skipped, not projected out of itself.
    own = Path(args.direction).resolve()
    others = [Direction.load(p) for p in direction_files(args.remove) if p.resolve() != own]
    out = disentangle(direction, others, per_timestep=args.over == "timestep", name=args.name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    before, after = direction.delta.flatten().norm(), out.delta.flatten().norm()
    print(f"{out.name}: removed the span of {', '.join(o.name for o in others)}; norm {float(before):.4g} -> {float(after):.4g}; wrote {args.output}")
