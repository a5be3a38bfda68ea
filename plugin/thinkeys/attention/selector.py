"""Pick the attention backend for a thin-key layer (keys of width r, values of width d)."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionBackend

logger = init_logger(__name__)


def select_attention_backend(rank: int, head_dim: int) -> type[AttentionBackend]:
    """Our paged backend everywhere; vLLM's in-tree DIFFKV kernels on CUDA where they fit.

    vLLM's ``TRITON_ATTN_DIFFKV`` handles the same ``[.., r + d]`` page layout on NVIDIA GPUs but
    needs a key head size of at least 32 (its tiles), so it is used for r >= 32 there.
    """
    if current_platform.is_cuda() and rank >= 32:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        backend = AttentionBackendEnum.TRITON_ATTN_DIFFKV.get_class()
        backend.set_head_size_v(head_dim)
        logger.info_once("thin keys: using %s (r=%d, d=%d)", backend.get_name(), rank, head_dim)
        return backend
    from thinkeys.attention.backend import ThinKeyAttentionBackend

    logger.info_once("thin keys: using %s (r=%d, d=%d)", ThinKeyAttentionBackend.get_name(), rank, head_dim)
    return ThinKeyAttentionBackend
