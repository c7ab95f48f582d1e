"""Direction cards: what a direction does, measured, and the calibrated unit it is applied in.

``card(direction, engine, ...)`` applies the direction at a sweep of scales (both signs) to held-out samples in one
batched replay and scores every edited image with the domain's scorer (the bundled classifier for toy faces, CLIP
from a local folder, any registered domain). It measures, with standard errors over samples:

- the dose-response of every attribute: the mean change from the unedited sample at each scale (continuous
  attributes in units of their training-data std, binary ones as a change of probability);
- the target attribute: the direction's own (its name, when the scorer knows it), else the one it moves most;
- the flip rate of every binary attribute at each scale: the share of the samples that could flip in the edit's
  direction (lacking the attribute for a positive change, having it for a negative one) that do, and the scales
  at which the target's reaches 50% and 90% (linear between grid scales);
- preservation: the mean absolute pixel change, inside and outside the direction's mask when it has one, and with a
  CLIP scorer the CLIP image-image cosine similarity of each edited image to its unedited sample (the text-to-image
  models' measure: no toy FID there); realism: the domain's measure (toy FID for toy faces) of the edited images per
  scale.

The calibration is one number, the raw scale of one effect unit: for a binary target the scale at which half the
samples that could flip do (its 50% flip scale, on the side the direction moves it), for a continuous one the scale
that moves it by one training-data std (the slope of the dose-response through zero). It is stored in the direction's
metadata (``meta["calibration"]``), so ``units="effect"`` applies ``scale x unit`` and two directions at effect scale 1
move their own attributes by the same amount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .directions.direction import Direction
from .errors import HspaceError

THRESHOLD = 0.5  # a binary score above it: the attribute is present (every flip below counts by this one label)
DEFAULT_SCALES = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)  # geometric: a strong and a weak direction both cross 50%
CARD_SEED = 700_000  # held-out samples of a card: seeds from here (banks use 0 .. n-1, reproduce 50,000 on)


@dataclass
class Card:
    """The measurements of one direction (module doc); ``to_json`` / ``markdown`` write them."""

    name: str
    target: str
    scales: list[float]
    n: int
    change: dict[str, list[float]]  # attribute -> mean change per scale (continuous: in training stds)
    change_se: dict[str, list[float]]
    flip: dict[str, list[float | None]]  # binary attribute -> flip rate per scale (None at 0 or where none could flip)
    flip_eligible: dict[str, list[int]]
    pixel_change: list[float]  # mean |delta pixel| per scale
    pixel_change_outside: list[float] | None
    realism: list[float] | None
    calibration: dict = field(default_factory=dict)
    binary: list[str] = field(default_factory=list)
    steps: int = 0  # the process the card was measured with
    similarity: list[float] | None = None  # mean CLIP image cosine to the unedited sample per scale (a scorer with ``embed``)
    sampler: str | None = None  # the diffusers sampler it was measured under (``steering.SAMPLERS``); None: hspace's own loop

    def side_effects(self, scale_index: int, k: int = 2) -> list[tuple[str, float]]:
        """The k attributes other than the target that move most at one scale (mean change)."""
        others = [(a, v[scale_index]) for a, v in self.change.items() if a != self.target]
        return sorted(others, key=lambda item: -abs(item[1]))[:k]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def markdown(self, plots: dict[str, str] | None = None) -> str:
        unit = self.calibration.get("unit", "uncalibrated")
        drawn = f"drawn by diffusers' {self.sampler} sampler (hspace.steer)" if self.sampler else "drawn by hspace's own loop"
        lines = [f"# Card: {self.name}", "", f"Target attribute: **{self.target}**; {self.n} held-out samples, {self.steps} steps, {drawn}; "
                 f"calibration: {unit} = raw scale {_fmt(self.calibration.get('scale'))}.", ""]
        if self.target in self.flip:
            lines.append(f"Flip rate of {self.target}: 50% at raw scale {_fmt(self.calibration.get('flip50'))}, 90% at "
                         f"{_fmt(self.calibration.get('flip90'))}.")
            lines.append("")
        header = "| attribute | " + " | ".join(f"{s:g}" for s in self.scales) + " |"
        lines += ["Mean change from the unedited sample (+- standard error over samples; continuous attributes in training-data "
                  "stds, binary ones in probability):", "", header, "|---" * (len(self.scales) + 1) + "|"]
        for attribute, values in self.change.items():
            cells = [f"{v:+.2f} +- {e:.2f}" for v, e in zip(values, self.change_se[attribute])]
            lines.append(f"| {'**' + attribute + '**' if attribute == self.target else attribute} | " + " | ".join(cells) + " |")
        lines += ["", "Flip rate of each binary attribute (share of the samples that could flip that do):", "", header,
                  "|---" * (len(self.scales) + 1) + "|"]
        for attribute, values in self.flip.items():
            lines.append(f"| {attribute} | " + " | ".join("-" if v is None else f"{100 * v:.0f}%" for v in values) + " |")
        lines += ["", "| | " + " | ".join(f"{s:g}" for s in self.scales) + " |", "|---" * (len(self.scales) + 1) + "|",
                  "| mean abs pixel change | " + " | ".join(f"{v:.3f}" for v in self.pixel_change) + " |"]
        if self.pixel_change_outside is not None:
            lines.append("| ... outside the mask | " + " | ".join(f"{v:.3f}" for v in self.pixel_change_outside) + " |")
        if self.similarity is not None:
            lines.append("| CLIP similarity to the unedited image | " + " | ".join(f"{v:.3f}" for v in self.similarity) + " |")
        if self.realism is not None:
            lines.append("| realism (lower: closer to the training data) | " + " | ".join(f"{v:.1f}" for v in self.realism) + " |")
        for attribute, path in (plots or {}).items():
            lines += ["", f"![{attribute}]({path})"]
        return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "not reached" if value is None else f"{value:.3g}"


def card(
    direction: Direction,
    engine,
    *,
    trajectory=None,
    n: int = 64,
    num_steps: int = 25,
    eta: float = 1.0,
    scales: Sequence[float] = DEFAULT_SCALES,
    scorer: Callable[[torch.Tensor], dict] | None = None,
    domain=None,
    target: str | None = None,
    mask: torch.Tensor | None = None,
    first_seed: int = CARD_SEED,
    batch_size: int = 32,
    progress: bool | None = None,
    callback: Callable | None = None,
    sampler: str | None = None,
    karras: bool = False,
) -> Card:
    """Measure ``direction`` (module doc) on ``trajectory`` (held-out samples; default ``n`` samples of seeds
    ``first_seed`` on, drawn here). ``scorer`` (images -> attribute scores) defaults to the domain's: ``domain``, or
    the one registered for the engine's model. ``mask`` [H, W] (image pixels) splits the pixel change. ``callback``
    gets the engine's ``StepEvent``s (the sampling, the sweep, the crossing: each call its own ``total``).
    ``sampler`` (``steering.SAMPLERS``, ``karras``): the samples are drawn by that diffusers scheduler with the
    direction steered in at each scale (``hspace.steer``; no trajectory, ``eta`` unused), and the card is that
    sampler's."""
    from .domains import domain_of
    from .validate import check_scales

    scales = sorted(set(check_scales(scales)) | {0.0})
    if domain is None and scorer is None:
        domain = domain_of(engine.spec)
    score = scorer or domain.scorer()
    binary = list(domain.binary) if domain is not None else []
    spread = domain.spread() if domain is not None and domain.spread is not None else {}
    edit = _edits(direction, engine, trajectory, n, num_steps, eta, first_seed, batch_size, progress, callback, sampler, karras)
    images = edit(scales)  # [S, B, 3, H, W]
    scores = _scores(score, images)
    if not binary:
        binary = [k for k, v in scores.items() if bool(((v >= 0) & (v <= 1)).all())]
    change, change_se, flip, eligible = _statistics(scales, scores, binary, spread, domain)
    target = _target(direction, scores, change, target)
    if target in flip:  # one more scale where the grid says the target's flip rate crosses 50%: the unit is measured, not interpolated
        crossing = _crossing(scales, flip[target], 0.5, change[target][-1] >= 0)
        if crossing is not None and all(abs(crossing - s) > 1e-9 for s in scales):
            more = edit([crossing])
            order = sorted(range(len(scales) + 1), key=lambda i: (scales + [crossing])[i])
            scales = [(scales + [crossing])[i] for i in order]
            images = torch.cat([images, more])[order]
            extra = _scores(score, more)
            scores = {k: torch.cat([v, extra[k]])[order] for k, v in scores.items()}
            change, change_se, flip, eligible = _statistics(scales, scores, binary, spread, domain)
    S, B = images.shape[:2]
    pixel_change, outside, realism, similarity = _image_measures(images, scales.index(0.0), mask, domain, score)
    result = Card(direction.name, target, scales, B, change, change_se, flip, eligible, pixel_change, outside, realism, binary=binary,
                  steps=num_steps if trajectory is None else trajectory.num_steps, similarity=similarity, sampler=sampler)
    result.calibration = calibrate(result, spread.get(target, 1.0))
    return result


