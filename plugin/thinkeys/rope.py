"""Rotary embedding in the thin r-dim space; one implementation for the vLLM model and the PyTorch reference.

The first ``rope_dims`` of a head's r dims are rotated in NeoX layout (dim ``j`` pairs with
``j + rope_dims / 2``) at angle ``position * freqs[g, j]``, where ``g`` is the head's KV group;
the other ``r - rope_dims`` dims pass through. Like HF and vLLM, cos/sin are computed in float32
and the rotation is done in the input's dtype.
"""

from __future__ import annotations

import torch


def apply_thin_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[..., n_heads, r]`` at ``positions`` (shape ``[...]``).

    ``freqs`` is ``[n_kv_heads, rope_dims / 2]``; ``n_heads`` must be a multiple of ``n_kv_heads``
    (query head ``h`` uses the table of KV head ``h // (n_heads // n_kv_heads)``).
    """
    n_heads = x.shape[-2]
    n_kv, half = freqs.shape
    if half == 0:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} heads cannot share {n_kv} frequency tables")
    angles = positions.to(torch.float32)[..., None, None] * freqs.to(torch.float32)  # [..., Hkv, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    group = n_heads // n_kv
    if group > 1:
        cos = cos.repeat_interleave(group, dim=-2)  # [..., H, half]
        sin = sin.repeat_interleave(group, dim=-2)
    x1 = x[..., :half]
    x2 = x[..., half : 2 * half]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if 2 * half == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)


def default_inv_freq(head_dim: int, theta: float, rotary_dim: int | None = None) -> torch.Tensor:
    """The base RoPE frequencies of a Llama-style model: ``theta ** (-2j / rotary_dim)``, j < rotary_dim / 2."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    # float32, exactly as vLLM's RotaryEmbedding._compute_inv_freq computes it.
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
