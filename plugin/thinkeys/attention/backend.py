"""vLLM attention backend for caches whose keys (width r) are narrower than their values (width d).

vLLM 0.32 already sizes such pages correctly: an ``Attention(head_size=r, head_size_v=d)`` layer
builds an ``AttentionSpec`` whose page is ``block_size * H_kv * (r + d) * dtype_bytes``, and the
per-layer cache view is ``[num_blocks, H_kv, block_size, r + d]``. What it lacks on CPU is a kernel:
``CPU_ATTN`` takes one head size. This backend supplies the kernel (``paged.py``: the compiled
kernel of ``kernels.py`` when it builds, else plain PyTorch), the metadata builder and the
implementation class that vLLM's ``Attention`` layer drives.

Cost per model step: the builder runs once per step and, with the compiled kernel, only hands over
vLLM's own host tensors (query offsets, sequence lengths, block table); each layer then makes one
call for the cache write and one for attention over the whole batch.

Touch points with vLLM internals (pinned version; each covered by tests/test_vllm_contract.py):
``AttentionBackend`` / ``AttentionMetadataBuilder`` / ``AttentionImpl`` and their hooks,
``CommonAttentionMetadata`` fields, ``forward_includes_kv_cache_update`` + ``do_kv_cache_update``,
``supported_kv_cache_layouts``, ``customize_spec`` (page size of 8-bit caches with per-token-head
scales, and of shared K=V caches), the layer's ``_k_scale_float`` / ``_v_scale_float``, and
``register_backend`` (in ``thinkeys.register``).

Sliding-window layers (Gemma 3): the impl keeps vLLM's ``sliding_window`` and hands it to
``paged.paged_attention``, which runs those layers on the PyTorch path over indices that gather only
the window (built once per step and window); the compiled kernels are never given a windowed layer.

8-bit caches (``--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2 | int8_per_token_head |
fp8_per_token_head``): keys and values are quantized on write and decoded on read (``quant.py``),
by the compiled kernel in place (or by the PyTorch path when the kernel is not available).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, KVQuantMode

from thinkeys import ATTENTION_BACKEND_NAME
from thinkeys.attention import kernels
from thinkeys.attention.paged import CacheFormat, ThinPagedMetadata, build_metadata, paged_attention, write_kv
from thinkeys.attention.quant import EIGHT_BIT_DTYPES, PER_TOKEN_HEAD, SCALE_BYTES, KVCodec


class ThinKeyAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", *EIGHT_BIT_DTYPES]
    #: Vectors cached per (token, KV head): a key and a value.
    vectors_per_slot: ClassVar[int] = 2

    @staticmethod
    def get_name() -> str:
        return ATTENTION_BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["ThinKeyAttentionImpl"]:
        return ThinKeyAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["ThinKeyMetadataBuilder"]:
        return ThinKeyMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Head-major blocks ([B, H, N, C], CPU_ATTN's layout too) make each (block, KV head) page one
        # contiguous run that the compiled kernel streams; both kernels index the logical view
        # through its strides, so the token-major layout works as well.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Per-token-head 8-bit modes keep one float32 scale per cached vector inside the slot.

        The slot is ``(r + d)`` 8-bit elements plus two 4-byte scales, as vLLM's Triton backend
        packs it; ``thinkeys.accounting`` counts the same bytes.
        """
        if spec.state_content_bytes is not None or spec.kv_quant_mode not in _PER_TOKEN_HEAD_MODES:
            return spec
        data = (spec.head_size + spec.head_size_v) * get_dtype_size(spec.dtype)
        return replace(spec, state_content_bytes=data + cls.vectors_per_slot * SCALE_BYTES)


