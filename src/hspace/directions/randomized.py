"""The streamed randomized PCA route: per-timestep principal components of h too large for the exact routes.

FLUX's h at 1024 px has D = 12.6 M numbers per step: the covariance route's D x D matrices cannot exist, and the Gram
route's n x n matrices are small but it holds the whole bank's panels. This route (Halko, Martinsson and Tropp 2011,
Alg. 4.4 and 5.1, streamed) never forms either: per group (timestep) it keeps a random test matrix Omega [D, l] and
sketches of size [n, l] and [D, l], l = k + oversample, so its memory is O(D l) per timestep plus O(n l):

1. pass 1: the sums and the squared norm of the samples, and Y = X Omega (centred afterwards: Y - 1 mu^T Omega);
2. each power iteration, two passes: Z = Xc^T Q, orthonormalised, then Y = Xc Z (sharpens a slowly decaying spectrum);
3. a last pass: B = Q^T Xc [l, D], whose SVD gives the components (rows of V^T) and the singular values.

Accumulation is float64 (the sums of many float16 samples). Every pass reads the bank once more (2 + 2 x the power
iterations in all). The exact routes stay the default where they fit; ``pca(..., method="randomized")`` asks for this one,
and ``method="auto"`` takes it above ``RANDOMIZED_ABOVE`` numbers per timestep. Its agreement with the exact route
(principal angles, variance captured) is measured by ``benchmarks/bench_randomized_pca.py``.
"""

from __future__ import annotations

import torch

RANDOMIZED_ABOVE = 1_000_000  # numbers of h per timestep (per group) above which "auto" takes this route
OVERSAMPLE = 40  # measured on the toy U-Net bank (bench_randomized_pca.py): 10 leaves the 10th PC 60 degrees off
POWER_ITERATIONS = 6  # with 40 extra columns: every top-10 angle under 1 degree there (2 passes each)
_F64 = torch.float64


class RandomizedPCA:
    """The route (module doc) over a ``pca._Source``; ``run()`` returns a ``PCAResult``."""

    def __init__(self, source, k: int, check, finish, oversample: int = OVERSAMPLE, power: int = POWER_ITERATIONS, seed: int = 0):
        """``check(n, k, shape)`` refuses a k the samples cannot give; ``finish(...)`` makes the result (``pca.py``'s)."""
        self.source, self.k, self.power, self.seed = source, k, power, seed
        self.check, self.finish = check, finish
        self.oversample = oversample

    def _chunks(self):
        return iter(self.source)  # one pass over the bank (the source counts them)

    def _sketch(self):
        """Pass 1: n, the mean, the total scatter and the centred sketch Y = Xc Omega [G, n, l]. A chunk is taken one
        group at a time in float64 (a chunk of FLUX's h in float64 would not fit)."""
        ys, sums, squares, omega, n = [], None, None, None, 0
        for _, _, x in self._chunks():
            if omega is None:
                G, D = x.shape[1:]
                self.l = min(self.k + self.oversample, D)
                generator = torch.Generator().manual_seed(self.seed)
                omega = torch.randn(G, D, self.l, generator=generator, dtype=_F64)
                sums, squares = torch.zeros(G, D, dtype=_F64), torch.zeros(G, dtype=_F64)
            y = torch.empty(x.shape[1], x.shape[0], self.l, dtype=_F64)
            for g in range(x.shape[1]):
                xg = x[:, g].to(_F64)
                sums[g] += xg.sum(0)
                squares[g] += (xg * xg).sum()
                torch.mm(xg, omega[g], out=y[g])
            ys.append(y)
            n += x.shape[0]
        mean = sums / n
        Y = torch.cat(ys, dim=1) - torch.einsum("gd,gdl->gl", mean, omega)[:, None, :]
        total = squares - n * (mean * mean).sum(1)  # trace of the scatter matrix of the centred samples
        return n, mean, total, Y

    def _times_q(self, Q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One pass: Xc^T Q [G, D, l] for Q [G, n, l]."""
        out = torch.zeros(Q.shape[0], mean.shape[1], Q.shape[2], dtype=_F64)
        for _, off, x in self._chunks():
            for g in range(x.shape[1]):
                out[g].addmm_((x[:, g].to(_F64) - mean[g]).T, Q[g, off : off + x.shape[0]])
        return out

    def _times_z(self, Z: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One pass: Xc Z [G, n, l] for Z [G, D, l]."""
        rows = []
        for _, _, x in self._chunks():
            rows.append(torch.stack([(x[:, g].to(_F64) - mean[g]) @ Z[g] for g in range(x.shape[1])]))
        return torch.cat(rows, dim=1)

    def run(self):
        n, mean, total, Y = self._sketch()
        self.check(n, self.k, self.source.shape)
        Q = torch.linalg.qr(Y).Q
        for _ in range(self.power):
            Z = torch.linalg.qr(self._times_q(Q, mean)).Q
            Q = torch.linalg.qr(self._times_z(Z, mean)).Q
        B = self._times_q(Q, mean).transpose(1, 2)  # [G, l, D] = Q^T Xc
        _, S, Vh = torch.linalg.svd(B, full_matrices=False)
        lam = S[:, : self.k] ** 2
        vecs = Vh[:, : self.k].transpose(1, 2).contiguous()  # [G, D, k]
        return self.finish(lam, S[:, 0] ** 2, total, vecs, mean, n, self.source.shape, "randomized")
