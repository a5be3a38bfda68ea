"""Thin-key Qwen2 for vLLM.

Qwen2's decoder layer is a Llama decoder layer with q/k/v biases (and RoPE theta 1e6, which the
checkpoint's frequency table already carries), so the thin model reuses vLLM's Llama blocks;
``ThinKeyLlamaAttention`` turns the biases on for the Qwen2 family. Tensor names are identical.
"""

from __future__ import annotations

from thinkeys.models.llama import ThinKeyLlamaForCausalLM


class ThinKeyQwen2ForCausalLM(ThinKeyLlamaForCausalLM):
    pass
