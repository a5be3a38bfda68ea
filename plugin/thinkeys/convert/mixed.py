"""Data-aware RoPE strategies: calibrated rotary-pair selection, and ``mixed`` (rotary bands + an unrotated low-rank part).

The serving primitive gives every KV head r/2 thin *slots*: a NeoX pair of dims (``i``, ``i + r/2``)
turning at its own frequency (:mod:`thinkeys.rope`). A source head has d/2 rotary pairs, pair ``j``
turning at ``inv_freq[j]``. Write pair ``j`` of a query or key as a complex number
``z_j = x_j + i y_j`` (dims ``j`` and ``j + d/2``); RoPE multiplies it by ``e^{i theta_j pos}`` and
the logit is ``sum_j Re(z_qj conj(z_kj) e^{i theta_j delta})``. A linear map commutes with every
such rotation only if it is complex-linear *within one frequency*, which is why the paper's real
SVD basis (mixing all frequencies) breaks RoPE and why ``pairs`` keeps whole pairs.

``mixed`` uses three ways to spend the r/2 slots, chosen per KV head by an estimated logit error:

* **kept pair**: one slot carries pair ``j`` exactly at ``theta_j`` (a band of one pair);
* **band**: c slots carry a complex rank-c fit of a few *neighbouring* pairs (similar frequencies)
  at one shared frequency ``phi`` (their energy-weighted mean). Exact up to the rank truncation
  and the phase drift ``(theta_j - phi) * delta`` between the pairs' and the slot's rotation;
* **unrotated part**: the slowest pairs hardly turn (SmolLM2's lowest frequencies move a few
  hundredths of a radian over a thousand tokens), so their share of the logit is an ordinary dot
  product, fitted by a *real* low-rank factorization over any number of dims (frequency-0 slots).
  Here the key mean does not matter (it adds the same to every key of a query; softmax cancels it),
  so the keys' covariance is used, not their second moment;

and every pair not covered is dropped. The cost model (q and k from different tokens, hence
independent; rotation phases averaged; ``delta`` uniform on ``[0, context]``)::

    drop pair j                 w_j / 2                       w_j = E|z_qj|^2 E|z_kj|^2
    band of pairs B, c slots    tail_c(B) / 2  +  sum_{j in B} w_j (1 - sinc((theta_j - phi) context))
    unrotated part U, rho dims  tail_rho(U)    +  sum_{j in U} w_j (1 - sinc(theta_j context))

where ``tail`` is the singular-value tail of the weighted fit (:mod:`thinkeys.convert.weighted`;
the complex one has the same form with Hermitian moments, half of its error being imaginary). A
dynamic programme over the pairs in frequency order picks the cheapest plan for each head; at
r = d it keeps every pair (cost 0), i.e. the source model exactly.

``context`` (``nope_context``) is the distance scale of the phase-drift penalty: larger is more
conservative for long prompts (fewer, narrower bands; fewer unrotated pairs).

``pairs`` with calibration is the special case with only kept pairs, chosen by the calibrated score
``w_j`` instead of the data-free weight-norm proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkeys.convert.calibration import QKMoments
from thinkeys.convert.families import QueryKey
from thinkeys.convert.weighted import LowRankQK, joint_lowrank

#: Default of ``--nope-context`` (tokens): the distance scale of the phase-drift penalty.
#: Chosen by measurement (bench-results/quality/README.md).
DEFAULT_NOPE_CONTEXT = 2048
#: Longest band of neighbouring pairs that may share slots (SmolLM2: 4 pairs span a frequency ratio of 2.9).
MAX_BAND = 4


@dataclass
class Band:
    """``slots`` complex slots at frequency ``freq`` carrying a fit of the source pairs ``pairs``."""

    pairs: list[int]
    slots: int
    freq: float
    q_coef: torch.Tensor  # [slots, len(pairs)] complex128: slot value = sum_j coef[s, j] * z_j
    k_coef: torch.Tensor


@dataclass
class Unrotated:
    """``dims`` real frequency-0 dims carrying a real low-rank fit of the pairs ``pairs`` (source dims j, j + d/2)."""

    pairs: list[int]
    dims: int
    fit: LowRankQK | None


@dataclass
class HeadPlan:
    bands: list[Band]
    unrotated: Unrotated
    dropped: list[int]
    estimated_error: float
    estimated_total: float  # the error if everything were dropped

    @property
    def rotary(self) -> list[int]:
        """Pairs kept exactly (bands of one pair with one slot)."""
        return sorted(b.pairs[0] for b in self.bands if len(b.pairs) == 1)

    @property
    def slots_used(self) -> int:
        return sum(b.slots for b in self.bands)

    @property
    def unrotated_rank(self) -> int:
        return self.unrotated.dims

    @property
    def kept_share(self) -> float:
        return 1.0 - self.estimated_error / max(self.estimated_total, 1e-300)


@dataclass
class ThinLayer:
    qk: QueryKey  # thin projections, float64: q [H, r, D], k [Hkv, r, D]
    freqs: torch.Tensor  # [Hkv, r/2] float32
    key_map: torch.Tensor  # [Hkv, r, d] float64: thin key = key_map @ source key (for the energy figure)
    query_map: torch.Tensor  # [Hkv, r, d] float64: thin query = query_map[g] @ source query (heads of group g)
    plans: list[HeadPlan] = field(default_factory=list)


# --- statistics of rotary pairs ------------------------------------------------------------------


def pair_energy(moment: torch.Tensor) -> torch.Tensor:
    """``E|z_j|^2`` of every rotary pair from a real second-moment matrix ``[d, d]`` -> ``[d/2]``."""
    diag = moment.diagonal(dim1=-2, dim2=-1)
    half = diag.shape[-1] // 2
    return diag[..., :half] + diag[..., half:]


def complex_moment(moment: torch.Tensor, pairs: list[int]) -> torch.Tensor:
    """Hermitian ``E[z z^H]`` over the given pairs (``z_j = x_j + i y_j``) from a real moment ``[d, d]``.

    Only the rotation-invariant (circular) part: what survives averaging over RoPE phases.
    """
    half = moment.shape[-1] // 2
    x = torch.tensor(pairs)
    y = x + half
    xx, yy = moment[x][:, x], moment[y][:, y]
    yx, xy = moment[y][:, x], moment[x][:, y]
    return torch.complex(xx + yy, yx - xy)  # [m, m]


def _herm_roots(s: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    s = (s + s.mH) / 2
    lam, vec = torch.linalg.eigh(s)
    lam = lam.clamp_min(lam.max().clamp_min(1e-300) * floor)
    root = (vec * lam.sqrt().to(vec.dtype)) @ vec.mH
    inv_root = (vec * lam.rsqrt().to(vec.dtype)) @ vec.mH
    return root, inv_root


@dataclass
class ComplexFit:
    p: torch.Tensor  # [m, m] complex: column s = query coefficients of slot s
    r: torch.Tensor  # [m, m] complex: column s = key coefficients of slot s
    singular_values: torch.Tensor  # [m]

    def residual(self, c: int) -> float:
        return float(self.singular_values[c:].pow(2).sum())


def complex_lowrank(q_moment: torch.Tensor, k_moment: torch.Tensor) -> ComplexFit:
    """Complex analogue of :func:`thinkeys.convert.weighted.joint_lowrank` for one band (all ranks at once).

    With ``w = conj(z)`` the band's logit is ``w_q^H w_k``; approximating it by ``sum_s (p_s^T z_q)
    conj(r_s^T z_k)`` costs ``E|w_q^H (I - M) w_k|^2 = ||Wq^{1/2} (I - M) Wk^{1/2}||_F^2``, minimised
    by the SVD of ``Wq^{1/2} Wk^{1/2}`` (``W = conj(E[z z^H])``).
    """
    wq, wk = q_moment.conj(), k_moment.conj()
    q_root, q_inv = _herm_roots(wq)
    k_root, k_inv = _herm_roots(wk)
    u, s, vh = torch.linalg.svd(q_root @ k_root)
    half = s.sqrt().to(u.dtype)
    return ComplexFit(p=q_inv @ u * half, r=k_inv @ vh.mH * half, singular_values=s)


def _drift(delta: torch.Tensor | float, context: float) -> torch.Tensor:
    """``1 - E[cos(delta * t)]`` for ``t`` uniform on ``[0, context]``: the lost share of a pair turning ``delta`` off its slot."""
    x = torch.as_tensor(delta, dtype=torch.float64).abs() * context
    return 1 - torch.where(x < 1e-8, torch.ones_like(x), torch.sin(x) / x.clamp_min(1e-8))


# --- planning one head -------------------------------------------------------------------------


def plan_head(
    q_moment: torch.Tensor,
    k_moment: torch.Tensor,
    k_cov: torch.Tensor,
    inv_freq: torch.Tensor,
    rank: int,
    *,
    nope_context: float | None,
    max_band: int = MAX_BAND,
) -> HeadPlan:
    """The cheapest plan (bands, kept pairs, unrotated part, dropped pairs) for one KV head; see the module docstring.

    ``nope_context=None``: calibrated ``pairs`` (only kept pairs, chosen by ``w_j``).
    """
    q_moment, k_moment, k_cov = (m.to(torch.float64) for m in (q_moment, k_moment, k_cov))
    d = q_moment.shape[-1]
    half, slots = d // 2, rank // 2
    theta = inv_freq.to(torch.float64)
    w = pair_energy(q_moment) * pair_energy(k_moment)  # [d/2]
    total = float(w.sum() / 2)

    if nope_context is None:  # kept pairs only: the top r/2 by w (ties -> lower index)
        kept = sorted(sorted(range(half), key=lambda j: (-float(w[j]), j))[:slots])
        bands = [_single(j, float(theta[j])) for j in kept]
        dropped = [j for j in range(half) if j not in kept]
        error = float(sum(w[j] for j in dropped) / 2)
        return HeadPlan(bands, Unrotated([], 0, None), dropped, error, total)

    context = float(nope_context)
    order = sorted(range(half), key=lambda j: (-float(theta[j]), j))  # fastest first
    n = len(order)
    drop_prefix = [0.0]
    for j in order:
        drop_prefix.append(drop_prefix[-1] + float(w[j]) / 2)

    band_fits: dict[tuple[int, int], tuple[ComplexFit, float, float]] = {}

    def band(a: int, b: int) -> tuple[ComplexFit, float, float]:
        """Fit, frequency and phase-drift cost of the band order[a:b]."""
        if (a, b) not in band_fits:
            pairs = order[a:b]
            ws = w[pairs]
            phi = float((ws * theta[pairs]).sum() / ws.sum().clamp_min(1e-300)) if ws.sum() > 0 else float(theta[pairs].mean())
            drift = float((ws * _drift(theta[pairs] - phi, context)).sum())
            fit = complex_lowrank(complex_moment(q_moment, pairs), complex_moment(k_moment, pairs))
            band_fits[(a, b)] = (fit, phi, drift)
        return band_fits[(a, b)]

    unrot_fits: dict[int, tuple[LowRankQK, float]] = {}

    def unrotated(a: int) -> tuple[LowRankQK, float]:
        """Real fit and drift cost of treating order[a:] as unrotated."""
        if a not in unrot_fits:
            pairs = order[a:]
            dims = pairs + [j + half for j in pairs]
            fit = joint_lowrank(q_moment[dims][:, dims], k_cov[dims][:, dims], len(dims))
            drift = float((w[pairs] * _drift(theta[pairs], context)).sum())
            unrot_fits[a] = (fit, drift)
        return unrot_fits[a]

    # best[i][s]: cheapest cost of covering order[i:] with s slots left; choice records the step.
    inf = float("inf")
    best = [[inf] * (slots + 1) for _ in range(n + 1)]
    choice: list[list[tuple | None]] = [[None] * (slots + 1) for _ in range(n + 1)]
    for s in range(slots + 1):
        best[n][s] = 0.0
    for i in range(n - 1, -1, -1):
        for s in range(slots + 1):
            # drop order[i]
            cand = (drop_prefix[i + 1] - drop_prefix[i] + best[i + 1][s], ("drop",))
            # a band order[i:b] with c >= 1 slots
            for b in range(i + 1, min(n, i + max_band) + 1):
                fit, phi, drift = band(i, b)
                for c in range(1, min(b - i, s) + 1):
                    cost = fit.residual(c) / 2 + drift + best[b][s - c]
                    if cost < cand[0] * (1 - 1e-12):
                        cand = (cost, ("band", b, c))
            # the unrotated tail order[i:] with rho real dims (uses what is left: 2s dims at most); a pair
            # turning >= 2 rad over the context costs more unrotated (drift >= 1/2 of w) than dropped
            if s > 0 and float(theta[order[i]]) * context <= 2.0:
                fit, drift = unrotated(i)
                rho = min(2 * s, 2 * (n - i))
                cost = fit.residual(rho) + drift
                if cost < cand[0] * (1 - 1e-12):
                    cand = (cost, ("unrotated", rho))
            best[i][s], choice[i][s] = cand

    bands: list[Band] = []
    dropped: list[int] = []
    unrot = Unrotated([], 0, None)
    i, s = 0, slots
    while i < n:
        step = choice[i][s]
        if step[0] == "drop":
            dropped.append(order[i])
            i += 1
        elif step[0] == "band":
            _, b, c = step
            fit, phi, _ = band(i, b)
            bands.append(Band(order[i:b], c, phi, fit.p[:, :c].T.clone(), fit.r[:, :c].T.clone()))
            i, s = b, s - c
        else:
            fit, _ = unrotated(i)
            unrot = Unrotated(order[i:], step[1], fit)
            i = n
    return HeadPlan(bands, unrot, sorted(dropped), best[0][slots], total)


def _single(j: int, freq: float) -> Band:
    one = torch.ones(1, 1, dtype=torch.complex128)
    return Band([j], 1, freq, one, one.clone())


# --- building the thin projections -----------------------------------------------------------------


def _realise(coef: torch.Tensor, pairs: list[int], half: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real rows (``[d]`` each) giving Re and Im of ``sum_j coef[j] z_j`` (``z_j = x_j + i y_j``)."""
    re, im = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    idx = torch.tensor(pairs)
    a, b = coef.real, coef.imag
    re[idx], re[idx + half] = a, -b  # Re(a + ib)(x + iy) = a x - b y
    im[idx], im[idx + half] = b, a  # Im(a + ib)(x + iy) = b x + a y
    return re, im


