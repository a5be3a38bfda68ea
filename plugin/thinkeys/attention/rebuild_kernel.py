"""The compiled CPU kernel of rebuild-at-read attention (``csrc/rebuild_attention.cpp``): built on first use, cached.

A separate extension from ``kernels.py``'s (own library name, own build folder under the same
cache root, same instruction-set choice and ``THINKEYS_ATTENTION_KERNEL`` switch), registering
``torch.ops.thinkeys_rebuild.paged_attention``.

RoPE cos/sin tables are computed here, in float32 exactly as ``thinkeys.rope.apply_thin_rope``
computes its angles (``position * freq``), once per frequency table and grown (doubling) as
longer sequences arrive; every layer of a model shares one table since all carry the source's
frequencies.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch

from thinkeys.attention import kernels
from thinkeys.checkpoint import ThinKeyError

logger = logging.getLogger(__name__)

SOURCE = kernels.SOURCE.with_name("rebuild_attention.cpp")


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    choice = kernels.kernel_choice()
    if choice == "torch":
        return False
    isa = kernels.cpu_isa()
    flags = ["-O3", "-fopenmp", "-DNDEBUG", *(kernels.AVX2_FLAGS if isa != "baseline" else [])]
    directory = kernels.build_dir(isa) / "rebuild"
    try:
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        cpp_extension.load(
            name=f"thinkeys_rebuild_attention_{isa}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        logger.info("thin keys: rebuild attention kernel ready in %.1f s", time.perf_counter() - started)
        return True
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, read-only cache, ...
        reason = kernels._first_error_line(exc)
        if choice == "compiled":
            raise ThinKeyError(
                f"{kernels.ENV_CHOICE}=compiled but the rebuild attention kernel could not be built in {directory}: "
                f"{reason} (install g++ and ninja, set {kernels.ENV_CACHE} to a writable folder, or use {kernels.ENV_CHOICE}=torch)"
            ) from exc
        logger.warning("thin keys: rebuild attention kernel unavailable (%s); using the slower PyTorch path.", reason)
        return False


def available() -> bool:
    """Whether the compiled rebuild kernel is in use in this process (builds it on the first call)."""
    return _load()


_tables: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
_lock = threading.Lock()


def rope_tables(freqs: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[>= positions, H_kv, half]`` float32 for ``freqs`` ``[H_kv, half]`` (cached, grown by doubling)."""
    freqs = freqs.detach().to(device="cpu", dtype=torch.float32)
    key = freqs.numpy().tobytes() + bytes(str(tuple(freqs.shape)), "ascii")
    with _lock:
        cached = _tables.get(key)
        if cached is None or cached[0].shape[0] < positions:
            size = max(positions, 2 * cached[0].shape[0] if cached is not None else 1024)
            angles = torch.arange(size, dtype=torch.float32)[:, None, None] * freqs  # [P, H_kv, half]
            cached = (angles.cos().contiguous(), angles.sin().contiguous())
            _tables[key] = cached
        return cached


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    table: torch.Tensor,
    freqs: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
) -> torch.Tensor:
    """Rebuild-at-read attention of ``query`` ``[T, H, d]`` over the paged latent cache into ``output`` ``[T, H, d]``.

    ``table`` ``[H_kv, d, r]`` (expansion A^T), ``freqs`` ``[H_kv, d / 2]`` (the source's RoPE);
    ``block_table``, ``query_start_loc``, ``seq_lens``: int32 host tensors as in ``kernels.paged_attention``.
    """
    expand_t = table.detach().to(torch.float32).transpose(1, 2).contiguous()  # [H_kv, r, d]
    cos, sin = rope_tables(freqs, int(seq_lens.max()) if seq_lens.numel() else 1)
    torch.ops.thinkeys_rebuild.paged_attention(
        query, kv_cache, expand_t, cos, sin, block_table, query_start_loc, seq_lens, float(scale), output
    )
    return output
