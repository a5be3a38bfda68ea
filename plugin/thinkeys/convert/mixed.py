"""Data-aware RoPE strategies: calibrated rotary-pair selection, and ``mixed`` (kept rotary pairs + an unrotated low-rank part).

Why ``mixed``. A RoPE head's logit is a sum over its d/2 rotary pairs, pair ``j`` turning at
``inv_freq[j]`` radians per token of relative distance. Mixing pairs (the paper's SVD basis)
breaks RoPE; keeping whole pairs (``pairs``) is exact but must *drop* half of them at r = d/2.
Yet the slow pairs hardly turn at all: SmolLM2's lowest frequencies move a few hundredths of a
radian over a thousand tokens, so for those pairs ``q . R(delta) k ~ q . k`` and their part of the
logit is an ordinary, unrotated dot product, which a low-rank factorization compresses well
(:mod:`thinkeys.convert.weighted`: weighted by real query and key statistics, key mean ignored
because softmax cancels it). Fast pairs cannot be mixed, only kept or dropped. So per KV head::

    thin slot i < p          a kept rotary pair (source dims j, j + d/2) at its own frequency  (exact)
    the other r - 2p dims    (A q_N) . (B k_N) over the slow pairs N, frequency 0              (low-rank)
    the rest                 dropped

and ``p`` is chosen per head by the estimated logit error (:func:`plan_head`). It fits the serving
primitive unchanged: every thin slot is a NeoX pair with a per-head frequency, and the unrotated
slots simply carry frequency 0 (``rope_dims = r``), so training can later give them a frequency.

A pair is "slow" when it turns less than one radian over ``nope_context`` tokens
(``inv_freq[j] * nope_context <= 1``); a larger ``nope_context`` is more conservative for long
prompts. Error estimates (q and k from different tokens, so independent; rotation phase averaged):
dropping pair j costs ``E|q_j|^2 E|k_j|^2 / 2`` (uncentered: a rotated key mean makes a positional
pattern that does not cancel), and the low-rank part costs its singular-value tail.

``pairs`` with calibration is the same machinery with every slot a rotary pair (p = r/2), chosen
by the calibrated score ``E|q_j|^2 E|k_j|^2`` instead of the data-free weight-norm proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkeys.convert.calibration import QKMoments
from thinkeys.convert.families import QueryKey
from thinkeys.convert.weighted import LowRankQK, joint_lowrank

#: Default of ``--nope-context``: pairs turning less than 1 radian over this many tokens may be
#: treated as unrotated. Chosen by measurement (bench-results/quality/README.md).
DEFAULT_NOPE_CONTEXT = 2048


@dataclass
class HeadPlan:
    """What one KV head keeps: rotary pairs, the slow pairs folded into the low-rank part, its rank."""

    rotary: list[int]
    unrotated: list[int]
    unrotated_rank: int
    dropped: list[int]
    estimated_error: float
    estimated_total: float  # the error if nothing were kept

    @property
    def kept_share(self) -> float:
        return 1.0 - self.estimated_error / max(self.estimated_total, 1e-300)


@dataclass
class ThinLayer:
    qk: QueryKey  # thin projections, float64: q [H, r, D], k [Hkv, r, D]
    freqs: torch.Tensor  # [Hkv, r/2] float32
    key_map: torch.Tensor  # [Hkv, r, d] float64: thin key = key_map @ source key (for the energy figure)
    plans: list[HeadPlan] = field(default_factory=list)


def _pair_dims(pairs: list[int], half: int) -> list[int]:
    """Source dims of the given rotary pairs, first halves then partners (NeoX layout)."""
    return list(pairs) + [j + half for j in pairs]


def pair_energy(moment: torch.Tensor) -> torch.Tensor:
    """``E|z_j|^2`` of every rotary pair from a second-moment matrix ``[d, d]`` -> ``[d/2]``."""
    diag = moment.diagonal(dim1=-2, dim2=-1)
    half = diag.shape[-1] // 2
    return diag[..., :half] + diag[..., half:]


def plan_head(
    q_moment: torch.Tensor,
    k_moment: torch.Tensor,
    k_cov: torch.Tensor,
    inv_freq: torch.Tensor,
    rank: int,
    *,
    nope_context: float | None,
) -> HeadPlan:
    """Choose the rotary pairs, the unrotated low-rank part and its rank for one KV head (see the module docstring).

    ``nope_context=None`` disables the unrotated part: all r/2 slots are rotary pairs (calibrated ``pairs``).
    """
    d = q_moment.shape[-1]
    half, slots = d // 2, rank // 2
    score = pair_energy(q_moment) * pair_energy(k_moment)  # [d/2]: 2x the expected squared logit share
    drop_cost = (score / 2).tolist()
    by_score = sorted(range(half), key=lambda j: (-score[j].item(), j))
    if nope_context is None:
        slow: set[int] = set()
    else:
        slow = {j for j in range(half) if float(inv_freq[j]) * nope_context <= 1.0}
    # Rotary slots go to fast pairs first (they cannot be folded into the unrotated part), best first.
    order = [j for j in by_score if j not in slow] + [j for j in by_score if j in slow]
    total = sum(drop_cost)

    best: HeadPlan | None = None
    fits: dict[tuple[int, ...], LowRankQK] = {}
    for p in range(slots, -1, -1) if slow else [slots]:  # from all-rotary down: ties keep more exact pairs
        rotary = sorted(order[:p])
        unrotated = sorted(j for j in slow if j not in rotary)
        rho = min(rank - 2 * p, 2 * len(unrotated))
        if rho == 0:
            unrotated = []
        dropped = sorted(j for j in range(half) if j not in rotary and j not in unrotated)
        error = sum(drop_cost[j] for j in dropped)
        if unrotated:
            key = tuple(unrotated)
            if key not in fits:
                dims = _pair_dims(unrotated, half)
                fits[key] = joint_lowrank(q_moment[dims][:, dims], k_cov[dims][:, dims], len(dims))
            error += fits[key].residual(rho)
        if best is None or error < best.estimated_error * (1 - 1e-9):
            best = HeadPlan(rotary, unrotated, rho, dropped, error, total)
    assert best is not None
    return best


def build_thin_layer(
    qk: QueryKey, rank: int, inv_freq: torch.Tensor, moments: QKMoments, *, nope_context: float | None
) -> ThinLayer:
    """Thin q/k projections and the frequency table of one layer under ``mixed`` (or calibrated ``pairs`` with ``nope_context=None``)."""
    n_heads, d, hidden = qk.q_weight.shape
    n_kv = qk.k_weight.shape[0]
    group, half, slots = n_heads // n_kv, d // 2, rank // 2
    q_w = qk.q_weight.to(torch.float64).reshape(n_kv, group, d, hidden)
    k_w = qk.k_weight.to(torch.float64)
    q_b = None if qk.q_bias is None else qk.q_bias.to(torch.float64).reshape(n_kv, group, d)
    k_b = None if qk.k_bias is None else qk.k_bias.to(torch.float64)

    q_map = torch.zeros(n_kv, rank, d, dtype=torch.float64)  # thin q = q_map[g] @ source q (every head of group g)
    k_map = torch.zeros(n_kv, rank, d, dtype=torch.float64)  # thin k = k_map[g] @ source k
    freqs = torch.zeros(n_kv, slots, dtype=torch.float32)
    plans = []
    for g in range(n_kv):
        plan = plan_head(moments.q_moment[g], moments.k_moment[g], moments.k_cov[g], inv_freq, rank, nope_context=nope_context)
        plans.append(plan)
        p = len(plan.rotary)
        for i, j in enumerate(plan.rotary):  # kept pair j -> slot i: dims i and i + r/2 (NeoX)
            for thin_dim, src_dim in ((i, j), (i + slots, j + half)):
                q_map[g, thin_dim, src_dim] = 1.0
                k_map[g, thin_dim, src_dim] = 1.0
            freqs[g, i] = inv_freq[j]
        if plan.unrotated_rank:
            dims = _pair_dims(plan.unrotated, half)
            fit = joint_lowrank(
                moments.q_moment[g][dims][:, dims], moments.k_cov[g][dims][:, dims], plan.unrotated_rank
            )
            rho = plan.unrotated_rank
            # Unrotated components fill the remaining slots' first halves, then their partners (frequency 0).
            free = list(range(p, slots)) + list(range(p + slots, 2 * slots))
            for c, thin_dim in enumerate(free[:rho]):
                q_map[g, thin_dim, dims] = fit.a[c]
                k_map[g, thin_dim, dims] = fit.b[c]

    q_thin = torch.einsum("grd,gjdD->gjrD", q_map, q_w).reshape(n_heads, rank, hidden)  # [H, r, D]
    k_thin = torch.einsum("grd,gdD->grD", k_map, k_w)  # [Hkv, r, D]
    q_bias = None if q_b is None else torch.einsum("grd,gjd->gjr", q_map, q_b).reshape(n_heads, rank)
    k_bias = None if k_b is None else torch.einsum("grd,gd->gr", k_map, k_b)
    return ThinLayer(QueryKey(q_thin, k_thin, q_bias, k_bias), freqs, k_map, plans)

