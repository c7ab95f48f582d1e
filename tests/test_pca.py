"""PCA in h-space (paper Sec. 4.1, Fig. 5-6): components against numpy's SVD, streaming, signs, random baseline."""

import numpy as np
import pytest
import torch

from hspace import Direction, HspaceError
from hspace.spec import FREE, Space, Spec
from hspace.directions.pca import PCAResult, StreamingPCA, pca_from_h, pca_per_timestep, random_directions

K = 4


def synthetic_h(n=40, steps=3, h_shape=(4, 3, 3), seed=0, offset=5.0):
    """[n, T, *h_shape] float32: well-separated variances (distinct eigenvalues) plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(h_shape))
    scales = np.array([9.0, 6.0, 4.0, 2.5, 1.5, 1.0])[: min(6, d)]
    out = np.empty((n, steps, d))
    for t in range(steps):
        basis, _ = np.linalg.qr(rng.standard_normal((d, len(scales))))
        out[:, t] = offset + rng.standard_normal((n, len(scales))) * scales @ basis.T + 0.05 * rng.standard_normal((n, d))
    return torch.from_numpy(out.reshape(n, steps, *h_shape)).float()


def svd_reference(x):
    """x [n, D] -> (unit components [k, D], sigma [k], variance ratio [k]) from numpy's SVD of the centred data."""
    x = np.asarray(x, dtype=np.float64)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return vt[:K], s[:K] / np.sqrt(len(x) - 1), (s**2 / (s**2).sum())[:K]


def assert_matches(comp, sigma, ratio, x):
    ref_v, ref_sigma, ref_ratio = svd_reference(x)
    comp = comp.double().numpy().reshape(K, -1)
    cos = np.abs((comp * ref_v).sum(1)) / np.linalg.norm(comp, axis=1)
    assert (cos >= 0.9999).all(), cos
    np.testing.assert_allclose(np.linalg.norm(comp, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), ref_sigma, rtol=1e-6)
    np.testing.assert_allclose(ratio.numpy(), ref_ratio, rtol=1e-6)


CASES = {"n>D": dict(n=40, h_shape=(4, 3, 3)), "n<D": dict(n=20, h_shape=(8, 4, 4))}


