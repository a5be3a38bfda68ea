"""The compiled CPU kernel of rebuild-at-read attention (``csrc/rebuild_attention.cpp``): built on first use, cached.

A separate extension from ``kernels.py``'s (own library name, own build folder under the same
cache root), built the same way (:func:`kernels.build_and_load`: the instruction set
:func:`kernels.cpu_isa` picks, ``THINKEYS_KERNEL_ISA`` caps it, the ``THINKEYS_ATTENTION_KERNEL``
switch, the AMX tile state requested at load), registering
``torch.ops.thinkeys_rebuild.paged_attention`` and ``torch.ops.thinkeys_rebuild.kernel_isa``. On
an AVX512-BF16 CPU bf16 runs the kernel's bf16 form (vdpbf16ps expansion; AMX brgemm for prefills
where the CPU has AMX, see ``kernels.py``); see the .cpp.

Per layer, once (cached on the table tensor, redone if it is modified in place): the expansion
table as float32 ``[H_kv, r, d]`` (the fp32 form) and as bf16 channel pairs
``[H_kv, ceil(r / 2), d rounded up to 16, 2]`` (the bf16 form's VNNI layout); for
``int8_per_token_head`` caches, also quantized to int8 per output channel in quads
(:func:`int8_tables`).

int8 expansion: with an ``int8_per_token_head`` cache the bf16 form multiplies the cached int8
latent codes by the table quantized to int8 (per KV head and output channel, scale = max |A| / 127)
with vpdpbusd, 64 products per instruction, and never widens the latents (where
:func:`int8_expansion` is true: AVX512-VNNI, d of 32, 64 or 128, and no AMX prefill in the call); P.V
then reads the value codes as they are (probabilities rounded to int16 steps of their page maximum). The
sums are exact; the table's int8 rounding is the main approximation, the same kind of rounding the int8
cache already applies to the latents; :func:`int8_table` gives the table the kernel then uses, for references.
``THINKEYS_INT8_EXPANSION=0`` keeps the bf16 table (codes widened to bf16) instead.

RoPE cos/sin tables are computed here, in float32 exactly as ``thinkeys.rope.apply_thin_rope``
computes its angles (``position * freq``), once per frequency table and grown (doubling) as
longer sequences arrive; every layer of a model shares one table since all carry the source's
frequencies, and when every KV head has the same frequencies the table has one head
(``[P, 1, d / 2]``, what the kernel broadcasts), so it stays small enough for the caches. Beside each
table sits its transpose ``[1 or H_kv, d / 2, P + 16]`` (:func:`rope_lane_tables`), from which the
kernel's tokens-in-lanes expansions load one channel's angles for 16 consecutive positions at once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref

import torch

from thinkeys.attention import kernels
from thinkeys.checkpoint import ThinKeyError

logger = logging.getLogger(__name__)

SOURCE = kernels.SOURCE.with_name("rebuild_attention.cpp")
#: Set to 0 to expand int8 latents with the bf16 table (widened codes) instead of the int8 table.
ENV_INT8_EXPANSION = "THINKEYS_INT8_EXPANSION"


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    choice = kernels.kernel_choice()
    if choice == "torch":
        return False
    isa = kernels.cpu_isa()
    directory = kernels.build_dir(isa) / "rebuild"
    try:
        started = time.perf_counter()
        kernels.build_and_load("thinkeys_rebuild_attention", SOURCE, directory, isa)
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


def kernel_isa() -> str:
    """The form the loaded rebuild kernel runs for bf16: ``avx512bf16+amx``, ``avx512bf16``, ``avx2`` or ``portable``."""
    return torch.ops.thinkeys_rebuild.kernel_isa()


def reads_8bit(dtype: torch.dtype) -> bool:
    """Whether the loaded kernel reads 8-bit caches in place for queries of ``dtype``: every dtype it serves.
    The bf16 form (bfloat16 on AVX512-BF16 CPUs) widens the codes to bf16 exactly and applies the scales to
    scores and probabilities; the fp32 form (float32 and float16, and bfloat16 elsewhere) dequantizes each
    chunk's codes to fp32 (code * scale) where it widens a float cache."""
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and available()


def int8_expansion(head_dim: int, query_tokens: int = 1, requests: int = 1) -> bool:
    """Whether an ``int8_per_token_head`` read by the loaded kernel expands the latents in int8 (:func:`int8_tables`)
    for bf16 queries of width ``head_dim``: AVX512-VNNI, d of 32, 64 or 128, not switched off; and, where the
    kernel prefills on AMX tiles (:func:`amx_tiles`), a call of decodes only (``query_tokens`` <= ``requests``):
    a call with more query tokens than requests reads its pages with the bf16 table, on AMX."""
    if os.environ.get(ENV_INT8_EXPANSION, "1") == "0" or head_dim not in (32, 64, 128) or not _int8_expansion_supported():
        return False
    return query_tokens <= requests or not amx_tiles()


@functools.lru_cache(maxsize=1)
def _int8_expansion_supported() -> bool:
    """The loaded kernel's answer (asked once: this runs on every attention call)."""
    return available() and bool(torch.ops.thinkeys_rebuild.int8_expansion_supported())


