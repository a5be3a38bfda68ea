"""Per-KV-head truncated SVD of the key projection, and absorption of a key basis into the queries.

Every strategy boils down to one matrix per KV head g, a basis ``P_g`` of shape ``[d, r]`` with
orthonormal columns. Thin keys and queries are the source ones expressed in that basis::

    k'   = P_g^T k   = (P_g^T W_K^g) x + P_g^T b_K^g          (cached: r wide instead of d)
    q'^h = P_g^T q^h = (P_g^T W_Q^h) x + P_g^T b_Q^h          for every query head h of group g
    q'^h . k' = q^h . (P_g P_g^T k)                           (= q^h . k when r = d)

Queries are never cached, so absorbing ``P_g`` into ``W_Q`` costs nothing at serving time. Values
and the output projection are untouched, and GQA is kept (the group shares one basis).

The SVD basis is the paper's: the top-r left singular vectors ``U_r`` of ``W_K^g`` (then
``P_g^T W_K^g = S_r V_r^T``), the rank-r subspace that keeps the most of the key projection's
Frobenius energy. Everything is computed in float64 and cast at the end, so r = d reproduces the
source to the output dtype's rounding.
"""

from __future__ import annotations

import torch

from thinkeys.convert.families import QueryKey


def key_svd_basis(k_weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of each KV head's key projection.

    ``k_weight`` is ``[Hkv, d, D]``; returns ``[Hkv, d, r]`` (float64), columns by decreasing
    singular value.
    """
    u, _, _ = torch.linalg.svd(k_weight.to(torch.float64), full_matrices=False)  # u: [Hkv, d, min(d, D)]
    return u[..., :rank]


def absorb(qk: QueryKey, basis: torch.Tensor) -> QueryKey:
    """Express q and k of every head in its KV group's ``basis`` (``[Hkv, d, r]``); returns float64 thin projections."""
    n_kv, _, rank = basis.shape
    n_heads, d, hidden = qk.q_weight.shape
    group = n_heads // n_kv
    p = basis.to(torch.float64)
    q = qk.q_weight.to(torch.float64).reshape(n_kv, group, d, hidden)  # [Hkv, G, d, D]
    q_thin = torch.einsum("gdr,gjdD->gjrD", p, q).reshape(n_heads, rank, hidden)  # [H, r, D]
    k_thin = torch.einsum("gdr,gdD->grD", p, qk.k_weight.to(torch.float64))  # [Hkv, r, D]
    q_bias = k_bias = None
    if qk.q_bias is not None:
        qb = qk.q_bias.to(torch.float64).reshape(n_kv, group, d)  # [Hkv, G, d]
        q_bias = torch.einsum("gdr,gjd->gjr", p, qb).reshape(n_heads, rank)  # [H, r]
    if qk.k_bias is not None:
        # Kept, not dropped: with RoPE the bias is rotated with the key and does not cancel in softmax.
        k_bias = torch.einsum("gdr,gd->gr", p, qk.k_bias.to(torch.float64))  # [Hkv, r]
    return QueryKey(q_weight=q_thin, k_weight=k_thin, q_bias=q_bias, k_bias=k_bias)


def retained_key_energy(k_weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Fraction of each KV head's key-projection energy ``||P P^T W_K||_F^2 / ||W_K||_F^2`` (``[Hkv]``).

    For the SVD basis this is the kept share of squared singular values; for selected rotary
    pairs it is the kept rows' share. A single, strategy-independent figure for the summary.
    """
    w = k_weight.to(torch.float64)  # [Hkv, d, D]
    kept = torch.einsum("gdr,gdD->grD", basis.to(torch.float64), w)  # [Hkv, r, D]
    return kept.pow(2).sum(dim=(1, 2)) / w.pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
