"""Generation commands: sample, edit, swap, arith, invert, info."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import HspaceError
from ..files import safe_name, save_image, unique_names
from ..steering import KARRAS, SAMPLERS
from .common import (
    add_model_args, add_process_args, add_processes_arg, card_scoring, engine_from, engine_of_spec, eps_pass, nonnegative_int, parse_eta,
    parse_scales, positive_int, parse_seeds, parse_window, processes_of, prompts_of, saved_trajectory,
)


def register(sub) -> None:
    _register_sample(sub)
    _register_edit(sub)
    _register_swap(sub)
    _register_arith(sub)
    _register_invert(sub)
    _register_info(sub)


def _register_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples, recording h at every step")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--seeds", nargs="+", default=["0-7"], help="seeds: 7, 0-15, 1,5,9 (default 0-7)")
    p.add_argument("--out", default="out/samples", help="output folder for PNGs")
    p.add_argument("--save-trajectory", default=None, help="also save the trajectories (safetensors)")
    p.set_defaults(func=run_sample)


def _register_edit(sub) -> None:
    p = sub.add_parser("edit", help="edit samples along directions at several scales (one batched replay)")
    add_model_args(p)
    add_process_args(p)
    add_processes_arg(p)
    p.add_argument("--direction", nargs="+", required=True, help="direction files (.safetensors) or folders of them")
    p.add_argument("--seeds", nargs="+", default=["0-3"], help="seeds of the samples to edit")
    p.add_argument("--trajectory", default=None, help="edit the samples of a saved trajectory file (its engine and steps) instead of --seeds")
    p.add_argument("--bank", default=None, help="edit samples of this bank (its engine, steps, eta and seeds) instead of --seeds")
    p.add_argument("--samples", nargs="+", default=["0-3"], help="with --bank: sample indices (default 0-3)")
    p.add_argument("--scales", nargs="+", default=["-2", "-1", "0", "1", "2"], help="edit scales gamma")
    p.add_argument("--window", default=None, help="only edit at timesteps T_START:T_END, e.g. 1000:500")
    p.add_argument("--asyrp", action="store_true", help="inject into P_t only (Asyrp, two U-Net passes per step)")
    p.add_argument("--units", choices=("auto", "raw", "effect"), default="auto",
                   help="auto (default, as the editor): a direction with a card (hspace card) moves in its effect unit, 1 = 50%% "
                        "flips of its attribute or one training-data std, any other in raw units; raw or effect: force one")
    p.add_argument("--save-each", action="store_true", help="also save every edited image on its own")
    p.add_argument("--sequential", action="store_true", help="mode: add the directions one after another (paper Fig. 11), one scale per direction")
    p.add_argument("--sampler", default=None, choices=tuple(SAMPLERS),
                   help="draw with this diffusers scheduler (the model's pipeline, the directions steered in: hspace.steer) "
                        "instead of hspace's own DDIM/DDPM loop; --eta is then the scheduler's")
    p.add_argument("--karras", action="store_true", help=f"with --sampler {', '.join(KARRAS)}: Karras sigmas")
    p.add_argument("--out", default="out/edits", help="output folder")
    p.set_defaults(func=run_edit)


def _register_swap(sub) -> None:
    p = sub.add_parser("swap", help="replay samples with h taken from other samples (paper Fig. 3)")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--seeds", nargs="+", required=True, help="seeds whose noise x_T, z is kept")
    p.add_argument("--donors", nargs="+", required=True, help="seeds whose h is swapped in (one per seed)")
    p.add_argument("--window", default=None, help="only swap at timesteps T_START:T_END")
    p.add_argument("--out", default="out/swap", help="output folder")
    p.set_defaults(func=run_swap)


def _register_arith(sub) -> None:
    p = sub.add_parser("arith", help="a direction from h of positive minus negative samples (paper Fig. 4, eq. 10)")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--plus", nargs="+", required=True, help="seeds of samples with the attribute")
    p.add_argument("--minus", nargs="+", required=True, help="seeds of samples without it")
    p.add_argument("--name", default="difference", help="name stored in the direction")
    p.add_argument("-o", "--output", required=True, help="direction file to write (.safetensors)")
    p.set_defaults(func=run_arith)


def _register_invert(sub) -> None:
    p = sub.add_parser("invert", help="real images into trajectories: DDIM inversion (eta 0) or edit-friendly DDPM inversion (eta > 0)")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("images", nargs="+", help="image files (the model's size, or pass --resize)")
    p.add_argument("--resize", action="store_true", help="centre-crop and resize images of another size to the model's")
    p.add_argument("--fixed-point", type=nonnegative_int, default=3, help="fixed-point refinements per deterministic step (0: classic DDIM inversion)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the fresh noise of DDPM inversion")
    p.add_argument("--out", default="out/invert", help="folder for trajectory.safetensors and the reconstructions")
    p.set_defaults(func=run_invert, eta="0", batch_size=16)


def _register_info(sub) -> None:
    p = sub.add_parser("info", help="model, h location and h shape")
    add_model_args(p)
    p.set_defaults(func=run_info)
    _register_directions_of_prompts_and_cards(sub)


def _register_directions_of_prompts_and_cards(sub) -> None:
    p = sub.add_parser("prompt-direction", help="a text slider without training: mean paired difference of h between two prompts "
                       "over the same seeds (eq. 10 with paired samples)")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--plus", default=None, help='the prompt with the attribute, e.g. "a photo of a smiling person"')
    p.add_argument("--minus", default=None, help='the prompt without it, e.g. "a photo of a person"')
    p.add_argument("--pairs", default=None, metavar="FILE", help="several pairs, one 'plus | minus' per line (with or instead of --plus/--minus)")
    p.add_argument("--n", type=positive_int, default=64, help="number of seeds (sample i uses pair i mod P; default 64)")
    p.add_argument("--base-seed", type=nonnegative_int, default=0, help="sample i has seed base_seed + i (default 0)")
    p.add_argument("--name", default=None, help="name stored in the direction (default: the words the plus prompt adds)")
    p.add_argument("-o", "--output", required=True, help="direction file to write (.safetensors)")
    p.set_defaults(func=run_prompt_direction)

    p = sub.add_parser("card", help="measure what a direction does: dose-response, side effects, flip rates, preservation; "
                       "calibrate its unit (docs/directions.md)")
    add_model_args(p)
    p.add_argument("direction", help="direction file (.safetensors)")
    p.add_argument("--steps", type=positive_int, default=25, help="steps of the held-out samples' process (default 25)")
    p.add_argument("--eta", default="1.0", help="eta of that process (default 1)")
    p.add_argument("--n", type=positive_int, default=64, help="held-out samples (default 64)")
    p.add_argument("--first-seed", type=nonnegative_int, default=700_000, help="their seeds start here (default 700000)")
    p.add_argument("--scales", nargs="+", default=None, help="raw scales to sweep, both signs (default -4 -2 -1 -0.5 0 0.5 1 2 4)")
    p.add_argument("--target", default=None, help="the attribute to calibrate on (default: the direction's own, else the one it moves most)")
    p.add_argument("--scorer", default="domain", help="domain (the classifier of the model's domain; default), a domain name, or clip:DIR "
                   "(a local CLIP model, with --attributes; text-to-image models)")
    p.add_argument("--attributes", nargs="+", default=None, metavar="NAME='WITH|WITHOUT'",
                   help="with a CLIP scorer: the attributes as prompt pairs, e.g. smile='a smiling face|a face'")
    p.add_argument("--sampler", default=None, choices=tuple(SAMPLERS),
                   help="measure the card under this diffusers scheduler (the direction steered in: hspace.steer) instead of "
                        "hspace's own loop; its unit is then the sampler's")
    p.add_argument("--karras", action="store_true", help=f"with --sampler {', '.join(KARRAS)}: Karras sigmas")
    p.add_argument("--out", default=None, help="folder for card.md, card.json, the plots and the calibrated direction (default out/card-NAME)")
    p.set_defaults(func=run_card)


def sample(engine, args, seeds, steps: int | None = None, eta=None):
    """The samples of ``seeds``, cycling over the prompts the flags give (``prompts_of``)."""
    return engine.sample(seeds, steps or args.steps, parse_eta(args.eta) if eta is None else eta, batch_size=args.batch_size,
                         prompts=prompts_of(args) if engine.spec.conditional else None)


def run_sample(args) -> None:
    from ..images import labelled_grid, save_images

    engine = engine_from(args)
    trajectory = sample(engine, args, parse_seeds(args.seeds))
    out = Path(args.out)
    save_images(trajectory.images, out, [f"seed{s}" for s in trajectory.seeds])
    save_image(labelled_grid(trajectory.images[None], col_labels=[str(s) for s in trajectory.seeds]), out / "grid.png")
    if args.save_trajectory:
        trajectory.save(args.save_trajectory)
    print(f"wrote {len(trajectory)} samples and grid.png to {out}")


def edit_source(args):
    """(engine, trajectory) of what to edit: a trajectory file or a bank (each with its own engine, so
    no model flags are needed), or --seeds with the model flags."""
    if args.trajectory and args.bank:
        raise HspaceError("give --trajectory or --bank, not both")
    procs = processes_of(args)  # several processes: each takes its share of the samples, in whole batches
    if procs.num > 1 and getattr(args, "sequential", False):
        raise HspaceError("--sequential draws one grid of every sample; run it as one process")
    share = lambda items: [x for block in procs.share(_blocks(items, args.batch_size)) for x in block]  # noqa: E731
    if args.trajectory:
        engine, trajectory = saved_trajectory(args)
        mine = share(list(range(len(trajectory))))
        return engine, (trajectory if procs.num == 1 else trajectory[mine] if mine else None)
    if args.bank:
        from ..bank import Bank

        bank = Bank.open(args.bank)
        indices = share(bank.check_indices(parse_seeds(args.samples)))
        engine = engine_of_spec(bank.spec, args, "the bank")
        return engine, (bank.trajectory(engine, indices, batch_size=args.batch_size) if indices else None)
    engine = engine_from(args)
    seeds = share(parse_seeds(args.seeds))
    return engine, (sample(engine, args, seeds) if seeds else None)  # None: no share for this process


def _blocks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_edit(args) -> None:
    from ..directions.direction import load_directions

    # Check every input before the first U-Net pass.
    window, scales = parse_window(args.window), parse_scales(args.scales)
    parse_seeds(args.seeds)
    directions = load_directions(args.direction)
    if args.sequential and len(scales) != len(directions):
        raise HspaceError(f"--sequential takes one scale per direction: {len(directions)} directions, {len(scales)} scales")
    if args.sampler or args.karras:
        return _sampler_edit(args, directions, scales, window)
    engine, trajectory = edit_source(args)
    if trajectory is None:
        return
    from ..edits import Edit

    # A direction lacking the unit asked for fails here; one that does not fit this engine in engine.edit, before any pass.
    edit = Edit(directions, scales, args.units, window, eps_pass(args))
    print(edit.describe())
    if args.sequential:
        raw = [float(edit.raw_scales(trajectory.num_steps)[d, d]) for d in range(len(directions))]
        return _sequential_edit(engine, trajectory, directions, raw, window, args)
    edited = engine.edit(trajectory, edit, batch_size=args.batch_size)
    _save_edit_grids(edited.images, trajectory, directions, scales, Path(args.out), args.save_each)
    _write_edit_record(edited, directions, args)
    print(f"wrote edit grids for {len(trajectory)} samples to {args.out}")


def _write_edit_record(edited, directions, args, **extra) -> None:
    """``edit.json`` beside the grids: what they show, in which units, each direction's calibration."""
    from ..files import write_json

    calibrations = {d.name: d.meta.get("calibration") for d in directions}
    labels = edited.to_dict()
    for entry in labels["directions"]:
        entry["calibration"] = calibrations[entry["name"]]
    write_json(Path(args.out) / "edit.json", {"units": args.units, **extra, **labels})


