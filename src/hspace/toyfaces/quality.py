"""How well the bundled model reproduces its training distribution, judged by the attribute classifier."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..engine import Engine
from .classifier import classify
from .train import TrainConfig
from .render import ATTRIBUTES, BINARY, DARK_HAIR_THRESHOLD, sample_attributes


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


def training_labels(pool: int) -> dict[str, np.ndarray]:
    """Ground-truth labels of the model's training faces (seeds 0 .. pool-1), without rendering them."""
    attrs = [sample_attributes(np.random.default_rng(seed)) for seed in range(pool)]
    return {name: np.array([float(getattr(a, name)) for a in attrs]) for name in ATTRIBUTES}


def evaluate_model(
    engine: Engine,
    n: int = 1000,
    num_steps: int = 50,
    eta: float = 1.0,
    seed0: int = 0,
    batch_size: int = 100,
    pool: int = TrainConfig.pool,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Sample n images and compare the classifier's view of them with the training faces' true labels."""
    trajectory = engine.sample(range(seed0, seed0 + n), num_steps, eta, record_h=False, keep_noise=False, batch_size=batch_size, callback=callback)
    generated = {k: v.numpy() for k, v in classify(trajectory.images).items()}
    truth = training_labels(pool)
    stats = attribute_statistics({k: torch.from_numpy(v) for k, v in generated.items()})
    for name in BINARY:
        stats[name]["training_frequency"] = float(truth[name].mean())
        stats[name]["difference_pp"] = 100 * (stats[name]["frequency"] - stats[name]["training_frequency"])
    return {
        "n": n,
        "num_steps": num_steps,
        "eta": eta,
        "binary": stats,
        "correlations_generated": correlations(generated),
        "correlations_training": correlations(truth),
        "images": trajectory.images,
    }
