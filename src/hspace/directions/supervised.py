"""Directions from examples (paper Sec. 5): eq. 10, the mean difference of h between positives and
negatives, from trajectories, from a bank's h, or from the top and bottom k of a bank by a score
(classifier annotation, Fig. 9)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..errors import HspaceError
from ..validate import check_int
from ..trajectory import Trajectory
from .direction import Direction, DirectionSet

logger = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor], dict]  # images [N, 3, H, W] in [-1, 1] -> {name: [N] scores}


def h_difference(h_positive: torch.Tensor, h_negative: torch.Tensor) -> torch.Tensor:
    """eq. 10: mean_i h+_i - mean_i h-_i over the leading (example) dimension, in float64."""
    for label, h in (("positive", h_positive), ("negative", h_negative)):
        if not isinstance(h, torch.Tensor) or h.ndim < 2 or h.shape[0] < 1:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise HspaceError(f"the {label} examples must be a tensor [n >= 1, ...], got {got}")
    if h_positive.shape[1:] != h_negative.shape[1:]:
        raise HspaceError(f"positive h {tuple(h_positive.shape[1:])} and negative h {tuple(h_negative.shape[1:])} differ in steps or shape")
    return h_positive.double().mean(0) - h_negative.double().mean(0)


def mean_difference(positive: Trajectory, negative: Trajectory, name: str = "difference") -> Direction:
    """v = mean_i h(x_i^+) - mean_i h(x_i^-) over all timesteps (eq. 10; Fig. 4's vector arithmetic)."""
    for label, t in (("positive", positive), ("negative", negative)):
        if t.h is None:
            raise HspaceError(f"the {label} trajectories have no recorded h; sample them with record_h=True")
    if positive.spec is None or negative.spec is None or positive.spec.differences(negative.spec, "samples"):
        raise HspaceError(f"positives and negatives come from different engines: {positive.spec} vs {negative.spec}")
    delta = h_difference(positive.h, negative.h)
    params = {"positive_seeds": positive.seeds, "negative_seeds": negative.seeds, "eta": positive.eta.tolist()}
    return Direction(delta.float(), meta={"name": name, "method": "mean_difference", "params": params}, spec=positive.spec.engine,
                     timesteps=positive.timesteps)


def top_bottom(scores: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Indices of exactly the k highest and the k lowest scores (ties: the lower index first)."""
    scores = torch.as_tensor(scores).flatten()
    check_int("k", k, 1, len(scores) // 2, valid=f"an integer from 1 to n/2 = {len(scores) // 2} (top k and bottom k of {len(scores)} samples)")
    if not torch.isfinite(scores).all():
        raise HspaceError("scores contain NaN or infinite values")
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    low = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return order[:k], low[:k]


def annotate_bank(bank, scorer: Scorer | None = None, name: str = "classifier", batch_size: int = 256, processes=None) -> dict[str, torch.Tensor]:
    """Score every sample of a bank from its x_0 thumbnails and store the scores in it (``scores/NAME``).

    ``scorer`` maps images [N, 3, H, W] in [-1, 1] to named scores [N]; the default is the scorer of the
    domain registered for the bank's model (``hspace.domains``; the toy-faces classifier). Thumbnails are at most the bank's
    ``thumbnail_size`` (draw the bank with a thumbnail size equal to the image size to score full images).
    Launched as several processes (``distributed.py``), each scores every num-th batch and the main process
    writes the scores; every process returns them.
    """
    from ..distributed import Processes

    procs = processes or Processes.current()
    if scorer is None:
        from ..domains import domain_of

        scorer = domain_of(bank.spec).scorer()
    chunks = list(enumerate(bank.thumbnails().split(batch_size)))
    mine = [(i, _score_chunk(scorer, chunk)) for i, chunk in procs.share(chunks)]
    parts = dict(item for gathered in procs.gather(mine) for item in gathered)
    scores = {key: torch.cat([parts[i][key] for i in range(len(chunks))]) for key in parts[0]}
    meta = {"scorer": getattr(scorer, "__qualname__", type(scorer).__name__)}
    procs.main_first(bank.set_scores, name, scores, meta=meta)
    return scores


def _score_chunk(scorer: Scorer, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
    out = scorer(chunk.float() / 127.5 - 1.0)
    if not isinstance(out, dict) or not out:
        raise HspaceError(f"the scorer must return a dict of named scores, got {type(out).__name__}")
    scores = {}
    for key, value in out.items():
        value = torch.as_tensor(value).detach().float().cpu()
        if value.shape != (len(chunk),):
            raise HspaceError(f"the scorer's {key!r} has shape {tuple(value.shape)}; valid: ({len(chunk)},), one score per image")
        scores[key] = value
    return scores


def direction_from_scores(bank, attribute: str, k: int, scores: str = "classifier", name: str | None = None) -> Direction:
    """eq. 10 over a bank: mean h of the k samples scored highest on ``attribute`` minus the k lowest (Fig. 9)."""
    table = bank.scores(scores)
    if attribute not in table:
        raise HspaceError(f"scores {scores!r} of bank {str(bank.path)!r} have no {attribute!r}; valid: {', '.join(sorted(table))}")
    values = table[attribute]
    top, bottom = top_bottom(values, k)
    params = {
        "bank": str(bank.path), "scores": scores, "attribute": attribute, "k": k,
        "positive_mean_score": float(values[top].mean()), "negative_mean_score": float(values[bottom].mean()),
    }
    return bank_difference(bank, top, bottom, name or attribute, params)


def supervised_directions(bank, attributes: Sequence[str], k: int, scores: str = "classifier") -> DirectionSet:
    """eq. 10 for every attribute over a bank (top k minus bottom k by the stored scores), as one result."""
    return DirectionSet([direction_from_scores(bank, a, k, scores) for a in attributes], "mean_difference", {"k": k, "scores": scores})


def bank_difference(bank, positive: Sequence[int], negative: Sequence[int], name: str, params: dict | None = None) -> Direction:
    """eq. 10 over a bank: mean h of the samples ``positive`` (indices) minus that of ``negative``."""
    delta = bank.lift(h_difference(bank.h(positive), bank.h(negative)))  # a pooled bank's, on the engine's grid
    seeds = bank.seeds
    params = {
        **(params or {}),
        "positive_seeds": [seeds[i] for i in positive], "negative_seeds": [seeds[i] for i in negative], "eta": bank.eta,
    }
    return Direction(delta.float(), meta={"name": name, "method": "mean_difference", "params": params}, spec=bank.spec.engine,
                     timesteps=bank.h_timesteps)


_TRUE, _FALSE = {"1", "true", "yes", "y", "+", "pos", "positive"}, {"0", "false", "no", "n", "-", "neg", "negative"}


def read_labels(path) -> tuple[str, list, list[bool]]:
    """A CSV of labelled examples: a header ``seed,label`` or ``image,label``, then one example per row.

    Labels are 1/0, true/false, yes/no or +/-. Image paths are relative to the CSV's folder. Returns
    ("seed" or "image", the seeds or image paths, the labels).
    """
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise HspaceError(f"labels file {str(path)!r} does not exist")
    try:  # utf-8-sig: spreadsheet programs start a UTF-8 CSV with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise HspaceError(f"labels file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    except (OSError, csv.Error) as e:
        raise HspaceError(f"cannot read labels file {str(path)!r}: {e}") from None
    if not rows:
        raise HspaceError(f"labels file {str(path)!r} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    if len(header) < 2 or header[0] not in ("seed", "image") or header[1] != "label":
        raise HspaceError(f"{str(path)!r} must start with a header 'seed,label' or 'image,label', got {','.join(rows[0])!r}")
    kind, items, labels = header[0], [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise HspaceError(f"{path}:{number}: expected two columns ({kind},label), got {row!r}")
        item, label = row[0].strip(), row[1].strip().lower()
        if label not in _TRUE | _FALSE:
            raise HspaceError(f"{path}:{number}: label {row[1]!r} is not one of 1/0, true/false, yes/no, +/-")
        if kind == "seed":
            try:
                value = int(item)
            except ValueError:
                raise HspaceError(f"{path}:{number}: seed {item!r} is not an integer") from None
        else:
            value = path.parent / item
        items.append(value)
        labels.append(label in _TRUE)
    if all(labels) or not any(labels):
        raise HspaceError(f"{str(path)!r} needs positive and negative examples; it has {sum(labels)} positive of {len(labels)}")
    return kind, items, labels


def x_T_difference(positive: Trajectory, negative: Trajectory) -> torch.Tensor:
    """eq. 10 in the space of x_T instead of h (the paper's Fig. 8 comparison): [C, H, W] float64."""
    return h_difference(positive.x_T[:, None], negative.x_T[:, None])[0]


def edit_x_T(engine, trajectory: Trajectory, delta: torch.Tensor, scales: Sequence[float], batch_size: int = 32, **run) -> torch.Tensor:
    """Images [S, B, C, H, W] of every sample regenerated from x_T + scale * delta (with its own z): one batched run.
    ``delta`` may also be K directions stacked, [K, *x_T]: images [K, S, B, C, H, W], still one run."""
    from dataclasses import replace

    delta = torch.as_tensor(delta, dtype=torch.float32)
    shape = tuple(trajectory.x_T.shape[1:])
    stacked = tuple(delta.shape[1:]) == shape
    if not stacked and tuple(delta.shape) != shape:
        raise HspaceError(f"an x_T direction has the shape of x_T, {shape} (or K of them stacked, [K, *{shape}]); got {tuple(delta.shape)}")
    deltas = delta if stacked else delta[None]
    scales = torch.tensor([float(s) for s in scales])
    n, copies = len(trajectory), len(deltas) * len(scales)
    noise = trajectory.noise() if trajectory.z is None and bool((trajectory.eta > 0).any()) else trajectory.z
    steps = scales.view(1, -1, *[1] * (deltas.ndim + 0)) * deltas[:, None, None]  # [K, S, 1, *x_T]
    moved = replace(
        trajectory,
        seeds=trajectory.seeds * copies,
        x_T=(trajectory.x_T[None, None] + steps).flatten(0, 2),
        x0=trajectory.x0.repeat(copies, 1, 1, 1),
        z=None if noise is None else noise.repeat(copies, *([1] * (noise.ndim - 1))),
        h=None,
        image=None,
        prompts=None if trajectory.prompts is None else list(trajectory.prompts) * copies,
    )
    images = engine.replay(moved, batch_size=batch_size, **run).images
    images = images.reshape(len(deltas), len(scales), n, *images.shape[1:])
    return images if stacked else images[0]


def clip_scorer(model: str, prompts: dict[str, tuple[str, str]], device: str | None = None) -> Scorer:
    """A zero-shot scorer from a local CLIP model (transformers ``CLIPModel`` folder): for every attribute
    a pair (prompt with it, prompt without it), scored as the softmax probability of the first.

    Images are prepared by the folder's own ``CLIPImageProcessor`` (``preprocessor_config.json``: resize,
    centre crop, normalisation, from the 8-bit image as a saved PNG would be) when it has one, else resized
    to the vision model's size with CLIP's normalisation. Needs the optional ``transformers`` package
    (``pip install 'hspace[clip]'``) and the model on disk; nothing is downloaded.
    """
    from pathlib import Path

    try:
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError:
        raise HspaceError("a CLIP scorer needs the transformers package: pip install 'hspace[clip]' (or transformers)") from None
    if not Path(model).is_dir():
        raise HspaceError(f"CLIP model {model!r} is not a local folder; save a CLIPModel and its tokenizer there first")
    for name, pair in prompts.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise HspaceError(f"prompts[{name!r}] must be a pair (with the attribute, without it), got {pair!r}")
    clip = CLIPModel.from_pretrained(model).eval().to(device or "cpu")
    tokenizer = CLIPTokenizer.from_pretrained(model)
    texts = [p for pair in prompts.values() for p in pair]
    with torch.no_grad():
        tokens = tokenizer(texts, padding=True, return_tensors="pt").to(clip.device)
        text = torch.nn.functional.normalize(_features(clip.get_text_features(**tokens)), dim=-1)
    prepare = _clip_preprocessing(model, clip.config.vision_config.image_size)

    def embed(images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings [N, D] (a card's image-image similarity to the unedited sample)."""
        x = prepare(images).to(clip.device)
        with torch.no_grad():
            return torch.nn.functional.normalize(_features(clip.get_image_features(pixel_values=x)), dim=-1)

    def score(images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = clip.logit_scale.exp() * embed(images) @ text.T  # [N, 2 * attributes]
        pairs = logits.view(len(images), len(prompts), 2).softmax(dim=-1)[..., 0].cpu()
        return {name: pairs[:, j] for j, name in enumerate(prompts)}

    score.__qualname__ = f"clip_scorer({model})"
    score.embed = embed
    return score


def _clip_preprocessing(folder: str, size: int):
    """images [N, 3, H, W] in [-1, 1] -> CLIP's pixel values: the folder's CLIPImageProcessor when it has one."""
    from pathlib import Path

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    if not (Path(folder) / "preprocessor_config.json").is_file():
        logger.info("%s has no preprocessor_config.json: images are resized (bicubic) to %d px with CLIP's normalisation", folder, size)
        return lambda images: (torch.nn.functional.interpolate((images.float().cpu() + 1) / 2, size=(size, size), mode="bicubic",
                                                               align_corners=False).clamp(0, 1) - mean) / std
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(folder)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return processor(images=list(pixels), return_tensors="pt")["pixel_values"]

    return prepare


def _features(out) -> torch.Tensor:
    """transformers returns a tensor, or (in newer versions) an output object holding the embeddings."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise HspaceError(f"unexpected CLIP output {type(out).__name__}")
