"""Sampling, replay, edits, swap and hooks of the Engine, on a tiny random U-Net."""

import pytest
import torch
from diffusers import DDIMScheduler

from hspace import Direction, HspaceError
from hspace.hooks import hook_count
from hspace.trajectory import seeded_noise

from conftest import composition_tolerance, tiny_engine


def test_sampling_matches_a_plain_diffusers_loop(engine):
    """Our eq. 2 loop equals DDIMScheduler.step driven by the same U-Net and the same noise."""
    steps, seeds = 5, [7, 8]
    for eta in (0.0, 1.0):
        traj = engine.sample(seeds, steps, eta=eta)
        scheduler = DDIMScheduler.from_config({k: v for k, v in engine.scheduler_config.items() if not k.startswith("_")})
        scheduler.set_timesteps(steps)
        x = traj.x_T.clone()
        z = traj.noise()
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                eps = engine.unet(x, t).sample
                x = scheduler.step(eps, t, x, eta=eta, variance_noise=z[:, i]).prev_sample
        assert (x - traj.x0).abs().max().item() <= 1e-5


@pytest.mark.parametrize("eta", [1.0, 0.0, [1, 0, 0.5, 1, 0, 1]])
def test_zero_delta_replay_reproduces_x0(engine, eta):
    traj = engine.sample([3, 11], num_steps=6, eta=eta)
    replayed = engine.replay(traj, torch.zeros(6, *engine.h_shape))
    assert torch.equal(replayed.x0, traj.x0)  # the same batch, h + 0: exactly
    edited = engine.replay(traj, torch.randn(6, *engine.h_shape))
    assert (edited.x0 - traj.x0).abs().max().item() > 1e-2


def test_replay_regenerates_noise_from_seeds(engine):
    traj = engine.sample([5, 6], num_steps=4, eta=1.0, keep_noise=False)
    assert traj.z is None
    assert torch.equal(engine.replay(traj).x0, traj.x0)  # the same noise, the same batch: exactly


def test_recorded_h_is_the_bottleneck_activation(engine, trajectory):
    """h recorded at mid.out equals the mid block's output seen by an independent hook."""
    engine.h_shape
    seen = []
    handle = engine.unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        engine.replay(trajectory)
    finally:
        handle.remove()
    assert torch.allclose(torch.stack(seen, 1), trajectory.h, atol=1e-6)
    assert trajectory.h.shape == (3, 6, *engine.h_shape)


def test_mid_in_location_records_the_mid_block_input():
    engine = tiny_engine("mid.in")
    engine.h_shape  # the shape probe is a U-Net pass of its own
    seen = []
    handle = engine.unet.mid_block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        traj = engine.sample([1], num_steps=3, eta=0.0)
    finally:
        handle.remove()
    assert torch.allclose(torch.stack(seen, 1), traj.h, atol=1e-6)
    delta = torch.randn(3, *engine.h_shape)
    edited = engine.replay(traj, delta, record_h=True)
    # step 0 sees the same x_T, so its edited h is exactly h + delta
    assert torch.allclose(edited.h[0, 0], traj.h[0, 0] + delta[0], atol=1e-5)


def test_injection_adds_delta_at_every_step(engine, trajectory):
    delta = torch.randn(6, *engine.h_shape)
    edited = engine.replay(trajectory, delta, scale=0.5, record_h=True)
    assert torch.allclose(edited.h[:, 0], trajectory.h[:, 0] + 0.5 * delta[0], atol=1e-5)
    assert not torch.allclose(edited.h[:, 1], trajectory.h[:, 1] + 0.5 * delta[1], atol=1e-3)  # x_t moved


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_batched_sampling_equals_per_seed_sampling(dtype, tol):
    """Same noise bit for bit; x_0 equal up to the float rounding of batched convolutions."""
    engine = tiny_engine(dtype=dtype)
    seeds = [0, 9, 123456789]
    batch = engine.sample(seeds, num_steps=5, eta=1.0)
    for b, seed in enumerate(seeds):
        alone = engine.sample([seed], num_steps=5, eta=1.0)
        assert torch.equal(alone.x_T[0], batch.x_T[b]) and torch.equal(alone.z[0], batch.z[b])
        assert (alone.x0[0] - batch.x0[b]).abs().max().item() <= tol
        assert (alone.h[0] - batch.h[b]).abs().max().item() <= tol * 10


def test_five_hundred_seeds_give_five_hundred_distinct_x_T():
    x_T = torch.stack([seeded_noise(s, (3, 4, 4), 1)[0] for s in range(500)]).flatten(1)
    assert len(torch.unique(x_T, dim=0)) == 500


def test_seeds_do_not_touch_the_global_rng(engine):
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    engine.sample([4], num_steps=2)
    assert torch.equal(torch.rand(3), expected)


def test_x_T_does_not_depend_on_the_number_of_steps():
    assert torch.equal(seeded_noise(5, (3, 4, 4), 10)[0], seeded_noise(5, (3, 4, 4), 50)[0])


def test_asyrp_with_zero_delta_equals_the_plain_process(engine, trajectory):
    zero = torch.zeros(6, *engine.h_shape)
    assert torch.equal(engine.replay(trajectory, zero, eps_pass="clean").x0, engine.replay(trajectory).x0)
    delta = torch.randn(6, *engine.h_shape)
    single = engine.replay(trajectory, delta).x0
    asyrp = engine.replay(trajectory, delta, eps_pass="clean").x0
    assert (single - asyrp).abs().max().item() > 1e-3


