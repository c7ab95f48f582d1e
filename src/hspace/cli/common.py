"""What every command shares: parsing seeds, eta, windows and scales; the model flags; JSON reports."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from ..errors import HspaceError


MAX_SEEDS = 1_000_000  # one command's samples; a bank (hspace bank --n) takes up to 100 million


def positive_int(text: str) -> int:
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    return _int(text, 0)


def sample_count(text: str) -> int:
    """A number of samples one command draws: 1 to MAX_SEEDS (more go into a bank)."""
    value = _int(text, 1)
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{value:,} samples; valid: 1 to {MAX_SEEDS:,} in one command")
    return value


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is out of range; valid: an integer >= {minimum}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_seeds(items: list[str]) -> list[int]:
    """Seeds from words like '0-7', '3', '1,5,9' (at most ``MAX_SEEDS``, checked before expanding a range)."""
    seeds: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
            except ValueError:
                lo, hi = 0, -1
            if hi < lo or lo < 0:
                raise HspaceError(f"bad seed {part!r}; valid: an integer like 7, a range like 0-15, or a list like 1,5,9")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise HspaceError(
                    f"seeds {part!r} are {hi - lo + 1:,} samples; one command takes at most {MAX_SEEDS:,} "
                    "(draw more into a bank: hspace bank OUT --n N)"
                )
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise HspaceError(f"no seeds in {' '.join(map(str, items))!r}; valid: an integer like 7, a range like 0-15, or a list like 1,5,9")
    if len(seeds) > MAX_SEEDS:
        raise HspaceError(f"{len(seeds):,} seeds; one command takes at most {MAX_SEEDS:,} (draw more into a bank: hspace bank OUT --n N)")
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


def parse_scales(items: list[str]) -> list[float]:
    try:
        scales = [float(s) for s in items]
    except ValueError:
        raise HspaceError(f"bad --scales {items}; valid: numbers like -2 0 2") from None
    bad = [s for s in scales if not math.isfinite(s)]
    if bad:
        raise HspaceError(f"bad --scales {bad[0]}; valid: finite numbers like -2 0 2")
    return scales


def eps_pass(args) -> str:
    return "clean" if args.asyrp else "edited"


def add_processes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="start N local processes (one per GPU, or CPU processes) and share the work; the same result as one "
                   "process (or start it with accelerate launch / torchrun yourself)")


def processes_of(args):
    """The processes of this job (several under accelerate launch / torchrun / --num-processes), made once."""
    from ..distributed import Processes

    if getattr(args, "_processes", None) is None:
        args._processes = Processes.current(getattr(args, "device", None))
    return args._processes


def device_of(args):
    """--device, or under a launcher with GPUs this process's own GPU."""
    from ..distributed import launched

    if getattr(args, "device", None) is None and launched():
        return processes_of(args).device
    return getattr(args, "device", None)


def engine_from(args, clip_sample: bool | None = None):
    """The engine the model flags name; ``clip_sample`` overrides --no-clip (e.g. from a trajectory file)."""
    from ..engine import Engine

    if clip_sample is None:
        clip_sample = False if getattr(args, "no_clip", False) else None
    condition = {k: getattr(args, k, None) for k in ("negative_prompt", "guidance", "guide_edit")}
    prompts = prompts_of(args)
    condition["prompt"] = None if prompts is None else prompts[0]  # the engine's prompt; samples may have others
    size = {k: getattr(args, k, None) for k in ("height", "width") if getattr(args, k, None) is not None}
    engine = Engine.load(model_of(args), h_location=args.h_location, device=device_of(args), dtype=args.dtype, clip_sample=clip_sample,
                         speed=speed_of(args), **condition, **size)
    return _with_batch_size(engine, args)


