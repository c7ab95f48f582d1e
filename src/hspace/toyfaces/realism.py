"""A realism measure for the toy faces, so that "degrades the image" is a number: the Fréchet distance
between generated images and rendered training faces in the classifier's penultimate features (a toy
FID; Heusel et al. 2017 use Inception features, here the bundled classifier's 256 ReLU units).

FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}), in float64. The reference is
``REFERENCE_N`` rendered faces of the training distribution (seeds 0..N-1), computed once per process.
Like any FID it is biased upwards for small sets: compare numbers computed on sets of the same size.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import HspaceError
from .classifier import _prepare, load_classifier

REFERENCE_N = 2000


def features(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate classifier features [N, 256] of images [N, 3, H, W] in [-1, 1]."""
    model = load_classifier()
    images = _prepare(images)
    trunk = torch.nn.Sequential(model.features, *list(model.head)[:-1])
    with torch.no_grad():
        return torch.cat([trunk(part) for part in images.split(batch_size)]).double()


def statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise HspaceError(f"a Fréchet distance needs at least 2 feature vectors [N, D], got {tuple(feats.shape)}")
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """FD between two Gaussians (mean, covariance); the matrix square root through symmetric eigendecompositions."""
    (mu1, s1), (mu2, s2) = a, b
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0)
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * inner.sqrt().sum())


@lru_cache(maxsize=4)
def reference_statistics(n: int = REFERENCE_N) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the features of n rendered training faces (seeds 0..n-1, at the classifier's size)."""
    from .classifier import INPUT_SIZE
    from .render import render_batch

    return statistics(features(torch.from_numpy(render_batch(range(n), size=INPUT_SIZE)[0])))


def toy_fid(images: torch.Tensor) -> float:
    """Fréchet distance of ``images`` to the rendered training faces, in classifier features."""
    return frechet_distance(statistics(features(images)), reference_statistics())
