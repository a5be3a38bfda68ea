"""Thin-key Gemma 3 (text-only ``Gemma3ForCausalLM``) for vLLM: vLLM's own Gemma 3 with the attention swapped.

Gemma 3 normalises q and k per head like Qwen3, so its thin attention is the QK-norm one of
:mod:`thinkeys.models.qwen3` (q/k projected d wide, normalised, mapped to r by ``thin_q_map`` /
``thin_k_map``, rotated with the layer's thin RoPE table; only the r-wide key is cached) with Gemma's
own pieces:

- ``GemmaRMSNorm`` (scales by ``1 + weight``) for ``q_norm`` / ``k_norm``;
- the softmax scale ``query_pre_attn_scalar ** -0.5`` (:func:`thinkeys.checkpoint.attention_scale`);
- ``layer_types``: a sliding-window layer hands ``per_layer_sliding_window = sliding_window`` to vLLM's
  ``Attention``, so vLLM gives it a ``SlidingWindowSpec`` (its hybrid KV-cache manager keeps only the
  window's blocks) and the thin-key backend masks keys outside the window
  (:mod:`thinkeys.attention.paged`); each layer's RoPE table was written by the converter with its own
  base (``rope_parameters[layer_type]``).

Everything else is vLLM's: the decoder layer's ``forward``, MLP and four norms
(:class:`ThinKeyGemma3DecoderLayer` subclasses ``Gemma3DecoderLayer``), the model (embedding scaled by
sqrt(hidden), final norm; ``Gemma3Model``) and the LM head with tied embeddings and the final logit
soft-cap (``Gemma3ForCausalLM``), and weight loading (``AutoWeightsLoader``).

vLLM's ``Gemma3Model.__init__`` builds its layers by the module name ``Gemma3DecoderLayer`` (there is
no ``decoder_layer_type`` hook as in Qwen2/Qwen3), so :class:`ThinKeyGemma3ForCausalLM` runs vLLM's
``__init__`` with that name bound to the thin layer for the duration of the call (under a lock; pinned
in tests/test_vllm_contract.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3MLP
from vllm.model_executor.models.utils import extract_layer_index

from thinkeys.checkpoint import ThinKeyConfig, ThinKeyError, attention_scale
from thinkeys.models.qwen3 import ThinKeyQKNormAttention

SLIDING, FULL = "sliding_attention", "full_attention"


class ThinKeyGemma3DecoderLayer(Gemma3DecoderLayer):
    """vLLM's Gemma 3 decoder layer (its ``forward``, MLP and norms) with the thin-key QK-norm attention."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        nn.Module.__init__(self)
        thin = ThinKeyConfig.from_hf_config(config)
        if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
            raise ThinKeyError("thin-key Gemma 3 serves causal decoders only (use_bidirectional_attention is not supported)")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ThinKeyError("thin-key Gemma 3: attn_logit_softcapping is not supported by the thin-key attention backend")
        layer_type = config.layer_types[extract_layer_index(prefix)]
        if layer_type not in (SLIDING, FULL):
            raise ThinKeyError(f"thin-key Gemma 3: layer type {layer_type!r} is not one of {SLIDING}, {FULL}")
        self.hidden_size = config.hidden_size
        self.self_attn = ThinKeyQKNormAttention.from_config(
            config, thin,
            scale=attention_scale(thin, config),  # query_pre_attn_scalar ** -0.5, the source's
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn",
            norm_cls=GemmaRMSNorm, sliding_window=config.sliding_window if layer_type == SLIDING else None,
        )  # fmt: skip
        self.mlp = Gemma3MLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_activation=config.hidden_activation,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


_LAYER_SWAP = threading.Lock()


@contextlib.contextmanager
def _thin_decoder_layers() -> Iterator[None]:
    """Bind vLLM's module-level ``Gemma3DecoderLayer`` to the thin layer while a model is built."""
    with _LAYER_SWAP:
        stock = vllm_gemma3.Gemma3DecoderLayer
        vllm_gemma3.Gemma3DecoderLayer = ThinKeyGemma3DecoderLayer
        try:
            yield
        finally:
            vllm_gemma3.Gemma3DecoderLayer = stock


class ThinKeyGemma3ForCausalLM(Gemma3ForCausalLM):
    """vLLM's ``Gemma3ForCausalLM`` (tied head, final logit soft-cap; its ``Gemma3Model``) with thin decoder layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        ThinKeyConfig.from_hf_config(vllm_config.model_config.hf_config)  # fail early, with the reason
        with _thin_decoder_layers():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
