"""vLLM attention backend for shared key-value (Q-K=V) checkpoints: one cached vector per token and KV head.

The layer (``thinkeys.models.thin_attention``) builds ``Attention(head_size=d, head_size_v=d)`` and
passes the un-rotated key projection ``u = W_K x`` as both key and value. vLLM would size that page
for two d-wide vectors; :meth:`ThinKeySharedKVBackend.customize_spec` sets the slot content to ONE
vector (``state_content_bytes = d * dtype_bytes``, plus one float32 scale with a per-token-head
8-bit cache), so the page is ``block_size * H_kv * d * dtype_bytes`` and the engine allocates
twice the stock model's blocks (four times with an 8-bit cache), and the per-layer cache view is
``[num_blocks, H_kv, block_size, d (+ 4)]``.

The cache write stores ``u``; attention reads it back as the value as it is and as the key rotated
at its position with the layer's RoPE table (``impl.key_rope_freqs``, set by the layer; None
without RoPE). Queries arrive rotated. The read is the rebuild kernel's fp32 form with
``shared_kv`` (``rebuild_kernel.shared_kv_attention``: the case r = d with no expansion, float or
8-bit slots read in place), or the PyTorch path of ``paged.py`` where the kernel cannot be built.

Touch points with vLLM internals (each in tests/test_vllm_contract.py): ``customize_spec`` is
applied by the model runner to every full-attention spec (``v1/worker/utils.py:
customize_attention_spec``), and ``AttentionSpec.state_content_bytes`` sets the slot size used for
page sizes and the per-layer view (``v1/kv_cache_interface.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.kv_cache_interface import AttentionSpec

from thinkeys import SHARED_KV_BACKEND_NAME
from thinkeys.attention.backend import (
    _PER_TOKEN_HEAD_MODES,
    ThinKeyAttentionBackend,
    ThinKeyAttentionImpl,
    ThinKeyMetadataBuilder,
)
from thinkeys.attention import rebuild_kernel
from thinkeys.attention.paged import CacheFormat, ThinPagedMetadata, paged_attention_torch
from thinkeys.attention.quant import SCALE_BYTES, KVCodec


class ThinKeySharedKVBackend(ThinKeyAttentionBackend):
    vectors_per_slot: ClassVar[int] = 1

    @staticmethod
    def get_name() -> str:
        return SHARED_KV_BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["ThinKeySharedKVImpl"]:
        return ThinKeySharedKVImpl

    @staticmethod
    def get_builder_cls() -> type["ThinKeySharedKVMetadataBuilder"]:
        return ThinKeySharedKVMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One d-wide vector per (token, KV head) slot (plus its scale with per-token-head caches)."""
        if spec.state_content_bytes is not None:
            return spec
        if spec.head_size != spec.head_size_v:
            raise ValueError(
                f"{SHARED_KV_BACKEND_NAME}: a shared K=V layer caches one vector, so head_size ({spec.head_size}) "
                f"must equal head_size_v ({spec.head_size_v})"
            )
        scales = SCALE_BYTES if spec.kv_quant_mode in _PER_TOKEN_HEAD_MODES else 0
        return replace(spec, state_content_bytes=spec.head_size * get_dtype_size(spec.dtype) + scales)


class ThinKeySharedKVMetadataBuilder(ThinKeyMetadataBuilder):
    def kernel_reads(self, vllm_config) -> bool:
        """One vector per slot: read by the rebuild kernel's fp32 form (``shared_kv``), float or 8-bit."""
        return rebuild_kernel.available()


class ThinKeySharedKVImpl(ThinKeyAttentionImpl):
    backend_name = SHARED_KV_BACKEND_NAME
    #: Shared K=V checkpoints come from sources converted without sliding windows.
    supports_sliding_window = False
    #: [H_kv, rope_dims / 2] RoPE table of the layer (set by the layer after construction); None without RoPE.
    key_rope_freqs: torch.Tensor | None = None

    def cache_format(self, layer, kv_cache: torch.Tensor) -> CacheFormat:
        if self._codec is None:
            self._codec = KVCodec(self.kv_cache_dtype, self.head_size, 0)
        return CacheFormat(
            self._codec,
            k_scale=float(getattr(layer, "_k_scale_float", 1.0)),
            v_scale=float(getattr(layer, "_k_scale_float", 1.0)),  # one vector, one per-tensor scale
            key_rope_freqs=self.key_rope_freqs,
        )

    def _attend(
        self, layer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: ThinPagedMetadata, output: torch.Tensor
    ) -> torch.Tensor:
        n = attn_metadata.num_actual_tokens
        fmt = self.cache_format(layer, kv_cache)
        if attn_metadata.kernel and attn_metadata.query_start_loc is not None and query.dtype == output.dtype and (
            fmt.codec.quantized or query.dtype == kv_cache.dtype
        ):
            rebuild_kernel.shared_kv_attention(
                query[:n], kv_cache, self.key_rope_freqs, attn_metadata.block_table, attn_metadata.query_start_loc,
                attn_metadata.seq_lens, self.scale, output[:n],
                fmt.codec.slot_encoding, fmt.k_scale,
            )
            return output
        if not attn_metadata.torch_path:
            raise RuntimeError("metadata was built without the PyTorch path's indices (torch_path=False)")
        paged_attention_torch(query[:n], kv_cache, attn_metadata, self.scale, output[:n], fmt)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache.numel() == 0:
            return
        from thinkeys.attention.paged import write_kv

        write_kv(kv_cache, key, None, slot_mapping, self.cache_format(layer, kv_cache))
