"""The thin-key self-attention block shared by every family's vLLM model.

Queries and keys are projected to ``r`` dims per head, values to ``d`` (``head_dim`` of the source
model); the first ``rope_dims`` of q/k are rotated with the per-KV-head frequency table stored in
the checkpoint; vLLM's ``Attention`` layer gets ``head_size=r, head_size_v=d``, so its KV-cache spec
(and so the engine's block count) is sized for thin keys plus full values.

Shared K=V checkpoints (``thin.shared_kv``): the layer hands vLLM's ``Attention`` the un-rotated
key projection as both key and value and uses the ``THINKEYS_SHARED_KV`` backend, whose pages hold
one d-wide vector per token and KV head and which rotates that vector at its position when it reads
it as a key (see ``thinkeys.attention.shared``). The checkpoint's ``v_proj`` (equal to ``k_proj``)
is still loaded with the fused projection, and its output is not used.

Rebuild-at-read checkpoints (``thin.rebuild``): queries are the source's (d wide, rotated with the
source's RoPE), ``k_proj`` gives the r-wide latent that is cached un-rotated, and the
``THINKEYS_REBUILD`` backend rebuilds and rotates keys at read time with the layer's expansion
table (``thin_rebuild``) and frequency table. The fused projection is vLLM's ``QKVParallelLinear``
with ``head_size = r`` and ``H * d / r`` query "heads" of width r (the query part is the source's
``[H * d, D]``, split over tensor-parallel ranks on whole heads since ``r | d``); the query goes to
``Attention`` flat (see ``thinkeys.attention.rebuild`` for why that is exact).

Built only from vLLM's own parallel layers, so tensor parallelism shards heads (GQA included)
exactly as vLLM's Llama does: ``QKVParallelLinear`` splits q/k/v heads across ranks (replicating
KV heads when there are fewer than ranks) and the frequency table is split the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig

from thinkeys.attention.selector import select_attention_backend
from thinkeys.checkpoint import REBUILD_TABLE_NAME, ROPE_FREQS_NAME, RopeStrategy, ThinKeyConfig, ThinKeyError
from thinkeys.rope import apply_thin_rope


class ThinKeyAttention(nn.Module):
    """Self-attention with thin q/k. Subclasses only name the projections as their checkpoints do."""

    qkv_name = "qkv_proj"
    out_name = "o_proj"

    def __init__(
        self,
        *,
        thin: ThinKeyConfig,
        hidden_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        qkv_bias: bool,
        out_bias: bool,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if total_num_heads % tp_size or (
            total_num_kv_heads % tp_size if total_num_kv_heads >= tp_size else tp_size % total_num_kv_heads
        ):
            raise ThinKeyError(
                f"{total_num_heads} query / {total_num_kv_heads} KV heads cannot be split over "
                f"tensor-parallel size {tp_size}: choose a size that divides the head counts"
            )
        self.rank, self.head_dim = thin.rank, thin.head_dim
        self.rebuild = thin.rebuild
        self.query_width = thin.query_width  # d for rebuild, else r
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.query_width
        self.k_size = self.num_kv_heads * self.rank
        self.v_size = self.num_kv_heads * self.head_dim

        self.add_module(
            self.qkv_name,
            QKVParallelLinear(
                hidden_size,
                head_size=self.rank,
                # rebuild: H * d / r query "heads" of width r hold the d-wide queries (r | d)
                total_num_heads=total_num_heads * self.query_width // self.rank,
                total_num_kv_heads=total_num_kv_heads,
                bias=qkv_bias,
                quant_config=quant_config,
                prefix=f"{prefix}.{self.qkv_name}",
                v_head_size=self.head_dim,
            ),
        )
        self.add_module(
            self.out_name,
            RowParallelLinear(
                total_num_heads * self.head_dim,
                hidden_size,
                bias=out_bias,
                quant_config=quant_config,
                prefix=f"{prefix}.{self.out_name}",
            ),
        )

        self.shared_kv = thin.shared_kv
        self.rope_dims = thin.rope_dims if thin.rope != RopeStrategy.NONE else 0
        if self.rope_dims:
            # [H_kv local, rope_dims / 2] radians per position; loaded from the checkpoint.
            freqs = nn.Parameter(torch.empty(self.num_kv_heads, self.rope_dims // 2, dtype=torch.float32), requires_grad=False)
            freqs.weight_loader = self._load_rope_freqs
            self.register_parameter(ROPE_FREQS_NAME, freqs)
            self._kv_head_start = self._local_kv_head_start(total_num_kv_heads, tp_size)

        self.attn = Attention(
            self.num_heads,
            self.rank,
            # The source model's scale: q'.k' approximates q.k, so softmax temperature is unchanged.
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=select_attention_backend(self.rank, self.head_dim, shared_kv=self.shared_kv, rebuild=self.rebuild),
            head_size_v=self.head_dim,
        )
        if self.rebuild:
            # [H_kv local, d, r] expansion A^T; the backend reads it (same Parameter object, loaded in place).
            table = nn.Parameter(torch.empty(self.num_kv_heads, self.head_dim, self.rank, dtype=torch.float32), requires_grad=False)
            table.weight_loader = self._load_kv_head_table
            self.register_parameter(REBUILD_TABLE_NAME, table)
            self.attn.impl.rebuild_table = table
            self.attn.impl.key_rope_freqs = getattr(self, ROPE_FREQS_NAME)
        if self.shared_kv:
            # The backend rotates cached vectors read as keys with this table (the same Parameter
            # object, so the checkpoint's values reach it when weights are loaded in place).
            self.attn.impl.key_rope_freqs = getattr(self, ROPE_FREQS_NAME) if self.rope_dims else None

    @staticmethod
    def _local_kv_head_start(total_num_kv_heads: int, tp_size: int) -> int:
        rank = get_tensor_model_parallel_rank()
        if total_num_kv_heads >= tp_size:
            return rank * (total_num_kv_heads // tp_size)
        return rank // (tp_size // total_num_kv_heads)  # KV heads replicated over ranks

    def _load_rope_freqs(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        local = loaded[self._kv_head_start : self._kv_head_start + self.num_kv_heads]
        if local.shape != param.shape:
            raise ThinKeyError(
                f"{ROPE_FREQS_NAME}: checkpoint table {tuple(loaded.shape)} does not fit "
                f"[{self.num_kv_heads} KV heads, rope_dims/2 = {self.rope_dims // 2}]"
            )
        param.data.copy_(local)

    def _load_kv_head_table(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        local = loaded[self._kv_head_start : self._kv_head_start + self.num_kv_heads]
        if local.shape != param.shape:
            raise ThinKeyError(
                f"{REBUILD_TABLE_NAME}: checkpoint table {tuple(loaded.shape)} does not fit "
                f"[{self.num_kv_heads} KV heads, head_dim {self.head_dim}, rank {self.rank}]"
            )
        param.data.copy_(local)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = getattr(self, self.qkv_name)(hidden_states)
        q, k, v = qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)
        if self.shared_kv:
            # One vector per token and KV head: cached un-rotated, rotated by the backend when read as a key.
            if self.rope_dims:
                freqs = getattr(self, ROPE_FREQS_NAME)
                q = apply_thin_rope(q.view(-1, self.num_heads, self.rank), positions, freqs).flatten(1)
            output, _ = getattr(self, self.out_name)(self.attn(q, k, k))
            return output
        if self.rebuild:
            # The source's query, rotated; the latent is cached as it is and rebuilt + rotated by the backend.
            freqs = getattr(self, ROPE_FREQS_NAME)
            q = apply_thin_rope(q.view(-1, self.num_heads, self.head_dim), positions, freqs).flatten(1)  # [T, H * d]
            output, _ = getattr(self, self.out_name)(self.attn(q, k, v))
            return output
        if self.rope_dims:
            freqs = getattr(self, ROPE_FREQS_NAME)
            q = apply_thin_rope(q.view(-1, self.num_heads, self.rank), positions, freqs).flatten(1)
            k = apply_thin_rope(k.view(-1, self.num_kv_heads, self.rank), positions, freqs).flatten(1)
        attn_output = self.attn(q, k, v)  # [T, H * d]
        output, _ = getattr(self, self.out_name)(attn_output)
        return output
