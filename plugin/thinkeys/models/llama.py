"""Thin-key Llama / Mistral (and Qwen2, see qwen2.py) for vLLM: vLLM's own Llama with the attention swapped.

``LlamaDecoderLayer`` takes the attention class as a parameter, so nothing of vLLM's model is
copied: the decoder layers, MLP, norms, embeddings, weight loading (``q_proj``/``k_proj``/``v_proj``
stacked into ``qkv_proj``) and torch.compile integration are vLLM's.
"""

from __future__ import annotations

from functools import partial

from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionType
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from thinkeys.checkpoint import SourceFamily, ThinKeyConfig, ThinKeyError
from thinkeys.models.thin_attention import ThinKeyAttention


class ThinKeyLlamaAttention(ThinKeyAttention):
    """Drop-in for vLLM's ``LlamaAttention`` (same constructor signature)."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config=None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config=None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        thin = ThinKeyConfig.from_hf_config(config)
        if attn_type != AttentionType.DECODER:
            raise ThinKeyError(f"thin keys serve causal decoders only (got attention type {attn_type})")
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise ThinKeyError("sliding-window layers are not supported by the thin-key attention backend")
        if thin.family.family == SourceFamily.QWEN2:
            bias, bias_o_proj = True, False  # Qwen2: q/k/v biases, none on o_proj
        super().__init__(
            thin=thin,
            hidden_size=hidden_size,
            total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads,
            qkv_bias=bias,
            out_bias=bias_o_proj,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )


class ThinKeyLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=None) -> None:
        ThinKeyConfig.from_hf_config(vllm_config.model_config.hf_config)  # fail early, with the reason
        super().__init__(
            vllm_config=vllm_config,
            prefix=prefix,
            layer_type=layer_type or partial(LlamaDecoderLayer, attn_layer_type=ThinKeyLlamaAttention),
        )
