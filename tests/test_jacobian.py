"""Jacobian directions (paper Sec. 4.2, Alg. 1, SM Alg. 2): the U-Net split and subspace iteration,
checked against the full U-Net and against the SVD of the explicit Jacobian on a tiny model."""

import pytest
import torch
from diffusers import UNet2DModel

from hspace.spec import FREE
from hspace import Direction, HspaceError
from hspace.directions.jacobian import (
    JacobianProducts,
    jacobian_directions,
    sequential_subspace_iteration,
    subspace_iteration,
)
from hspace.hooks import h_hook, hook_count
from hspace.models.unet import decode, encode, forward_mode

from conftest import COMPOSITION_MARGIN, composition_tolerance, tiny_unet

STEP, K = 2, 4


def _x(seed=0):
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _decoder(unet, cache, mask=None):
    def f(h):
        with forward_mode(unet):
            eps = decode(unet, h, cache)
        return eps if mask is None else eps * mask

    return f


def _explicit_svd(f, h):
    with torch.no_grad():
        J = torch.autograd.functional.jacobian(lambda v: f(v.reshape(1, *h.shape)).flatten(), h.flatten(), vectorize=True)
    return torch.linalg.svd(J.double(), full_matrices=False)  # U [768, r], S, Vh [r, 2048]


@pytest.fixture(scope="module")
def point(engine, trajectory):
    """x_t, cache and the explicit Jacobian's SVD at step STEP of the first sample."""
    x_t = engine.x_t(trajectory[0], STEP)
    cache = encode(engine.unet, x_t, int(trajectory.timesteps[STEP]), engine.h_location)
    f = _decoder(engine.unet, cache)
    return cache, f, _explicit_svd(f, cache.h[0])


def _assert_matches(result, svd, k=K):
    U, S, Vh = svd
    rel = ((result.S.double() - S[:k]) / S[:k]).abs()
    assert rel.max() < 1e-3, (result.S, S[:k])
    cos_v = (result.V.reshape(k, -1).double() @ Vh[:k].T).diagonal().abs()
    cos_u = (result.U.reshape(k, -1).double() @ U[:, :k]).diagonal().abs()
    assert cos_v.min() >= 0.999 and cos_u.min() >= 0.999, (cos_v, cos_u)
    V = result.V.reshape(k, -1).double()
    assert torch.allclose(V @ V.T, torch.eye(k, dtype=torch.float64), atol=1e-4)


# ------------------------------------------------------------------ the split


@pytest.mark.parametrize("location", ["mid.out", "mid.in"])
def test_decode_of_encode_is_the_unet(location):
    unet = tiny_unet().eval().requires_grad_(False)
    x = _x()
    cache = encode(unet, x, 500, location)
    with torch.no_grad():
        full = unet(x, torch.tensor(500)).sample
        seen = []
        with h_hook(unet, location, lambda h: seen.append(h) or h):
            unet(x, torch.tensor(500))
        assert torch.equal(cache.h, seen[0])
        assert (decode(unet, cache.h, cache) - full).abs().max() < 1e-5
        # a cache of batch 1 serves a batch of k different h
        hs = torch.cat([cache.h, cache.h + 0.1 * torch.randn_like(cache.h)])
        batch = decode(unet, hs, cache)
        # a batch of 2 vs batches of 1: float sums in another order, by as much as this CPU's kernels differ between
        # the two batch shapes (measured here on the same h twice), with a margin (conftest)
        spread = float((decode(unet, torch.cat([cache.h, cache.h]), cache)[0] - decode(unet, cache.h, cache)[0]).abs().max())
        tolerance = max(COMPOSITION_MARGIN * spread, 1e-5)
        assert (batch[0] - full[0]).abs().max() < tolerance
        assert (batch[1] - decode(unet, hs[1:], cache)[0]).abs().max() < tolerance


