"""Conditional directions by joint regression: exact least squares, partial effects, bank streaming, CLI."""

from dataclasses import replace

import pytest
import torch

from hspace import HspaceError
from hspace.bank import build_bank
from hspace.cli import main
from hspace.directions import load_result
from hspace.directions.regression import Regression, regression_directions, regression_from_h
from hspace.directions.supervised import h_difference
from hspace.spec import FREE


def correlated(n=400, seed=0):
    """h = a * u + b * v + noise with attributes a, b correlated (b follows a 80% of the time)."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    a = (torch.rand(n, generator=g) < 0.5).double()
    b = torch.where(torch.rand(n, generator=g) < 0.8, a, 1 - a)
    h = a[:, None, None, None] * u + b[:, None, None, None] * v + 0.01 * torch.randn(n, 3, 2, 4, generator=g, dtype=torch.float64)
    return h, a, b, u, v


def test_regression_recovers_the_partial_effects_where_mean_difference_is_entangled():
    h, a, b, u, v = correlated()
    found = regression_from_h(h, {"a": a, "b": b}, FREE)
    assert [d.name for d in found] == ["a", "b"] and found.method == "regression"
    assert torch.allclose(found[0].delta.double(), u, atol=0.01) and torch.allclose(found[1].delta.double(), v, atol=0.01)
    # eq. 10 on a carries 60% of v along (b = a in 80% of samples)
    diff = h_difference(h[a == 1], h[a == 0])
    assert (diff - u - 0.6 * v).abs().max() < 0.15


def test_streaming_equals_one_least_squares_solve():
    h, a, b, _, _ = correlated(n=57, seed=3)
    fit = Regression(["a", "b"])
    for rows in torch.arange(57).split(10):
        fit.update(h[rows], torch.stack([a[rows], b[rows]], 1))
    X = torch.stack([torch.ones(57, dtype=torch.float64), a, b], 1)
    expected = torch.linalg.lstsq(X, h.reshape(57, -1)).solution.reshape(3, *h.shape[1:])
    assert torch.allclose(fit.coefficients(), expected, atol=1e-10)


@pytest.mark.parametrize(
    "labels, message",
    [({"a": torch.ones(20)}, "a does not vary"), ({"a": torch.arange(20.0), "b": 2 * torch.arange(20.0)}, "linear combinations"),
     ({"a": torch.tensor([float("nan")] * 20)}, "must be finite")],
)
def test_regression_errors(labels, message):
    with pytest.raises(HspaceError, match=message):
        regression_from_h(torch.randn(20, 2, 3), labels, FREE)


def test_regression_over_a_bank_and_from_the_command_line(tmp_path, engine):
    bank = build_bank(tmp_path / "b", engine, 12, 3, shard_size=5)
    scores = {"x": torch.linspace(0, 1, 12), "y": torch.rand(12, generator=torch.Generator().manual_seed(0))}
    bank.set_scores("mine", scores)
    found = regression_directions(bank, ["x", "y"], scores="mine")
    expected = regression_from_h(bank.h(), scores, bank.spec)
    for d, e in zip(found, expected):
        assert torch.allclose(d.delta, e.delta, atol=1e-5) and d.spec == replace(bank.spec.space, h_shape=bank.h_shape)  # the space, not the process
    out = tmp_path / "reg"
    assert main(["supervised", str(tmp_path / "b"), "--attribute", "x", "y", "--scores", "mine", "--method", "regression", "--out", str(out)]) == 0
    loaded = load_result(out)
    assert loaded.method == "regression" and torch.allclose(loaded[1].delta, found[1].delta)
    assert main(["supervised", str(tmp_path / "b"), "--attribute", "x", "--scores", "mine", "--method", "ols", "--out", str(out)]) == 2