def _sampler_edit(args, directions, scales, window) -> None:
    """``hspace edit --sampler``: every direction at every scale steered into diffusers' sampler, one seed per call."""
    from types import SimpleNamespace

    import torch

    from ..edits import Edit, Edited
    from ..steering import scheduler_for, steered_images

    if not args.sampler:
        raise HspaceError("--karras takes a --sampler (dpm++2m, euler or unipc)")
    given = [flag for flag, on in (("--trajectory", args.trajectory), ("--bank", args.bank), ("--asyrp", args.asyrp),
                                    ("--sequential", args.sequential), ("--num-processes", (args.num_processes or 1) > 1)) if on]
    if given:
        raise HspaceError(f"--sampler draws new samples with the pipeline's scheduler, one process; it does not take {given[0]}")
    engine = engine_from(args)
    scheduler_for(args.sampler, engine.scheduler_config, args.karras)  # a bad combination fails before any pass
    seeds = parse_seeds(args.seeds)
    edit = Edit(directions, scales, args.units, window)
    for direction in directions:
        engine.check_direction(direction, args.steps)
    print(edit.describe())
    raw = edit.raw_scales(args.steps)  # [D, S]
    images = torch.stack([steered_images(engine, d, raw[i].tolist(), seeds, args.steps, args.sampler, karras=args.karras, window=window)
                          for i, d in enumerate(directions)])
    _save_edit_grids(images, SimpleNamespace(seeds=seeds), directions, scales, Path(args.out), args.save_each)
    edited = Edited(images, edit.names, list(scales), raw.tolist(), edit.unit_names(), list(seeds))
    _write_edit_record(edited, directions, args, sampler=args.sampler, karras=args.karras)
    print(f"wrote edit grids for {len(seeds)} samples to {args.out} ({args.sampler}{', Karras sigmas' if args.karras else ''})")


