"""Pick the attention backend for a thin-key layer (keys of width r, values of width d).

- CPU (and anything that is not CUDA): our ``THINKEYS`` backend, whose compiled kernel
  (``kernels.py``) reads the ``[.., r + d]`` pages in place; vLLM's ``CPU_ATTN`` takes one head size.
- CUDA: vLLM's in-tree ``TRITON_ATTN_DIFFKV`` reads the same ``[.., r + d]`` page layout, but its
  tiles need a key head size of at least 32 (its ``supports_head_size``), so it serves r >= 32; narrower keys fall back to our backend, which on CUDA runs its
  PyTorch path (gather + SDPA). ``FLASH_ATTN_DIFFKV`` (FA3/FA4) accepts only a few (r, d) pairs
  and is not chosen: no GPU run has validated it with thin-key checkpoints.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionBackend

logger = init_logger(__name__)


def select_attention_backend(rank: int, head_dim: int, *, shared_kv: bool = False, rebuild: bool = False) -> type[AttentionBackend]:
    """The backend class for one thin-key ``Attention`` layer; see the module docstring for the rule.

    Shared K=V layers always get ``THINKEYS_SHARED_KV`` (its PyTorch path on any device): no vLLM
    backend reads one vector per token as both key and value. Rebuild-at-read layers always get
    ``THINKEYS_REBUILD`` (compiled kernel on CPU, PyTorch path elsewhere).
    """
    if rebuild:
        from thinkeys.attention.rebuild import ThinKeyRebuildBackend

        logger.info_once("thin keys: using %s (rebuild at read, r=%d, d=%d)", ThinKeyRebuildBackend.get_name(), rank, head_dim)
        return ThinKeyRebuildBackend
    if shared_kv:
        from thinkeys.attention.shared import ThinKeySharedKVBackend

        logger.info_once("thin keys: using %s (shared K=V, d=%d)", ThinKeySharedKVBackend.get_name(), head_dim)
        return ThinKeySharedKVBackend
    if current_platform.is_cuda():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        triton = AttentionBackendEnum.TRITON_ATTN_DIFFKV.get_class()
        if triton.supports_head_size(rank):
            triton.set_head_size_v(head_dim)  # class-level in vLLM: one value width per process
            logger.info_once("thin keys: using %s (r=%d, d=%d)", triton.get_name(), rank, head_dim)
            return triton
    from thinkeys.attention.backend import ThinKeyAttentionBackend

    logger.info_once("thin keys: using %s (r=%d, d=%d)", ThinKeyAttentionBackend.get_name(), rank, head_dim)
    return ThinKeyAttentionBackend
