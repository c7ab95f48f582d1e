"""The bundled toy-faces domain's command group (`hspace toyfaces ...`, registered by the CLI): train, train-classifier, evaluate, renoise, edit-success, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import HspaceError
from ..files import save_image
from ..cli.common import (
    add_model_args, add_process_args, engine_from, engine_of_spec, finite_float, nonnegative_int, parse_eta, positive_int, sample_count, write_json,
)


def register(sub) -> None:
    toy = sub.add_parser("toyfaces", help="the bundled toy-faces domain: train and export its diffusion model")
    toy_sub = toy.add_subparsers(dest="toyfaces_command", required=True)
    p = toy_sub.add_parser("train", help="train (or resume) the toy-faces U-Net with EMA; checkpoints in --run")
    p.add_argument("--run", default="runs/toyfaces", help="run folder (checkpoint.pt; the same command resumes)")
    p.add_argument("--steps", type=positive_int, default=8000, help="total training steps")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None)
    p.add_argument("--lr", type=finite_float, default=None)
    p.add_argument("--pool", type=positive_int, default=None, help="number of rendered training faces")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int, default=None)
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up steps of the learning rate")
    p.add_argument(
        "--region-weights", dest="region_weights", default=None,
        help="extra loss weight on fixed face regions, e.g. mouth=3 (parts: eyes, mouth, hair, face, glasses, hat)",
    )
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast (faster on CPUs with AVX512-BF16)")
    p.add_argument(
        "--v-weight-cap", dest="v_weight_cap", type=finite_float, default=None,
        help="weight the epsilon loss at step t by min(1/alpha_bar_t, CAP) (the v loss, truncated; mean weight 1): "
        "capacity moves to the noisy steps, where attributes are decided (default 1: the plain epsilon loss)",
    )
    p.add_argument("--init", default=None, help="start a new run from the weights of a checkpoint.pt, a diffusers model folder, toyfaces or toydit (the bundled models; a DiT pipeline folder for --arch dit); a U-Net folder or toyfaces is deepened, function unchanged, to --layers-per-block")
    p.add_argument("--channels", default=None, help="block channels of the U-Net (default 32,64,128, the bundled model)")
    p.add_argument("--layers-per-block", dest="layers_per_block", type=positive_int, default=None, help="layers per U-Net block (default 1)")
    p.add_argument("--arch", choices=("unet", "dit", "sd"), default=None,
                   help="unet (the bundled toyfaces: epsilon, DDPM schedule; default), dit (a DiT trained with flow matching: toydit) "
                   "or sd (toysd: an autoencoder, then a text-conditioned U-Net with its CLIP text encoder)")
    p.add_argument("--vae-steps", dest="vae_steps", type=positive_int, default=None, help="--arch sd: the autoencoder's training steps, before the U-Net's (default 2000)")
    p.add_argument("--decoder-steps", dest="decoder_steps", type=nonnegative_int, default=None,
                   help="--arch sd: then fine-tune the decoder alone for this many steps (the latents unchanged; default 0)")
    p.add_argument("--caption-drop", dest="caption_drop", type=finite_float, default=None,
                   help="--arch sd: the chance that each phrase of a training caption is dropped (default 0.3)")
    p.add_argument("--text-attribute-weight", dest="text_attribute_weight", type=finite_float, default=None,
                   help="--arch sd: weight of a loss that has the text encoder's pooled output tell, per binary attribute, whether the caption names it true, false or not (default 0: none)")
    p.add_argument("--vae-init", dest="vae_init", default=None,
                   help="--arch sd: take the autoencoder of this toysd folder (toysd: the bundled one) as the finished first stage; the U-Net and text encoder start from scratch")
    p.add_argument("--dit-layers", dest="dit_layers", type=positive_int, default=None, help="transformer blocks of the DiT (default 8)")
    p.add_argument("--dit-width", dest="dit_width", type=positive_int, default=None, help="hidden size of the DiT, a multiple of 48 (default 192)")
    p.add_argument("--resolution", type=nonnegative_int, default=None,
                   help="DiT only: train on the faces area-averaged to this resolution (e.g. 16; 0 = the size); the model keeps its size, so a later run at full resolution starts from it with --init")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present); a run may resume on another device")
    p.set_defaults(func=run_train, outputs={"run": "dir"})
    p = toy_sub.add_parser("train-classifier", help="train the attribute classifier; prints held-out accuracy and R^2")
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--faces", type=positive_int, default=40000, help="training faces (independent attributes)")
    p.add_argument("--out", default="src/hspace/toyfaces/classifier.safetensors")
    p.set_defaults(func=run_train_classifier, outputs={"out": "file"})
    _register_checks(toy_sub)


def _register_checks(toy_sub) -> None:
    """The commands that measure and export a trained model."""
    p = toy_sub.add_parser("evaluate", help="sample n images and compare classifier statistics with the training data")
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--n", type=sample_count, default=1000)
    p.add_argument("--grid", default=None, help="write an 8x8 sample grid here (PNG)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--autoencoder-faces", dest="autoencoder_faces", type=sample_count, default=2000,
                   help="a text-to-image toy (toysd): held-out faces (seeds 100000 on) of its autoencoder's round trip (default 2000)")
    p.set_defaults(func=run_evaluate, batch_size=100)
    p = toy_sub.add_parser(
        "renoise",
        help="where the model loses an attribute: training faces noised to a step and generated back (SDEdit), flip rates",
    )
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--attribute", default="smile", help="binary attribute (default smile)")
    p.add_argument("--start", type=nonnegative_int, nargs="+", default=[10, 20, 30, 40], help="start steps (0 = pure noise; default 10 20 30 40)")
    p.add_argument("--n", type=sample_count, default=400, help="training faces, half with the attribute (default 400)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the forward noise")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=run_renoise, batch_size=100)
    p = toy_sub.add_parser("edit-success", help="share of held-out samples whose attribute flips under its supervised and disentangled direction")
    add_model_args(p)
    p.add_argument("bank", help="a bank of the toyfaces model with classifier scores (hspace annotate)")
    p.add_argument("--k", type=positive_int, default=20, help="top/bottom k of the bank per attribute (default 20)")
    p.add_argument("--scale", type=finite_float, default=1.0, help="edit scale (default 1)")
    p.add_argument("--n", type=sample_count, default=100, help="held-out samples (default 100)")
    p.add_argument("--first-seed", type=nonnegative_int, default=10000, help="seeds of the held-out samples start here")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=run_edit_success, batch_size=100)

    p = toy_sub.add_parser("compare-text", help="text edits on toysd compared with the classifier as ground truth: prompt edit, prompt-pair, "
                           "regression and PCA directions at matched identity; guidance branches; transfer (docs/text_to_image.md)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="work folder (cached sets, directions, the bank; a rerun resumes) and comparison.json/.md")
    p.add_argument("--n", type=sample_count, default=64, help="held-out seeds (default 64)")
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps (eta 0; default 20)")
    p.add_argument("--bank-n", dest="bank_n", type=positive_int, default=256, help="bank samples for the regression and PCA directions (default 256)")
    p.add_argument("--direction-n", dest="direction_n", type=positive_int, default=64, help="seeds of each prompt-pair direction (default 64)")
    p.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--md", default=None, help="also write the tables here (markdown)")
    p.set_defaults(func=run_compare_text, batch_size=64, model="toysd", guidance=5.0)

    p = toy_sub.add_parser("export", help="write the EMA weights in float16 as a diffusers folder")
    p.add_argument("--run", default="runs/toyfaces")
    p.add_argument("--out", default="src/hspace/toyfaces/model", help="model folder to write")
    p.set_defaults(func=run_export)


def run_train(args) -> None:
    from dataclasses import fields

    from tqdm.auto import tqdm

    from ..loading import resolve_device
    from .train import TrainConfig, train

    if args.steps < 1:
        raise HspaceError(f"--steps must be a positive integer, got {args.steps}")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None})
    bar = tqdm(desc="training", total=config.steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(info):
        if info.get("stage", "") != getattr(bar, "stage", ""):  # toysd: the autoencoder's steps, then the U-Net's
            bar.reset(total=info["steps"])
            bar.stage = info.get("stage", "")
            bar.set_description(f"training {bar.stage}".strip())
        if bar.n == 0:
            bar.update(info["step"] - 1)  # resumed runs start past zero
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}")

    if config.arch == "sd":  # toysd: the autoencoder, then the U-Net with its text encoder
        from .toysd import train
    try:
        checkpoint = train(args.run, config, callback=progress, device=resolve_device(args.device))
    finally:
        bar.close()
    print(f"checkpoint: {checkpoint}")


def run_export(args) -> None:
    from .train import export

    if (Path(args.run) / "vae.pt").is_file():  # a toysd run
        from .toysd import export as export_sd

        print(f"exported to {export_sd(args.run, args.out)}")
        return
    checkpoint = Path(args.run) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise HspaceError(f"no checkpoint at {str(checkpoint)!r}; train first with `hspace toyfaces train --run {args.run}`")
    print(f"exported to {export(checkpoint, args.out)}")


def run_train_classifier(args) -> None:
    from tqdm.auto import tqdm

    from .classifier import ClassifierConfig, train_classifier

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


def run_evaluate(args) -> None:
    from ..images import labelled_grid
    from .quality import evaluate_model

    engine = engine_from(args)
    if engine.spec.conditional:  # a text-to-image toy (toysd): how it follows its prompts
        from .quality import prompt_fidelity
        from .toysd import autoencoder_agreement

        report = prompt_fidelity(engine, args.n, args.steps, parse_eta(args.eta), batch_size=args.batch_size)
        if engine.decoder is not None:
            report["autoencoder_agreement"] = autoencoder_agreement(engine.decoder, args.autoencoder_faces)
        _print_fidelity(report)
    else:
        report = evaluate_model(engine, args.n, args.steps, parse_eta(args.eta), batch_size=args.batch_size)
    images = report.pop("images")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_image(labelled_grid(images[:64].reshape(8, 8, *images.shape[1:]), min_cell=32, pad=1), args.grid)
    write_json(args.json, report)
    print(json.dumps(report, indent=2))


def run_compare_text(args) -> None:
    from .text_edits import compare, markdown

    engine = engine_from(args)
    report = compare(engine, args.out, n=args.n, num_steps=args.steps, bank_n=args.bank_n, direction_n=args.direction_n,
                     batch_size=args.batch_size, resamples=args.resamples)
    text = markdown(report)
    (Path(args.out) / "comparison.md").write_text(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    print(text)


def _print_fidelity(report: dict) -> None:
    """The prompt-fidelity table of a text-to-image toy, one row per prompt."""
    print(f"guidance {report['guidance']}, {report['n']} samples per prompt, {report['num_steps']} steps, eta {report['eta']}", file=sys.stderr)
    for prompt, row in report["named"].items():
        worst = max(row["unnamed"].items(), key=lambda kv: abs(kv[1]["frequency"] - kv[1]["training_frequency_given_named"]))
        print(f"{prompt!r:32} agreement {100 * row['agreement']:5.1f}%; unnamed furthest from training: {worst[0]} "
              f"{100 * worst[1]['frequency']:.1f}% (training {100 * worst[1]['training_frequency_given_named']:.1f}%)", file=sys.stderr)
    print(f"empty prompt: toy FID {report['empty_prompt']['toy_fid']:.2f}", file=sys.stderr)


def run_renoise(args) -> None:
    from .quality import renoise_flips

    engine = engine_from(args)
    report = renoise_flips(engine, args.attribute, args.start, args.n, args.steps, parse_eta(args.eta), args.seed, args.batch_size)
    for row in report["starts"]:
        print(
            f"start step {row['start_step']:3d} (t = {row['timestep']:4d}): {args.attribute} {100 * row['frequency']:.1f}% "
            f"(balanced input: 50%); lost {100 * row['lost']:.1f}%, gained {100 * row['gained']:.1f}%"
        )
    write_json(args.json, report)


def run_edit_success(args) -> None:
    from ..bank import Bank
    from ..directions.disentangle import disentangle_each
    from ..directions.supervised import direction_from_scores
    from ..card import flip_rates, mean_off_target
    from .domain import TOYFACES

    bank = Bank.open(args.bank)
    engine = engine_of_spec(bank.spec, args, "the bank")
    supervised = {n: direction_from_scores(bank, n, args.k) for n in TOYFACES.binary}
    sets = {"supervised": supervised, "disentangled": disentangle_each(supervised)}
    held_out = list(range(args.first_seed, args.first_seed + args.n))
    bank_seeds = set(bank.seeds)
    if any(s in bank_seeds for s in held_out):
        raise HspaceError(f"held-out seeds {held_out[0]}..{held_out[-1]} overlap the bank's seeds; pass another --first-seed")
    trajectory = engine.sample(held_out, bank.num_steps, bank.eta, batch_size=args.batch_size)
    report = {"bank": str(bank.path), "k": args.k, "n": args.n, "first_seed": args.first_seed, "scale": args.scale}
    for label, directions in sets.items():
        r = flip_rates(engine, trajectory, directions, args.scale, TOYFACES.scorer(), domain=TOYFACES, batch_size=args.batch_size)
        r["mean_off_target"] = mean_off_target(r)
        report[label] = r
        for name, a in r["attributes"].items():
            others = ", ".join(f"{k} {100 * v:.0f}%" for k, v in a["others_flipped"].items())
            print(f"{label:12s} {name:9s}: flipped {100 * a['flipped']:.0f}% (others: {others})")
        print(f"{label:12s} mean share of other attributes flipped: {100 * r['mean_off_target']:.1f}%")
    write_json(args.json, report)