@functools.lru_cache(maxsize=1)
def amx_tiles() -> bool:
    """Whether the loaded kernel prefills on AMX tiles (oneDNN brgemm: a CPU with AMX, THINKEYS_KERNEL_NO_AMX unset)."""
    return available() and kernel_isa().endswith("+amx")


_lock = threading.Lock()
_tables: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
LANE_PAD = 16  # zero positions past a lane table's end (a 16-position load may start at its last position)


class _PerTensor:
    """Values derived from a tensor, kept while it lives and valid while its version is unchanged (keyed by
    identity: a WeakKeyDictionary would compare tensors with ``==`` when ids are reused)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, object]] = {}

    def get(self, tensor: torch.Tensor):
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
            return None
        return entry[2]

    def put(self, tensor: torch.Tensor, value) -> None:
        key = id(tensor)

        def forget(ref, key=key, entries=self._entries):
            if entries.get(key, (None,))[0] is ref:
                entries.pop(key, None)

        self._entries[key] = (weakref.ref(tensor, forget), tensor._version, value)


_freq_keys = _PerTensor()  # per frequency tensor: (the key of _tables, whether all heads share one row)
_prepared = _PerTensor()  # per expansion table: (float32 [H_kv, r, d], bf16 pairs [H_kv, ceil(r/2), ceil16(d), 2])
_quantized = _PerTensor()  # per expansion table: int8_tables()


def rope_tables(freqs: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[>= positions, H, half]`` float32 for ``freqs`` ``[H_kv, half]`` (cached, grown by doubling);
    ``H`` is 1 when every KV head has the same frequencies, else ``H_kv``."""
    return _rope_entry(freqs, positions)[:2]


