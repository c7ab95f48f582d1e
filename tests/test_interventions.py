"""The intervention API of Engine.run: custom interventions, recording, errors that leave no hook."""

import pytest
import torch

from conftest import composition_tolerance
from hspace import HspaceError
from hspace.hooks import hook_count
from hspace.interventions import LinearEdit, Record, StepContext


def test_a_custom_recording_intervention_equals_the_built_in_recording(engine, trajectory):
    seen = {}

    def record(h, ctx: StepContext):
        assert isinstance(ctx, StepContext) and ctx.num_steps == 6 and ctx.num_samples == 3
        for row, value in zip(ctx.rows.tolist(), h):
            seen[(row, ctx.step)] = value.clone()
        return h

    replay = engine.replay(trajectory, interventions=[record], record_h=True, batch_size=2)
    tolerance = composition_tolerance(engine, trajectory)  # (conftest: measured on this machine, with a margin)
    assert sorted(seen) == [(b, i) for b in range(3) for i in range(6)]
    for (b, i), value in seen.items():
        assert torch.equal(value, replay.h[b, i])  # the same run: exactly
        assert (value - trajectory.h[b, i]).abs().max() <= tolerance  # batches of 2, not 3: float rounding only


def test_a_custom_edit_equals_the_built_in_linear_edit(engine, trajectory):
    delta = torch.randn(6, *engine.h_shape)
    built_in = engine.replay(trajectory, delta, scale=0.5).x0
    custom = engine.replay(trajectory, interventions=[lambda h, ctx: h + 0.5 * delta[ctx.step]]).x0
    assert torch.equal(custom, built_in)
    edit = LinearEdit(delta[None], torch.full((3, 1), 0.5))
    assert torch.equal(engine.replay(trajectory, interventions=[edit]).x0, built_in)


def test_run_with_a_record_equals_sampling(engine, trajectory):
    record = Record()
    x0 = engine.run(trajectory.x_T, 6, trajectory.eta, noise=trajectory.z, interventions=[record])
    assert torch.equal(x0, trajectory.x0) and torch.equal(record.h, trajectory.h)


def test_an_intervention_that_raises_leaves_no_hook(engine, trajectory):
    def boom(h, ctx):
        if ctx.step == 3:
            raise RuntimeError("intervention failed")
        return h

    with pytest.raises(RuntimeError, match="intervention failed"):
        engine.replay(trajectory, interventions=[boom])
    assert hook_count(engine.unet) == 0
    with pytest.raises(HspaceError, match=r"must return h of shape \(3, 32, 8, 8\)"):
        engine.replay(trajectory, interventions=[lambda h, ctx: h[:1]])
    assert hook_count(engine.unet) == 0
    assert torch.equal(engine.replay(trajectory).x0, engine.replay(trajectory).x0)


def test_source_rows_replay_repeated_samples(engine, trajectory):
    replay = engine.replay(trajectory, source=[2, 0, 2])
    assert replay.seeds == [42, 3, 42]
    assert (replay.x0 - trajectory.x0[[2, 0, 2]]).abs().max() <= composition_tolerance(engine, trajectory)  # other rows together
    with pytest.raises(HspaceError, match="source indices must lie in 0..2"):
        engine.replay(trajectory, source=[3])


def test_clean_eps_pass_runs_a_second_pass_only_where_an_intervention_edits(engine, trajectory):
    events = []
    window = (int(trajectory.timesteps[2]), 0)  # steps 2..5
    engine.replay(trajectory, torch.randn(6, *engine.h_shape), window=window, eps_pass="clean", callback=events.append)
    assert [e.done for e in events] == [3, 6, 12, 18, 24, 30]  # 3 samples; two passes from step 2 on
    with pytest.raises(HspaceError, match="unknown eps_pass 'both'"):
        engine.replay(trajectory, eps_pass="both")


def test_sample_takes_interventions_like_run(engine, trajectory):
    """An edit while sampling equals the same edit replayed from the unedited samples (same x_T and z, same
    batches: exactly), and the recorded h is h after the edit."""
    delta = torch.randn(6, *engine.h_shape, generator=torch.Generator().manual_seed(4))
    edit = LinearEdit(delta[None], torch.full((3, 1), 0.5))
    edited = engine.sample(trajectory.seeds, 6, 1.0, interventions=[edit])
    replayed = engine.replay(trajectory, interventions=[edit], record_h=True)
    assert torch.equal(edited.x0, replayed.x0) and torch.equal(edited.h, replayed.h)
    assert not torch.equal(edited.x0, trajectory.x0)


def test_an_edit_of_fewer_steps_than_the_run_is_a_clear_error(engine, trajectory):
    from hspace.interventions import LinearEdit

    edit = LinearEdit(torch.zeros(1, 3, *engine.h_shape), torch.ones(len(trajectory), 1))
    with pytest.raises(HspaceError, match="LinearEdit holds 3 steps, but this run has 6; resample its directions"):
        engine.run(trajectory.x_T, trajectory.num_steps, 1.0, noise=engine.noise_of(trajectory, torch.arange(len(trajectory))),
                   interventions=[edit], progress=False)