def _edits(direction, engine, trajectory, n, num_steps, eta, first_seed, batch_size, progress, callback, sampler, karras):
    """scales -> the direction's edited images [S, B, ...] of the held-out samples: a batched replay of their
    trajectory in hspace's loop, or with ``sampler`` the seeds drawn by diffusers' scheduler, steered."""
    from .validate import check_int

    if trajectory is None:
        check_int("n", n, 2, valid="an integer >= 2 (held-out samples)")
    seeds = list(range(first_seed, first_seed + n))
    if sampler is not None:
        from .steering import scheduler_for, steered_images

        if trajectory is not None:
            raise HspaceError("a card under a sampler draws its own samples with it; it takes no trajectory")
        scheduler_for(sampler, engine.scheduler_config, karras)  # a bad combination fails before any pass
        return lambda scales: steered_images(engine, direction, scales, seeds, num_steps, sampler, karras=karras)
    if trajectory is None:
        trajectory = engine.sample(seeds, num_steps, eta, batch_size=batch_size, progress=progress, callback=callback)
    return lambda scales: engine.edit(trajectory, [direction], scales, units="raw", batch_size=batch_size, progress=progress,
                                      callback=callback).images[0]


def _image_measures(images: torch.Tensor, zero: int, mask, domain, score) -> tuple:
    """Per scale: the mean pixel change from the unedited images, its share outside ``mask``, the domain's realism
    and (a CLIP scorer) the mean similarity of each edited image's embedding to its unedited one's."""
    S, B = images.shape[:2]
    pixel = (images - images[zero]).abs()
    pixel_change = pixel.mean((1, 2, 3, 4)).tolist()
    outside = None
    if mask is not None:
        keep = (torch.as_tensor(mask, dtype=torch.float32) <= 0.5).to(pixel.dtype)
        outside = ((pixel * keep).sum((1, 2, 3, 4)) / (keep.sum() * pixel.shape[1] * pixel.shape[2]).clamp_min(1)).tolist()
    realism = None
    if domain is not None and domain.realism is not None:
        realism = [float(domain.realism(images[s])) for s in range(S)]
    similarity = None
    if callable(getattr(score, "embed", None)):  # a CLIP scorer: how much of each image survives the edit
        embedded = score.embed(images.reshape(S * B, *images.shape[2:])).reshape(S, B, -1).double()
        similarity = (embedded * embedded[zero]).sum(-1).mean(1).tolist()
    return pixel_change, outside, realism, similarity


