"""8-bit KV-cache cells for the thin-key backend: what one (token, KV head) slot of a page holds.

A slot of the per-layer cache view ``[num_blocks, H_kv, block_size, C]`` holds, in this order::

    plain (auto / float16 / bfloat16 / float32):  key (r) | value (d)                    C = r + d elements
    fp8, fp8_e4m3, fp8_e5m2 (per-tensor scale):    key (r) | value (d)  as fp8 bytes       C = r + d bytes
    int8_per_token_head, fp8_per_token_head:       key (r) | value (d) | k_scale | v_scale  C = r + d + 8 bytes
    shared K=V (thinkeys.attention.shared):        vector (d) [| scale]                     C = d (+ 4) bytes

Per-tensor fp8 divides by the layer's ``k_scale`` / ``v_scale`` (vLLM's ``_k_scale_float``,
1.0 unless a checkpoint provides scales) and stores ``float8_e4m3fn`` (``fp8``, ``fp8_e4m3``) or
``float8_e5m2``. Per-token-head modes compute a dynamic scale per cached vector, ``amax / qmax``
(qmax 127 for int8, 448 for fp8 e4m3), and keep it as a float32 right after the vector data in the
same slot, as vLLM's Triton backend does: 8 bytes per token and KV head (4 for a shared vector),
which ``ThinKeyAttentionBackend.customize_spec`` adds to the page size and
``thinkeys.accounting`` counts (``scale_bytes_per_vector``).

The compiled kernel (``kernels.py``) writes and reads these slots in place (its ``cache_format`` is
:attr:`KVCodec.kernel_format`), decoding each chunk to fp32 as it streams the cache; the PyTorch
path of ``paged.py`` (the fallback, and shared K=V slots) dequantizes gathered slots to the query
dtype (``value * scale``) with :meth:`KVCodec.decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkeys.checkpoint import ThinKeyError

#: kv_cache_dtype names the thin-key backend stores in 8 bits, and how.
PER_TENSOR_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
PER_TOKEN_HEAD = {"int8_per_token_head": torch.int8, "fp8_per_token_head": torch.float8_e4m3fn}
EIGHT_BIT_DTYPES = tuple(PER_TENSOR_FP8) + tuple(PER_TOKEN_HEAD)
#: The compiled kernel's name of each slot encoding (``cache_format`` of ``torch.ops.thinkeys``).
KERNEL_FORMATS = {
    "fp8": "fp8_e4m3",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "int8_per_token_head": "int8_per_token_head",
    "fp8_per_token_head": "fp8_per_token_head",
}
#: Bytes of one inline per-token-head scale (float32).
SCALE_BYTES = 4
_INT8_MAX = 127.0


def _qmax(dtype: torch.dtype) -> float:
    return _INT8_MAX if dtype == torch.int8 else float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class KVCodec:
    """Encodes a token's key/value (or one shared vector) into a cache slot and decodes slots back.

    ``value_width`` 0 means a shared K=V slot: :meth:`encode` takes only the vector, :meth:`decode`
    returns it twice.
    """

    kv_cache_dtype: str
    key_width: int
    value_width: int

    @property
    def per_token_head(self) -> bool:
        return self.kv_cache_dtype in PER_TOKEN_HEAD

    @property
    def quantized(self) -> bool:
        return self.kv_cache_dtype in EIGHT_BIT_DTYPES

    @property
    def element_dtype(self) -> torch.dtype | None:
        """The 8-bit element type (None for plain float caches)."""
        return PER_TENSOR_FP8.get(self.kv_cache_dtype) or PER_TOKEN_HEAD.get(self.kv_cache_dtype)

    @property
    def slot_encoding(self) -> str:
        """How each vector of a slot is stored, as the compiled kernels name it: ``plain`` or an 8-bit format."""
        return KERNEL_FORMATS[self.kv_cache_dtype] if self.quantized else "plain"

    @property
    def kernel_format(self) -> str | None:
        """The main compiled kernel's ``cache_format`` for these slots; None for shared K=V slots (one vector:
        the rebuild kernel reads those, ``rebuild_kernel.shared_kv_attention``, with :attr:`slot_encoding`)."""
        return None if self.value_width == 0 else self.slot_encoding

    @property
    def num_vectors(self) -> int:
        return 1 if self.value_width == 0 else 2

    @property
    def slot_width(self) -> int:
        """Elements (bytes for 8-bit caches) of one (token, KV head) slot."""
        data = self.key_width + self.value_width
        return data + (self.num_vectors * SCALE_BYTES if self.per_token_head else 0)

    # --- write ----------------------------------------------------------------------------

    def encode(
        self, key: torch.Tensor, value: torch.Tensor | None, storage: torch.dtype, k_scale: float = 1.0, v_scale: float = 1.0
    ) -> torch.Tensor:
        """``[T, H, slot_width]`` of dtype ``storage`` (the cache tensor's dtype) for keys ``[T, H, r]`` and values ``[T, H, d]``."""
        vectors = [key] if self.value_width == 0 else [key, value]
        if not self.quantized:
            return torch.cat(vectors, dim=-1).to(storage)
        if self.per_token_head:
            qs, scales = zip(*(self._quantize_per_token_head(x) for x in vectors))
            scale_bytes = torch.stack(scales, dim=-1).contiguous().view(storage)  # [T, H, 4 * n]
            return torch.cat([q.view(storage) for q in qs] + [scale_bytes], dim=-1)
        scales = (k_scale, v_scale)[: len(vectors)]
        return torch.cat([self._quantize_per_tensor(x, s).view(storage) for x, s in zip(vectors, scales)], dim=-1)

    def _quantize_per_tensor(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = self.element_dtype
        qmax = _qmax(dtype)
        return (x.to(torch.float32) / scale).clamp(-qmax, qmax).to(dtype)

    def _quantize_per_token_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.element_dtype
        qmax = _qmax(dtype)
        x = x.to(torch.float32)
        scale = (x.abs().amax(dim=-1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)  # [T, H]
        scaled = x / scale[..., None]
        if dtype == torch.int8:
            return scaled.round().clamp(-qmax, qmax).to(torch.int8), scale
        return scaled.clamp(-qmax, qmax).to(dtype), scale

    # --- read -----------------------------------------------------------------------------

    def decode(
        self, slots: torch.Tensor, dtype: torch.dtype, k_scale: float = 1.0, v_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[..., r]`` and values ``[..., d]`` in ``dtype`` from gathered slots ``[..., slot_width]``."""
        r, d = self.key_width, self.value_width
        if not self.quantized:
            x = slots.to(dtype)
            return (x, x) if d == 0 else (x[..., :r], x[..., r : r + d])
        data = slots[..., : r + d].view(self.element_dtype).to(torch.float32)
        if self.per_token_head:
            scales = slots[..., r + d :].contiguous().view(torch.float32)  # [..., num_vectors]
            k = data[..., :r] * scales[..., :1]
            v = k if d == 0 else data[..., r:] * scales[..., 1:2]
        else:
            k = data[..., :r] * k_scale
            v = k if d == 0 else data[..., r:] * v_scale
        return k.to(dtype), v.to(dtype)


def codec_for(kv_cache_dtype: str, key_width: int, value_width: int) -> KVCodec:
    """The codec of a layer; refuses 8-bit kinds this backend does not store."""
    if kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32", *EIGHT_BIT_DTYPES):
        raise ThinKeyError(
            f"kv_cache_dtype {kv_cache_dtype!r} is not stored by the thin-key backend: use auto, bfloat16, "
            f"float16, or an 8-bit cache ({', '.join(EIGHT_BIT_DTYPES)})"
        )
    return KVCodec(kv_cache_dtype, key_width, value_width)