def build_thin_layer(
    qk: QueryKey, rank: int, inv_freq: torch.Tensor, moments: QKMoments, *, nope_context: float | None
) -> ThinLayer:
    """Thin q/k projections and the frequency table of one layer under ``mixed`` (or calibrated ``pairs`` with ``nope_context=None``)."""
    n_heads, d, hidden = qk.q_weight.shape
    n_kv = qk.k_weight.shape[0]
    group, half, slots = n_heads // n_kv, d // 2, rank // 2
    q_map = torch.zeros(n_kv, rank, d, dtype=torch.float64)  # thin q = q_map[g] @ source q (every head of group g)
    k_map = torch.zeros(n_kv, rank, d, dtype=torch.float64)  # thin k = k_map[g] @ source k
    freqs = torch.zeros(n_kv, slots, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny eigh/SVDs: threading only adds overhead
    try:
        plans = [
            plan_head(moments.q_moment[g], moments.k_moment[g], moments.k_cov[g], inv_freq, rank, nope_context=nope_context)
            for g in range(n_kv)
        ]
    finally:
        torch.set_num_threads(threads)
    for g, plan in enumerate(plans):
        slot = 0
        for band in sorted(plan.bands, key=lambda b: -b.freq):  # fastest slots first
            for c in range(band.slots):  # slot -> thin dims (slot, slot + r/2) = (Re, Im)
                q_map[g, slot], q_map[g, slot + slots] = _realise(band.q_coef[c], band.pairs, half, d)
                k_map[g, slot], k_map[g, slot + slots] = _realise(band.k_coef[c], band.pairs, half, d)
                freqs[g, slot] = band.freq
                slot += 1
        un = plan.unrotated
        if un.dims:  # the remaining slots' dims, first halves then partners, at frequency 0
            dims = un.pairs + [j + half for j in un.pairs]
            free = list(range(slot, slots)) + list(range(slot + slots, 2 * slots))
            for c, thin_dim in enumerate(free[: un.dims]):
                q_map[g, thin_dim, dims] = un.fit.a[c]
                k_map[g, thin_dim, dims] = un.fit.b[c]

    q_w = qk.q_weight.to(torch.float64).reshape(n_kv, group, d, hidden)
    q_thin = torch.einsum("grd,gjdD->gjrD", q_map, q_w).reshape(n_heads, rank, hidden)  # [H, r, D]
    k_thin = torch.einsum("grd,gdD->grD", k_map, qk.k_weight.to(torch.float64))  # [Hkv, r, D]
    q_bias = k_bias = None
    if qk.q_bias is not None:
        q_b = qk.q_bias.to(torch.float64).reshape(n_kv, group, d)
        q_bias = torch.einsum("grd,gjd->gjr", q_map, q_b).reshape(n_heads, rank)
    if qk.k_bias is not None:
        k_bias = torch.einsum("grd,gd->gr", k_map, qk.k_bias.to(torch.float64))
    return ThinLayer(QueryKey(q_thin, k_thin, q_bias, k_bias), freqs, k_map, q_map, plans)