def test_skip_blocks_and_fourier_embedding_are_split_exactly():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
            down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"), up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
            time_embedding_type="fourier", center_input_sample=True,
        ).eval().requires_grad_(False)
    t = torch.tensor([0.7])
    for location in ("mid.out", "mid.in"):
        cache = encode(unet, _x(), t, location)
        with torch.no_grad():
            full = unet(_x(), t).sample
        assert (decode(unet, cache.h, cache) - full).abs().max() < 1e-5


def test_class_conditional_unets_are_rejected():
    unet = UNet2DModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4,
    )
    with pytest.raises(HspaceError, match="class-conditional"):
        encode(unet, _x(), 1)


def test_forward_mode_routes_around_two_torch_gaps():
    """torch 2.13: fused attention has no forward derivative; group_norm's fails on channels-last views."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unet = tiny_unet().eval().requires_grad_(False)
    for location, context, error in (("mid.out", None, "forward AD"), ("mid.in", SDPBackend.MATH, "view size")):
        cache = encode(unet, _x(), 500, location)
        h = cache.h.repeat(2, 1, 1, 1)  # batch 1 happens to dodge the group_norm gap
        jvp = lambda: torch.func.jvp(lambda x: decode(unet, x, cache), (h,), (torch.ones_like(h),))  # noqa: E731
        with pytest.raises((NotImplementedError, RuntimeError), match=error):
            if context is None:
                jvp()
            else:
                with sdpa_kernel(context):
                    jvp()
        with forward_mode(unet):
            assert torch.isfinite(jvp()[1]).all()
        assert hook_count(unet) == 0


@pytest.mark.parametrize("batching", ["vmap", "repeat"])
@pytest.mark.parametrize("location", ["mid.out", "mid.in"])
def test_decoder_products_equal_full_unet_products(location, batching):
    """J v (eq. 8) and J^T u (eq. 9) of the decoder half equal those of the whole U-Net with h + delta hooked in."""
    unet = tiny_unet().eval().requires_grad_(False)
    x, t = _x(1), torch.tensor(300)
    cache = encode(unet, x, t, location)
    h = cache.h[0]
    products = JacobianProducts(_decoder(unet, cache), h, batching)
    gen = torch.Generator().manual_seed(0)
    V, U = torch.randn(3, *h.shape, generator=gen), torch.randn(3, 3, 16, 16, generator=gen)

    def full(delta):
        with h_hook(unet, location, lambda hh: hh + delta), forward_mode(unet):
            return unet(x.repeat(delta.shape[0], 1, 1, 1), t).sample

    zero = torch.zeros(3, *h.shape)
    with torch.no_grad():
        JV_full = torch.func.jvp(full, (zero,), (V,))[1]
    _, vjp = torch.func.vjp(full, zero)
    (JtU_full,) = vjp(U)
    assert (products.jvp(V) - JV_full).abs().max() < 1e-5
    assert (products.vjp(U) - JtU_full).abs().max() < 1e-5
    assert hook_count(unet) == 0


# ------------------------------------------------------------------ x_t


def test_x_t_replays_what_sampling_saw(engine, trajectory):
    n = trajectory.num_steps
    assert torch.equal(engine.x_t(trajectory, 0), trajectory.x_T)
    assert (engine.x_t(trajectory, n) - trajectory.x0).abs().max() < 1e-6
    tolerance = composition_tolerance(engine, trajectory)  # batches of 2 and 1 here, of 3 when sampled (conftest)
    for step in (1, n - 1):
        x_t = engine.x_t(trajectory, step, batch_size=2)
        for b in range(len(trajectory)):
            cache = encode(engine.unet, x_t[b : b + 1], int(trajectory.timesteps[step]), engine.h_location)
            assert (cache.h[0] - trajectory.h[b, step]).abs().max() < tolerance
    for bad in (-1, n + 1, 1.5):
        with pytest.raises(HspaceError, match=f"from 0 to {n}"):
            engine.x_t(trajectory, bad)


def test_finish_from_x_t_with_the_rest_of_the_noise_ends_at_the_sample(engine, trajectory):
    n, eta = trajectory.num_steps, trajectory.eta
    noise = trajectory.noise()
    tolerance = composition_tolerance(engine, trajectory)  # batches of 2 here, of 3 when sampled (conftest)
    for step in (0, 1, n - 1):
        x0 = engine.finish(engine.x_t(trajectory, step), step, n, eta, noise[:, step:], batch_size=2)
        assert (x0 - trajectory.x0).abs().max() < tolerance
    for bad in (-1, n, 1.5):
        with pytest.raises(HspaceError, match=f"from 0 to {n - 1}"):
            engine.finish(trajectory.x_T, bad, n, eta, noise)


# ------------------------------------------------------------------ subspace iteration vs the explicit SVD


def test_alg1_matches_the_explicit_svd(point):
    cache, f, svd = point
    result = subspace_iteration(f, cache.h[0], K, generator=torch.Generator().manual_seed(0), oversample=K)
    _assert_matches(result, svd)
    assert result.converged and len(result.iterations) == 1 and 1 < result.iterations[0] < 50


def test_alg2_matches_the_explicit_svd(point):
    cache, f, svd = point
    result = sequential_subspace_iteration(f, cache.h[0], K, 2, generator=torch.Generator().manual_seed(0), oversample=2)
    _assert_matches(result, svd)
    assert result.converged and len(result.iterations) == 2 and all(1 < i < 50 for i in result.iterations)


@pytest.mark.parametrize("sequential", [False, True])
def test_paper_algorithms_without_oversampling_on_a_decaying_spectrum(sequential):
    """Alg. 1 / Alg. 2 exactly as printed (no oversampling) on a linear map of known spectrum."""
    gen = torch.Generator().manual_seed(0)
    Qu, _ = torch.linalg.qr(torch.randn(300, 40, generator=gen))
    Qv, _ = torch.linalg.qr(torch.randn(200, 40, generator=gen))
    S = 0.7 ** torch.arange(40.0)
    A = (Qu * S) @ Qv.T
    f = lambda h: h.flatten(1) @ A.T  # noqa: E731
    h = torch.zeros(2, 10, 10)
    if sequential:
        result = sequential_subspace_iteration(f, h, 5, 2, generator=gen, tol=1e-7, max_iter=200)
    else:
        result = subspace_iteration(f, h, 5, generator=gen, tol=1e-7, max_iter=200)
    assert result.converged and max(result.iterations) < 200
    assert torch.allclose(result.S, S[:5], rtol=1e-4)
    cos = (result.V.flatten(1) @ Qv[:, :5]).diagonal().abs()
    assert cos.min() > 0.999
    stopped_early = subspace_iteration(f, h, 5, generator=gen, tol=1e-7, max_iter=3)
    assert not stopped_early.converged and stopped_early.iterations == [3]
    # tol = 0 is fixed work: exactly max_iter iterations even where the values stopped changing long before.
    events = []
    fixed = subspace_iteration(f, h, 5, generator=gen, tol=0, max_iter=250, callback=events.append)
    assert fixed.iterations == [250] and len(events) == 250 and events[-1]["change"] == 0.0
    assert torch.allclose(fixed.S, S[:5], rtol=1e-4)


def test_masked_directions_match_the_masked_jacobian(engine, trajectory, point):
    cache, _, _ = point
    mask = torch.zeros(16, 16)
    mask[3:9, 4:12] = 1.0
    masked_svd = _explicit_svd(_decoder(engine.unet, cache, mask), cache.h[0])
    (result,) = jacobian_directions(
        engine, trajectory, sample=0, steps=[STEP], k=K, mask=mask, mask_name="eyes", generator=torch.Generator().manual_seed(1)
    )
    _assert_matches(result.svd, masked_svd)
    assert (result.svd.U.abs().sum((0, 1)) * (1 - mask)).max() < 1e-6  # the output change lies inside the mask
    h_norm = float(cache.h.norm())
    assert result.step == STEP and result.timestep == int(trajectory.timesteps[STEP])
    assert result.h_norm == pytest.approx(h_norm, rel=1e-5)
    d = result.directions[0]
    assert isinstance(d, Direction) and d.delta.shape == (1, *engine.h_shape)
    assert float(d.norms()[0]) == pytest.approx(h_norm, rel=1e-4)
    assert d.meta["name"] == f"j{STEP}_0" and d.meta["method"] == "jacobian" and d.spec.h_location == "mid.out"
    p = d.meta["params"]
    assert p["step"] == STEP and p["index"] == 0 and p["seed"] == trajectory.seeds[0] and p["mask"] == "eyes"
    assert p["singular_value"] == pytest.approx(float(masked_svd[1][0]), rel=1e-3) and p["iterations"]
    # a direction found at one step edits every step (Sec. 4.2)
    edited = engine.replay(trajectory[[1]], d, scale=0.5)
    assert not torch.allclose(edited.x0, trajectory.x0[1:])


# ------------------------------------------------------------------ errors


def test_bad_arguments_name_the_value(engine, trajectory, point):
    cache, f, _ = point
    h = cache.h[0]
    for k in (0, 2049, 2.0):
        with pytest.raises(HspaceError, match="k .*from 1 to dim h = 2048"):
            subspace_iteration(f, h, k)
    for b in (0, 5, None):
        with pytest.raises(HspaceError, match="mini-batch size b .*from 1 to k=4"):
            sequential_subspace_iteration(f, h, 4, b)
    with pytest.raises(HspaceError, match="V0 has shape"):
        subspace_iteration(f, h, 4, V0=torch.randn(3, 2048))
    with pytest.raises(HspaceError, match="oversample"):
        subspace_iteration(f, h, 4, oversample=-1)
    for step in (-1, 6):
        with pytest.raises(HspaceError, match="step must be an integer from 0 to 5 .the trajectory has 6 steps."):
            jacobian_directions(engine, trajectory, steps=[step])
    for mask in (torch.ones(8, 8), torch.ones(2, 16, 16), torch.zeros(16, 16)):
        with pytest.raises(HspaceError, match="mask"):
            jacobian_directions(engine, trajectory, steps=[1], mask=mask)
    with pytest.raises(HspaceError, match="method"):
        jacobian_directions(engine, trajectory, steps=[1], method="power")
    with pytest.raises(HspaceError, match="mini-batch size b"):
        jacobian_directions(engine, trajectory, steps=[1], method="sequential")
    with pytest.raises(HspaceError, match="index 7 out of range"):
        jacobian_directions(engine, trajectory, sample=7, steps=[1])
    with pytest.raises(HspaceError, match="valid: \\[k, 32, 8, 8\\]"):
        decode(engine.unet, torch.zeros(2, 16, 8, 8), cache)
    with pytest.raises(HspaceError, match="unknown h location"):
        encode(engine.unet, _x(), 1, "mid")


def test_restrict_to_region_keeps_the_cells_over_the_mask_and_the_norm():
    from hspace.directions.jacobian import restrict_to_region

    d = Direction(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), meta={"name": "j"}, spec=FREE)
    mask = torch.zeros(16, 16)
    mask[2:6, 9:12] = 1  # pixels 2..5 x 9..11 -> cells 1..2 x 4..5 of the 8x8 grid
    r = restrict_to_region(d, mask)
    kept = torch.zeros(8, 8, dtype=torch.bool)
    kept[1:3, 4:6] = True
    assert torch.equal(r.delta[:, :, ~kept], torch.zeros_like(r.delta[:, :, ~kept]))
    assert torch.allclose(r.delta[:, :, kept] * d.delta[:, :, kept].norm() / d.delta.norm(), d.delta[:, :, kept], atol=1e-6)
    assert float(r.delta.norm()) == pytest.approx(float(d.delta.norm()), rel=1e-5)
    assert r.meta["params"]["h_cells"] == 4 and r.name == "j-cells"
    with pytest.raises(HspaceError, match="lies over none of h's 8x8 cells"):
        restrict_to_region(d, torch.zeros(16, 16))
