"""How well the bundled model reproduces its training distribution, judged by the attribute classifier."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..engine import Engine
from ..errors import HspaceError
from ..progress import Meter
from .classifier import classify
from .train import TrainConfig
from .render import _RANGES, ATTRIBUTES, BINARY, CONTINUOUS, DARK_HAIR_THRESHOLD, sample_attributes


def attribute_statistics(scores: dict[str, torch.Tensor], confidence: float = 0.9) -> dict[str, dict[str, float]]:
    """Per binary attribute: frequency (p > 0.5) and the share of images scored with confidence >= ``confidence``."""
    stats = {}
    for name in BINARY:
        p = scores[name].double()
        stats[name] = {
            "frequency": float((p > 0.5).double().mean()),
            "confident": float(((p >= confidence) | (p <= 1 - confidence)).double().mean()),
        }
    confident_all = torch.stack([(scores[n] >= confidence) | (scores[n] <= 1 - confidence) for n in BINARY]).all(0)
    stats["all_binary"] = {"confident": float(confident_all.double().mean())}
    return stats


def correlations(labels: dict[str, np.ndarray]) -> dict[str, float]:
    """The two entangled pairs of the training distribution (see render.py)."""
    dark = labels["hair_color"] < DARK_HAIR_THRESHOLD
    smile = labels["smile"] > 0.5

    def mean(x, where):
        return float(np.asarray(x)[where].mean()) if where.any() else float("nan")

    glasses, hat = np.asarray(labels["glasses"]) > 0.5, np.asarray(labels["hat"]) > 0.5
    return {
        "P(glasses | dark hair)": mean(glasses, dark),
        "P(glasses | light hair)": mean(glasses, ~dark),
        "P(hat | smile)": mean(hat, smile),
        "P(hat | no smile)": mean(hat, ~smile),
    }


def by_thirds(labels: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Frequency of every binary attribute in each third of every continuous attribute's range.

    ``[binary][continuous]`` is a list of three frequencies (low, middle, high third); a third with
    no image is NaN. It shows where a generated frequency departs from the training data (e.g. a
    smile lost on dark skin only).
    """
    table: dict[str, dict[str, list[float]]] = {}
    for name in BINARY:
        present = np.asarray(labels[name]) > 0.5
        table[name] = {}
        for cont in CONTINUOUS:
            lo, hi = _RANGES[cont]
            third = np.clip(((np.asarray(labels[cont]) - lo) / (hi - lo) * 3).astype(int), 0, 2)
            table[name][cont] = [float(present[third == k].mean()) if (third == k).any() else float("nan") for k in range(3)]
    return table


def training_labels(pool: int) -> dict[str, np.ndarray]:
    """Ground-truth labels of the model's training faces (seeds 0 .. pool-1), without rendering them."""
    return training_labels_range(0, pool)


def training_labels_range(start: int, stop: int) -> dict[str, np.ndarray]:
    """Ground-truth labels of the training faces of seeds start .. stop-1."""
    attrs = [sample_attributes(np.random.default_rng(seed)) for seed in range(start, stop)]
    return {name: np.array([float(getattr(a, name)) for a in attrs]) for name in ATTRIBUTES}


def evaluate_model(
    engine: Engine,
    n: int = 1000,
    num_steps: int = 50,
    eta: float = 1.0,
    seed0: int = 0,
    batch_size: int = 100,
    pool: int = TrainConfig.pool,
    callback: Callable | None = None,
    progress: bool | None = None,
) -> dict:
    """Sample n images and compare the classifier's view of them with the training faces' true labels."""
    trajectory = engine.sample(
        range(seed0, seed0 + n), num_steps, eta, record_h=False, keep_noise=False, batch_size=batch_size, callback=callback, progress=progress
    )
    generated = {k: v.numpy() for k, v in classify(trajectory.images).items()}
    truth = training_labels(pool)
    stats = attribute_statistics({k: torch.from_numpy(v) for k, v in generated.items()})
    for name in BINARY:
        stats[name]["training_frequency"] = float(truth[name].mean())
        stats[name]["difference_pp"] = 100 * (stats[name]["frequency"] - stats[name]["training_frequency"])
    from .realism import toy_fid

    return {
        "n": n,
        "num_steps": num_steps,
        "eta": eta,
        "toy_fid": toy_fid(trajectory.images),
        "binary": stats,
        "correlations_generated": correlations(generated),
        "correlations_training": correlations(truth),
        "by_thirds_generated": by_thirds(generated),
        "by_thirds_training": by_thirds(truth),
        "images": trajectory.images,
    }