def _scores(score, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scorer's outputs of images [S, B, 3, H, W] as [S, B] per attribute (per-sample scores only)."""
    S, B = images.shape[:2]
    flat = score(images.reshape(S * B, *images.shape[2:]))
    return {k: torch.as_tensor(v, dtype=torch.float64).reshape(S, B) for k, v in flat.items() if torch.as_tensor(v).numel() == S * B}


def present(scores: torch.Tensor) -> torch.Tensor:
    """The label of binary scores: the attribute is present where the score is above ``THRESHOLD``."""
    return scores > THRESHOLD


def flip_rate(before: torch.Tensor, after: torch.Tensor, could: torch.Tensor | None = None) -> float | None:
    """The one flip protocol (cards, ``flip_rates``, reproduce): the share of the samples that could flip (``could``,
    default all) whose label differs after the edit; None when no sample could."""
    if could is None:
        could = torch.ones_like(before, dtype=torch.bool)
    if not bool(could.any()):
        return None
    return float((present(after[could]) != present(before[could])).double().mean())


def flip_rates(
    engine,
    trajectory,
    directions: dict[str, Direction],
    scale: float,
    classify: Callable[[torch.Tensor], dict],
    *,
    watch: list[str] | None = None,
    domain=None,
    batch_size: int = 32,
    callback=None,
    progress: bool | None = None,
) -> dict:
    """For each attribute -> direction: the share of samples whose classifier label flips (``flip_rate``) when the
    direction is applied towards the opposite label (+scale where the attribute is absent, -scale where it
    is present), and the share flipped of every other binary attribute (what the edit drags along).

    ``classify`` maps images to probabilities per attribute (names as the keys of ``directions``);
    ``watch`` names the binary scores to count as other attributes (default: the binary attributes of
    ``domain``, or of the domain registered for the engine's model, among the scores). Every edit of
    every sample is one batched replay.
    """
    from .interventions import LinearEdit

    deltas = engine.directions_at(list(directions.values()), trajectory.num_steps)  # each checked once, before any work
    before = classify(trajectory.images)
    watch = _watched(engine, before, directions, watch, domain)
    binary = list(dict.fromkeys(list(directions) + watch))  # the edited ones, then the rest
    n, names = len(trajectory), list(directions)
    # One batched run: row (d, b) is sample b edited by direction d towards its opposite label.
    labels = torch.stack([present(before[name]) for name in names])  # [D, n]
    coefficients = torch.zeros(len(names) * n, len(names))
    for d in range(len(names)):
        coefficients[d * n : (d + 1) * n, d] = torch.where(labels[d], -1.0, 1.0) * float(scale)
    edit = LinearEdit(deltas, coefficients)
    source = torch.arange(n).repeat(len(names))
    edited = engine.replay(trajectory, interventions=[edit], source=source, batch_size=batch_size, callback=callback, progress=progress)
    after_all = classify(edited.images)
    report = {"n": n, "scale": float(scale), "attributes": {}}
    for d, name in enumerate(names):
        after = {k: v[d * n : (d + 1) * n] for k, v in after_all.items()}
        label = labels[d]
        flips = {k: flip_rate(before[k], after[k]) for k in binary}
        report["attributes"][name] = {
            "flipped": flips[name],
            "flipped_to_present": flip_rate(before[name], after[name], ~label) or 0.0,
            "flipped_to_absent": flip_rate(before[name], after[name], label) or 0.0,
            "others_flipped": {k: v for k, v in flips.items() if k != name},
        }
    return report


def _watched(engine, before: dict, directions: dict, watch, domain) -> list[str]:
    """The binary scores ``flip_rates`` counts as other attributes, checked against what the classifier scores."""
    missing = [name for name in directions if name not in before]
    if missing:
        raise HspaceError(f"the classifier has no {missing[0]!r}; it scores {', '.join(sorted(before))}")
    if watch is None:
        from .domains import domain_of

        watch = _binary_keys(before, domain or domain_of(engine.spec, required=False))
    unknown = [k for k in watch if k not in before]
    if unknown:
        raise HspaceError(f"the classifier has no {unknown[0]!r} to watch; it scores {', '.join(sorted(before))}")
    return list(watch)


def _binary_keys(scores: dict, domain) -> list[str]:
    """The domain's binary attributes among the scores (no domain: only the edited ones count)."""
    return [] if domain is None else [k for k in domain.binary if k in scores]


def mean_off_target(report: dict) -> float:
    """Mean share of other attributes flipped, over all directions of a ``flip_rates`` report."""
    values = [v for a in report["attributes"].values() for v in a["others_flipped"].values()]
    return sum(values) / len(values) if values else 0.0


def _statistics(scales: list[float], scores: dict, binary: list[str], spread: dict, domain=None):
    """Mean change and its standard error per attribute and scale, flip rates and their eligible counts (module doc)."""
    from .domains import attribute_change

    zero = scales.index(0.0)
    B = next(iter(scores.values())).shape[1]
    change, change_se, flip, eligible = {}, {}, {}, {}
    for attribute, values in scores.items():
        delta = attribute_change(attribute, values[zero], values, domain) / spread.get(attribute, 1.0)
        change[attribute] = delta.mean(1).tolist()
        change_se[attribute] = (delta.std(1) / math.sqrt(B)).tolist()
        if attribute in binary:
            before = present(values[zero])
            rates, counts = [], []
            for s, scale in enumerate(scales):
                could = ~before if scale > 0 else before
                counts.append(int(could.sum()))
                rates.append(None if scale == 0 else flip_rate(values[zero], values[s], could))
            flip[attribute], eligible[attribute] = rates, counts
    return change, change_se, flip, eligible


def _target(direction: Direction, scores: dict, change: dict, target: str | None) -> str:
    if target is not None:
        if target not in scores:
            raise HspaceError(f"target {target!r} is not scored; valid: {', '.join(sorted(scores))}")
        return target
    for candidate in (direction.meta.get("params", {}).get("attribute"), direction.name):
        if candidate in scores:
            return candidate
    return max(change, key=lambda a: abs(change[a][-1]) + abs(change[a][0]))


def calibrate(result: Card, spread: float = 1.0) -> dict:
    """The raw scale of one effect unit (module doc), with the 50% and 90% flip scales of a binary target."""
    scales = result.scales
    target = result.target
    if target in result.flip:
        # the side that adds the attribute: positive scales when they raise its probability (eq. 10, regression), else
        # negative ones (a PC's sign is arbitrary)
        positive = result.change[target][-1] >= 0
        flip50 = _crossing(scales, result.flip[target], 0.5, positive)
        flip90 = _crossing(scales, result.flip[target], 0.9, positive)
        return {"attribute": target, "kind": "flip50", "unit": f"50% flips of {target}", "scale": flip50, "flip50": flip50, "flip90": flip90,
                "steps": result.steps}
    # continuous: least-squares slope through zero of the mean change (in training stds) against the scale
    x = torch.tensor(scales, dtype=torch.float64)
    y = torch.tensor(result.change[target], dtype=torch.float64)
    slope = float((x * y).sum() / (x * x).sum())
    scale = None if abs(slope) < 1e-12 else 1.0 / slope
    return {"attribute": target, "kind": "std", "unit": f"one training-data std of {target}", "scale": scale, "slope_per_raw_unit": slope,
            "steps": result.steps}


def _crossing(scales: list[float], rates: list, level: float, positive: bool) -> float | None:
    """The smallest |scale| on one side at which the flip rate reaches ``level`` (linear between grid scales), signed."""
    side = [(abs(s), r) for s, r in zip(scales, rates) if (s > 0 if positive else s < 0) and r is not None]
    side.sort()
    previous = (0.0, 0.0)
    for scale, rate in side:
        if rate >= level:
            s0, r0 = previous
            value = scale if rate == r0 else s0 + (level - r0) * (scale - s0) / (rate - r0)
            return value if positive else -value
        previous = (scale, rate)
    return None


def calibration_record(result: Card) -> dict:
    """What a calibrated direction carries (``meta["calibration"]``): its unit, and the card's dose-response in short
    (scales, every attribute's mean change, the target's flip rate), which the editor reads while a slider moves."""
    return {**result.calibration, "n": result.n, "target": result.target, "scales": result.scales,
            **({"sampler": result.sampler} if result.sampler else {}),
            "change": {a: [round(v, 4) for v in values] for a, values in result.change.items()},
            "flip": [None if v is None else round(v, 4) for v in result.flip.get(result.target, [])]}


def calibrated(result: Card, direction: Direction) -> Direction:
    """``direction`` carrying ``result``'s calibration (``meta["calibration"]``): the same delta, now with its unit."""
    return Direction(direction.delta, direction.sigma, {**direction.meta, "calibration": calibration_record(result)},
                     direction.spec, direction.timesteps)


def write_card(result: Card, direction: Direction, out: str | Path) -> Path:
    """card.md, card.json and a dose-response plot per attribute (PNG) in ``out``; the direction with its
    calibration as ``out/DIRECTION.safetensors``."""
    from matplotlib.figure import Figure

    from .files import safe_name, write_json, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for attribute, values in result.change.items():
        fig = Figure(figsize=(3.2, 2.4))
        ax = fig.subplots()
        ax.errorbar(result.scales, values, yerr=[1.96 * e for e in result.change_se[attribute]], marker="o", capsize=2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="raw scale", ylabel="change" + (" (stds)" if attribute not in result.flip else " (prob.)"), title=attribute)
        fig.tight_layout()
        name = f"dose_{attribute}.png"
        fig.savefig(out / name, dpi=80)
        plots[attribute] = name
    write_json(out / "card.json", result.to_json())
    write_text(out / "card.md", result.markdown(plots))
    calibrated(result, direction).save(out / safe_name(direction.name or "direction", suffix=".safetensors"))
    return out
