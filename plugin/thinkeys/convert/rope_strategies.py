"""How a RoPE model's rotary embedding is carried into the r-dim key space.

Each strategy returns, per KV head g, a basis ``P_g`` (``[d, r]``, orthonormal columns, absorbed
into q and k by :func:`thinkeys.convert.svd.absorb`) and the frequency table row the thin RoPE
uses for that head (``[r/2]``, radians per position; see :mod:`thinkeys.rope` for the layout).

``pairs`` (exact RoPE on what is kept)
    The source rotates dim ``j`` with ``j + d/2`` at frequency ``inv_freq[j]`` (NeoX layout, as in
    HF's ``rotate_half``). Keep the r/2 pairs with the most energy, each with its own frequency,
    and lay them out NeoX-style in the thin head: kept pair ``p_i`` (sorted by original index)
    becomes thin dims ``i`` and ``i + r/2``. ``P_g`` is then a 0/1 selection matrix, rotation
    commutes with it, and the kept part of ``q.k`` is reproduced exactly; r = d is the identity.

    Data-free criterion: a pair contributes ``q_p . k_p`` to the score, bounded by
    ``|q_p| |k_p|``. With the pre-attention norm's output modelled as ``gain * u`` for isotropic
    unit-variance ``u``, ``E|q_p|^2 = ||W_Q[p] diag(gain)||_F^2 + |b_Q[p]|^2`` (rows ``p`` and
    ``p + d/2``; summed over the group's query heads), and likewise for k. The score is
    ``sqrt(E|q_p|^2 * E|k_p|^2)``; ties go to the lower pair index.

    Measured weakness: real attention inputs are far from isotropic, and on SmolLM2-135M this
    data-free choice wrecks the model below full rank (wiki perplexity 14.7 -> 836 at r = 48 of
    64, dropping mostly the fastest pairs), while the same score on real activations keeps it at
    17.0. Prefer ``--calibration`` (:mod:`thinkeys.convert.calibration`) whenever text is at hand.

``svd`` (the paper's variant: approximate, needs recovery fine-tuning)
    ``P_g`` = top-r left singular vectors of ``W_K^g``; RoPE is then applied to all r thin dims
    with the source's first r/2 frequencies, pairing thin dim ``i`` with ``i + r/2`` (what an
    r-wide standard RoPE does to the SVD keys). Rotation does not commute with the SVD mixing, so
    even r = d is not the source model.

``none`` (no RoPE in the source: GPT-2)
    ``P_g`` = the SVD basis; exact up to truncation, no table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from thinkeys.checkpoint import RopeStrategy, ThinKeyError
from thinkeys.convert.families import QueryKey
from thinkeys.convert.svd import key_svd_basis

#: The transformers rotary-embedding class of each RoPE source architecture ("module:Class").
ROTARY_EMBEDDINGS = {
    "LlamaForCausalLM": "transformers.models.llama.modeling_llama:LlamaRotaryEmbedding",
    "MistralForCausalLM": "transformers.models.mistral.modeling_mistral:MistralRotaryEmbedding",
    "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding",
    "Qwen3ForCausalLM": "transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding",
    "Gemma3ForCausalLM": "transformers.models.gemma3.modeling_gemma3:Gemma3RotaryEmbedding",
}


@dataclass
class ThinBasis:
    basis: torch.Tensor  # [Hkv, d, r] float64
    freqs: torch.Tensor | None  # [Hkv, r/2] float32, None without RoPE


def source_inv_freq(architecture: str, config: Any, head_dim: int, layer_type: str | None = None) -> torch.Tensor:
    """The source model's RoPE inverse frequencies ``[d/2]`` (float32), as transformers computes them.

    Built by the architecture's own rotary-embedding class, so ``linear`` and ``llama3`` scaling
    are honoured. Refused: ``dynamic`` (frequencies change with sequence length, a fixed table
    cannot hold them), types with an attention factor != 1 (``yarn``, ``longrope``: they also
    rescale cos/sin, which the thin RoPE does not), and partial rotary embeddings. Models with one
    RoPE per layer type (Gemma 3: ``rope_parameters`` keyed by ``sliding_attention`` /
    ``full_attention``) give the table of ``layer_type``.
    """
    module, cls = ROTARY_EMBEDDINGS[architecture].split(":")
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ThinKeyError(
            "config.json: rope_type 'dynamic' changes its frequencies with the sequence length; thin keys "
            "store one fixed table per layer. Supported rope types: default, linear, llama3"
        )
    rotary = getattr(importlib.import_module(module), cls)(config)
    prefix = "" if layer_type is None else f"{layer_type}_"
    scaling = float(getattr(rotary, f"{prefix}attention_scaling"))
    if abs(scaling - 1.0) > 1e-12:
        raise ThinKeyError(
            f"config.json: rope_type {rope_type!r} scales attention by {scaling:.4g} "
            "(an attention factor != 1, as yarn/longrope do), which thin-key RoPE does not apply. "
            "Supported rope types: default, linear, llama3"
        )
    inv_freq = getattr(rotary, f"{prefix}inv_freq").detach().to(torch.float32)
    if inv_freq.numel() != head_dim // 2:
        raise ThinKeyError(
            f"config.json: RoPE rotates {2 * inv_freq.numel()} of the {head_dim} head dims (partial rotary); "
            "only full-width RoPE is supported"
        )
    return inv_freq


def layer_inv_freqs(architecture: str, config: Any, head_dim: int) -> list[torch.Tensor]:
    """Every layer's RoPE inverse frequencies (``[d/2]`` each): one table for all layers, or, where the
    config has ``layer_types`` with per-type ``rope_parameters`` (Gemma 3), the table of each layer's type."""
    layer_types = getattr(config, "layer_types", None)
    params = getattr(config, "rope_parameters", None) or {}
    if layer_types and all(t in params for t in set(layer_types)):
        tables = {t: source_inv_freq(architecture, config, head_dim, t) for t in sorted(set(layer_types))}
        return [tables[t] for t in layer_types]
    return [source_inv_freq(architecture, config, head_dim)] * config.num_hidden_layers


