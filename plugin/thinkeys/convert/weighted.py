"""Low-rank factorizations of a query-key product, weighted by real query and key statistics.

An attention logit is ``q . k``. Replacing it with ``(A q) . (B k)`` (``A``, ``B``: ``[rho, n]``)
caches ``B k`` (rho wide) and costs nothing at serving time on the query side. Which rank-rho pair
``(A, B)`` is best depends on the data, not on the weights alone: directions the keys never use
can go, directions that vary across keys must stay, and the key *mean* does not matter at all
where keys are not rotated (it adds ``q . B E[k]``, the same to every key of a query, which
softmax cancels). With query second moment ``Sq = E[q q^T]`` and key covariance
``Sk = Cov(k)``, and q independent of k (they come from different tokens)::

    E[(q^T (I - A^T B) k_c)^2] = || Sq^{1/2} (I - A^T B) Sk^{1/2} ||_F^2        (k_c = k - E[k])

which is minimised by the truncated SVD of ``C = Sq^{1/2} Sk^{1/2} = U S V^T``::

    A = S_rho^{1/2} U_rho^T Sq^{-1/2}        B = S_rho^{1/2} V_rho^T Sk^{-1/2}
    residual = sum_{i > rho} s_i^2

(:func:`joint_lowrank`; the ``S^{1/2}`` split keeps the thin q and k at similar scales). At
rho = n it is exact (``A^T B = I``). This is the "weighted by queries and keys jointly"
factorization; with ``Sq = I`` it reduces to PCA of the keys, with ``Sq = Sk = I`` to the plain SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Eigenvalues below this share of the largest are treated as this share (keeps inverse roots finite).
RELATIVE_FLOOR = 1e-8


def _sym_roots(s: torch.Tensor, floor: float = RELATIVE_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """``S^{1/2}`` and ``S^{-1/2}`` of a symmetric PSD matrix (float64), eigenvalues floored relative to the largest."""
    s = (s + s.transpose(-1, -2)) / 2
    lam, vec = torch.linalg.eigh(s)
    lam = lam.clamp_min(lam.max().clamp_min(torch.finfo(s.dtype).tiny) * floor)
    root = (vec * lam.sqrt()) @ vec.transpose(-1, -2)
    inv_root = (vec * lam.rsqrt()) @ vec.transpose(-1, -2)
    return root, inv_root


@dataclass
class LowRankQK:
    a: torch.Tensor  # [rho, n]: applied to queries
    b: torch.Tensor  # [rho, n]: applied to keys (what is cached)
    singular_values: torch.Tensor  # [n]: of Sq^{1/2} Sk^{1/2}, decreasing

    def residual(self, rank: int | None = None) -> float:
        """Expected squared logit error ``sum_{i > rank} s_i^2`` (rank defaults to this factorization's)."""
        rank = self.a.shape[0] if rank is None else rank
        return float(self.singular_values[rank:].pow(2).sum())


def joint_lowrank(q_moment: torch.Tensor, k_cov: torch.Tensor, rank: int) -> LowRankQK:
    """Best rank-``rank`` ``(A, B)`` with ``q . k ~ (A q) . (B k)`` under the query/key statistics (see the module docstring).

    ``q_moment`` ``[n, n]`` (summed over the query heads that share these keys), ``k_cov`` ``[n, n]``.
    """
    n = q_moment.shape[-1]
    rank = min(rank, n)
    q_root, q_inv_root = _sym_roots(q_moment.to(torch.float64))
    k_root, k_inv_root = _sym_roots(k_cov.to(torch.float64))
    u, s, vt = torch.linalg.svd(q_root @ k_root)  # [n, n], [n], [n, n]
    half = s[:rank].sqrt()
    a = half[:, None] * (u[:, :rank].T @ q_inv_root)  # [rho, n]
    b = half[:, None] * (vt[:rank] @ k_inv_root)  # [rho, n]
    return LowRankQK(a=a, b=b, singular_values=s)


def key_pca_basis(k_moment: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of ``E[k k^T]`` (``[n, n]``): the key subspace real inputs use most, ``[n, rank]``."""
    lam, vec = torch.linalg.eigh(k_moment.to(torch.float64))
    return vec.flip(-1)[:, :rank]