class ThinKeyMetadataBuilder(AttentionMetadataBuilder[ThinPagedMetadata]):
    # Ask vLLM to put single-token decodes at the front of every batch, so the PyTorch path runs
    # them as one call (the compiled kernel does not care about the order).
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        # The kernel is built (or loaded from the cache) here, during engine start-up, not on the first request.
        self.use_kernel = torch.device(device).type == "cpu" and self.kernel_reads(vllm_config)

    def kernel_reads(self, vllm_config) -> bool:
        """Whether this backend's compiled kernel is available and reads this engine's cache (builds it on the
        first call). ``key | value`` slots, float or 8-bit: the thin-key kernel reads them all."""
        return kernels.available()

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ThinPagedMetadata:
        cm = common_attn_metadata
        if not (isinstance(cm.causal, bool) and cm.causal):
            raise NotImplementedError(f"{ATTENTION_BACKEND_NAME} supports causal decoder attention only")
        num_reqs = cm.num_reqs
        return build_metadata(
            query_start_loc=cm.query_start_loc_cpu[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs],
            block_size=self.block_size,
            num_actual_tokens=cm.num_actual_tokens,
            torch_path=not self.use_kernel,
            kernel=self.use_kernel,
        )


class ThinKeyAttentionImpl(AttentionImpl[ThinPagedMetadata]):
    #: Whether layers with a sliding window are served (masked by :func:`paged.paged_attention`).
    supports_sliding_window: ClassVar[bool] = True
    #: The backend's name, in errors.
    backend_name: ClassVar[str] = ATTENTION_BACKEND_NAME

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **unsupported,
    ) -> None:
        unsupported = {k: v for k, v in unsupported.items() if v is not None}
        problems = [
            name
            for name, bad in (
                ("alibi_slopes", alibi_slopes is not None),
                (
                    f"sliding_window={sliding_window} (this backend attends over the whole context)",
                    sliding_window is not None and not self.supports_sliding_window,
                ),
                ("logits_soft_cap", bool(logits_soft_cap)),
                ("kv sharing", kv_sharing_target_layer_name is not None),
                (
                    f"kv_cache_dtype={kv_cache_dtype} (the thin-key cache stores "
                    f"{', '.join(ThinKeyAttentionBackend.supported_kv_cache_dtypes)}: pick one of those for --kv-cache-dtype)",
                    kv_cache_dtype not in ThinKeyAttentionBackend.supported_kv_cache_dtypes,
                ),
                (f"attn_type={attn_type}", attn_type != AttentionType.DECODER),
                (", ".join(unsupported), bool(unsupported)),
            )
            if bad
        ]
        if problems:
            raise NotImplementedError(f"{ATTENTION_BACKEND_NAME} attention does not support: {'; '.join(problems)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        # Keys at positions p - W < j <= p only (Gemma 3's local layers); such layers take the PyTorch path.
        self.sliding_window = sliding_window
        self._codec: KVCodec | None = None

    def _slot_codec(self, kv_cache: torch.Tensor) -> KVCodec:
        """The layer's codec; the value width is read off the cache view (slot = r + d [+ scales])."""
        if self._codec is None:
            scales = 2 * SCALE_BYTES if self.kv_cache_dtype in PER_TOKEN_HEAD else 0
            self._codec = KVCodec(self.kv_cache_dtype, self.head_size, kv_cache.shape[-1] - self.head_size - scales)
        return self._codec

    def cache_format(self, layer: AttentionLayer, kv_cache: torch.Tensor) -> CacheFormat | None:
        """How this layer's slots are encoded; None for plain float slots (the fast paths)."""
        if self.kv_cache_dtype not in EIGHT_BIT_DTYPES:
            return None
        return CacheFormat(
            self._slot_codec(kv_cache),
            k_scale=float(getattr(layer, "_k_scale_float", 1.0)),
            v_scale=float(getattr(layer, "_v_scale_float", 1.0)),
        )

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if kv_cache.numel() == 0:
            return
        write_kv(kv_cache, key, value, slot_mapping, self.cache_format(layer, kv_cache))

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ThinPagedMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{self.backend_name} does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output.zero_()
        return self._attend(layer, query, kv_cache, attn_metadata, output)

    def _attend(
        self, layer: AttentionLayer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: ThinPagedMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """This step's attention into ``output`` (the backends differ only here)."""
        n = attn_metadata.num_actual_tokens
        paged_attention(
            query[:n], kv_cache, attn_metadata, self.scale, output[:n], self.cache_format(layer, kv_cache),
            sliding_window=self.sliding_window,
        )
        return output


_PER_TOKEN_HEAD_MODES = (KVQuantMode.INT8_PER_TOKEN_HEAD, KVQuantMode.FP8_PER_TOKEN_HEAD)