def pair_scores(qk: QueryKey) -> torch.Tensor:
    """Data-free energy score of every rotary pair of every KV head, ``[Hkv, d/2]`` (see the module docstring)."""
    n_heads, d, _ = qk.q_weight.shape
    n_kv = qk.k_weight.shape[0]
    half = d // 2

    def row_energy(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # [n, d, D] -> [n, d]
        w = w.to(torch.float64)
        if qk.input_gain is not None:
            w = w * qk.input_gain.to(torch.float64)  # scale input columns by the norm gain
        e = w.pow(2).sum(-1)
        if b is not None:
            e = e + b.to(torch.float64).pow(2)
        return e

    def per_pair(e: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d/2]: dims j and j + d/2
        return e[:, :half] + e[:, half:]

    q_pairs = per_pair(row_energy(qk.q_weight, qk.q_bias)).reshape(n_kv, n_heads // n_kv, half).sum(1)  # [Hkv, d/2]
    k_pairs = per_pair(row_energy(qk.k_weight, qk.k_bias))  # [Hkv, d/2]
    return (q_pairs * k_pairs).sqrt()


def select_pairs(scores: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Indices of the ``n_pairs`` best pairs per KV head, ``[Hkv, n_pairs]``, sorted by original index."""
    order = torch.sort(-scores, dim=-1, stable=True).indices  # best first; ties -> lower index
    return order[:, :n_pairs].sort(dim=-1).values


def pairs_basis(qk: QueryKey, rank: int, inv_freq: torch.Tensor) -> ThinBasis:
    n_kv, d, _ = qk.k_weight.shape
    half, n_pairs = d // 2, rank // 2
    kept = select_pairs(pair_scores(qk), n_pairs)  # [Hkv, r/2]
    basis = torch.zeros(n_kv, d, rank, dtype=torch.float64)
    cols = torch.arange(n_pairs)
    for g in range(n_kv):
        basis[g, kept[g], cols] = 1.0  # first rotary half: source dim p -> thin dim i
        basis[g, kept[g] + half, cols + n_pairs] = 1.0  # its partner p + d/2 -> thin dim i + r/2
    return ThinBasis(basis=basis, freqs=inv_freq[kept].to(torch.float32))  # freqs: [Hkv, r/2]


def svd_rope_basis(qk: QueryKey, rank: int, inv_freq: torch.Tensor) -> ThinBasis:
    n_kv = qk.k_weight.shape[0]
    freqs = inv_freq[: rank // 2].to(torch.float32).expand(n_kv, -1).contiguous()  # [Hkv, r/2]
    return ThinBasis(basis=key_svd_basis(qk.k_weight, rank), freqs=freqs)


def svd_no_rope_basis(qk: QueryKey, rank: int) -> ThinBasis:
    return ThinBasis(basis=key_svd_basis(qk.k_weight, rank), freqs=None)


def thin_basis(strategy: RopeStrategy, qk: QueryKey, rank: int, inv_freq: torch.Tensor | None) -> ThinBasis:
    if strategy == RopeStrategy.PAIRS:
        return pairs_basis(qk, rank, inv_freq)
    if strategy == RopeStrategy.SVD:
        return svd_rope_basis(qk, rank, inv_freq)
    return svd_no_rope_basis(qk, rank)