def prompts_of(args) -> list[str] | None:
    """The prompts of --prompt (repeatable) and --prompts FILE (one per line; blank lines and lines starting with
    # skipped), in that order; None when neither is given."""
    prompts = list(getattr(args, "prompt", None) or [])
    file = getattr(args, "prompts", None)
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise HspaceError(f"--prompts {file!r} cannot be read as UTF-8 text: {getattr(e, 'strerror', None) or e}") from None
        read = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not read:
            raise HspaceError(f"--prompts {file!r} holds no prompt; valid: a text file with one prompt per line")
        prompts += read
    return prompts or None


def model_of(args) -> str:
    from ..loading import DEFAULT_MODEL

    return args.model or DEFAULT_MODEL


# What a bank's or trajectory's spec fixes: given beside --bank or --trajectory, they would be ignored.
FIXED_BY_SPEC = ("--h-location", "--dtype", "--no-clip", "--height", "--width", "--prompt", "--prompts", "--negative-prompt", "--guidance", "--guide-edit", "--steps", "--eta")


def engine_of_spec(spec, args, source: str = "the bank or trajectory"):
    """The engine of a bank's or trajectory's spec, on the device (and with the speed options) the flags name;
    ``--model DIR`` says where the spec's model is now (a moved or copied folder: its fingerprint must match).
    Options the spec fixes are refused rather than silently ignored."""
    from ..engine import Engine

    given = [o for o in FIXED_BY_SPEC if any(a == o or a.startswith(o + "=") for a in getattr(args, "_argv", []))]
    if given:
        raise HspaceError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} fixed by {source}'s spec "
                          f"({spec.describe()}, {spec.num_steps} steps); leave {'it' if len(given) == 1 else 'them'} out")

    return _with_batch_size(Engine.load(spec, device=device_of(args), speed=speed_of(args), folder=getattr(args, "model", None)), args)


def speed_of(args):
    from ..speed import Speed

    return Speed(bool(getattr(args, "channels_last", False)), bool(getattr(args, "compile", False)), getattr(args, "autocast", None),
                 bool(getattr(args, "offload", False)), bool(getattr(args, "vae_slicing", False)), bool(getattr(args, "vae_tiling", False)))


def batch_size_arg(text: str):
    """--batch-size: a positive integer, or "auto" (from the free memory of the device, once the model is loaded)."""
    return text if text == "auto" else positive_int(text)


def _with_batch_size(engine, args):
    """The engine; ``--batch-size auto`` becomes a number here (``speed.auto_batch_size``), said once."""
    if getattr(args, "batch_size", None) == "auto":
        from ..speed import CPU_BATCH_CAP, auto_batch_size

        args.batch_size = auto_batch_size(engine.model)
        cap = f"; at most {CPU_BATCH_CAP} on a CPU" if engine.device.type == "cpu" else ""
        logging.getLogger("hspace").info("--batch-size auto: %d (a U-Net pass in half the free memory of %s%s)", args.batch_size, engine.device, cap)
    return engine