def _save_edit_grids(images, trajectory, directions, scales, out: Path, save_each: bool) -> None:
    from ..images import labelled_grid, to_pil

    out.mkdir(parents=True, exist_ok=True)
    rows, cols = [d.name for d in directions], [f"{s:g}" for s in scales]
    for b, seed in enumerate(trajectory.seeds):
        who = f"seed{seed}" if seed >= 0 else f"sample{b}"  # an inverted image has no seed
        save_image(labelled_grid(images[:, :, b], rows, cols), out / f"edit_{who}.png")
        if save_each:
            for d, direction in enumerate(directions):
                for s, scale in enumerate(scales):
                    save_image(to_pil(images[d, s, b]), out / safe_name(f"{who}_{d}_{direction.name}_{scale:g}", suffix=".png"))


def _sequential_edit(engine, trajectory, directions, scales, window, args) -> None:
    """Fig. 11: the directions added one after another, gamma_1 v_1, + gamma_2 v_2, ..., one grid."""
    import itertools

    import torch

    from ..images import labelled_grid

    combos = list(itertools.accumulate(direction * scale for direction, scale in zip(directions, scales)))
    names = [f"+{direction.name} ({scale:g})" for direction, scale in zip(directions, scales)]
    images = engine.edit(trajectory, combos, [1.0], units="raw", window=window, eps_pass=eps_pass(args), batch_size=args.batch_size).images
    grid = torch.cat([trajectory.images[:, None], images[:, 0].transpose(0, 1)], dim=1)
    rows = [f"seed {s}" if s >= 0 else f"sample {b}" for b, s in enumerate(trajectory.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image(labelled_grid(grid, rows, ["original"] + names), out / "sequential.png")
    print(f"wrote {out / 'sequential.png'}: {len(trajectory)} samples, each with {' then '.join(names)}")


def run_swap(args) -> None:
    import torch

    from ..images import labelled_grid

    seeds, donors, window = parse_seeds(args.seeds), parse_seeds(args.donors), parse_window(args.window)
    if len(seeds) != len(donors):
        raise HspaceError(f"{len(seeds)} seeds but {len(donors)} donors; swap pairs them one to one")
    engine = engine_from(args)
    both = sample(engine, args, seeds + donors)
    a, b = both[list(range(len(seeds)))], both[list(range(len(seeds), len(both)))]
    swapped = engine.swap(a, b, window=window, batch_size=args.batch_size)
    grid = torch.stack([a.images, b.images, swapped.images], dim=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image(labelled_grid(grid, [f"{s}<-h{d}" for s, d in zip(seeds, donors)], ["sample", "h donor", "swapped"]), out / "swap.png")
    print(f"wrote {out / 'swap.png'}")


def run_arith(args) -> None:
    from ..directions.supervised import mean_difference

    engine = engine_from(args)
    plus, minus = parse_seeds(args.plus), parse_seeds(args.minus)
    trajectory = sample(engine, args, plus + minus)
    positive = trajectory[list(range(len(plus)))]
    negative = trajectory[list(range(len(plus), len(trajectory)))]
    direction = mean_difference(positive, negative, name=args.name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    direction.save(args.output)
    print(f"wrote direction {args.name!r} ({direction.num_steps} steps, h {direction.h_shape}) to {args.output}")


def run_prompt_direction(args) -> None:
    from ..directions.prompts import read_pairs

    pairs = []
    if (args.plus is None) != (args.minus is None):
        raise HspaceError("give --plus and --minus together (or --pairs FILE)")
    if args.plus is not None:
        pairs.append((args.plus, args.minus))
    if args.pairs:
        pairs += read_pairs(args.pairs)
    if not pairs:
        raise HspaceError("no prompt pair: give --plus and --minus, or --pairs FILE with 'plus | minus' lines")
    eta = parse_eta(args.eta)
    engine = engine_from(args)
    from ..directions.prompts import prompt_direction

    direction = prompt_direction(engine, pairs, args.n, args.steps, eta, base_seed=args.base_seed, name=args.name, batch_size=max(2, args.batch_size))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    direction.save(args.output)
    print(f"wrote direction {direction.name!r} ({len(pairs)} pair(s), {args.n} seeds, {direction.num_steps} steps, h {direction.h_shape}) to {args.output}")


def run_invert(args) -> None:
    import torch

    from ..images import labelled_grid, save_images
    from ..inversion import invert, load_images

    eta = parse_eta(args.eta)
    engine = engine_from(args)
    images = load_images(args.images, engine.image_size, resize=args.resize)
    deterministic = not any(e > 0 for e in (eta if isinstance(eta, list) else [eta]))
    if deterministic and engine.scheduler_config.get("clip_sample") and not args.no_clip:
        print("note: this model clips the predicted x_0; DDIM inversion cannot undo clipped steps, pass --no-clip for a far better one", file=sys.stderr)
    trajectory = invert(engine, images, args.steps, eta, seed=args.seed, fixed_point_iterations=args.fixed_point, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trajectory.save(out / "trajectory.safetensors")
    names = unique_names([Path(p).stem for p in args.images])  # face.png from two folders: face and face-2
    save_images(trajectory.images, out, [f"{n}_reconstruction" for n in names])
    save_image(labelled_grid(torch.stack([images, trajectory.images], 1), names, ["image", "reconstruction"]), out / "inversion.png")
    mse = ((trajectory.images - images) ** 2).mean(dim=(1, 2, 3))
    for name, m, err in zip(names, mse, (trajectory.images - images).abs().flatten(1).max(1).values):
        print(f"{name}: PSNR {float(10 * torch.log10(4 / m.clamp_min(1e-20))):.1f} dB, max |error| {float(err):.2g}")
    print(f"wrote {out / 'trajectory.safetensors'}; edit it with: hspace edit --trajectory {out / 'trajectory.safetensors'} --direction ...")


def run_card(args) -> None:
    from ..card import DEFAULT_SCALES, card, write_card
    from ..directions.direction import Direction

    direction = Direction.load(args.direction)
    scales = parse_scales(args.scales) if args.scales else list(DEFAULT_SCALES)
    if args.n < 2:
        raise HspaceError(f"--n must be at least 2 (a standard error needs two samples), got {args.n}")
    engine = engine_from(args)
    engine.check_direction(direction)
    scorer, domain = card_scoring(args, args.model)
    if args.karras and not args.sampler:
        raise HspaceError("--karras takes a --sampler (dpm++2m, euler or unipc)")
    result = card(direction, engine, n=args.n, num_steps=args.steps, eta=parse_eta(args.eta), scales=scales, target=args.target,
                  first_seed=args.first_seed, batch_size=args.batch_size, scorer=scorer, domain=domain, sampler=args.sampler,
                  karras=args.karras)
    out = Path(args.out or f"out/card-{safe_name(direction.name)}")
    write_card(result, direction, out)
    unit = result.calibration
    print(f"card of {direction.name!r} in {out}{' under ' + result.sampler if result.sampler else ''}: target {result.target}; effect unit = {unit['unit']} = raw scale "
          f"{'not reached' if unit['scale'] is None else format(unit['scale'], '.3g')}; calibrated direction: "
          f"{out / safe_name(direction.name or 'direction', suffix='.safetensors')}")


def run_info(args) -> None:
    import torch

    from ..diffusion import describe_process

    engine = engine_from(args)
    locations = engine.model.locations()
    info = {
        "model": engine.spec.describe(),
        **engine.model.describe(),
        "process": describe_process(engine.scheduler_config, engine.schedule(1).prediction_type),
        "h": f"{locations[engine.h_location]}: {engine.h_location}, shape {list(engine.h_shape)} per sample and step",
        "spec": engine.spec.to_dict(),
        "sample_shape": engine.sample_shape,
        "h_shape": engine.h_shape,
        "h_locations": {name: f"{what}, shape {list(engine.model.location_shape(name))}" for name, what in locations.items()},
        "latent": engine.decoder is not None,
        "device": str(engine.device),
        "speed": engine.speed.describe(),
        "cpu_threads": torch.get_num_threads(),  # OMP_NUM_THREADS, as torch reads it
        "scheduler": engine.scheduler_config,
    }
    print(json.dumps(info, indent=2, default=str))
