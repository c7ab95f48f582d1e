"""Progress: one typed event, counted in U-Net passes, for every long operation; bars can be turned off."""

import torch

from hspace.directions.jacobian import jacobian_directions
from hspace.inversion import invert
from hspace.progress import IterationEvent, Meter, StepEvent, progress_enabled


def test_events_count_u_net_passes_to_the_announced_total(engine, trajectory):
    events = []
    engine.sample([1, 2, 3], num_steps=4, batch_size=2, callback=events.append)
    assert all(isinstance(e, StepEvent) for e in events)
    assert [e.done for e in events] == [2, 4, 6, 8, 9, 10, 11, 12] and {e.total for e in events} == {12}
    assert [e.rows.tolist() for e in events[:1] + events[4:5]] == [[0, 1], [2]]
    last = events[3]
    assert last.x_next.shape == (2, *engine.sample_shape) and last.step == 3 and last.timestep == 0

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    events.clear()
    invert(engine, images, 4, 1.0, callback=events.append)
    # the deterministic last step (1 + 3 fixed-point passes), 3 DDPM steps, the replay that records h
    assert events[-1].done == events[-1].total == 2 * ((1 + 3) + 3 + 4)


def test_jacobian_reports_iterations_and_ends_at_its_total(engine, trajectory):
    events = []
    jacobian_directions(engine, trajectory, 0, 2, 2, max_iter=5, generator=torch.Generator().manual_seed(0), callback=events.append)
    assert events and all(isinstance(e, IterationEvent) and e.step == 2 for e in events)
    assert events[0].done == 2 * (2 + 2)  # a JVP and a VJP per vector (k = 2, oversampled by 2)


def test_nested_jobs_share_the_outer_meter():
    seen = []
    with Meter.job(seen.append, 10, progress=False) as outer:
        with Meter.job(outer, 999, progress=False) as inner:
            assert inner is outer
            inner.emit(IterationEvent, 4, stage="s", step=0, iteration=1, max_iter=1, change=0.0, block=0, num_blocks=1)
    assert seen[0].done == 4 and seen[0].total == 10


def test_progress_switch(monkeypatch, capsys, engine):
    monkeypatch.setenv("HSPACE_NO_PROGRESS", "1")
    assert not progress_enabled(None) and progress_enabled(True)
    monkeypatch.setenv("HSPACE_NO_PROGRESS", "0")
    assert progress_enabled(None) and not progress_enabled(False)
    engine.sample([1], num_steps=2, progress=True)
    assert "sampling" in capsys.readouterr().err
    engine.sample([1], num_steps=2, progress=False)
    assert capsys.readouterr().err == ""
