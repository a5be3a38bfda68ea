"""Paged attention over a KV cache whose keys are narrower than its values, in plain PyTorch.

The cache of one layer is vLLM's logical per-layer view ``[num_blocks, H_kv, block_size, r + d]``:
for every token slot the first ``r`` channels hold its (thin, already rotated) key and the last
``d`` its value. Physical strides depend on the KV-cache layout vLLM chose; every access here goes
through the logical view with advanced indexing, so it works for any layout and writes in place.

One code path covers prefill, decode, chunked prefill and prefix-cache hits: a request with
``seq_len`` cached tokens (the new ones included, since the cache is written before attention)
and ``q_len`` new query tokens attends to positions ``0 .. seq_len - 1``, query ``i`` seeing key
``j`` iff ``j <= seq_len - q_len + i``.

Decodes (``q_len == 1``; vLLM puts them first when the builder asks for batch reordering) run as
one batched SDPA call over a padded gather; prefills run one SDPA call per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillRequest:
    """One request with more than one new token."""

    query_start: int
    query_end: int
    kv_len: int
    kv_blocks: torch.Tensor  # [kv_len] block id of every cached position
    kv_offsets: torch.Tensor  # [kv_len] offset inside that block
    mask: torch.Tensor | None  # [q_len, kv_len] bool (True = attend); None = plain causal (no cached prefix)


@dataclass
class ThinPagedMetadata:
    """What one model step needs, built once per step and shared by every layer."""

    num_actual_tokens: int
    num_decodes: int  # the first num_decodes requests (and tokens) are single-token decodes
    decode_blocks: torch.Tensor | None = None  # [n_dec, max_len] block id per position (padded with 0)
    decode_offsets: torch.Tensor | None = None  # [n_dec, max_len]
    decode_mask: torch.Tensor | None = None  # [n_dec, 1, 1, max_len] bool, True = real position
    prefills: list[PrefillRequest] = field(default_factory=list)


def _token_locations(
    block_table_row: torch.Tensor, positions: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset) of each position of one request."""
    return block_table_row[positions // block_size], positions % block_size


def build_metadata(
    *,
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: torch.Tensor,
    block_size: int,
    num_actual_tokens: int,
) -> ThinPagedMetadata:
    """Index tensors for :func:`paged_attention`, from host-side query offsets and sequence lengths.

    ``block_table`` is ``[num_reqs, max_blocks]`` on the compute device.
    """
    device = block_table.device
    num_reqs = len(seq_lens)
    query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_reqs)]
    num_decodes = 0
    while num_decodes < num_reqs and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = ThinPagedMetadata(num_actual_tokens=num_actual_tokens, num_decodes=num_decodes)

    if num_decodes:
        lens = torch.tensor(seq_lens[:num_decodes], device=device)
        max_len = int(max(seq_lens[:num_decodes]))
        positions = torch.arange(max_len, device=device)  # [max_len]
        valid = positions[None, :] < lens[:, None]  # [n_dec, max_len]
        block_idx = torch.where(valid, positions[None, :] // block_size, 0)
        meta.decode_blocks = torch.gather(block_table[:num_decodes], 1, block_idx)
        meta.decode_offsets = (positions % block_size).expand(num_decodes, max_len)
        meta.decode_mask = valid[:, None, None, :]

    for i in range(num_decodes, num_reqs):
        q_len, kv_len = query_lens[i], seq_lens[i]
        if q_len == 0:  # padding request
            continue
        positions = torch.arange(kv_len, device=device)
        blocks, offsets = _token_locations(block_table[i], positions, block_size)
        context = kv_len - q_len
        mask = None
        if context:
            q_pos = torch.arange(context, kv_len, device=device)
            mask = positions[None, :] <= q_pos[:, None]  # [q_len, kv_len]
        meta.prefills.append(
            PrefillRequest(query_start_loc[i], query_start_loc[i + 1], kv_len, blocks, offsets, mask)
        )
    return meta


def write_kv(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's thin key ``[T, H_kv, r]`` and value ``[T, H_kv, d]`` at its slot (in place).

    Padding tokens have slot -1 and are skipped.
    """
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    entry = torch.cat((key, value), dim=-1).to(kv_cache.dtype)  # [T, H_kv, r + d]
    kv_cache[blocks, :, offsets] = entry


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: ThinPagedMetadata,
    scale: float,
    output: torch.Tensor,
) -> torch.Tensor:
    """Attention of ``query`` ``[T, H, r]`` over the cache; writes ``output`` ``[T, H, d]``."""
    r = query.shape[-1]
    num_kv_heads = kv_cache.shape[1]
    gqa = query.shape[1] != num_kv_heads

    n_dec = meta.num_decodes
    if n_dec:
        kv = kv_cache[meta.decode_blocks, :, meta.decode_offsets]  # [n_dec, max_len, H_kv, r + d]
        kv = kv.to(query.dtype).transpose(1, 2)  # [n_dec, H_kv, max_len, r + d]
        out = F.scaled_dot_product_attention(
            query[:n_dec].unsqueeze(2),  # [n_dec, H, 1, r]
            kv[..., :r],
            kv[..., r:],
            attn_mask=meta.decode_mask,
            scale=scale,
            enable_gqa=gqa,
        )  # [n_dec, H, 1, d]
        output[:n_dec] = out.squeeze(2)

    for req in meta.prefills:
        kv = kv_cache[req.kv_blocks, :, req.kv_offsets].to(query.dtype).transpose(0, 1)  # [H_kv, L, r + d]
        q = query[req.query_start : req.query_end].transpose(0, 1)  # [H, q_len, r]
        out = F.scaled_dot_product_attention(
            q,
            kv[..., :r],
            kv[..., r:],
            attn_mask=req.mask,
            is_causal=req.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )  # [H, q_len, d]
        output[req.query_start : req.query_end] = out.transpose(0, 1)
    return output
