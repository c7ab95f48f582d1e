"""Real images into trajectories (paper Sec. 5.2, Fig. 12): DDIM inversion and edit-friendly DDPM inversion.

``invert(engine, images, num_steps, eta)`` returns a Trajectory whose replay reproduces the images,
with h recorded at every step, so that any direction can edit them like a generated sample.

- Steps with sigma_t > 0 (eta_t > 0): edit-friendly DDPM inversion (Huberman-Spiegelglas et al.,
  2023). The state after such a step is drawn as sqrt(a_{t-1}) x_0 + sqrt(1 - a_{t-1}) n with fresh
  noise n, and z_t is solved so that the generative step lands on it exactly:
  z_t = (x_{t-1} - mu_t(x_t)) / sigma_t, mu_t the deterministic part of eq. 2.
- Steps with sigma_t = 0 (eta_t = 0, and the last step of schedules whose final a is 1) are
  deterministic; the final run of them is inverted backward from x_0 by DDIM inversion: x_t =
  sqrt(a_t) P + sqrt(1 - a_t) eps with P from x_{t-1} and eps = eps(x_t, t), solved by fixed-point
  iteration starting from eps(x_{t-1}, t) (``fixed_point_iterations`` = 0 is the classic DDIM
  inversion). A schedule of only eta = 0 is plain DDIM inversion; any schedule whose final
  deterministic run is short (the last step, for eta = 1) reconstructs the image to float precision.

The trajectory stores x_T and z (its seeds are -1: it did not come from a seed), and x_0 of its
replay (the reconstruction). Images must match the model's size and channels (``prepare_images``
resizes on request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .diffusion import eta_schedule
from .validate import check_batch_size
from .errors import HspaceError
from .validate import check_int
from .progress import Meter, StepEvent
from .trajectory import Trajectory


def image_tensor(image, size: tuple[int, int], resize: bool = False, what: str = "the image") -> torch.Tensor:
    """A PIL image as [3, H, W] in [-1, 1] at ``size`` (centre-cropped and resized when ``resize``)."""
    import numpy as np
    from PIL import Image

    if image.mode not in ("RGB", "RGBA", "L"):
        raise HspaceError(f"{what} has mode {image.mode!r}; valid: RGB, RGBA or L (grayscale)")
    image = image.convert("RGB")
    H, W = size
    if image.size != (W, H):
        if not resize:
            raise HspaceError(
                f"{what} is {image.size[0]}x{image.size[1]} px, the model takes {W}x{H}; resize it (or pass --resize to centre-crop and resize)"
            )
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((W, H), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def load_images(paths: Sequence[str | Path], size: tuple[int, int], resize: bool = False) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] from files. A file of another size is an error unless ``resize``:
    then it is centre-cropped to a square and resized (bicubic) to ``size``."""
    from PIL import Image

    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise HspaceError(f"image {str(path)!r} does not exist")
        try:
            image = Image.open(path)
            image.load()
        except Exception as e:
            raise HspaceError(f"{str(path)!r} is not an image PIL can read: {e}") from None
        out.append(image_tensor(image, size, resize, repr(str(path))))
    return torch.stack(out)