def test_edit_batches_equal_single_replays(engine, trajectory):
    directions = [Direction(torch.randn(6, *engine.h_shape), meta={"name": n}, spec=engine.spec) for n in "ab"]
    scales = [-1.0, 0.0, 2.0]
    images = engine.edit(trajectory, directions, scales, batch_size=4).images  # chunks split the 18 items unevenly
    assert images.shape == (2, 3, 3, 3, 16, 16)
    tolerance = composition_tolerance(engine, trajectory)  # batches of 4 mixed rows vs batches of 3 (conftest)
    for d, direction in enumerate(directions):
        for s, scale in enumerate(scales):
            single = engine.replay(trajectory, direction, scale=scale).x0
            assert (images[d, s] - single).abs().max().item() <= tolerance
    assert (images[0, 1] - trajectory.x0).abs().max().item() <= tolerance


def test_edit_window_leaves_earlier_steps_alone(engine, trajectory):
    timesteps = trajectory.timesteps.tolist()  # 6 steps: 834, 667, ...
    window = (timesteps[3], 0)
    delta = torch.randn(6, *engine.h_shape)
    edited = engine.replay(trajectory, delta, window=window, record_h=True)
    assert torch.allclose(edited.h[:, :3], trajectory.h[:, :3], atol=1e-5)
    assert torch.allclose(edited.h[:, 3], trajectory.h[:, 3] + delta[3], atol=1e-5)
    with pytest.raises(HspaceError, match=r"window \(5, 1\) contains no step"):
        engine.replay(trajectory, delta, window=(5, 1))
    with pytest.raises(HspaceError, match="larger timestep to the smaller"):
        engine.replay(trajectory, delta, window=(0, 500))


def test_swap_replaces_h_and_keeps_the_noise(engine, trajectory):
    a, b = trajectory[[0, 1]], trajectory[[2, 1]]
    swapped = engine.swap(a, b)
    assert torch.allclose(swapped.h, b.h, atol=1e-6)
    assert torch.equal(swapped.x_T, a.x_T)
    # own h: unchanged (a batch of 2 replayed, of 3 drawn: within the composition tolerance, conftest)
    assert (swapped.x0[1] - trajectory.x0[1]).abs().max().item() <= composition_tolerance(engine, trajectory)
    assert (swapped.x0[0] - trajectory.x0[0]).abs().max().item() > 1e-2
    with pytest.raises(HspaceError, match="2 samples vs 1 donors"):
        engine.swap(a, b[[0]])


def test_vector_arithmetic_direction(engine, trajectory):
    from hspace.directions.supervised import mean_difference

    direction = mean_difference(trajectory[[0]], trajectory[[1]])
    assert torch.allclose(direction.delta, trajectory.h[0] - trajectory.h[1], atol=1e-6)
    # adding h(0) - h(1) to sample 1 at step 0 gives exactly h(0) there
    edited = engine.replay(trajectory[[1]], direction, record_h=True)
    assert torch.allclose(edited.h[0, 0], trajectory.h[0, 0], atol=1e-5)


def test_no_hook_remains_after_an_edit_that_raised(engine, trajectory):
    before = hook_count(engine.unet)

    def boom(event):
        if event.step == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        engine.replay(trajectory, torch.randn(6, *engine.h_shape), callback=boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.sample([1], num_steps=6, callback=boom)
    assert hook_count(engine.unet) == before == 0
    assert torch.equal(engine.replay(trajectory).x0, trajectory.x0)


def test_unknown_h_location_lists_the_valid_ones():
    with pytest.raises(HspaceError, match=r"unknown h location 'mid\.middle' for this UNet2DModel; valid: mid\.out, mid\.in"):
        tiny_engine("mid.middle")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seeds": [-1]}, "seed must be an integer from 0 to 2..63-1, got -1"),
        ({"seeds": ["a"]}, "seed must be an integer from 0 to 2..63-1, got 'a'"),
        ({"seeds": []}, "seeds is empty"),
        ({"seeds": [1], "eta": [1, 0]}, "eta has 2 values but the process has 3 steps"),
        ({"seeds": [1], "num_steps": 0}, "got 0"),
        ({"seeds": [1], "batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_sampling_input(engine, kwargs, message):
    kwargs = {"num_steps": 3, **kwargs}
    with pytest.raises(HspaceError, match=message):
        engine.sample(**kwargs)


def test_bad_delta_shape_names_the_valid_shapes(engine, trajectory):
    with pytest.raises(HspaceError, match=r"delta has shape \(5, 32, 8, 8\); valid: \(6, 32, 8, 8\) or \(3, 6, 32, 8, 8\)"):
        engine.replay(trajectory, torch.zeros(5, 32, 8, 8))


def test_trajectory_from_another_engine_is_rejected(trajectory):
    other = tiny_engine("mid.in")
    with pytest.raises(HspaceError, match="made by a different engine"):
        other.replay(trajectory)


def test_trajectory_indexing_and_save_load(tmp_path, trajectory):
    from hspace import Trajectory

    path = tmp_path / "t.safetensors"
    trajectory.save(path)
    loaded = Trajectory.load(path)
    assert loaded.seeds == trajectory.seeds and loaded.spec == trajectory.spec
    for name in ("x_T", "x0", "h", "z", "timesteps", "eta"):
        assert torch.equal(getattr(loaded, name), getattr(trajectory, name))
    one = trajectory[1]
    assert one.seeds == [11] and one.h.shape[0] == 1
    with pytest.raises(HspaceError, match="index 3 out of range"):
        trajectory[3]
