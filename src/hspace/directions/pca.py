"""PCA in h-space (paper Sec. 4.1, Fig. 5-6): global directions as principal components of h_t.

The paper generates n random samples, keeps the bottleneck activation h_t^(i) of every sample i at every
timestep, and "for each timestep t vectorize{s} {h_t^(i)}_{i=1}^n and calculate{s} the principal
components"; the editing direction v_j is the concatenation over all timesteps of the j-th principal
component (Sec. 4.1). Fig. 6 compares the two leading components with random directions whose
||delta-h_t|| matches theirs.

Here:

- ``pca_per_timestep(chunks, k)`` streams a bank of h in chunks of samples and never holds all of it in
  memory (CelebA-HQ h is 512x8x8 = 32768 numbers, so its D x D covariance would take 8.6 GB in float64).
  Two exact routes, both in float64:

  * ``"covariance"``: one pass accumulating, per timestep, the sum and second moment (D x D) of h;
    used when those matrices fit ``memory_budget_bytes`` (``StreamingPCA`` is this accumulator, with an
    ``update(h_batch)`` of its own).
  * ``"gram"``: the n x n Gram matrix Xc Xc^T of the centred samples per timestep, accumulated block by
    block, its eigendecomposition Xc Xc^T = U S^2 U^T, and the components V = Xc^T U / S from one more
    pass. Used when D x D does not fit, or when fewer samples than dimensions are expected. Chunks are
    kept in a "panel" of at most a quarter of the budget; every Gram block pairs a panel chunk with a
    later chunk, so the number of passes is 1 + the number of panels (2 when a quarter of the budget
    holds the whole bank; ``method="auto"`` reads the first chunk once more to learn D).

- ``per_timestep=False`` does one PCA over all timesteps concatenated (each sample's h_{T:1} as one
  vector of T*D numbers) instead of one per timestep.
- ``PCAResult.directions`` are ``Direction``s whose delta_t is sigma_{j,t} times the unit component,
  so that an edit scale gamma reads in standard deviations of the data along the component.
- ``random_directions(result, k, seed)`` is the baseline of Fig. 6: Gaussian directions with the same
  ||delta_t|| as the matching principal component at every timestep.

Signs. A principal component is defined up to its sign, independently at each timestep; the signs are
made consistent so that v_j is one direction along the whole trajectory: at the first timestep of the
trajectory (index 0, the noisiest step) the coordinate of largest magnitude is made positive, and at each
later step the component is flipped if its dot product with the previous step's component is negative
(h at neighbouring timesteps is strongly correlated). With ``per_timestep=False`` the single vector's
largest-magnitude coordinate is made positive. Only signs are aligned: components are ordered by
explained variance at each timestep separately, so where two eigenvalues cross between timesteps the
j-th component may change meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..errors import HspaceError
from ..validate import check_int
from ..spec import FREE, Spec
from ..files import read_safetensors, save_safetensors, staged_folder
from .direction import Direction, DirectionSet, save_directions, write_result_record
from .randomized import RANDOMIZED_ABOVE, RandomizedPCA

__all__ = ["PCAResult", "StreamingPCA", "pca_per_timestep", "pca_from_h", "random_directions"]

DEFAULT_MEMORY_BUDGET = 2**31  # bytes
METHODS = ("auto", "covariance", "gram", "randomized")  # randomized: randomized.py, streamed, O(D k) memory per timestep
_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Input checks


def _check_k(k) -> int:
    check_int("k (the number of components)", k, 1, valid="an integer >= 1")
    return k


def _check_budget(budget) -> int:
    check_int("memory_budget_bytes", budget, 1, valid="a positive integer")
    return budget


class _Shape:
    """Checks chunks [b, T, *h_shape] and views them as [b, G, D_g] groups.

    Per timestep: G = T groups of D_g = prod(h_shape); concatenated: G = 1 group of D_g = T * prod(h_shape).
    """

    def __init__(self, per_timestep: bool):
        if not isinstance(per_timestep, bool):
            raise HspaceError(f"per_timestep must be True or False, got {per_timestep!r}")
        self.per_timestep = per_timestep
        self.num_steps: int | None = None
        self.h_shape: tuple[int, ...] | None = None

    @property
    def groups(self) -> int:
        return self.num_steps if self.per_timestep else 1

    @property
    def dim(self) -> int:
        d = math.prod(self.h_shape)
        return d if self.per_timestep else d * self.num_steps

    def check(self, chunk, index: int) -> torch.Tensor:
        what = f"chunk {index}" if index >= 0 else "h_batch"
        if not isinstance(chunk, torch.Tensor):
            raise HspaceError(f"{what} must be a torch.Tensor [b, T, *h_shape], got {type(chunk).__name__}")
        if chunk.ndim < 3:
            raise HspaceError(f"{what} must be [b, T, *h_shape] (at least 3 dimensions), got shape {tuple(chunk.shape)}")
        if not chunk.is_floating_point():
            raise HspaceError(f"{what} must hold floating-point h (float16/float32/float64), got {chunk.dtype}")
        steps, h_shape = chunk.shape[1], tuple(chunk.shape[2:])
        if self.num_steps is None:
            if steps < 1 or math.prod(h_shape) < 1:
                raise HspaceError(f"{what} has an empty h: shape {tuple(chunk.shape)}")
            self.num_steps, self.h_shape = steps, h_shape
        elif (steps, *h_shape) != (self.num_steps, *self.h_shape):
            raise HspaceError(
                f"{what} has h of shape {(steps, *h_shape)} per sample (T, *h_shape), but earlier chunks have "
                f"{(self.num_steps, *self.h_shape)}; every chunk must have the same T and h shape"
            )
        chunk = chunk.detach().cpu()
        if not bool(torch.isfinite(chunk).all()):
            raise HspaceError(f"{what} contains NaN or infinite values; h must be finite")
        return chunk.reshape(chunk.shape[0], self.groups, self.dim)

    def where(self, g: int) -> str:
        return f"step index {g} (0 = first denoising step)" if self.per_timestep else "the concatenated h"


class _Source:
    """Iterates the chunks of one pass: (chunk index, sample offset, chunk viewed [b, G, D_g]).

    Every pass after the first must yield chunks of the same sizes.
    """

    def __init__(self, chunks, per_timestep: bool):
        if callable(chunks):
            self._make = chunks
        elif isinstance(chunks, (list, tuple)):
            self._make = lambda: chunks
        else:
            raise HspaceError(
                "chunks must be a callable that returns a fresh iterable of [b, T, *h_shape] tensors at every "
                f"call (one call per pass), or a list of such tensors; got {type(chunks).__name__}"
            )
        self.shape = _Shape(per_timestep)
        self.sizes: list[int] | None = None  # batch size of every chunk, from the first pass
        self.passes = 0

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def offset(self, index: int) -> int:
        return sum(self.sizes[:index])

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        first = self.sizes is None
        sizes: list[int] = []
        offset = 0
        for i, chunk in enumerate(self._make()):
            x = self.shape.check(chunk, i)
            b = x.shape[0]
            if not first and (i >= len(self.sizes) or self.sizes[i] != b):
                raise HspaceError(self._inconsistent(i, b))
            sizes.append(b)
            if b:
                yield i, offset, x
            offset += b
        if first:
            self.sizes = sizes
        elif sizes != self.sizes:
            raise HspaceError(self._inconsistent(len(sizes), 0))
        self.passes += 1

    def _inconsistent(self, i: int, b: int) -> str:
        return (
            f"pass {self.passes + 1} over the chunks differs from the first: chunk {i} has {b} samples, the first "
            f"pass had chunk sizes {self.sizes}; chunks() must yield the same data at every call"
        )


def _check_n_k(n: int, k: int, shape: _Shape) -> None:
    if n < 2:
        raise HspaceError(f"PCA needs at least 2 samples, got {n}")
    limit = min(n - 1, shape.dim)
    if k > limit:
        raise HspaceError(
            f"k={k} components requested, but {n} samples of dimension {shape.dim} give at most "
            f"min(n-1, D) = {limit}; use 1 <= k <= {limit}"
        )


# ----------------------------------------------------------------------------------------------------
# Result


@dataclass
class PCAResult:
    """Principal components of h (paper Sec. 4.1), per timestep or over all timesteps concatenated.

    components: [k, T, *h_shape] float32. Per timestep: unit norm at every t. Concatenated
        (``per_timestep=False``): one unit vector over all T*D numbers, reshaped.
    sigma: [k, T] float64, the std of the data along each component, sqrt(eigenvalue / (n-1))
        (concatenated: the one std of the joint component, repeated over T).
    variance_ratio: [k, T] float64, the fraction of the total variance (at that t) each component explains.
    mean: [T, *h_shape] float64, the mean h.
    n: the number of samples. per_timestep: which PCA. route: "covariance" or "gram" (how it was computed).
    """

    components: torch.Tensor
    sigma: torch.Tensor
    variance_ratio: torch.Tensor
    mean: torch.Tensor
    n: int
    per_timestep: bool = True
    route: str = ""
    spec: Spec | str | None = None  # the engine whose h this is (set from the bank), or FREE; the directions carry it
    timesteps: torch.Tensor | None = None  # [T] the timesteps of the steps (``bank.h_timesteps``); the directions carry them

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def lifted(self, pool: int) -> "PCAResult":
        """This PCA of h pooled over ``pool`` x ``pool`` cells (a pooled bank's), on the full grid: component v becomes the
        unit vector up(v) / pool (nearest upsampling), whose data std is pool x sigma (the pooled coordinate of h along v
        is the full coordinate along it over pool), so a delta of one sigma is up(sigma v) exactly; the mean is up(mean)."""
        from ..bank import lift_h

        return replace(self, components=lift_h(self.components, pool) / pool, sigma=self.sigma * pool,
                       mean=lift_h(self.mean, pool))

    @property
    def num_steps(self) -> int:
        return self.components.shape[1]

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.components.shape[2:])

    def deltas(self) -> torch.Tensor:
        """[k, T, *h_shape] float64: delta_{j,t} = sigma_{j,t} * component_{j,t} (one sigma per unit of scale)."""
        view = (self.k, self.num_steps) + (1,) * len(self.h_shape)
        return self.sigma.to(_F64).reshape(view) * self.components.to(_F64)

    @property
    def directions(self) -> list[Direction]:
        """One Direction per component (v_j of Sec. 4.1, pc1, pc2, ...), carrying the result's spec."""
        return self.directions_for()

    def directions_for(self, spec: Spec | str | None = None, num_steps: int | None = None) -> list[Direction]:
        """One Direction per component: v_j of Sec. 4.1, named pc1, pc2, ...

        delta[t] = sigma[j, t] * components[j, t], so an edit scale gamma is in units of the data's std
        along the component; ``sigma`` holds sigma[j]. ``spec`` defaults to the result's own; ``num_steps``,
        if given, must equal T.
        """
        spec = spec or self.spec
        if num_steps is not None and num_steps != self.num_steps:
            raise HspaceError(f"num_steps={num_steps!r} but this PCA has {self.num_steps} steps")
        if spec is None:
            raise HspaceError("this PCA has no spec, so its directions would not know their model: give the engine's "
                              "(pca_per_timestep(..., spec=bank.spec)) or spec=FREE for directions that apply to any engine")
        deltas = self.deltas()
        out = []
        for j in range(self.k):
            params = {
                "component": j,
                "n": self.n,
                "per_timestep": self.per_timestep,
                "variance_ratio": [float(v) for v in self.variance_ratio[j]],
            }
            meta = {"name": f"pc{j + 1}", "method": "pca", "params": params}
            out.append(Direction(deltas[j].float(), sigma=self.sigma[j].float(), meta=meta, spec=spec, timesteps=self.timesteps))
        return out

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Coordinates of h [N, T, *h_shape] along the components, in units of sigma: [N, k, T] per
        timestep (<h_t - mean_t, v_{j,t}> / sigma_{j,t}), [N, k] for the concatenated PCA."""
        h = torch.as_tensor(h)
        if h.ndim < 2 or tuple(h.shape[1:]) != (self.num_steps, *self.h_shape):
            raise HspaceError(f"h has shape {tuple(h.shape)}; valid: [N, {self.num_steps}, {', '.join(map(str, self.h_shape))}]")
        centred = (h.to(_F64) - self.mean.to(_F64)).flatten(2)  # [N, T, D]
        comps = self.components.to(_F64).flatten(2)  # [k, T, D]
        per_step = torch.einsum("ntd,ktd->nkt", centred, comps)
        if self.per_timestep:
            return per_step / self.sigma[None]
        return per_step.sum(2) / self.sigma[:, 0][None]

    def save(self, folder) -> list:
        """The directions (pc1.safetensors, ...) and the whole result in pca.safetensors (components,
        sigma, variance ratio, mean; n, route, spec), so that ``PCAResult.load(folder)`` can project new h."""
        import json
        from pathlib import Path

        tensors = {"components": self.components, "sigma": self.sigma, "variance_ratio": self.variance_ratio, "mean": self.mean}
        if self.timesteps is not None:
            tensors["timesteps"] = self.timesteps
        meta = {"kind": "hspace.PCAResult", "n": str(self.n), "per_timestep": json.dumps(self.per_timestep), "route": self.route}
        if self.spec is not None:
            meta["spec"] = FREE if self.spec == FREE else self.spec.to_json()
        with staged_folder(folder) as stage:  # all or nothing: never a partial set of directions
            names = [p.name for p in save_directions(self.directions, stage)]
            save_safetensors(tensors, stage / "pca.safetensors", meta)
            write_result_record(stage, "pca", "pca", {"k": self.k, "n": self.n, "per_timestep": self.per_timestep, "route": self.route}, names)
        return [Path(folder) / name for name in names]

    @classmethod
    def load(cls, folder) -> "PCAResult":
        import json
        from pathlib import Path

        path = Path(folder) / "pca.safetensors"
        if not path.is_file():
            raise HspaceError(f"{str(folder)!r} holds no PCA result (pca.safetensors); write one with `hspace pca`")
        meta, tensors = read_safetensors(path, "hspace.PCAResult", "hspace PCA result")
        try:
            spec = (FREE if meta["spec"] == FREE else Spec.from_json(meta["spec"])) if "spec" in meta else None
            return cls(**tensors, n=int(meta["n"]), per_timestep=json.loads(meta["per_timestep"]), route=meta["route"], spec=spec)
        except (KeyError, TypeError, ValueError) as e:
            raise HspaceError(f"{str(path)!r} is not a complete PCA result: {type(e).__name__} {e}") from None


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """v [k, G, D]: largest-|.| coordinate of group 0 positive, then each group agrees with the previous."""
    k = v.shape[0]
    idx = v[:, 0].abs().argmax(dim=1)
    sign = torch.sign(v[torch.arange(k), 0, idx])
    v[:, 0] *= torch.where(sign < 0, -1.0, 1.0).to(v.dtype)[:, None]
    for g in range(1, v.shape[1]):
        dot = (v[:, g] * v[:, g - 1]).sum(dim=1)
        v[:, g] *= torch.where(dot < 0, -1.0, 1.0).to(v.dtype)[:, None]
    return v


def _finish(
    lam: torch.Tensor,  # [G, k] descending eigenvalues of the scatter matrix (sum of squares, not / (n-1))
    lam_max: torch.Tensor,  # [G]
    total: torch.Tensor,  # [G] trace of the scatter matrix
    vecs: torch.Tensor,  # [G, D, k] float64 components
    mean: torch.Tensor,  # [G, D] float64
    n: int,
    shape: _Shape,
    route: str,
) -> PCAResult:
    eps = torch.finfo(_F64).eps
    for g in range(lam.shape[0]):
        tol = float(lam_max[g]) * max(n, shape.dim) * eps
        bad = (lam[g] <= tol).nonzero()
        if len(bad):
            rank = int(bad[0])
            raise HspaceError(
                f"the centred h at {shape.where(g)} has (numerical) rank {rank}, fewer than k={lam.shape[1]} "
                f"components; use k <= {rank}" if rank else f"h does not vary across samples at {shape.where(g)}"
            )
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    v = _fix_signs(vecs.permute(2, 0, 1).contiguous())  # [k, G, D]
    T, h_shape, k = shape.num_steps, shape.h_shape, lam.shape[1]
    sigma = (lam / (n - 1)).sqrt().T  # [k, G]
    ratio = (lam / total[:, None]).T
    if not shape.per_timestep:
        sigma, ratio = sigma.expand(k, T).contiguous(), ratio.expand(k, T).contiguous()
    return PCAResult(
        components=v.reshape(k, T, *h_shape).float(),
        sigma=sigma,
        variance_ratio=ratio,
        mean=mean.reshape(T, *h_shape),
        n=n,
        per_timestep=shape.per_timestep,
        route=route,
    )


# ----------------------------------------------------------------------------------------------------
# Covariance route


def _covariance_bytes(groups: int, dim: int) -> int:
    """The G accumulated D x D float64 matrices plus room for one eigendecomposition (2 more)."""
    return (groups + 2) * dim * dim * 8


class StreamingPCA:
    """One-pass PCA by accumulating, per timestep, float64 sums and second moments (paper Sec. 4.1).

    ``update(h_batch)`` takes [B, T, *h_shape] (or [B, T, D]); ``result(k)`` eigendecomposes the covariance.
    Values are accumulated relative to the first batch's mean, which keeps the float64 second moment
    accurate when the mean is large. Holds (T + 2) D x D float64 matrices per timestep group, so it refuses
    to start when that exceeds ``memory_budget_bytes``; use ``pca_per_timestep`` (Gram route) then.
    """

    def __init__(self, per_timestep: bool = True, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, shape: "_Shape | None" = None):
        self._shape = shape or _Shape(per_timestep)
        self.memory_budget_bytes = _check_budget(memory_budget_bytes)
        self.n = 0
        self._shift = self._sum = self._second = None

    @property
    def per_timestep(self) -> bool:
        return self._shape.per_timestep

    def update(self, h_batch: torch.Tensor) -> "StreamingPCA":
        """Accumulate h [B, T, *h_shape] (GANSpace's ``fit_partial``)."""
        self.add_groups(self._shape.check(h_batch, -1))
        return self

    fit_partial = update

    def add_groups(self, x: torch.Tensor) -> None:
        """Accumulate samples already checked and viewed as [b, G, D] groups (see ``_Shape.check``)."""
        if not x.shape[0]:
            return
        if self._second is None:
            G, D = self._shape.groups, self._shape.dim
            need = _covariance_bytes(G, D)
            if need > self.memory_budget_bytes:
                raise HspaceError(
                    f"the covariance route needs {G} x {D} x {D} float64 matrices (with eigendecomposition "
                    f"space {need / 2**30:.2f} GiB), over memory_budget_bytes={self.memory_budget_bytes}; "
                    "use pca_per_timestep(..., method='gram') or a larger budget"
                )
            self._shift = x.to(_F64).mean(0)  # [G, D]
            self._sum = torch.zeros(G, D, dtype=_F64)
            self._second = torch.zeros(G, D, D, dtype=_F64)
        y = (x.to(_F64) - self._shift).transpose(0, 1)  # [G, b, D]
        self._sum += y.sum(1)
        self._second.baddbmm_(y.transpose(1, 2), y)
        self.n += x.shape[0]

    def result(self, k: int) -> PCAResult:
        """The top-k principal components of everything passed to ``update``."""
        _check_k(k)
        if self._second is None:
            raise HspaceError("PCA needs at least 2 samples, got 0 (call update with h first)")
        _check_n_k(self.n, k, self._shape)
        G, D = self._shape.groups, self._shape.dim
        mu = self._sum / self.n  # mean of the shifted data
        lam, lam_max, total = torch.zeros(G, k, dtype=_F64), torch.zeros(G, dtype=_F64), torch.zeros(G, dtype=_F64)
        vecs = torch.zeros(G, D, k, dtype=_F64)
        for g in range(G):
            scatter = self._second[g] - self.n * torch.outer(mu[g], mu[g])
            total[g] = scatter.diagonal().sum()
            evals, evecs = torch.linalg.eigh(scatter)
            del scatter
            lam[g], lam_max[g] = evals[-k:].flip(0), evals[-1]
            vecs[g] = evecs[:, -k:].flip(1)
            del evecs
        return _finish(lam, lam_max, total, vecs, self._shift + mu, self.n, self._shape, "covariance")


# ----------------------------------------------------------------------------------------------------
# Gram route


class _GramPCA:
    """Exact PCA through the n x n Gram matrix of the centred samples, per group, in float64."""

    def __init__(self, source: _Source, k: int, memory_budget_bytes: int):
        self.source = source
        self.k = k
        self.panel_bytes = memory_budget_bytes // 4
        self.shift = self.sum = None  # [G, D] float64: the first chunk's mean; sum of the shifted samples
        self.K = None  # [G, n, n] once n is known
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # first-pass blocks (row offset, col offset, block)
        self._buffers: dict[str, torch.Tensor] = {}

    def _minus(self, x: torch.Tensor, g: int, centre: torch.Tensor, slot: str) -> torch.Tensor:
        """x[:, g] - centre in float64, in a reused buffer (fresh float64 allocations cost more than the matmuls)."""
        b = x.shape[0]
        buf = self._buffers.get(slot)
        if buf is None or buf.shape[0] < b:
            buf = self._buffers[slot] = torch.empty(b, x.shape[2], dtype=_F64)
        return buf[:b].copy_(x[:, g]).sub_(centre)

    def _pass(self, start: int) -> int:
        """One pass: Gram blocks between the panel (chunks from ``start`` on, while they fit in a quarter of the
        budget) and every chunk at or after it; the first pass also sums. Returns the first chunk after the panel."""
        first = self.source.sizes is None
        panel: list[tuple[int, torch.Tensor]] = []
        used, full, end = 0, False, start
        for i, off, x in self.source:
            G = x.shape[1]
            if self.shift is None:
                self.shift = torch.stack([x[:, g].to(_F64).mean(0) for g in range(G)])
                self.sum = torch.zeros_like(self.shift)
            if i < start:
                continue
            if not full and (not panel or used + x.nbytes <= self.panel_bytes):
                panel.append((off, x))
                used, end = used + x.nbytes, i + 1
            else:
                full = True
            blocks = [torch.empty(G, p.shape[0], x.shape[0], dtype=_F64) for _, p in panel]
            for g in range(G):
                y = self._minus(x, g, self.shift[g], "x")
                if first:
                    self.sum[g] += y.sum(0)
                for (_, p), block in zip(panel, blocks):
                    yp = y if p is x else self._minus(p, g, self.shift[g], "panel")
                    torch.mm(yp, y.T, out=block[g])
            for (p_off, _), block in zip(panel, blocks):
                self._store(p_off, off, block)
        return end

    def _store(self, row: int, col: int, block: torch.Tensor) -> None:
        if self.K is None:
            self._pending.append((row, col, block))
            return
        b_r, b_c = block.shape[1:]
        self.K[:, row : row + b_r, col : col + b_c] = block
        if row != col:
            self.K[:, col : col + b_c, row : row + b_r] = block.transpose(1, 2)

    def run(self) -> PCAResult:
        source, shape = self.source, self.source.shape
        start = self._pass(0)
        n = source.n
        _check_n_k(n, self.k, shape)
        G = shape.groups
        self.K = torch.empty(G, n, n, dtype=_F64)
        while self._pending:
            self._store(*self._pending.pop())
        while source.offset(start) < n:
            start = self._pass(start)

        # Centre: Xc Xc^T = H K H with H = I - 11^T / n (K is the Gram matrix of the shifted data).
        K = self.K
        r = K.mean(dim=2)  # [G, n]
        q = r.mean(dim=1)  # [G]
        K -= r[:, :, None]
        K -= r[:, None, :]
        K += q[:, None, None]
        k = self.k
        lam, lam_max, total = torch.zeros(G, k, dtype=_F64), torch.zeros(G, dtype=_F64), torch.zeros(G, dtype=_F64)
        U = torch.zeros(G, n, k, dtype=_F64)
        for g in range(G):
            total[g] = K[g].diagonal().sum()
            evals, evecs = torch.linalg.eigh(K[g])
            lam[g], lam_max[g] = evals[-k:].flip(0), evals[-1]
            U[g] = evecs[:, -k:].flip(1)
            del evecs
        self.K = K = None

        # Components: V = Xc^T U / s, one more pass (the norm is restored in _finish).
        mean = self.shift + self.sum / n
        V = torch.zeros(G, shape.dim, k, dtype=_F64)
        for _, off, x in source:
            for g in range(G):
                V[g].addmm_(self._minus(x, g, mean[g], "x").T, U[g, off : off + x.shape[0]])
        self._buffers.clear()
        V /= lam.clamp_min(torch.finfo(_F64).tiny).sqrt()[:, None, :]
        return _finish(lam, lam_max, total, V, mean, n, shape, "gram")


# ----------------------------------------------------------------------------------------------------
# Entry points


def pca_per_timestep(
    chunks: Callable[[], Iterable[torch.Tensor]] | Sequence[torch.Tensor],
    k: int,
    *,
    per_timestep: bool = True,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    expected_n: int | None = None,
    spec: Spec | None = None,
    timesteps: torch.Tensor | None = None,
) -> PCAResult:
    """The top-k principal components of h at every timestep (paper Sec. 4.1), streamed over chunks.

    chunks: a callable returning a fresh iterable of [b, T, *h_shape] tensors (float16/32/64) at every call,
        one call per pass over the bank; or a list of such tensors.
    k: the number of components, 1 <= k <= min(n-1, D).
    per_timestep: False does one PCA over all timesteps concatenated (h_{T:1} as one T*D vector per sample).
    method: "covariance" (one pass, D x D float64 per timestep), "gram" (n x n Gram matrix per timestep,
        1 + number of panels passes, never D x D), "randomized" (``randomized.py``: streamed, 2 + 2 x power iterations
        passes, O(D k) per timestep, approximate) or "auto": randomized above ``RANDOMIZED_ABOVE`` numbers a step, else
        covariance when (G + 2) D x D float64 fit ``memory_budget_bytes`` and ``expected_n`` is not below D, else gram.
    memory_budget_bytes: bounds the covariance matrices, and the chunks the Gram route keeps at a time (a
        quarter of it). The Gram route's own n x n float64 matrices per timestep (T * n^2 * 8 bytes) come
        on top.
    spec: the engine whose h this is, carried by the directions; timesteps: those of the steps (any step count).
    """
    _check_k(k)
    _check_budget(memory_budget_bytes)
    if method not in METHODS:
        raise HspaceError(f"unknown PCA method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if expected_n is not None:
        check_int("expected_n", expected_n, valid="an integer or None")
    source = _Source(chunks, per_timestep)
    if method == "gram":
        return replace(_GramPCA(source, k, memory_budget_bytes).run(), spec=spec, timesteps=timesteps)
    if method == "randomized":
        return replace(RandomizedPCA(source, k, _check_n_k, _finish).run(), spec=spec, timesteps=timesteps)

    # The route depends on D: read the first chunk, then go on with this pass (covariance) or restart the
    # passes from scratch (gram; the first chunk is read once more).
    streaming = StreamingPCA(per_timestep, memory_budget_bytes, shape=source.shape)
    it = iter(source)
    first = next(it, None)
    if first is None:
        raise HspaceError("PCA needs at least 2 samples, got 0 (chunks yielded no samples)")
    G, D = source.shape.groups, source.shape.dim
    if method == "auto" and D > RANDOMIZED_ABOVE:  # FLUX-sized h: neither exact route's matrices, the passes start over
        it.close()
        return replace(RandomizedPCA(source, k, _check_n_k, _finish).run(), spec=spec, timesteps=timesteps)
    if method == "auto":
        fits = _covariance_bytes(G, D) <= memory_budget_bytes
        if not fits or (expected_n is not None and expected_n < D):
            it.close()  # an unfinished pass records nothing; the Gram route starts over
            return replace(_GramPCA(source, k, memory_budget_bytes).run(), spec=spec, timesteps=timesteps)
    if k > D:  # before a whole pass: no number of samples can make k components of dimension D
        raise HspaceError(f"k={k} components requested, but h has dimension D={D}; use 1 <= k <= min(n-1, {D})")
    streaming.add_groups(first[2])
    for _, _, x in it:
        streaming.add_groups(x)
    return replace(streaming.result(k), spec=spec, timesteps=timesteps)


def pca_from_h(
    h: torch.Tensor,
    k: int,
    *,
    per_timestep: bool = True,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int = 256,
    spec: Spec | None = None,
    timesteps: torch.Tensor | None = None,
) -> PCAResult:
    """``pca_per_timestep`` over h [N, T, *h_shape] already in memory (e.g. ``Trajectory.h``), in chunks of
    ``chunk_size`` samples to bound the float64 temporaries. "auto" takes the Gram route when N < D."""
    if not isinstance(h, torch.Tensor) or h.ndim < 3:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise HspaceError(f"h must be a tensor [N, T, *h_shape], got {got}")
    check_int("chunk_size", chunk_size, 1, valid="a positive integer")
    parts = list(torch.split(h, chunk_size)) if len(h) else [h]
    return pca_per_timestep(
        parts,
        k,
        per_timestep=per_timestep,
        method=method,
        memory_budget_bytes=memory_budget_bytes,
        spec=spec,
        timesteps=timesteps,
        expected_n=len(h),
    )


def pca(source, k: int, *, per_timestep: bool = True, method: str = "auto", memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> PCAResult:
    """The top-k principal components of the h of a ``Bank`` (streamed in shards), a ``Trajectory`` or a ``Recording`` of
    the user's own pipeline (``hspace.record``; their h in memory), per timestep (paper Sec. 4.1). What the directions need to be applied anywhere (the engine's part of the source's spec, not its process, and
    the timesteps of the stored steps, so they resample to any step count) comes from the source itself."""
    from ..bank import Bank
    from ..steering import Recording
    from ..trajectory import Trajectory

    options = {"per_timestep": per_timestep, "method": method, "memory_budget_bytes": memory_budget_bytes}
    if isinstance(source, Bank):
        found = pca_per_timestep(source.h_chunks(), k, expected_n=source.n, spec=source.spec.engine, timesteps=source.h_timesteps, **options)
        return found if source.layout.h_pool is None else found.lifted(source.layout.h_pool)
    if isinstance(source, Trajectory):
        if source.h is None:
            raise HspaceError("this trajectory holds no h (it was drawn with record_h=False); sample it with h recorded")
        return pca_from_h(source.h, k, spec=source.spec.engine, timesteps=source.timesteps, **options)
    if isinstance(source, Recording):  # h recorded inside the user's own pipeline (hspace.record)
        return pca_from_h(source.h, k, spec=source.spec, timesteps=source.timesteps, **options)
    raise HspaceError(f"pca takes a Bank, a Trajectory or a Recording, got {type(source).__name__}; for h tensors use pca_from_h")


def random_directions(result: PCAResult, k: int, seed: int, spec: Spec | None = None) -> DirectionSet:
    """Random baseline of Fig. 6: Gaussian directions with the PCs' ||delta_t|| at every timestep.

    Direction j (named random{j+1}) is drawn per timestep from N(0, I) with a generator of its own seeded
    by ``seed`` (never the global RNG) and scaled so that ||delta_t|| equals ||delta_t|| of pc{j+1}
    (sigma[j, t] per timestep), "matched per-timestep norm". Draws are sequential, so random{j+1} does
    not depend on k. ``sigma`` is left empty: sigma is the data's std along a direction, which a random
    direction does not have from the PCA.
    """
    if not isinstance(result, PCAResult):
        raise HspaceError(f"result must be a PCAResult, got {type(result).__name__}")
    _check_k(k)
    if k > result.k:
        raise HspaceError(f"k={k} random directions requested, but the PCA has {result.k} components to match; use k <= {result.k}")
    check_int("seed", seed, 0, 2**63 - 1, valid="an integer from 0 to 2**63-1")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    T, D = result.num_steps, math.prod(result.h_shape)
    target = result.deltas()[:k].reshape(k, T, D).norm(dim=2)  # [k, T]
    out = []
    for j in range(k):
        g = torch.randn((T, D), generator=generator, dtype=_F64)
        delta = g * (target[j] / g.norm(dim=1))[:, None]
        params = {"component": j, "seed": seed, "matched_to": f"pc{j + 1}", "n": result.n, "per_timestep": result.per_timestep}
        meta = {"name": f"random{j + 1}", "method": "random", "params": params}
        out.append(Direction(delta.reshape(T, *result.h_shape).float(), meta=meta, spec=spec or result.spec, timesteps=result.timesteps))
    return DirectionSet(out, "random", {"k": k, "seed": seed, "matched_to": "pca"})