def _check_images(engine, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HspaceError(f"images must be a tensor [N, 3, H, W] in [-1, 1], got {got}")
    if images.min() < -1.0001 or images.max() > 1.0001:
        raise HspaceError(f"images must lie in [-1, 1], got values from {float(images.min()):.3g} to {float(images.max()):.3g}")
    x0 = engine.encode(images.float())
    if tuple(x0.shape[1:]) != engine.sample_shape:
        raise HspaceError(
            f"images of size {tuple(images.shape[2:])} give x_0 of shape {tuple(x0.shape[1:])}; the model samples {engine.sample_shape}"
        )
    return x0


def invert(
    engine,
    images: torch.Tensor,
    num_steps: int = 50,
    eta: float | Sequence[float] = 0.0,
    *,
    seed: int = 0,
    fixed_point_iterations: int = 3,
    batch_size: int = 16,
    callback: Callable | None = None,
    progress: bool | None = None,
) -> Trajectory:
    """Trajectories whose generative process (``num_steps`` steps, ``eta`` per step) reproduces ``images``.

    ``seed`` seeds the fresh noise of the DDPM steps (a CPU generator of its own); h is recorded by a
    replay at the end, which also gives x_0 (check ``(trajectory.images - images).abs().max()``).
    """
    check_int("fixed_point_iterations", fixed_point_iterations, 0, valid="an integer >= 0")
    check_batch_size(batch_size)
    x0_all = _check_images(engine, images)
    schedule = engine.schedule(num_steps)
    eta_t = eta_schedule(eta, num_steps)
    sigma = schedule.sigma(eta_t)
    stochastic = (sigma > 0).nonzero()
    last = int(stochastic[-1]) if len(stochastic) else -1  # the last step with sigma > 0
    generator = torch.Generator().manual_seed(int(seed))
    n, T = len(x0_all), num_steps
    total = n * ((T - 1 - last) * (1 + fixed_point_iterations) + (last + 1) + T)  # + the replay that records h
    x_Ts, zs = [], []
    with Meter.job(callback, total, progress, "inversion") as meter:
        for start in range(0, n, batch_size):
            x0 = x0_all[start : start + batch_size].to(engine.device)
            with torch.no_grad():
                # Backward from x_0 through the final run of deterministic steps (all of them for pure DDIM).
                target = x0
                for i in range(T - 1, last, -1):
                    target = _invert_step(engine, schedule, i, target, float(sigma[i]), fixed_point_iterations, meter)
                x_T, z = _invert_stochastic(engine, schedule, sigma, last, x0, target, generator, meter)
            x_Ts.append(x_T.cpu())
            zs.append(z)
        x_T, z = torch.cat(x_Ts), torch.cat(zs)
        spec = engine.spec.with_process(T, eta_t.tolist(), schedule.timesteps)
        draft = Trajectory([-1] * n, x_T.to(torch.float32), x0_all.to(torch.float32), spec, z=z.float())
        return engine.replay(draft, record_h=True, batch_size=batch_size, callback=meter)


def _invert_stochastic(engine, schedule, sigma, last: int, x0, target, generator, meter: Meter):
    """x_T and z of the steps up to ``last`` (edit-friendly DDPM inversion), landing on ``target`` there."""
    z = torch.zeros(len(x0), schedule.num_steps, *engine.sample_shape, dtype=engine.compute_dtype)
    if last < 0:
        return target, z
    x_T = schedule.noised(0, x0, _noise(generator, x0))
    x = x_T
    for i in range(last + 1):
        t = schedule.t(i)
        p, eps = schedule.split_output(i, x, engine.model_output(x, t))
        s = float(sigma[i])
        mu = schedule.step(i, x, p, eps, s, torch.zeros_like(x))
        following = mu
        if s > 0:
            if i == last:
                goal = target
            else:
                goal = float(schedule.alpha_prev[i]) ** 0.5 * x0 + float(schedule.var_prev[i]) ** 0.5 * _noise(generator, x0)
            z[:, i] = ((goal - mu) / s).cpu()
            following = schedule.step(i, x, p, eps, s, z[:, i].to(x.device))
        meter.emit(StepEvent, len(x), **_event(schedule, i, x, p, following))
        x = following
    return x_T, z


def _event(schedule, i: int, x, p, following) -> dict:
    return dict(stage="inversion", step=i, num_steps=schedule.num_steps, timestep=schedule.t(i),
                rows=torch.arange(len(x)), x_t=x, x0_pred=p, x_next=following)


def _noise(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _invert_step(engine, schedule, i: int, x_prev: torch.Tensor, sigma: float, iterations: int, meter: Meter) -> torch.Tensor:
    """x_t with step i (deterministic, sigma = 0) taking x_t to ``x_prev``: DDIM inversion, refined by fixed point."""
    if sigma > 0:
        raise HspaceError(f"step {i} is not deterministic (sigma = {sigma:.3g})")
    t = schedule.t(i)
    a, ap = float(schedule.alpha[i]), float(schedule.alpha_prev[i])
    v, vp = float(schedule.var[i]), float(schedule.var_prev[i])
    _, eps = schedule.split_output(i, x_prev, engine.model_output(x_prev, t))  # eps at x_{t-1}: classic DDIM inversion
    for k in range(iterations + 1):
        p = (x_prev - vp**0.5 * eps) / ap**0.5
        x_t = a**0.5 * p + v**0.5 * eps
        if k < iterations:
            _, eps = schedule.split_output(i, x_t, engine.model_output(x_t, t))
    meter.emit(StepEvent, len(x_t) * (1 + iterations), **_event(schedule, i, x_t, p, x_prev))
    return x_t
