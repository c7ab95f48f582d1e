"""The toy FID: the Fréchet distance against closed forms, and what it says of real and broken faces."""

import pytest
import torch

from hspace import HspaceError
from hspace.toyfaces.realism import frechet_distance, statistics, toy_fid


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    d1, d2 = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum())  # 5 + (1 + 0 + 4)
    assert frechet_distance((mu1, torch.diag(d1)), (mu2, torch.diag(d2))) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_is_invariant_to_rotation_and_zero_for_equal_sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    y = torch.randn(500, 6, generator=g, dtype=torch.float64) * 2 + 1
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert frechet_distance(statistics(x), statistics(x)) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(statistics(x), statistics(y)) == pytest.approx(frechet_distance(statistics(x @ q), statistics(y @ q)), rel=1e-8)
    with pytest.raises(HspaceError, match="at least 2 feature vectors"):
        statistics(x[:1])


def test_toy_fid_ranks_rendered_faces_above_broken_ones():
    from hspace.toyfaces.render import render_batch

    faces = torch.from_numpy(render_batch(range(30000, 30400))[0])
    noisy = (faces + 0.6 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    flat = faces.mean(dim=(2, 3), keepdim=True).expand_as(faces)
    real, broken, blank = toy_fid(faces), toy_fid(noisy), toy_fid(flat)
    assert real < 0.2 * broken and real < 0.2 * blank
