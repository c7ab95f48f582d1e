"""The generative step (paper eq. 2-5) against diffusers' DDIMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler

from hspace.diffusion import Schedule, eta_schedule
from hspace.errors import HspaceError
from hspace.loading import CELEBAHQ_SCHEDULER_CONFIG


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_ddim_scheduler(eta, clip, prediction_type):
    config = {**CELEBAHQ_SCHEDULER_CONFIG, "clip_sample": clip, "prediction_type": prediction_type}
    num_steps = 10
    schedule = Schedule.from_config(config, num_steps)
    reference = DDIMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    reference.set_timesteps(num_steps)
    assert torch.equal(schedule.timesteps, reference.timesteps.long())
    sigma = schedule.sigma(torch.full((num_steps,), eta))
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(reference.timesteps):
        x_t = torch.randn(2, 3, 8, 8, generator=g)
        out = torch.randn(2, 3, 8, 8, generator=g) * 1.5
        z = torch.randn(2, 3, 8, 8, generator=g)
        expected = reference.step(out, t, x_t, eta=eta, variance_noise=z).prev_sample
        p, eps = schedule.split_output(i, x_t, out)
        got = schedule.step(i, x_t, p, eps, float(sigma[i]), z)
        assert (got - expected).abs().max().item() <= 1e-5, (i, int(t))
        # eq. 5 against the scheduler's own variance
        variance = reference._get_variance(t, t - 1000 // num_steps)
        assert abs(float(sigma[i]) - eta * float(variance) ** 0.5) < 1e-6


def test_eta_zero_step_is_deterministic_and_needs_no_noise():
    schedule = Schedule.from_config(CELEBAHQ_SCHEDULER_CONFIG, 5)
    x = torch.randn(1, 3, 4, 4)
    p, eps = schedule.split_output(0, x, torch.randn(1, 3, 4, 4))
    a = schedule.step(0, x, p, eps, 0.0, None)
    assert torch.equal(a, schedule.step(0, x, p, eps, 0.0, torch.randn(1, 3, 4, 4)))
    with pytest.raises(HspaceError, match="no noise"):
        schedule.step(0, x, p, eps, 0.3, None)


def test_eta_schedule_forms_and_errors():
    assert eta_schedule(1.0, 4).tolist() == [1.0] * 4
    assert eta_schedule([0, 1, 0, 1], 4).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert eta_schedule([0.5], 3).tolist() == [0.5] * 3
    with pytest.raises(HspaceError, match="3 values but the process has 4 steps"):
        eta_schedule([0, 1, 0], 4)
    with pytest.raises(HspaceError, match=r"-1\.0"):
        eta_schedule(-1.0, 4)
    with pytest.raises(HspaceError, match="'x'"):
        eta_schedule("x", 4)


@pytest.mark.parametrize("bad", [0, 1001, 2.5, "10"])
def test_bad_num_steps(bad):
    with pytest.raises(HspaceError, match="num_steps must be an integer from 1 to 1000"):
        Schedule.from_config(CELEBAHQ_SCHEDULER_CONFIG, bad)


def test_unknown_prediction_type():
    with pytest.raises(HspaceError, match="'flow'"):
        Schedule.from_config({**CELEBAHQ_SCHEDULER_CONFIG, "prediction_type": "flow"}, 5)
