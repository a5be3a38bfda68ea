"""Rebuild-at-read strategies: cache a thin pre-RoPE latent, rebuild and rotate the key at every read.

These cache a thin *pre-RoPE* key ``c = B k`` (r wide) and, at every read, rebuild a full key
``k~ = A^T c`` (d wide) and rotate it with the source RoPE. Rotation then acts on the rebuilt key
exactly, so the only error is the rank-r truncation ``M = A^T B``::

    logit = (R_m q) . (R_n M k)

Served as ``rope: rebuild`` checkpoints (:func:`rebuild_layer` writes the layer: ``k_proj`` =
``B W_K``, expansion table ``A^T``; format in :mod:`thinkeys.checkpoint`) by the
``THINKEYS_REBUILD`` attention backend (``thinkeys.attention.rebuild``), which expands and rotates
every cached key on every step (``d * r`` multiply-adds per cached key and KV head).
:func:`rebuild_model` builds the same model differently, as the *stock* source model with its key
projection replaced by ``M W_K`` (and key bias by ``M b_K``), so perplexity can be measured with
the ordinary evaluator without a thin cache.

Kinds of ``M`` (rank r, per KV head):

* ``svd``: ``U_r U_r^T``, the top-r left singular vectors of ``W_K`` (weights only);
* ``pca``: the top-r eigenvectors of the real key second moment ``E[k k^T]`` ("SVD weighted by
  real input activations");
* ``joint``: ``A^T B`` of :func:`thinkeys.convert.weighted.joint_lowrank` with the group's query
  second moment and the key second moment (uncentered: a rotated key mean does not cancel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thinkeys.checkpoint import ThinKeyError
from thinkeys.convert.calibration import Calibration, qk_moments
from thinkeys.convert.families import Geometry, LlamaLayout, QueryKey
from thinkeys.convert.svd import key_svd_basis
from thinkeys.convert.weighted import joint_lowrank, key_pca_basis

REBUILD_KINDS = ("svd", "pca", "joint")


def rebuild_factors(
    kind: str, k_weight: torch.Tensor, rank: int, q_moment: torch.Tensor | None, k_moment: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A^T)``: the cache map ``[Hkv, r, d]`` (``c = B k``) and the expansion ``[Hkv, d, r]`` (``k~ = A^T c``), float64."""
    n_kv = k_weight.shape[0]
    if kind == "svd":
        u = key_svd_basis(k_weight, rank)  # [Hkv, d, r]
        return u.transpose(1, 2), u
    if q_moment is None or k_moment is None:
        raise ThinKeyError(f"rebuild kind {kind!r} needs calibration statistics")
    if kind == "pca":
        u = torch.stack([key_pca_basis(k_moment[g], rank) for g in range(n_kv)])  # [Hkv, d, r]
        return u.transpose(1, 2), u
    if kind == "joint":
        fits = [joint_lowrank(q_moment[g], k_moment[g], rank) for g in range(n_kv)]
        return torch.stack([f.b for f in fits]), torch.stack([f.a.T for f in fits])
    raise ThinKeyError(f"rebuild kind {kind!r} is not one of {', '.join(REBUILD_KINDS)}")


def rebuild_maps(kind: str, k_weight: torch.Tensor, rank: int, q_moment: torch.Tensor | None, k_moment: torch.Tensor | None) -> torch.Tensor:
    """The rank-``rank`` maps ``M = A^T B`` ``[Hkv, d, d]`` applied to source keys (see the module docstring)."""
    b, expand = rebuild_factors(kind, k_weight, rank, q_moment, k_moment)
    return expand @ b


def rebuild_layer(qk: QueryKey, b: torch.Tensor) -> QueryKey:
    """The served layer's projections: queries unchanged, ``k_proj`` = ``B W_K`` ``[Hkv, r, d]`` (bias ``B b_K``), float64."""
    k_weight = torch.einsum("grd,gdD->grD", b, qk.k_weight.to(torch.float64))
    k_bias = None if qk.k_bias is None else torch.einsum("grd,gd->gr", b, qk.k_bias.to(torch.float64))
    return QueryKey(q_weight=qk.q_weight, k_weight=k_weight, q_bias=qk.q_bias, k_bias=k_bias)


@torch.no_grad()
def rebuild_model(src: str | Path, rank: int, kind: str, calibration: Calibration | None = None) -> Any:
    """The source model (transformers, fp32, eval mode) with every key projection replaced by its rank-r rebuild ``M W_K``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    geo = Geometry.from_config(model.config)
    if not 1 <= rank <= geo.head_dim:
        raise ThinKeyError(f"rank {rank} is out of range 1..{geo.head_dim}")
    state = {n: t for n, t in model.state_dict().items()}
    layout = LlamaLayout(geo, state)
    for i, layer in enumerate(model.model.layers):
        qk = layout.read(state, i)
        q_m = k_m = None
        if calibration is not None:
            m = qk_moments(qk, calibration.mean[i], calibration.moment[i])
            q_m, k_m = m.q_moment, m.k_moment
        maps = rebuild_maps(kind, qk.k_weight, rank, q_m, k_m)  # [Hkv, d, d]
        k_proj = layer.self_attn.k_proj
        w = torch.einsum("gde,geD->gdD", maps, qk.k_weight.to(torch.float64))  # [Hkv, d, D]
        k_proj.weight.copy_(w.reshape(-1, geo.hidden).to(k_proj.weight.dtype))
        if k_proj.bias is not None:
            b = torch.einsum("gde,ge->gd", maps, qk.k_bias.to(torch.float64))
            k_proj.bias.copy_(b.reshape(-1).to(k_proj.bias.dtype))
    return model
