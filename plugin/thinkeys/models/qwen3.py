"""Thin-key Qwen3 for vLLM: vLLM's own Qwen3 with the attention swapped.

Qwen3 normalises q and k per head (``q_norm`` / ``k_norm``, RMSNorm over d) between the projection
and RoPE, so the key is not a linear function of the layer input and the thin basis cannot be
absorbed into ``k_proj``. The thin attention computes q/k d wide with vLLM's fused projection,
normalises them with vLLM's ``RMSNorm``, maps them to r with the checkpoint's per-KV-head
``thin_q_map`` / ``thin_k_map`` ``[Hkv, r, d]`` (see :mod:`thinkeys.checkpoint`), rotates them with
the thin RoPE table, and hands vLLM's ``Attention`` r-wide keys and d-wide values: only the r-dim
key is cached. Rebuild-at-read checkpoints (``rope: rebuild``) keep the normalised query as it is
(rotated with the source's RoPE), cache the un-rotated latent ``thin_k_map @ k_norm(k)`` and let
the ``THINKEYS_REBUILD`` backend rebuild and rotate keys with ``thin_rebuild`` at read time.

vLLM's ``Qwen3DecoderLayer`` builds its attention class by name, so the thin decoder layer
subclasses it and builds the same blocks with the thin attention (its ``forward``, MLP and norms are
vLLM's); the model is vLLM's ``Qwen3Model`` with that layer type, and weight loading is vLLM's
``AutoWeightsLoader`` (q/k/v stacked into ``qkv_proj``; the maps and RoPE tables load through
their own ``weight_loader``).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP, Qwen3Model
from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

from thinkeys.attention.selector import select_attention_backend
from thinkeys.checkpoint import (
    KEY_MAP_NAME,
    QUERY_MAP_NAME,
    REBUILD_TABLE_NAME,
    ROPE_FREQS_NAME,
    ThinKeyConfig,
    ThinKeyError,
)
from thinkeys.models.thin_attention import ThinKeyAttention
from thinkeys.rope import apply_thin_rope


class ThinKeyQKNormAttention(nn.Module):
    """Self-attention whose q/k are normalised per head, then mapped to r dims (cached keys are r wide)."""

    def __init__(
        self,
        *,
        thin: ThinKeyConfig,
        hidden_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        qkv_bias: bool,
        rms_norm_eps: float,
        scale: float,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
        norm_cls: type[nn.Module] = RMSNorm,
        sliding_window: int | None = None,
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
        self.rank, self.head_dim = r, d = thin.rank, thin.head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qkv_proj = QKVParallelLinear(
            hidden_size, d, total_num_heads, total_num_kv_heads,
            bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_num_heads * d, hidden_size, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        self.q_norm = norm_cls(d, eps=rms_norm_eps)
        self.k_norm = norm_cls(d, eps=rms_norm_eps)

        self._kv_head_start = ThinKeyAttention._local_kv_head_start(total_num_kv_heads, tp_size)
        self.rebuild = thin.rebuild
        # rebuild: no query map (the normalised query is the source's), the key map is B and the
        # expansion A^T [Hkv, d, r] goes to the THINKEYS_REBUILD backend (thinkeys.attention.rebuild)
        shapes = {KEY_MAP_NAME: (r, d), ROPE_FREQS_NAME: (thin.rope_dims // 2,)}
        shapes.update({REBUILD_TABLE_NAME: (d, r)} if self.rebuild else {QUERY_MAP_NAME: (r, d)})
        for name, shape in shapes.items():
            # angles and the expansion in float32, maps in the model dtype
            dtype = torch.float32 if name in (ROPE_FREQS_NAME, REBUILD_TABLE_NAME) else None
            param = nn.Parameter(torch.empty(self.num_kv_heads, *shape, dtype=dtype), requires_grad=False)
            param.weight_loader = self._load_per_kv_head
            self.register_parameter(name, param)

        self.attn = Attention(
            self.num_heads,
            r,
            scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=select_attention_backend(r, d, rebuild=self.rebuild),
            head_size_v=d,
            # A sliding-window layer (Gemma 3): vLLM gives it a SlidingWindowSpec, the backend masks by it.
            per_layer_sliding_window=sliding_window,
        )
        if self.rebuild:  # the backend reads the same Parameter objects, loaded in place
            self.attn.impl.rebuild_table = getattr(self, REBUILD_TABLE_NAME)
            self.attn.impl.key_rope_freqs = getattr(self, ROPE_FREQS_NAME)

    @classmethod
    def from_config(
        cls, config, thin: ThinKeyConfig, *, scale: float, cache_config, quant_config, prefix: str, **kwargs
    ) -> "ThinKeyQKNormAttention":
        """The attention of a decoder layer of ``config`` (a Qwen3 or Gemma 3 ``PretrainedConfig``)."""
        return cls(
            thin=thin,
            hidden_size=config.hidden_size,
            total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_key_value_heads,
            qkv_bias=getattr(config, "attention_bias", False),
            rms_norm_eps=config.rms_norm_eps,
            scale=scale,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
            **kwargs,
        )

    def _load_per_kv_head(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """This rank's KV heads of a ``[Hkv, ...]`` table (a map or the RoPE frequencies)."""
        local = loaded[self._kv_head_start : self._kv_head_start + self.num_kv_heads]
        if local.shape != param.shape:
            raise ThinKeyError(
                f"checkpoint table {tuple(loaded.shape)} does not fit [{self.num_kv_heads} KV heads, "
                f"{', '.join(map(str, param.shape[1:]))}] (thin_keys rank {self.rank}, head_dim {self.head_dim})"
            )
        param.data.copy_(local)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n_kv, group, d, r = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim, self.rank
        q = self.q_norm(q.view(-1, self.num_heads, d))  # [T, H, d]
        k = self.k_norm(k.view(-1, n_kv, d))  # [T, Hkv, d]
        freqs = getattr(self, ROPE_FREQS_NAME)
        if self.rebuild:  # the source's query, rotated; the latent B k_norm(k) is cached un-rotated
            k = torch.einsum("tgd,grd->tgr", k, getattr(self, KEY_MAP_NAME)).flatten(1)  # [T, Hkv * r]
            q = apply_thin_rope(q, positions, freqs).flatten(1)  # [T, H * d], viewed as rows of r by Attention
            output, _ = self.o_proj(self.attn(q, k, v))
            return output
        q = torch.einsum("tgjd,grd->tgjr", q.view(-1, n_kv, group, d), getattr(self, QUERY_MAP_NAME))
        k = torch.einsum("tgd,grd->tgr", k, getattr(self, KEY_MAP_NAME))  # [T, Hkv, r]
        q = apply_thin_rope(q.reshape(-1, self.num_heads, r), positions, freqs).flatten(1)  # [T, H * r]
        k = apply_thin_rope(k, positions, freqs).flatten(1)  # [T, Hkv * r]
        output, _ = self.o_proj(self.attn(q, k, v))  # attention: [T, H * d]
        return output


