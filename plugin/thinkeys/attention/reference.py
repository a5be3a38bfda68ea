"""Plain-PyTorch reference for the paged thin-key attention: one sequence, dense, obviously correct."""

from __future__ import annotations

import math

import torch


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, context: int = 0, sliding_window: int | None = None
) -> torch.Tensor:
    """``q`` ``[q_len, H, r]`` at positions ``context ..``, ``k`` ``[kv_len, H_kv, r]``, ``v`` ``[kv_len, H_kv, d]`` -> ``[q_len, H, d]``.

    Query ``i`` sees keys ``0 .. context + i``; with ``sliding_window`` W only the last W of them
    (``context + i - W < j``). Computed in float64 with an explicit softmax.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()  # [kv_len, H, r]
    v = v.repeat_interleave(group, dim=1).double()  # [kv_len, H, d]
    scores = torch.einsum("qhr,khr->hqk", q.double(), k) * scale  # [H, q_len, kv_len]
    q_pos = torch.arange(q.shape[0])[:, None] + context
    k_pos = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill(k_pos > q_pos, -math.inf)
    if sliding_window is not None:
        scores = scores.masked_fill(k_pos <= q_pos - sliding_window, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