@pytest.mark.parametrize("method", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("case", CASES)
def test_per_timestep_matches_numpy_svd(case, method):
    h = synthetic_h(**CASES[case])
    res = pca_from_h(h, K, method=method)
    assert res.components.shape == (K, 3, *h.shape[2:]) and res.sigma.shape == res.variance_ratio.shape == (K, 3)
    assert res.n == len(h) and res.per_timestep
    assert res.route == (method if method != "auto" else ("covariance" if case == "n>D" else "gram"))
    for t in range(3):
        assert_matches(res.components[:, t], res.sigma[:, t], res.variance_ratio[:, t], h[:, t].flatten(1))
    torch.testing.assert_close(res.mean, h.double().mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_routes_and_chunkings_agree(case):
    h = synthetic_h(**CASES[case]).half()  # a bank stores float16
    ref = pca_from_h(h, K, method="covariance")
    results = [
        pca_from_h(h, K, method="gram"),
        pca_from_h(h, K, method="gram", chunk_size=7),
        # a tiny budget: the Gram route keeps one chunk per panel and makes one pass per chunk
        pca_per_timestep(list(torch.split(h, [3, 1, 9, 2, len(h) - 15])), K, memory_budget_bytes=1),
        pca_per_timestep(lambda: iter(torch.split(h, 6)), K, method="covariance"),
        StreamingPCA().update(h[:5]).update(h[5:13]).update(h[13:]).result(K),
    ]
    assert results[2].route == "gram"
    for res in results:
        # same signs as well: the sign convention does not depend on the route
        torch.testing.assert_close(res.components, ref.components, rtol=0, atol=2e-5)
        torch.testing.assert_close(res.sigma, ref.sigma, rtol=1e-9, atol=0)
        torch.testing.assert_close(res.variance_ratio, ref.variance_ratio, rtol=1e-9, atol=0)
        torch.testing.assert_close(res.mean, ref.mean, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["covariance", "gram"])
def test_concatenated_option_matches_svd_of_concatenated_h(method):
    h = synthetic_h(n=30, steps=3, h_shape=(2, 3, 3))
    res = pca_from_h(h, K, per_timestep=False, method=method, spec=FREE)
    assert res.components.shape == (K, 3, 2, 3, 3) and not res.per_timestep
    assert_matches(res.components.flatten(1), res.sigma[:, 0], res.variance_ratio[:, 0], h.flatten(1))
    assert torch.equal(res.sigma, res.sigma[:, :1].expand(K, 3))
    # the direction's delta is sigma times the joint unit vector: its norm over all steps is sigma
    d = res.directions[0]
    assert d.delta.norm().item() == pytest.approx(res.sigma[0, 0].item(), rel=1e-6)


def shared_component_h(n=40, steps=8, d=20, seed=1):
    """h_t = a_i u_t + noise where u_t turns slowly with t: the true first component is one direction along t."""
    rng = np.random.default_rng(seed)
    u0, u1 = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    a = rng.standard_normal(n) * 5
    out = np.empty((n, steps, d))
    for t in range(steps):
        angle = 0.15 * t
        u = np.cos(angle) * u0 + np.sin(angle) * u1
        out[:, t] = a[:, None] * u + 0.3 * rng.standard_normal((n, d))
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("method", ["covariance", "gram"])
def test_signs_are_consistent_across_timesteps(method):
    h = shared_component_h()
    for flip in (1.0, -1.0):  # the data's own sign must not matter
        res = pca_from_h(h * flip, 3, method=method)
        c = res.components.flatten(2)  # [k, T, D]
        assert ((c[0, 1:] * c[0, :-1]).sum(-1) > 0).all()
        # the first step's largest coordinate is positive, for every component
        first = c[:, 0]
        assert (first.gather(1, first.abs().argmax(1, keepdim=True)) > 0).all()
        # and every component's neighbouring steps agree
        assert ((c[:, 1:] * c[:, :-1]).sum(-1) > 0).all()


def test_directions_shape_meta_and_round_trip(tmp_path):
    h = synthetic_h()
    res = pca_from_h(h, K, spec=FREE)
    dirs = res.directions_for(Spec("tiny-test", "mid.out"), num_steps=3)
    assert [d.name for d in dirs] == ["pc1", "pc2", "pc3", "pc4"]
    for j, d in enumerate(dirs):
        assert d.delta.shape == (3, 4, 3, 3) and d.delta.dtype == torch.float32
        torch.testing.assert_close(d.norms().double(), res.sigma[j], rtol=1e-6, atol=0)
        torch.testing.assert_close(d.delta, (res.sigma[j].float()[:, None, None, None] * res.components[j]))
        assert d.meta["method"] == "pca" and d.spec.model == "tiny-test" and d.spec.h_location == "mid.out"
        assert d.meta["params"]["component"] == j and d.meta["params"]["n"] == 40
        assert d.meta["params"]["per_timestep"] is True
        d.save(tmp_path / f"{d.name}.safetensors")
        loaded = Direction.load(tmp_path / f"{d.name}.safetensors")
        assert torch.equal(loaded.delta, d.delta) and torch.equal(loaded.sigma, d.sigma) and loaded.meta == d.meta
    with pytest.raises(HspaceError, match="num_steps=5 but this PCA has 3 steps"):
        res.directions_for(num_steps=5)


def test_random_baseline_matches_norms_and_is_seeded(tmp_path):
    res = pca_from_h(synthetic_h(), K, spec=FREE)
    pcs = res.directions
    state = torch.get_rng_state()
    a = random_directions(res, 3, seed=7, spec=Spec("m", "mid.out"))
    assert torch.equal(torch.get_rng_state(), state)
    assert [d.name for d in a] == ["random1", "random2", "random3"]
    for j, d in enumerate(a):
        assert d.delta.shape == pcs[j].delta.shape
        torch.testing.assert_close(d.norms(), pcs[j].norms(), rtol=1e-5, atol=0)
        assert d.meta["method"] == "random" and d.meta["params"]["seed"] == 7 and d.meta["params"]["matched_to"] == f"pc{j + 1}"
        # a random direction is nearly orthogonal to its PC, not a copy of it
        cos = (d.delta.flatten() @ pcs[j].delta.flatten()) / (d.delta.norm() * pcs[j].delta.norm())
        assert abs(cos) < 0.9
    b = random_directions(res, 3, seed=7)
    c = random_directions(res, 3, seed=8)
    assert all(torch.equal(x.delta, y.delta) for x, y in zip(a, b))
    assert not any(torch.allclose(x.delta, y.delta) for x, y in zip(a, c))
    assert torch.equal(random_directions(res, 1, seed=7)[0].delta, a[0].delta)
    a[0].save(tmp_path / "r.safetensors")
    assert Direction.load(tmp_path / "r.safetensors").meta == a[0].meta
    assert Direction.load(tmp_path / "r.safetensors").spec == Space("m", "mid.out", h_shape=(4, 3, 3))


def test_random_baseline_matches_concatenated_pc_norms():
    res = pca_from_h(synthetic_h(n=30, h_shape=(2, 2, 2)), 2, per_timestep=False, spec=FREE)
    for pc, rnd in zip(res.directions, random_directions(res, 2, seed=0)):
        torch.testing.assert_close(rnd.norms(), pc.norms(), rtol=1e-5, atol=0)


def test_errors():
    h = synthetic_h(n=10, h_shape=(2, 2, 1))  # D = 4
    for k in (0, -1, 2.0, True):
        with pytest.raises(HspaceError, match="k .*must be an integer >= 1"):
            pca_from_h(h, k)
    with pytest.raises(HspaceError, match=r"k=5 components requested, but h has dimension D=4"):
        pca_from_h(h, 5)
    with pytest.raises(HspaceError, match=r"k=5 .*min\(n-1, D\) = 4; use 1 <= k <= 4"):
        pca_from_h(h, 5, method="gram")
    with pytest.raises(HspaceError, match=r"k=3 .*3 samples of dimension 5 .*min\(n-1, D\) = 2"):
        pca_from_h(synthetic_h(n=3, h_shape=(5,)), 3)
    for method in ("covariance", "gram"):
        with pytest.raises(HspaceError, match="at least 2 samples, got 1"):
            pca_from_h(h[:1], 1, method=method)
    with pytest.raises(HspaceError, match="at least 2 samples, got 0"):
        pca_per_timestep([], 1)
    with pytest.raises(HspaceError, match=r"chunk 1 has h of shape \(3, 2, 2\).*earlier chunks have \(3, 2, 2, 1\)"):
        pca_per_timestep([h[:5], h[5:, :, :, :, 0]], 2)
    with pytest.raises(HspaceError, match=r"chunk 0 must be \[b, T, \*h_shape\]"):
        pca_per_timestep([torch.zeros(4, 3)], 1)
    with pytest.raises(HspaceError, match="NaN or infinite"):
        pca_per_timestep([torch.full((4, 2, 3), float("nan"))], 1)
    with pytest.raises(HspaceError, match="unknown PCA method 'svd'"):
        pca_from_h(h, 1, method="svd")
    with pytest.raises(HspaceError, match="does not vary across samples at step index 0"):
        pca_from_h(torch.ones(6, 2, 3), 1)
    with pytest.raises(HspaceError, match="over memory_budget_bytes=100"):
        pca_from_h(h, 1, method="covariance", memory_budget_bytes=100)
    generator = iter(torch.split(h, 4))  # one-shot: the second pass of the Gram route sees nothing
    with pytest.raises(HspaceError, match="chunks\\(\\) must yield the same data at every call"):
        pca_per_timestep(lambda: generator, 1, method="gram")
    res = pca_from_h(h, 2)
    with pytest.raises(HspaceError, match="k=3 random directions requested, but the PCA has 2 components"):
        random_directions(res, 3, seed=0)
    with pytest.raises(HspaceError, match="seed must be an integer"):
        random_directions(res, 1, seed=-1)
    assert isinstance(res, PCAResult)


@pytest.mark.parametrize("per_timestep", [True, False])
def test_saved_result_reloads_and_projects_new_h(tmp_path, per_timestep):
    from dataclasses import replace

    h = synthetic_h()
    res = replace(pca_from_h(h, K, per_timestep=per_timestep), spec=Spec("tiny-test"))
    paths = res.save(tmp_path / "pca")
    assert [p.name for p in paths] == [f"pc{j + 1}.safetensors" for j in range(K)]
    loaded = PCAResult.load(tmp_path / "pca")
    for name in ("components", "sigma", "variance_ratio", "mean"):
        assert torch.equal(getattr(loaded, name), getattr(res, name)), name
    assert (loaded.n, loaded.per_timestep, loaded.route, loaded.spec) == (res.n, per_timestep, res.route, Spec("tiny-test"))
    # Projecting new h: h = mean + c * sigma_j v_j has coordinate c along component j and 0 along the others.
    new = res.mean[None].float() + 2.5 * res.directions[1].delta[None]
    coords = loaded.project(new)
    expected = torch.zeros_like(coords)
    expected[:, 1] = 2.5
    torch.testing.assert_close(coords, expected, atol=1e-4, rtol=0)
    # The projections of the data have variance sigma^2 / sigma^2 = 1 per component (unit sigma).
    assert torch.allclose(loaded.project(h).var(0), torch.ones(1, dtype=torch.float64), atol=1e-6)
    with pytest.raises(HspaceError, match="holds no PCA result"):
        PCAResult.load(tmp_path)


def _low_rank(n=240, T=3, D=1500, rank=30, seed=0):
    """h [n, T, 15, 10, 10] with a decaying spectrum of ``rank`` directions plus noise: well separated top components."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g, dtype=torch.float64)).Q
    coef = torch.randn(n, T, rank, generator=g, dtype=torch.float64) * torch.logspace(1.5, 0, rank, dtype=torch.float64)
    return (coef @ basis.T + 0.05 * torch.randn(n, T, D, generator=g, dtype=torch.float64)).float().reshape(n, T, 15, 10, 10)


def test_the_randomized_route_agrees_with_an_explicit_svd_and_counts_its_passes(monkeypatch):
    from hspace.directions import pca as pca_module

    h = _low_rank()
    passes = []
    chunks = list(torch.split(h, 64))

    def counted():
        passes.append(1)
        return iter(chunks)

    fast = pca_per_timestep(counted, 8, method="randomized")
    from hspace.directions.randomized import POWER_ITERATIONS

    assert fast.route == "randomized" and len(passes) == 2 + 2 * POWER_ITERATIONS  # sketch, power iterations, the last product
    for t in range(h.shape[1]):
        x = h[:, t].reshape(len(h), -1).double()
        _, S, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        V = fast.components[:, t].reshape(8, -1).double()
        cosines = torch.linalg.svdvals(V @ Vh[:8].T)  # the cosines of the principal angles of the two top-8 subspaces
        assert float(cosines.min()) > np.cos(np.radians(1.0))
        assert torch.allclose(fast.sigma[:, t].double(), S[:8] / np.sqrt(len(h) - 1), rtol=1e-3)
    exact = pca_from_h(h, 8, method="gram")
    assert torch.allclose(fast.variance_ratio, exact.variance_ratio, rtol=1e-3)
    monkeypatch.setattr(pca_module, "RANDOMIZED_ABOVE", 1000)  # h of 1500 numbers a step: "auto" takes it above this size
    assert pca_from_h(h, 3).route == "randomized"