def saved_trajectory(args):
    """(engine, trajectory) of ``--trajectory FILE``: the engine of the file's spec (its model, h location and
    clipping; the model flags only for a file without one)."""
    from ..trajectory import Trajectory

    saved = Trajectory.load(args.trajectory)
    return (engine_of_spec(saved.spec, args, "the trajectory") if saved.spec is not None else engine_from(args)), saved


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..spec import GUIDE_EDITS
    from ..loading import DEFAULT_MODEL

    p.add_argument("--model", default=None, help=f"built-in name, local diffusers folder or hub id (default: {DEFAULT_MODEL}); with "
                   "--bank or --trajectory, where their model is now if it moved (its fingerprint must match)")
    p.add_argument("--h-location", default=None, help="where h lives: mid.out (U-Nets' default, the paper's h) or mid.in; block.N "
                   "for a transformer (default: its middle block); `hspace info` lists a model's locations")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    p.add_argument("--batch-size", type=batch_size_arg, default=32, help="samples per U-Net batch, or auto: from the device's free memory")
    p.add_argument("--height", type=positive_int, default=None, help="image height in pixels (with --width; default: the model's)")
    p.add_argument("--width", type=positive_int, default=None, help="image width in pixels (with --height; default: the model's)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 (the scheduler's clip_sample); DDIM inversion needs it")
    from ..speed import AUTOCAST_DTYPES

    s = p.add_argument_group("speed (docs/performance.md: what each gains and its tolerance)")
    s.add_argument("--channels-last", action="store_true", help="NHWC memory order for the U-Net (x_0 within 1e-4)")
    s.add_argument("--compile", action="store_true", help="torch.compile the U-Net's blocks (within 1e-4; the first batch compiles)")
    s.add_argument("--autocast", choices=AUTOCAST_DTYPES, default=None,
                   help="U-Net matmuls/convolutions in this precision, h and weights in float32 (not within 1e-4; recorded in banks)")
    s.add_argument("--offload", action="store_true", help="keep the text encoders and the VAE on the CPU between uses (a GPU holds the denoiser only)")
    s.add_argument("--vae-slicing", action="store_true", help="the VAE decodes and encodes one image at a time (its peak memory: one image's)")
    s.add_argument("--vae-tiling", action="store_true", help="the VAE works in overlapping tiles (large images; blended where tiles meet)")
    g = p.add_argument_group("text-conditioned models (Stable Diffusion, SDXL, SD3, FLUX, PixArt; DiT: a class)")
    g.add_argument("--prompt", action="append", default=None,
                   help='the prompt (default ""); repeat it for several: the samples cycle over them (sample i gets prompt i mod P)')
    g.add_argument("--prompts", default=None, metavar="FILE", help="prompts from a text file, one per line (after any --prompt)")
    g.add_argument("--negative-prompt", default=None, help="the negative prompt (default: the pipeline's)")
    g.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale (default 7.5; <= 1: one pass)")
    g.add_argument("--guide-edit", choices=GUIDE_EDITS, default=None,
                   help="where delta-h goes under guidance: both passes (default, the paper's code), the conditional or the unconditional one")


def add_process_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=50, help="number of generative steps (default 50)")
    p.add_argument("--eta", default="1.0", help="eta: 0 = DDIM, 1 = DDPM, or one value per step, comma-separated")


def write_json(path: str | Path | None, report: dict) -> None:
    """Write a report as indented JSON (creating its folder); nothing when no path was given."""
    if path:
        from ..files import write_json as write

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write(path, report)


def _clip_prompts(items: list[str] | None) -> dict[str, tuple[str, str]]:
    if not items:
        raise HspaceError("a CLIP scorer needs at least one attribute as a prompt pair: NAME='with the attribute|without it'")
    prompts = {}
    for item in items:
        name, _, pair = item.partition("=")
        texts = pair.split("|")
        if not name or len(texts) != 2 or not all(t.strip() for t in texts):
            raise HspaceError(f"bad attribute {item!r}; valid: NAME='a photo of a smiling person|a photo of a person'")
        prompts[name.strip()] = (texts[0].strip(), texts[1].strip())
    return prompts


def scorer_from(text: str, prompts: list[str] | None, model):
    """A scorer named on the command line: "domain" (the model's), a domain name, or "clip:DIR"."""
    from ..domains import domain_of, get_domain

    if text.startswith("clip:"):
        from ..directions.supervised import clip_scorer

        return clip_scorer(text[len("clip:"):], _clip_prompts(prompts))
    if prompts:
        raise HspaceError("attributes given as prompt pairs need a CLIP scorer (--scorer clip:DIR)")
    return (domain_of(model) if text == "domain" else get_domain(text)).scorer()


def card_scoring(args, model: str) -> tuple:
    """What a card is scored by, from ``--scorer`` and ``--attributes``: (a CLIP scorer, None), (None, a named
    domain: its classifier, spreads and realism), or (None, None) for the model's own domain."""
    if args.scorer.startswith("clip:") or args.attributes:
        return scorer_from(args.scorer, args.attributes, model), None  # CLIP probabilities: every attribute binary
    if args.scorer != "domain":
        from ..domains import get_domain

        return None, get_domain(args.scorer)
    return None, None
