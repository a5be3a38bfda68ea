"""Per-family weight maps: where each layer's query/key projections live in a source checkpoint.

A conversion only ever changes the query and key projections. Each family reads them into one
per-head form (:class:`QueryKey`) and writes the thin result back under the *same* tensor names,
so the thin checkpoint is the source checkpoint with thinner q/k:

* Llama / Mistral / Qwen2 (``nn.Linear``, ``y = x W^T + b``)::

      model.layers.{i}.self_attn.q_proj.weight  [H * d, D]    -> [H * r, D]
      model.layers.{i}.self_attn.k_proj.weight  [Hkv * d, D]  -> [Hkv * r, D]
      (q_proj.bias [H * d] / k_proj.bias [Hkv * d] where present, e.g. Qwen2)

* GPT-2 (``Conv1D``, ``y = x W + b``, q | k | v fused along the output axis)::

      transformer.h.{i}.attn.c_attn.weight  [D, 3 * D]  -> [D, H * r + H * r + H * d]
      transformer.h.{i}.attn.c_attn.bias    [3 * D]     -> [H * r + H * r + H * d]

  Checkpoints saved without the ``transformer.`` prefix (the original OpenAI upload) keep their
  names. The legacy causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` of old GPT-2 files
  are dropped: they are not weights, and the thin model builds its own mask.

* Qwen3 (QK-norm: per-head RMSNorm ``q_norm`` / ``k_norm`` after the projections): the
  projections are read as for Llama but never rewritten; the thin result is two per-layer maps
  applied after the norms (``thin_q_map`` / ``thin_k_map``, ``[Hkv, r, d]``, see
  :mod:`thinkeys.checkpoint`)::

      model.layers.{i}.self_attn.q_norm.weight  [d]   (read: the gain of every normalised query dim)
      model.layers.{i}.self_attn.k_norm.weight  [d]

  Gemma 3 has the same names; its norms scale by ``1 + weight`` (``GemmaQKNormLayout``).

The pre-attention norm gain (``input_layernorm`` / ``ln_1`` weight) is read too: it scales each
input feature of q and k, so the data-free pair-selection criterion weighs columns by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from thinkeys.checkpoint import SUPPORTED_SOURCES, SourceFamily, ThinKeyError, qk_map_names


@dataclass
class Geometry:
    """Attention sizes of a source model (read from its HF config)."""

    num_layers: int
    hidden: int  # D
    num_heads: int  # H (query heads)
    num_kv_heads: int  # Hkv; H is a multiple of it (GQA group size H / Hkv)
    head_dim: int  # d

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "Geometry":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ThinKeyError(f"config.json: {heads} attention heads are not a multiple of {kv_heads} KV heads")
        return cls(config.num_hidden_layers, config.hidden_size, heads, kv_heads, head_dim)


@dataclass
class QueryKey:
    """One layer's query/key projections, per head, as ``y = W x + b``.

    Source form has width d per head; after conversion, width r.
    """

    q_weight: torch.Tensor  # [H, d, D]
    k_weight: torch.Tensor  # [Hkv, d, D]
    q_bias: torch.Tensor | None  # [H, d]
    k_bias: torch.Tensor | None  # [Hkv, d]
    input_gain: torch.Tensor | None = None  # [D]: pre-attention norm weight (source only)


def _take(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in state:
        raise ThinKeyError(f"weights: tensor {name!r} is missing; the checkpoint does not match its config.json")
    t = state[name]
    if tuple(t.shape) != shape:
        raise ThinKeyError(f"weights: {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    return t


class LlamaLayout:
    """Llama, Mistral and Qwen2: separate ``q_proj`` / ``k_proj`` linears, optional biases."""

    rotary = True

    def __init__(self, geo: Geometry, state: dict[str, torch.Tensor]) -> None:
        self.geo = geo

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def read(self, state: dict[str, torch.Tensor], i: int) -> QueryKey:
        g, p = self.geo, f"{self.layer_prefix(i)}.self_attn"
        H, Hkv, d, D = g.num_heads, g.num_kv_heads, g.head_dim, g.hidden
        q_bias = k_bias = None
        if f"{p}.q_proj.bias" in state:
            q_bias = _take(state, f"{p}.q_proj.bias", (H * d,)).reshape(H, d)
        if f"{p}.k_proj.bias" in state:
            k_bias = _take(state, f"{p}.k_proj.bias", (Hkv * d,)).reshape(Hkv, d)
        gain_name = f"{self.layer_prefix(i)}.input_layernorm.weight"
        return QueryKey(
            q_weight=_take(state, f"{p}.q_proj.weight", (H * d, D)).reshape(H, d, D),
            k_weight=_take(state, f"{p}.k_proj.weight", (Hkv * d, D)).reshape(Hkv, d, D),
            q_bias=q_bias,
            k_bias=k_bias,
            input_gain=state.get(gain_name),
        )

    def write(self, state: dict[str, torch.Tensor], i: int, thin: QueryKey) -> None:
        p = f"{self.layer_prefix(i)}.self_attn"
        state[f"{p}.q_proj.weight"] = thin.q_weight.reshape(-1, self.geo.hidden)  # [H * r, D]
        state[f"{p}.k_proj.weight"] = thin.k_weight.reshape(-1, self.geo.hidden)  # [Hkv * r, D]
        if thin.q_bias is not None:
            state[f"{p}.q_proj.bias"] = thin.q_bias.reshape(-1)  # [H * r]
        if thin.k_bias is not None:
            state[f"{p}.k_proj.bias"] = thin.k_bias.reshape(-1)  # [Hkv * r]


class QKNormLayout(LlamaLayout):
    """Qwen3: Llama's projections followed by a per-head RMSNorm of q and k; the thin maps act after it."""

    qk_norm = True
    #: Added to the stored norm weight to get the gain (Gemma's RMSNorm scales by ``1 + weight``).
    norm_offset = 0.0

    def norm_gains(self, state: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective per-dim gains of ``q_norm`` and ``k_norm``, ``[d]`` each (float64)."""
        p, d = f"{self.layer_prefix(i)}.self_attn", self.geo.head_dim
        return tuple(
            _take(state, f"{p}.{n}.weight", (d,)).to(torch.float64) + self.norm_offset for n in ("q_norm", "k_norm")
        )

    def post_norm_proxy(self, state: dict[str, torch.Tensor], i: int, qk: QueryKey) -> QueryKey:
        """A linear stand-in for the normalised q/k, for data-free pair scores and energy figures.

        RMSNorm divides each head vector by its root-mean-square and multiplies dim j by the gain
        ``g_j``, so dim j of a normalised head carries about ``g_j^2 e_j / mean(e)`` of energy, where
        ``e_j`` is the energy of projection row j (with the input norm's gain). The proxy rows are
        ``g_j W[j] / sqrt(mean(e))``; biases (if any) are scaled the same way.
        """
        q_gain, k_gain = self.norm_gains(state, i)

        def scaled(w: torch.Tensor, b: torch.Tensor | None, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = w.to(torch.float64)
            wg = w * qk.input_gain.to(torch.float64) if qk.input_gain is not None else w
            e = wg.pow(2).sum(-1)  # [n, d]
            if b is not None:
                e = e + b.to(torch.float64).pow(2)
            rms = e.mean(-1, keepdim=True).clamp_min(1e-300).sqrt()  # [n, 1]
            w = w * (gain[:, None] / rms[..., None])
            return w, None if b is None else b.to(torch.float64) * gain / rms

        q_w, q_b = scaled(qk.q_weight, qk.q_bias, q_gain)
        k_w, k_b = scaled(qk.k_weight, qk.k_bias, k_gain)
        return QueryKey(q_w, k_w, q_b, k_b, input_gain=qk.input_gain)

    def write_maps(self, state: dict[str, torch.Tensor], i: int, q_map: torch.Tensor | None, k_map: torch.Tensor) -> None:
        """Store the post-norm maps ``[Hkv, r, d]`` (rebuild: the key map only); projections and norms stay as they are."""
        q_name, k_name = qk_map_names(self.layer_prefix(i))
        if q_map is not None:
            state[q_name] = q_map.contiguous()
        state[k_name] = k_map.contiguous()


class GemmaQKNormLayout(QKNormLayout):
    """Gemma 3: as Qwen3, but Gemma's RMSNorm scales by ``1 + weight`` (a stored 0 is a gain of 1)."""

    norm_offset = 1.0


class GPT2Layout:
    """GPT-2: fused ``c_attn`` Conv1D, weight stored input-major ``[D, 3D]`` (transposed vs. Linear)."""

    rotary = False
    LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")

    def __init__(self, geo: Geometry, state: dict[str, torch.Tensor]) -> None:
        self.geo = geo
        self.prefix = "transformer." if "transformer.h.0.attn.c_attn.weight" in state else ""
        for name in [n for n in state if n.endswith(self.LEGACY_BUFFERS)]:
            del state[name]

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}h.{i}"

    def read(self, state: dict[str, torch.Tensor], i: int) -> QueryKey:
        g, p = self.geo, f"{self.layer_prefix(i)}.attn.c_attn"
        H, d, D = g.num_heads, g.head_dim, g.hidden
        w = _take(state, f"{p}.weight", (D, 3 * D))
        b = _take(state, f"{p}.bias", (3 * D,))
        return QueryKey(
            q_weight=w[:, :D].T.reshape(H, d, D),  # Conv1D [D, D] -> per-head Linear form [H, d, D]
            k_weight=w[:, D : 2 * D].T.reshape(H, d, D),
            q_bias=b[:D].reshape(H, d),
            k_bias=b[D : 2 * D].reshape(H, d),
            input_gain=state.get(f"{self.layer_prefix(i)}.ln_1.weight"),
        )

    def write(self, state: dict[str, torch.Tensor], i: int, thin: QueryKey) -> None:
        p = f"{self.layer_prefix(i)}.attn.c_attn"
        D = self.geo.hidden
        w, b = state[f"{p}.weight"], state[f"{p}.bias"]
        q_w = thin.q_weight.reshape(-1, D).T.to(w.dtype)  # [D, H * r]
        k_w = thin.k_weight.reshape(-1, D).T.to(w.dtype)  # [D, H * r]
        state[f"{p}.weight"] = torch.cat([q_w, k_w, w[:, 2 * D :]], dim=1).contiguous()  # [D, 2Hr + Hd]
        state[f"{p}.bias"] = torch.cat(
            [thin.q_bias.reshape(-1).to(b.dtype), thin.k_bias.reshape(-1).to(b.dtype), b[2 * D :]]
        )  # [2Hr + Hd]


LAYOUTS = {
    SourceFamily.LLAMA: LlamaLayout,
    SourceFamily.QWEN2: LlamaLayout,
    SourceFamily.QWEN3: QKNormLayout,
    SourceFamily.GEMMA3: GemmaQKNormLayout,
    SourceFamily.GPT2: GPT2Layout,
}


def layout_for(architecture: str, geo: Geometry, state: dict[str, torch.Tensor]) -> LlamaLayout | QKNormLayout | GPT2Layout:
    return LAYOUTS[SUPPORTED_SOURCES[architecture].family](geo, state)
