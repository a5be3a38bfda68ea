"""Thin-key GPT-2 for vLLM: vLLM's own GPT-2 with the attention swapped.

vLLM's ``GPT2Block`` builds its attention by the module-level name ``GPT2Attention`` and takes no
parameter for it, so the thin model is built while that one name points at the thin attention
(``_thin_attention_in_blocks``). Everything else (blocks, MLP, LayerNorms, learned positions, the
Conv1D transposes and weight names in ``load_weights``) is vLLM's. tests/test_vllm_contract.py
checks that this swap took effect, so a vLLM release that renames it fails loudly.
"""

from __future__ import annotations

import contextlib

from vllm.config import VllmConfig
from vllm.model_executor.models import gpt2 as vllm_gpt2

from thinkeys.checkpoint import ThinKeyConfig
from thinkeys.models.thin_attention import ThinKeyAttention


class ThinKeyGPT2Attention(ThinKeyAttention):
    """Drop-in for vLLM's ``GPT2Attention`` (same constructor signature; no RoPE; fused ``c_attn``)."""

    qkv_name = "c_attn"
    out_name = "c_proj"

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(
            thin=ThinKeyConfig.from_hf_config(config),
            hidden_size=config.hidden_size,
            total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_attention_heads,
            qkv_bias=True,
            out_bias=True,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )

    def forward(self, hidden_states):  # GPT-2 blocks call attention without positions
        return super().forward(None, hidden_states)


@contextlib.contextmanager
def _thin_attention_in_blocks():
    original = vllm_gpt2.GPT2Attention
    vllm_gpt2.GPT2Attention = ThinKeyGPT2Attention
    try:
        yield
    finally:
        vllm_gpt2.GPT2Attention = original


class ThinKeyGPT2LMHeadModel(vllm_gpt2.GPT2LMHeadModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        ThinKeyConfig.from_hf_config(vllm_config.model_config.hf_config)
        with _thin_attention_in_blocks():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