class ThinKeyQwen3DecoderLayer(Qwen3DecoderLayer):
    """vLLM's Qwen3 decoder layer (its ``forward``) with the thin-key attention."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", **unsupported) -> None:
        nn.Module.__init__(self)
        thin = ThinKeyConfig.from_hf_config(config)
        if unsupported.get("per_layer_sliding_window") is not None or not getattr(config, "is_causal", True):
            raise ThinKeyError("thin-key Qwen3 serves causal decoders without sliding-window layers only")
        self.hidden_size = config.hidden_size
        self.self_attn = ThinKeyQKNormAttention.from_config(
            config, thin,
            scale=thin.head_dim**-0.5,  # the source model's scale: q'.k' approximates q.k
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn",
        )  # fmt: skip
        self.mlp = Qwen3MLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class ThinKeyQwen3Model(Qwen3Model):
    decoder_layer_type = ThinKeyQwen3DecoderLayer


class ThinKeyQwen3ForCausalLM(Qwen3ForCausalLM):
    """vLLM's ``Qwen3ForCausalLM`` around :class:`ThinKeyQwen3Model` (its ``__init__`` names the stock model class)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        ThinKeyConfig.from_hf_config(config)  # fail early, with the reason
        self.config, self.vllm_config, self.quant_config = config, vllm_config, vllm_config.quant_config
        self.model = ThinKeyQwen3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=self.quant_config, prefix=maybe_prefix(prefix, "lm_head")
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
