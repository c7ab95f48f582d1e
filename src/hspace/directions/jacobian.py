"""Image-specific directions: top right singular vectors of J_t = d eps(x_t, h_t) / d h_t (paper Sec. 4.2).

The Jacobian (eq. 6) is never formed. Subspace iteration on J_t^T J_t (Alg. 1; SM Alg. 2 for the
low-memory sequential variant) needs only products: J v by forward-mode differentiation (eq. 8) and
J^T u by a vector-Jacobian product (eq. 9), both for a batch of vectors at once. h feeds only the
decoder half of the U-Net, so eps is differentiated through the engine's ``decoder_half`` (the
encoder half is computed once per (x_t, t)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import HspaceError, check_choice
from ..validate import check_int, is_int
from ..progress import IterationEvent, Meter
from ..files import read_json, read_safetensors, safe_name, save_safetensors, staged_folder, write_json
from .direction import Direction, save_directions, write_result_record

BATCHING = ("vmap", "repeat")
METHODS = ("batched", "sequential")


@dataclass
class SVDResult:
    """k top singular triplets of a Jacobian, vectors as rows: J V[i] = S[i] U[i] (eq. 7)."""

    U: torch.Tensor  # [k, *out_shape] left singular vectors, orthonormal
    S: torch.Tensor  # [k] singular values, descending
    V: torch.Tensor  # [k, *in_shape] right singular vectors, orthonormal
    iterations: list[int] = field(default_factory=list)  # per mini-batch (one for Alg. 1)
    converged: bool = True  # every mini-batch met the tolerance before max_iter


class JacobianProducts:
    """J v (eq. 8) and J^T u (eq. 9) of f at h for a batch of vectors, reusing one forward pass of f.

    ``f`` maps [n, *in_shape] -> [n, *out_shape] row by row. Alg. 1 evaluates y = f(h) once and
    takes every J^T u as the gradient of <u, y>; this keeps that graph. ``batching="vmap"`` keeps it
    at batch 1 and vectorises over the k vectors (torch.func.vmap); the primal of the JVP is then
    computed once, not k times. ``"repeat"`` runs f at h repeated k times (the literal batched
    form; f need not be vmap-able).
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, batching: str = "vmap"):
        check_choice("batching", batching, BATCHING)
        self.f, self.h, self.batching = f, h.detach().contiguous(), batching
        self._graph: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (batch, leaf, y)
        self.out_shape = tuple(self._forward(1)[2].shape[1:])

    def _forward(self, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        if self._graph is None or self._graph[0] != n:
            self._graph = None  # drop the old graph before building the next one
            with torch.enable_grad():
                leaf = self.h.expand(n, *self.h.shape).clone().requires_grad_(True)
                self._graph = (n, leaf, self.f(leaf))
        return self._graph

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V[i] for every row (eq. 8), by forward-mode differentiation. [k, *in] -> [k, *out]."""
        V = V.to(self.h.dtype).contiguous()
        with torch.no_grad():
            if self.batching == "vmap":
                h1 = self.h[None]
                return torch.func.vmap(lambda v: torch.func.jvp(self.f, (h1,), (v[None],))[1][0])(V)
            h_rep = self.h.expand(V.shape[0], *self.h.shape).contiguous()
            return torch.func.jvp(self.f, (h_rep,), (V,))[1]

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """J^T U[i] for every row (eq. 9), the gradient of <U[i], y>. [k, *out] -> [k, *in]."""
        U = U.to(self.h.dtype)
        if self.batching == "vmap":
            _, leaf, y = self._forward(1)
            (g,) = torch.autograd.grad(y, leaf, U[:, None], retain_graph=True, is_grads_batched=True)
            return g[:, 0]
        _, leaf, y = self._forward(U.shape[0])
        (g,) = torch.autograd.grad(y, leaf, U, retain_graph=True)
        return g


def subspace_iteration(
    f: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    k: int,
    V0: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    *,
    oversample: int = 0,
    batching: str = "vmap",
    callback: Callable[[dict], None] | None = None,
) -> SVDResult:
    """Top-k singular values and vectors of df/dh at ``h`` by Jacobian subspace iteration (Alg. 1).

    ``f`` maps a batch [n, *h.shape] -> [n, *out_shape] row by row; ``h`` is one point (no batch
    dimension). All k vectors iterate in one batch: U = J V (eq. 8), V_hat = J^T U (eq. 9),
    V, S^2, _ = SVD(V_hat); stop when the largest relative change of one of the k singular values
    is below ``tol`` or after ``max_iter`` iterations (``tol=0``: exactly ``max_iter``, for equal-work comparisons). ``V0`` [k, *h.shape] is the initial guess
    (default: Gaussian from ``generator``). U is orthonormalised at the end.

    ``oversample`` p > 0 iterates k + p vectors and keeps the top k (not in the paper; the standard
    remedy when s_{k+1} is close to s_k, where the k-th vector converges like (s_{k+p+1}/s_k)^2
    per iteration instead of (s_{k+1}/s_k)^2). ``callback`` gets {"iteration", "max_iter", "change",
    "block", "num_blocks"} after every iteration.
    """
    d = _check_k(k, h)
    _check_iteration(max_iter, tol, oversample)
    products = JacobianProducts(f, h, batching)
    V = _initial(V0, k, h, generator, "V0")
    extra = min(oversample, d - k)
    if extra:
        V = torch.cat([V, _initial(None, extra, h, generator, "")])
    V, S, U, iterations, converged = _iterate(products, V, None, max_iter, tol, k, _block(callback, 0, 1))
    return _result(U, S, V, h.shape, products.out_shape, [iterations], converged)


def sequential_subspace_iteration(
    f: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    k: int,
    b: int,
    V0: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    *,
    oversample: int = 0,
    batching: str = "vmap",
    callback: Callable[[dict], None] | None = None,
) -> SVDResult:
    """Top-k singular triplets in mini-batches of ``b`` vectors (SM Sec. C, Alg. 2): low memory.

    Each mini-batch runs Alg. 1 with its vectors projected, before every product, onto the
    complement of the vectors found so far, [I - V (V^T V)^-1 V^T] Phi, then re-orthonormalised;
    the converged block is projected once more, so that V is orthonormal across blocks too.
    ``V0`` [k, *h.shape] gives the initial guess of every mini-batch (its rows in order);
    ``oversample`` adds p vectors to every mini-batch (see ``subspace_iteration``).
    """
    d = _check_k(k, h)
    _check_iteration(max_iter, tol, oversample)
    _check_b(b, k)
    products = JacobianProducts(f, h, batching)
    init = None if V0 is None else _initial(V0, k, h, None, "V0")
    Vs, Ss, Us, iterations, converged = [], [], [], [], True
    for start in range(0, k, b):
        n = min(b, k - start)
        Phi = _initial(None, n, h, generator, "") if init is None else init[start : start + n]
        extra = min(oversample, d - start - n)
        if extra:
            Phi = torch.cat([Phi, _initial(None, extra, h, generator, "")])
        found = torch.cat(Vs) if Vs else None
        blocks = _block(callback, start // b, math.ceil(k / b))
        Phi, S, Psi, its, ok = _iterate(products, Phi, found, max_iter, tol, n, blocks)
        if found is not None:  # the last SVD step leaves Phi slightly outside the complement
            Phi = _orthonormal_rows(_deflate(Phi, found))
        Vs.append(Phi)
        Ss.append(S)
        Us.append(Psi)
        iterations.append(its)
        converged = converged and ok
    return _result(torch.cat(Us), torch.cat(Ss), torch.cat(Vs), h.shape, products.out_shape, iterations, converged)


def _block(callback, block: int, num_blocks: int):
    if callback is None:
        return None
    return lambda info: callback({**info, "block": block, "num_blocks": num_blocks})


def _iterate(products: JacobianProducts, V: torch.Tensor, found: torch.Tensor | None, max_iter: int, tol: float, keep: int, callback=None):
    """The inner loop of Alg. 1 / Alg. 2 on flat float32 rows V [n, d]; deflates against ``found``.

    Returns the top ``keep`` <= n triplets; the tolerance applies to those only (the other rows
    are oversampling: they speed up convergence of the kept ones when the spectrum is flat).
    """
    shape = products.h.shape
    V = _orthonormal_rows(V)
    S = None
    for it in range(1, max_iter + 1):
        if found is not None:
            V = _orthonormal_rows(_deflate(V, found))
        U = products.jvp(V.reshape(-1, *shape)).float()
        V_hat = products.vjp(U).float().reshape(V.shape[0], -1)
        # V_hat^T = W S^2 Z^T (reduced SVD): the new vectors are W; since J V_old Z = J W once the
        # subspace is invariant, Z rotates U along so that U[i] = J V[i] without another product.
        W, S2, Zt = torch.linalg.svd(V_hat.T.double(), full_matrices=False)
        V = W.T.float()
        U = torch.einsum("ij,j...->i...", Zt.float(), U)
        S_new = S2[:keep].clamp(min=0).sqrt().float()
        change = float("inf")
        if S is not None:
            scale = S_new.clamp(min=float(S_new.max()) * 1e-6 + 1e-30)
            change = float(((S_new - S).abs() / scale).max())
        if callback is not None:
            callback({"iteration": it, "max_iter": max_iter, "change": change})
        if tol > 0 and change < tol:  # tol = 0: fixed work, exactly max_iter iterations
            return V[:keep], S_new, U[:keep], it, True
        S = S_new
    return V[:keep], S, U[:keep], max_iter, False


def _deflate(Phi: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """[I - V^T (V V^T)^-1 V] applied to the rows of Phi (Alg. 2), V and Phi as rows."""
    coef = torch.linalg.solve(V.double() @ V.double().T, V.double() @ Phi.double().T)
    return (Phi.double() - coef.T @ V.double()).float()


def _orthonormal_rows(V: torch.Tensor) -> torch.Tensor:
    Q, R = torch.linalg.qr(V.T.double())
    sign = torch.sign(torch.diagonal(R))
    sign[sign == 0] = 1
    return (Q * sign).T.float()


def _result(U, S, V, in_shape, out_shape, iterations, converged) -> SVDResult:
    k = V.shape[0]
    order = torch.argsort(S, descending=True)  # Alg. 2's mini-batches are ordered only approximately
    U, S, V = U[order], S[order], V[order]
    U = _orthonormal_rows(U.reshape(k, -1))  # "Orthonormalize U" (Alg. 1, 2); keeps U[i] ~ J V[i] / S[i]
    return SVDResult(U.reshape(k, *out_shape).cpu(), S.cpu(), V.reshape(k, *in_shape).cpu(), iterations, converged)


def _initial(V0, k: int, h: torch.Tensor, generator, name: str) -> torch.Tensor:
    d = h.numel()
    if V0 is None:
        return torch.randn(k, d, generator=generator).to(h.device)
    V0 = torch.as_tensor(V0)
    if V0.ndim < 1 or V0.shape[0] != k or V0[0].numel() != d:
        raise HspaceError(f"{name} has shape {tuple(V0.shape)}; valid: [{k}, {', '.join(map(str, h.shape))}] (k rows of h's size)")
    return V0.reshape(k, d).float().to(h.device)


def _check_k(k, h: torch.Tensor) -> int:
    d = h.numel()
    check_int("k (number of singular vectors)", k, 1, d, valid=f"an integer from 1 to dim h = {d}")
    return d


def _check_b(b, k: int) -> None:
    check_int("mini-batch size b", b, 1, k, valid=f"an integer from 1 to k={k}")


def _check_iteration(max_iter, tol, oversample) -> None:
    check_int("oversample", oversample, 0, valid="an integer >= 0")
    check_int("max_iter", max_iter, 1, valid="a positive integer")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0 or tol != tol:
        raise HspaceError(f"tol must be a number >= 0 (0: run exactly max_iter iterations), got {tol!r}")


# ------------------------------------------------------------------ on a diffusion model


def check_mask(mask, out_shape: Sequence[int]) -> torch.Tensor:
    """The output mask as float [C or 1, H, W]: [H, W] or [C, H, W] over the denoiser's output, or [H, W] / [1, H, W]
    at an integer multiple of its size (a latent model's image: 8x for Stable Diffusion), area-averaged onto it."""
    out_shape = tuple(out_shape)
    mask = torch.as_tensor(mask)
    given = tuple(mask.shape)
    c, hw = out_shape[0], out_shape[1:]
    if mask.ndim == 2:
        mask = mask[None]
    factor = mask.shape[-1] // hw[-1] if mask.ndim == 3 and len(hw) == 2 and hw[-1] > 0 else 0
    if mask.ndim == 3 and mask.shape[0] == 1 and factor > 1 and tuple(mask.shape[1:]) == (hw[0] * factor, hw[1] * factor):
        mask = F.avg_pool2d(mask[None].float(), factor)[0]
    if mask.ndim != 3 or tuple(mask.shape[1:]) != hw or mask.shape[0] not in (1, c):
        raise HspaceError(
            f"mask has shape {given}; valid: {hw} or {(c, *hw)} (or {(1, *hw)}), the denoiser output's spatial size, "
            "or an integer multiple of it (the image of a latent model)"
        )
    mask = mask.float()
    if not torch.isfinite(mask).all() or (mask < 0).any() or not (mask > 0).any():
        raise HspaceError("mask values must be finite and >= 0, with at least one > 0")
    return mask


@dataclass
class JacobianStep:
    """Directions found at one step of one sample: its singular triplets and a Direction per vector."""

    step: int
    timestep: int
    svd: SVDResult
    directions: list[Direction]
    h_norm: float  # ||h_t||: the unit of every direction's delta

    @property
    def singular_values(self) -> torch.Tensor:
        return self.svd.S


def jacobian_directions(
    engine,
    trajectory,
    sample: int = 0,
    steps: int | Sequence[int] | None = None,
    k: int = 4,
    *,
    mask: torch.Tensor | None = None,
    mask_name: str | None = None,
    method: str = "batched",
    b: int | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    batching: str = "vmap",
    callback: Callable | None = None,
    progress: bool | None = None,
) -> "JacobianDirections":
    """Image-specific directions of one sample: top right singular vectors of J_t (eq. 6-9) at each step.

    For each step index in ``steps`` (default: the middle step) x_t is replayed (``Engine.x_t``), the
    encoder half is cached and J_t of eps with respect to h_t is decomposed by Alg. 1
    (``method="batched"``) or Alg. 2 (``"sequential"``, mini-batches of ``b``). ``mask`` ([H, W] or
    [C, H, W] over the U-Net output) restricts eps to a region: the Jacobian of mask * eps.
    Singular values are those of eps (for v- or x0-predicting U-Nets the output's Jacobian differs
    by a constant per step, SM Sec. E, which is divided out; the vectors are the same).
    ``oversample`` (default: the block size, k or b) extra vectors iterate alongside and are dropped
    (see ``subspace_iteration``); 0 runs the paper's algorithms exactly.

    Every direction applies at all timesteps (Sec. 4.2: directions found at t are applied across all
    timesteps): delta is [1, *h_shape] = ||h_t|| v with ||v|| = 1, so an edit with scale gamma moves
    h by gamma times its own norm at step t (the unit is stored as params["h_norm"]). The sign of v
    is fixed so that its largest-magnitude entry is positive. ``callback`` gets an ``IterationEvent``
    after every iteration; ``done``/``total`` count decoder-half passes (a JVP and a VJP per vector).
    """
    check_choice("method", method, METHODS)
    _check_k(k, torch.empty(engine.h_shape))
    if method == "sequential":
        _check_b(b, k)
    check_int("sample", sample, valid="the integer index of one sample of the trajectory")
    if oversample is None:
        oversample = k if method == "batched" else b
    one = trajectory[sample]
    steps = _check_steps(steps, one.num_steps)
    out_mask = None if mask is None else check_mask(mask, engine.sample_shape).to(engine.device, engine.dtype)
    schedule = engine.schedule(one.num_steps)
    block, num_blocks = (k, 1) if method == "batched" else (b, math.ceil(k / b))
    per_iteration = 2 * (block + oversample)  # decoder-half passes: a JVP and a VJP per vector
    results = []
    recorded = one.sample_prompts  # the sample's own prompt, where it is not the engine's
    prompt = recorded[0] if recorded is not None and recorded[0] != engine.spec.prompt else None
    with Meter.job(callback, len(steps) * num_blocks * max_iter * per_iteration, progress, "jacobian") as meter:
        for step in steps:
            half = engine.decoder_half(engine.x_t(one, step), schedule.t(step), prompt)
            svd = _decompose(half, schedule.eps_scale(step), out_mask, method, k, b, max_iter, tol, generator,
                             oversample, batching, _iteration_events(meter, step, per_iteration))
            meter.skip(num_blocks * max_iter * per_iteration - sum(svd.iterations) * per_iteration)
            results.append(_step_result(engine, one, schedule, step, svd, float(half.h[0].float().norm()), method, b, oversample, mask, mask_name))
    return JacobianDirections(results)


def _check_steps(steps, n: int) -> list[int]:
    if steps is None:
        return [n // 2]
    if is_int(steps):
        steps = [steps]
    return [check_int("step", s, 0, n - 1, valid=f"an integer from 0 to {n - 1} (the trajectory has {n} steps)") for s in list(steps)]


def _iteration_events(meter: Meter, step: int, passes: int):
    def report(info: dict) -> None:
        meter.emit(IterationEvent, passes, stage="jacobian", step=step, **info)

    return report


def _decompose(half, scale, out_mask, method, k, b, max_iter, tol, generator, oversample, batching, report) -> SVDResult:
    """Alg. 1 or 2 on the decoder half (times the eps scale, masked), signs fixed."""

    def f(h: torch.Tensor) -> torch.Tensor:
        eps = half(h) * scale
        return eps if out_mask is None else eps * out_mask

    h = half.h[0]
    with half.forward_mode():
        if method == "batched":
            svd = subspace_iteration(f, h, k, None, max_iter, tol, generator, oversample=oversample, batching=batching, callback=report)
        else:
            svd = sequential_subspace_iteration(
                f, h, k, b, None, max_iter, tol, generator, oversample=oversample, batching=batching, callback=report
            )
    return _fix_signs(svd)


def _step_result(engine, one, schedule, step, svd, h_norm, method, b, oversample, mask, mask_name) -> JacobianStep:
    t = schedule.t(step)
    k = len(svd.S)
    directions = []
    for i in range(k):
        params = {
            "step": step,
            "timestep": t,
            "index": i,
            "singular_value": float(svd.S[i]),
            "iterations": svd.iterations,
            "converged": svd.converged,
            "seed": one.seeds[0],
            "k": k,
            "algorithm": "Alg. 1" if method == "batched" else f"Alg. 2 (b={b})",
            "oversample": oversample,
            "unit": "||h_t||",
            "h_norm": h_norm,
        }
        if mask is not None:
            params["mask"] = mask_name or "mask"
        meta = {"name": f"j{step}_{i}", "method": "jacobian", "params": params}
        directions.append(Direction(svd.V[i][None] * h_norm, meta=meta, spec=engine.spec))
    return JacobianStep(step, t, svd, directions, h_norm)


@dataclass
class JacobianDirections:
    """The result of ``jacobian_directions``: one ``JacobianStep`` per step decomposed (iterable)."""

    steps: list[JacobianStep]

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> JacobianStep:
        return self.steps[i]

    @property
    def directions(self) -> list[Direction]:
        return [d for r in self.steps for d in r.directions]

    def summary(self) -> list[dict]:
        return [
            {
                "step": r.step, "timestep": r.timestep, "singular_values": [float(v) for v in r.singular_values],
                "iterations": r.svd.iterations, "converged": r.svd.converged, "h_norm": r.h_norm,
            }
            for r in self.steps
        ]

    def save(self, folder: str | Path, info: dict | None = None) -> list[Path]:
        """Every direction as NAME.safetensors, the singular triplets in jacobian.safetensors, jacobian.json
        (the summary per step, plus ``info``)."""
        tensors = {}
        for r in self.steps:
            tensors.update({f"U{r.step}": r.svd.U, f"S{r.step}": r.svd.S, f"V{r.step}": r.svd.V})
        with staged_folder(folder) as stage:  # all or nothing
            names = [p.name for p in save_directions(self.directions, stage)]
            save_safetensors(tensors, stage / "jacobian.safetensors", {"kind": "hspace.JacobianDirections"})
            write_json(stage / "jacobian.json", {"results": self.summary(), "directions": names, **(info or {})})
            write_result_record(stage, "jacobian", "jacobian", {"steps": [r.step for r in self.steps]}, names)
        return [Path(folder) / name for name in names]

    @classmethod
    def load(cls, folder: str | Path) -> "JacobianDirections":
        folder = Path(folder)
        if not (folder / "jacobian.json").is_file():
            raise HspaceError(f"{str(folder)!r} holds no Jacobian result (jacobian.json); write one with `hspace jacobian`")
        info = read_json(folder / "jacobian.json", "Jacobian result")
        _, tensors = read_safetensors(folder / "jacobian.safetensors", "hspace.JacobianDirections", "hspace Jacobian result")
        directions = {p: Direction.load(folder / safe_name(p)) for p in info.get("directions", [])}
        steps = []
        for r in info["results"]:
            s = r["step"]
            svd = SVDResult(tensors[f"U{s}"], tensors[f"S{s}"], tensors[f"V{s}"], r["iterations"], r["converged"])
            own = [d for d in directions.values() if d.meta["params"]["step"] == s]
            steps.append(JacobianStep(s, r["timestep"], svd, own, r["h_norm"]))
        return cls(steps)


def restrict_to_region(direction: Direction, mask: torch.Tensor) -> Direction:
    """``direction`` with delta-h kept only on the spatial cells of h that lie over ``mask`` (an image-space
    region [H, W], pooled to h's grid), renormalised to its own norm so that scales keep their unit."""
    import torch.nn.functional as F

    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim != 2:
        raise HspaceError(f"a region mask must be [H, W], got shape {tuple(mask.shape)}")
    cells = F.adaptive_max_pool2d(mask[None, None], direction.h_shape[-2:])[0, 0] > 0
    delta = direction.delta * cells
    if float(delta.norm()) == 0:
        raise HspaceError(f"the region lies over none of h's {direction.h_shape[-2]}x{direction.h_shape[-1]} cells")
    meta = {**direction.meta, "name": f"{direction.name}-cells", "params": {**direction.meta["params"], "h_cells": int(cells.sum())}}
    return Direction(delta * (direction.delta.norm() / delta.norm()), direction.sigma, meta, direction.spec)


def _fix_signs(svd: SVDResult) -> SVDResult:
    """Singular vectors are defined up to sign: make each v's largest-magnitude entry positive."""
    flat = svd.V.reshape(svd.V.shape[0], -1)
    sign = torch.sign(flat.gather(1, flat.abs().argmax(1, keepdim=True)))[:, 0]
    sign[sign == 0] = 1
    shape = (-1,) + (1,) * (svd.V.ndim - 1)
    out_shape = (-1,) + (1,) * (svd.U.ndim - 1)
    return SVDResult(svd.U * sign.reshape(out_shape), svd.S, svd.V * sign.reshape(shape), svd.iterations, svd.converged)