def renoise_flips(
    engine: Engine,
    attribute: str = "smile",
    start_steps: Sequence[int] = (10, 20, 30, 40),
    n: int = 400,
    num_steps: int = 50,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 100,
    callback: Callable | None = None,
    progress: bool | None = None,
) -> dict:
    """At which noise levels the model loses or gains a binary attribute (SDEdit from training faces).

    ``n`` training faces, half with the attribute and half without (the first such seeds from 0 up),
    are noised by q(x_t | x_0) to the timestep of each start step and generated from there to x_0
    (steps ``start .. num_steps-1`` of the ``num_steps``-step process with ``eta``). The forward
    noising keeps the training distribution, so for an exact model the attribute's frequency stays at
    50%, whatever the start step; ``lost`` and ``gained`` (the share of faces with / without it that
    come back without / with it) show where this model departs, as judged by the classifier.
    """
    from .render import render_batch

    if attribute not in BINARY:
        raise HspaceError(f"unknown attribute {attribute!r}; valid: {', '.join(BINARY)}")
    if n < 2 or n % 2:
        raise HspaceError(f"n must be an even number >= 2 (half with, half without the attribute), got {n}")
    bad = [k for k in start_steps if not 0 <= k < num_steps]
    if bad or not start_steps:
        raise HspaceError(f"start steps must lie in 0..{num_steps - 1} (0 = pure noise), got {list(start_steps)}")
    with_, without = [], []
    for first in range(0, 10**7, 2000):  # the first n/2 seeds on each side
        labels = training_labels_range(first, first + 2000)[attribute] > 0.5
        with_ += [first + int(i) for i in np.flatnonzero(labels)]
        without += [first + int(i) for i in np.flatnonzero(~labels)]
        if min(len(with_), len(without)) >= n // 2:
            break
    seeds = with_[: n // 2] + without[: n // 2]
    truth = np.array([1] * (n // 2) + [0] * (n // 2), dtype=bool)
    x0 = engine.encode(torch.from_numpy(render_batch(seeds, size=engine.image_size[0])[0]))
    schedule = engine.schedule(num_steps)  # checks num_steps
    total = sum(num_steps - k for k in start_steps) * n  # one bar over every start step
    report = {"attribute": attribute, "n": n, "num_steps": num_steps, "eta": eta, "seeds": seeds, "starts": []}
    with Meter.job(callback, total, progress, "renoised faces") as meter:
        for k in start_steps:
            report["starts"].append(_renoise_from(engine, schedule, x0, truth, attribute, k, eta, seed, batch_size, meter))
    return report


def _renoise_from(engine, schedule, x0, truth, attribute: str, k: int, eta, seed: int, batch_size: int, meter) -> dict:
    """Training faces noised to step k and generated back: the attribute's frequency, lost and gained."""
    generator = torch.Generator().manual_seed(seed * 1000 + k)
    a = float(schedule.alpha[k])
    x_k = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    z = torch.randn((len(x0), schedule.num_steps - k, *x0.shape[1:]), generator=generator, dtype=x0.dtype)
    out = engine.finish(x_k, k, schedule.num_steps, eta, z, batch_size=batch_size, callback=meter)
    present = classify(engine.decode(out))[attribute].numpy() > 0.5
    return {
        "start_step": k,
        "timestep": schedule.t(k),
        "frequency": float(present.mean()),
        "lost": float((~present[truth]).mean()),
        "gained": float(present[~truth].mean()),
    }


def prompt_fidelity(
    engine: Engine,
    n: int = 200,
    num_steps: int = 25,
    eta: float = 0.0,
    seed0: int = 0,
    batch_size: int = 100,
    pool: int = TrainConfig.pool,
    progress: bool | None = None,
) -> dict:
    """How a text-to-image toy (``toysd``) follows its prompts, at the engine's guidance, judged by the classifier.

    Per binary attribute and polarity, ``n`` samples (seeds seed0 ..) under the prompt that names only it
    (``captions.caption({name: polarity})``): ``agreement``, the share the classifier labels as the prompt says; every
    other binary attribute's frequency against the training faces' frequency given the named one (the correlations
    are part of the training distribution: P(hat | smile) = 0.6) and their marginal. Then ``n`` samples of the empty
    prompt: their frequencies and toy FID."""
    from .captions import caption
    from .realism import toy_fid

    if not engine.spec.conditional:
        raise HspaceError(f"{engine.name!r} is unconditional: prompt fidelity needs a text-to-image model such as toysd")
    truth = training_labels(pool)

    def draw(prompt: str):
        trajectory = engine.sample(range(seed0, seed0 + n), num_steps, eta, record_h=False, keep_noise=False,
                                   batch_size=batch_size, prompts=[prompt], progress=progress)
        return trajectory.images, {k: v.numpy() for k, v in classify(trajectory.images).items()}

    named = {}
    for name in BINARY:
        for polarity in (True, False):
            prompt = caption({name: polarity})
            _, scores = draw(prompt)
            given = truth[name] == float(polarity)
            named[prompt] = {
                "attribute": name, "polarity": polarity, "agreement": float(np.mean((scores[name] > 0.5) == polarity)),
                "unnamed": {other: {"frequency": float(np.mean(scores[other] > 0.5)),
                                    "training_frequency_given_named": float(truth[other][given].mean()),
                                    "training_frequency": float(truth[other].mean())} for other in BINARY if other != name},
            }
    images, scores = draw("")
    empty = {other: {"frequency": float(np.mean(scores[other] > 0.5)), "training_frequency": float(truth[other].mean())} for other in BINARY}
    return {"n": n, "num_steps": num_steps, "eta": eta, "guidance": engine.spec.guidance, "named": named,
            "empty_prompt": {"toy_fid": toy_fid(images), "binary": empty}, "images": images}
