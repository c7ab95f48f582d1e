"""The toy-faces attribute classifier: a small CNN that scores every attribute of a face image.

``classify(images)`` returns a probability for every binary attribute (smile, eyes_open, glasses, hat)
and a value for every continuous one (hair_color, skin_tone, yaw in their ranges; background as a hue in
[0, 1), predicted through its cosine and sine because hue wraps around). Trained on faces with
*independent* attributes, so that it cannot read one attribute off another that correlates with it in
the diffusion model's training data; with light noise and blur so that it reads generated samples too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HspaceError
from .render import BINARY, CONTINUOUS, render_batch

WEIGHTS = Path(__file__).with_name("classifier.safetensors")
INPUT_SIZE = 32
# Seeds of the classifier's faces, far from the diffusion model's training faces (0 .. pool-1).
TRAIN_SEED0 = 10_000_000
HELDOUT_SEED0 = 20_000_000


class FaceClassifier(nn.Module):
    """Conv net: 3x32x32 in [-1, 1] -> 4 binary logits, hair, skin, yaw, cos and sin of the background hue."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.ReLU(), nn.Linear(256, len(BINARY) + 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _prepare(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HspaceError(f"classify takes images [N, 3, H, W] in [-1, 1], got {shape}")
    images = images.float()
    if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return images.clamp(-1, 1)


def decode_outputs(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named scores from the network's raw outputs."""
    nb = len(BINARY)
    scores = {name: torch.sigmoid(out[:, i]) for i, name in enumerate(BINARY)}
    scores["hair_color"] = out[:, nb]
    scores["skin_tone"] = out[:, nb + 1]
    scores["yaw"] = out[:, nb + 2]
    scores["background"] = torch.remainder(torch.atan2(out[:, nb + 4], out[:, nb + 3]) / (2 * math.pi), 1.0)
    return scores


@lru_cache(maxsize=None)
def load_classifier(path: str = str(WEIGHTS)) -> FaceClassifier:
    """The bundled classifier (float16 weights on disk, float32 in memory)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise HspaceError(f"no classifier weights at {path!r}; train them with `hspace toyfaces train-classifier`")
    model = FaceClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval().requires_grad_(False)


def classify(images: torch.Tensor, batch_size: int = 512, model: FaceClassifier | None = None) -> dict[str, torch.Tensor]:
    """Scores of every attribute for images [N, 3, H, W] in [-1, 1]: probabilities and values, each [N]."""
    images = _prepare(images)
    model = model or load_classifier()
    with torch.no_grad():
        out = torch.cat([model(part) for part in images.split(batch_size)])
    return decode_outputs(out)


def _targets(labels: dict[str, np.ndarray]) -> torch.Tensor:
    hue = 2 * math.pi * labels["background"]
    columns = [labels[n] for n in BINARY] + [labels["hair_color"], labels["skin_tone"], labels["yaw"], np.cos(hue), np.sin(hue)]
    return torch.from_numpy(np.stack(columns, 1).astype(np.float32))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light blur on half the batch and Gaussian noise of random strength: generated samples are not crisp."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float() * torch.rand(n, 1, 1, 1, generator=generator)
    x = x + mix * (blur - x)
    return x + torch.randn(x.shape, generator=generator) * 0.08 * torch.rand(n, 1, 1, 1, generator=generator)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    nb = len(BINARY)
    return F.binary_cross_entropy_with_logits(out[:, :nb], target[:, :nb]) + 4 * F.mse_loss(out[:, nb:], target[:, nb:])


def evaluate(scores: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy of every binary attribute and R^2 of every continuous one (background: circular residual)."""
    metrics = {}
    for name in BINARY:
        metrics[f"{name}_accuracy"] = float(((scores[name] > 0.5).float().numpy() == labels[name]).mean())
    for name in CONTINUOUS:
        truth, pred = labels[name].astype(np.float64), scores[name].double().numpy()
        residual = pred - truth
        if name == "background":
            residual = (residual + 0.5) % 1.0 - 0.5
        metrics[f"{name}_r2"] = float(1 - (residual**2).sum() / ((truth - truth.mean()) ** 2).sum())
    return metrics


@dataclass
class ClassifierConfig:
    train_faces: int = 40000
    heldout_faces: int = 5000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def train_classifier(
    config: ClassifierConfig | None = None,
    out: str | Path = WEIGHTS,
    callback: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Train on independent-attribute faces, save float16 weights to ``out``; returns held-out metrics."""
    from safetensors.torch import save_file

    config = config or ClassifierConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels, _ = render_batch(range(TRAIN_SEED0, TRAIN_SEED0 + config.train_faces), correlated=False)
    x, y = torch.from_numpy(images), _targets(labels)
    model = FaceClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    steps = config.epochs * (len(x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - config.batch_size + 1, config.batch_size):
            index = order[start : start + config.batch_size]
            loss = _loss(model(_augment(x[index], generator)), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if callback is not None:
                callback({"step": step, "steps": steps, "epoch": epoch, "loss": float(loss)})
    model.eval()
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out))
    load_classifier.cache_clear()
    held_images, held_labels, _ = render_batch(range(HELDOUT_SEED0, HELDOUT_SEED0 + config.heldout_faces), correlated=False)
    metrics = evaluate(classify(torch.from_numpy(held_images), model=load_classifier(str(out))), held_labels)
    Path(out).with_suffix(".json").write_text(json.dumps({"config": asdict(config), "heldout": metrics}, indent=2))
    return metrics
