"""vLLM attention backend for rebuild-at-read checkpoints (``rope: rebuild``): keys rebuilt from a cached latent.

The cache holds, per token and KV head, the thin pre-RoPE latent ``c = B W_K x`` (r wide) and the
value (d wide): the same ``[.., r + d]`` slot as the ``THINKEYS`` backend, so the page size, the
cache write and :mod:`thinkeys.accounting` are unchanged. At every read the backend rebuilds the
key ``k = A^T c`` with the layer's expansion table (``impl.rebuild_table`` ``[H_kv, d, r]``,
float32), rotates it at its position with the source's RoPE (``impl.key_rope_freqs``
``[H_kv, d / 2]``) and attends with the source's own d-wide query, which arrives rotated.

How the d-wide query gets through vLLM's ``Attention``: the layer is built as
``Attention(num_heads=H, head_size=r, head_size_v=d)``, so vLLM sizes the page for ``r + d`` and
views the key as ``[T, H_kv, r]`` and the value as ``[T, H_kv, d]``, as it should. It also views
the query as ``[-1, H, r]``: the layer hands it the rotated query flat (``[T, H * d]``), which that
view turns into ``[T * d / r, H, r]`` rows of the same memory (the checkpoint format requires
``r | d``), and :meth:`ThinKeyRebuildImpl.forward` views it back as ``[T, H, d]``. No copy, no
change to vLLM's spec or its page size; the output is ``[T, H * d]`` as for every thin layer.

Sliding-window layers (Gemma 3 converted with ``rebuild``) always take the PyTorch path below, on the
step's windowed indices (``ThinPagedMetadata.windowed``): the rebuild kernel has no lower bound on key
positions. Otherwise two read paths share the metadata of ``paged.py``:

- the compiled kernel (``rebuild_kernel.py``, ``csrc/rebuild_attention.cpp``) for plain float
  caches and 8-bit caches (every format of ``quant.KERNEL_FORMATS``; ``rebuild_kernel.reads_8bit``):
  per (request, KV head) it expands and rotates each cached page once for all query heads of the
  group and all query tokens of a tile (of the whole request in the bf16 form, where the
  expansion is a bf16 product on AMX or vdpbf16ps), then runs the dot products and an online
  softmax. In the bf16 form (bfloat16 on AVX512-BF16 CPUs) 8-bit codes are widened to bf16
  exactly and expanded as they are; since the expansion and RoPE are linear the key is
  ``s * RoPE(A^T c_q)``, so each token's key factor multiplies its scores and its value factor
  its probabilities, in fp32 (the main kernel's 8-bit page step); ``int8_per_token_head`` latents are
  multiplied as bytes by the table rounded to int8 per output channel where the CPU has AVX512-VNNI
  (``rebuild_kernel.int8_expansion``). In the fp32 form (float32 /
  float16 activations, CPUs without AVX512-BF16) each chunk's codes are dequantized to fp32;
- the PyTorch path (``paged.paged_attention_torch`` with ``CacheFormat.key_expansion``), the
  fallback where the kernel cannot be built: the latent and the value are dequantized by
  ``quant.KVCodec``, then expanded.

Touch points with vLLM internals are those of ``backend.py`` plus the query view of
``Attention.forward`` (``query.view(-1, num_heads, head_size)``), pinned in
tests/test_vllm_contract.py.
"""

from __future__ import annotations

import torch

from thinkeys import REBUILD_BACKEND_NAME
from thinkeys.attention import rebuild_kernel
from thinkeys.attention.backend import ThinKeyAttentionBackend, ThinKeyAttentionImpl, ThinKeyMetadataBuilder
from thinkeys.attention.paged import CacheFormat, ThinPagedMetadata, paged_attention_torch
from thinkeys.attention.quant import EIGHT_BIT_DTYPES


class ThinKeyRebuildBackend(ThinKeyAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return REBUILD_BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["ThinKeyRebuildImpl"]:
        return ThinKeyRebuildImpl

    @staticmethod
    def get_builder_cls() -> type["ThinKeyRebuildMetadataBuilder"]:
        return ThinKeyRebuildMetadataBuilder


class ThinKeyRebuildMetadataBuilder(ThinKeyMetadataBuilder):
    def kernel_reads(self, vllm_config) -> bool:
        """The rebuild kernel reads float and 8-bit latent caches (``rebuild_kernel.reads_8bit``)."""
        return rebuild_kernel.available() and (
            vllm_config.cache_config.cache_dtype not in EIGHT_BIT_DTYPES
            or rebuild_kernel.reads_8bit(vllm_config.model_config.dtype)
        )


class ThinKeyRebuildImpl(ThinKeyAttentionImpl):
    backend_name = REBUILD_BACKEND_NAME
    #: Sliding-window layers (Gemma 3 rebuild) take the PyTorch path on windowed indices; the kernel has no window.
    supports_sliding_window = True
    #: [H_kv, d, r] float32 expansion table A^T of the layer (set by the layer after construction).
    rebuild_table: torch.Tensor | None = None
    #: [H_kv, d / 2] float32: the source's RoPE frequencies (set by the layer).
    key_rope_freqs: torch.Tensor | None = None

    def read_format(self, layer, kv_cache: torch.Tensor) -> CacheFormat:
        """How reads decode a slot: the codec (plain or 8-bit), then expansion and rotation of the key."""
        return CacheFormat(
            self._slot_codec(kv_cache),
            k_scale=float(getattr(layer, "_k_scale_float", 1.0)),
            v_scale=float(getattr(layer, "_v_scale_float", 1.0)),
            key_rope_freqs=self.key_rope_freqs,
            key_expansion=self.rebuild_table,
        )

    def _attend(
        self, layer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: ThinPagedMetadata, output: torch.Tensor
    ) -> torch.Tensor:
        if self.rebuild_table is None or self.key_rope_freqs is None:
            raise RuntimeError(f"{REBUILD_BACKEND_NAME}: the layer did not set its expansion and RoPE tables")
        d = self.rebuild_table.shape[1]
        query = query.reshape(-1, self.num_heads, d)  # vLLM viewed the flat [T, H * d] query as [T * d / r, H, r]
        n = attn_metadata.num_actual_tokens
        eight_bit = self.kv_cache_dtype in EIGHT_BIT_DTYPES
        if self.sliding_window is not None:  # keys p - W < j <= p: never the kernel, which has no lower bound
            meta = attn_metadata.windowed(self.sliding_window)
            paged_attention_torch(query[:n], kv_cache, meta, self.scale, output[:n], self.read_format(layer, kv_cache))
            return output
        if (
            attn_metadata.query_start_loc is not None
            and rebuild_kernel.available()
            and query.device.type == "cpu"
            and query.dtype == output.dtype
            and (rebuild_kernel.reads_8bit(query.dtype) if eight_bit else query.dtype == kv_cache.dtype)
        ):
            fmt = self.read_format(layer, kv_cache)
            rebuild_kernel.paged_attention(
                query[:n], kv_cache, self.rebuild_table, self.key_rope_freqs, attn_metadata.block_table,
                attn_metadata.query_start_loc, attn_metadata.seq_lens, self.scale, output[:n],
                fmt.codec.slot_encoding, fmt.k_scale, fmt.v_scale,
            )
            return output
        if not attn_metadata.torch_path:
            raise RuntimeError("metadata was built without the PyTorch path's indices (torch_path=False)")
        paged_attention_torch(query[:n], kv_cache, attn_metadata, self.scale, output[:n], self.read_format(layer, kv_cache))
        return output