def rope_lane_tables(freqs: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_tables`' cos, sin transposed to ``[H, half, P + LANE_PAD]`` (positions contiguous, zeros past
    the end): the kernel's tokens-in-lanes expansions load a channel's angles for 16 consecutive positions at once."""
    return _rope_entry(freqs, positions)[2:]


def _rope_entry(freqs: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin, cos lanes, sin lanes) for ``freqs``, built together and cached under the frequencies' bytes."""
    with _lock:
        known = _freq_keys.get(freqs)
        if known is None:
            f = freqs.detach().to(device="cpu", dtype=torch.float32)
            shared = bool((f == f[:1]).all())
            if shared:
                f = f[:1]
            known = (f.numpy().tobytes() + bytes(str(tuple(f.shape)), "ascii"), shared)
            _freq_keys.put(freqs, known)
        key = known[0]
        cached = _tables.get(key)
        if cached is None or cached[0].shape[0] < positions:
            f = freqs.detach().to(device="cpu", dtype=torch.float32)
            f = f[:1] if known[1] else f
            size = max(positions, 2 * cached[0].shape[0] if cached is not None else 1024)
            angles = torch.arange(size, dtype=torch.float32)[:, None, None] * f  # [P, H, half]
            cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
            lanes = []
            for t in (cos, sin):
                lane = torch.zeros(t.shape[1], t.shape[2], size + LANE_PAD, dtype=torch.float32)
                lane[:, :, :size] = t.permute(1, 2, 0)
                lanes.append(lane)
            cached = (cos, sin, *lanes)
            _tables[key] = cached
        return cached


def _rope_for(freqs: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin and their lane tables covering every position of a batch whose longest sequence is ``seq_lens.max()``."""
    return _rope_entry(freqs, int(seq_lens.max()) if seq_lens.numel() else 1)


def prepared_tables(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expansion table ``[H_kv, d, r]`` as the kernel reads it: float32 ``[H_kv, r, d]`` and bf16 VNNI pairs
    ``[H_kv, ceil(r / 2), d rounded up to 16, 2]`` (zero padded). Cached per table tensor."""
    with _lock:
        hit = _prepared.get(table)
        if hit is not None:
            return hit
    expand_t = table.detach().to(device="cpu", dtype=torch.float32).transpose(1, 2).contiguous()  # [H_kv, r, d]
    h, r, d = expand_t.shape
    padded = torch.zeros(h, r + r % 2, -(-d // 16) * 16, dtype=torch.float32)
    padded[:, :r, :d] = expand_t
    pairs = padded.view(h, -1, 2, padded.shape[-1]).transpose(2, 3).to(torch.bfloat16).contiguous()  # [H_kv, r/2, d16, 2]
    with _lock:
        _prepared.put(table, (expand_t, pairs))
    return expand_t, pairs


def _quantize_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes ``[H_kv, d, r]``, float32 scales ``[H_kv, d]``) of the table ``[H_kv, d, r]``: per KV head and output channel."""
    t = table.detach().to(device="cpu", dtype=torch.float32)
    scale = (t.abs().amax(dim=-1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # [H_kv, d]
    return (t / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def int8_table(table: torch.Tensor) -> torch.Tensor:
    """The expansion table ``[H_kv, d, r]`` (float32) that the int8 expansion multiplies by: each output channel
    rounded to int8 steps of its scale (what the kernel computes with, where :func:`int8_expansion` holds)."""
    codes, scale = _quantize_table(table)
    return codes.float() * scale[..., None]


def int8_tables(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 expansion's tables for ``table`` ``[H_kv, d, r]``: codes in quads ``[H_kv, ceil(r / 4), d16, 4]`` int8
    (four consecutive latents of one output channel per 32-bit lane, zero padded; d16: d rounded up to 16) and
    ``[H_kv, 2, d16]`` float32 (each channel's scale, then 128 times its codes' sum: the kernel feeds the
    latent codes in as unsigned c + 128). Cached per table tensor."""
    with _lock:
        hit = _quantized.get(table)
        if hit is not None:
            return hit
    codes, scale = _quantize_table(table)
    h, d, r = codes.shape
    d16, r4 = -(-d // 16) * 16, -(-r // 4) * 4
    padded = torch.zeros(h, d16, r4, dtype=torch.int8)
    padded[:, :d, :r] = codes
    quads = padded.view(h, d16, r4 // 4, 4).transpose(1, 2).contiguous()  # [H_kv, r4 / 4, d16, 4]
    side = torch.zeros(h, 2, d16, dtype=torch.float32)
    side[:, 0, :d] = scale
    side[:, 1, :d] = 128.0 * codes.sum(dim=-1, dtype=torch.int32).float()  # exact: |sum| <= 127 r < 2^24
    with _lock:
        _quantized.put(table, (quads, side))
    return quads, side


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
    cache_format: str = "plain",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rebuild-at-read attention of ``query`` ``[T, H, d]`` over the paged latent cache into ``output`` ``[T, H, d]``.

    ``table`` ``[H_kv, d, r]`` (expansion A^T), ``freqs`` ``[H_kv, d / 2]`` (the source's RoPE);
    ``block_table``, ``query_start_loc``, ``seq_lens``: int32 host tensors as in ``kernels.paged_attention``.
    An 8-bit cache (``cache_format`` one of ``quant.KERNEL_FORMATS``' values, a 1-byte tensor) is read in place
    (see :func:`reads_8bit`): in the bf16 form the codes are widened to bf16 exactly, expanded and rotated, and the
    per-token (or per-tensor ``k_scale`` / ``v_scale``) factors applied to scores and probabilities in fp32; in the
    fp32 form each chunk is dequantized to fp32 (code * factor) and rebuilt like a float cache. With an
    ``int8_per_token_head`` cache and bf16 queries the latents are expanded in int8 where :func:`int8_expansion`
    holds for the call (the table rounded as :func:`int8_table` says).
    """
    expand_t, pairs = prepared_tables(table)
    cos, sin, cos_lanes, sin_lanes = _rope_for(freqs, seq_lens)
    quads = side = None
    if (cache_format == "int8_per_token_head" and query.dtype == torch.bfloat16
            and int8_expansion(query.shape[-1], query.shape[0], seq_lens.shape[0])):
        quads, side = int8_tables(table)
    torch.ops.thinkeys_rebuild.paged_attention(
        query, kv_cache, expand_t, pairs, cos, sin, block_table, query_start_loc, seq_lens, float(scale), output,
        cache_format, float(k_scale), float(v_scale), False, quads, side, cos_lanes, sin_lanes,
    )
    return output


def shared_kv_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    freqs: torch.Tensor | None,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    cache_format: str = "plain",
    k_scale: float = 1.0,
) -> torch.Tensor:
    """Attention over a shared K=V cache (``THINKEYS_SHARED_KV``: one d-wide vector per token and KV head).

    The cached vector is the value as it is and, rotated at its position with ``freqs`` ``[H_kv, d / 2]``
    (NeoX layout over all d dims; ``None``: no RoPE), the key: the rebuild kernel's fp32 form with no
    expansion (``R == d``). ``kv_cache`` is ``[blocks, H_kv, block_size, d]`` (8-bit: ``d`` codes plus one
    float32 scale per slot with a per-token-head format, or the layer's per-tensor ``k_scale``).
    """
    h_kv, d = kv_cache.shape[1], query.shape[-1]
    no_table, no_pairs, no_rope = _shared_kv_placeholders(h_kv, d)
    cos, sin, _, _ = _rope_for(no_rope if freqs is None else freqs, seq_lens)
    torch.ops.thinkeys_rebuild.paged_attention(
        query, kv_cache, no_table, no_pairs, cos, sin, block_table, query_start_loc, seq_lens,
        float(scale), output, cache_format, float(k_scale), float(k_scale), True,
    )
    return output


@functools.lru_cache(maxsize=16)
def _shared_kv_placeholders(h_kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty expansion table and VNNI table (shared K=V has none) and all-zero frequencies (no RoPE: the
    identity rotation), made once per shape; ordinary tensors even when first asked for under inference mode
    (rope_tables keys its cache by the tensor's version counter)."""
    with torch.inference_mode(False):
        return (torch.empty(h_kv, 0, d, dtype=torch.float32), torch.empty(0, dtype=torch.bfloat16),
                torch.zeros(h_kv, d // 2, dtype=torch.float32))
