"""The thin-key checkpoint format: the contract between conversion, fine-tuning and serving.

A thin-key checkpoint is an ordinary Hugging Face folder (config.json, *.safetensors, tokenizer
files) whose attention has been factored so that cached keys are ``rank``-dimensional while values
keep the full ``head_dim``::

      x ──W_Q'──► q' (H heads x r)  ─┐
      x ──W_K'──► k' (Hkv heads x r) ─┴─► softmax(q'·k' / sqrt(head_dim)) ──► · v ──► W_O
      x ──W_V ──► v  (Hkv heads x d)      (cached per token: k' of width r, v of width d)

Tensor names and layouts are those of the source family with thinner q/k projections:

* Llama / Mistral / Qwen2: ``q_proj.weight`` is ``[H * r, D]``, ``k_proj.weight`` is
  ``[Hkv * r, D]`` (biases ``[H * r]`` / ``[Hkv * r]`` where the source has them), ``v_proj`` and
  ``o_proj`` unchanged.
* GPT-2: ``c_attn.weight`` keeps the Conv1D layout ``[D, H * r + H * r + H * d]`` (q | k | v).
* QK-norm families (Qwen3, Gemma 3): the key is not a linear function of the layer input (a per-head
  RMSNorm ``q_norm`` / ``k_norm`` sits between the projection and RoPE), so the thin basis acts
  after the norm. ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and the norms keep the source
  shapes (q and k are computed d wide and normalised), and two maps per layer take them to r::

      <layer>.self_attn.thin_q_map  [Hkv, r, d]   thin q = thin_q_map[g] @ q_norm(q)  (every query head of group g)
      <layer>.self_attn.thin_k_map  [Hkv, r, d]   thin k = thin_k_map[g] @ k_norm(k)  (cached: r wide)

  RoPE is then applied to the thin q/k as below. ``pairs``, ``mixed`` and ``rebuild`` are the
  strategies. With ``rebuild`` (below) the query is the source's normalised one and there is no
  ``thin_q_map``: ``thin_k_map`` is the cache map ``B`` (the latent is ``B k_norm(k)``) and
  ``thin_rebuild`` its expansion ``A^T``.
  Gemma 3 keeps its own attention geometry from config.json: the softmax scale is
  ``query_pre_attn_scalar ** -0.5`` (not ``1 / sqrt(head_dim)``), ``layer_types`` says which layers
  attend within ``sliding_window`` tokens, and each layer's ``thin_rope_freqs`` holds the frequencies
  of its own RoPE base (``rope_parameters[layer_type]``: the local base on sliding layers).

RoPE, when the source uses it, is applied to the first ``rope_dims`` of the r dims of every
query and key head, in NeoX layout (dim ``j`` pairs with ``j + rope_dims / 2``), with a frequency
table stored per layer and KV head as ``<layer>.self_attn.thin_rope_freqs`` of shape
``[Hkv, rope_dims / 2]`` (float32, radians per position). Query heads use the table of their KV
group. The remaining ``rank - rope_dims`` dims are not rotated. The softmax scale stays
``1 / sqrt(head_dim)`` of the source model.

Shared key-value (Q-K=V) checkpoints (``shared_kv: true``) are models whose key and value
projections are one projection: ``rank == head_dim``, the checkpoint keeps the family's tensor
names with ``v_proj`` (GPT-2: the v part of ``c_attn``) equal to ``k_proj`` so it stays loadable
by the family's own code, and the serving cache stores ONE vector per token and KV head, the
un-rotated ``k = W_K x``: it is the value as it is and the key once rotated at its position
(``thin_rope_freqs`` holds the source's own frequencies, ``rope: pairs``, ``rope_dims = head_dim``;
GPT-2: ``rope: none``). ``thinkeys convert SRC DST --shared-kv`` writes them.

Rebuild-at-read checkpoints (``rope: rebuild``; Llama-family sources, and QK-norm ones as above) cache a thin *pre-RoPE*
latent of the source key and rebuild the full key from it at every read::

      x ──W_Q ──► q  (H heads x d, the source's own query)            ──► R(m) q
      x ──B W_K─► c  (Hkv heads x r, cached un-rotated)  ─ at read ─►  R(n) (A^T c)  (d wide)
      logit = (R(m) q) . (R(n) A^T c) / sqrt(d)        (exact at r = d, where A^T B = I)

``q_proj`` is the source's (``[H * d, D]``), ``k_proj`` is ``[Hkv * r, D]`` (``B W_K``; bias
``B b_K``), and every layer has an expansion table ``<layer>.self_attn.thin_rebuild``
``[Hkv, d, r]`` = ``A^T`` (float32) besides its ``thin_rope_freqs`` ``[Hkv, d / 2]``, which here
holds the source's own RoPE frequencies (``rope_dims = head_dim``, NeoX layout), applied to queries
and to rebuilt keys at their positions. ``rank`` must divide ``head_dim`` (the serving layer hands
the d-wide query to vLLM's ``Attention`` in r-wide rows, see ``thinkeys.attention.rebuild``). The
cache holds ``r + d`` numbers per token and KV head, as for the other thin checkpoints.
``thinkeys convert SRC DST --rope rebuild --rank R [--calibration TEXT]`` writes them (``joint``
fit to calibration statistics, or the data-free ``svd`` of ``W_K`` without ``--calibration``).

This module is imported by every other part (converter, trainer, evaluator, vLLM models,
accounting); it depends on nothing but pydantic.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Key in config.json that holds the thin-key fields.
CONFIG_KEY = "thin_keys"
FORMAT_VERSION = 1
#: Suffix (after ``<layer prefix>.self_attn.``) of the per-layer RoPE frequency table.
ROPE_FREQS_NAME = "thin_rope_freqs"
#: Suffix of the per-layer key expansion table ``[Hkv, d, r]`` of rebuild-at-read checkpoints.
REBUILD_TABLE_NAME = "thin_rebuild"
#: Suffixes of the per-layer post-norm query / key maps of QK-norm families (``[Hkv, r, d]`` each).
QUERY_MAP_NAME = "thin_q_map"
KEY_MAP_NAME = "thin_k_map"


class RopeStrategy(str, Enum):
    """How a RoPE source model's rotary embedding is carried into the thin r-dim space."""

    #: The source has no rotary embedding (GPT-2): q'.k' approximates q.k exactly up to truncation.
    NONE = "none"
    #: The paper's variant: SVD basis, RoPE applied to all r dims with the first r/2 base
    #: frequencies. Approximate (the SVD basis mixes rotary pairs); needs recovery training.
    SVD = "svd"
    #: Keep the r/2 original rotary pairs with the most energy, with their original frequencies.
    #: Exact RoPE on what is kept; at r = head_dim it is the source model exactly.
    PAIRS = "pairs"
    #: Kept rotary pairs at their own frequencies plus an unrotated low-rank part over the slowly
    #: turning pairs (frequency-0 slots), fitted to calibration statistics (thinkeys.convert.mixed).
    #: rope_dims = rank; the unrotated slots are the ones whose table entry is 0.
    MIXED = "mixed"
    #: Cache the thin pre-RoPE latent ``c = B k``; rebuild ``A^T c`` (d wide) at read time and rotate
    #: it with the source's RoPE. Queries are the source's. rope_dims = head_dim; see the module docstring.
    REBUILD = "rebuild"


class SourceFamily(str, Enum):
    LLAMA = "llama"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    GEMMA3 = "gemma3"
    GPT2 = "gpt2"


class Family(BaseModel):
    """How a source architecture maps to its thin-key twin."""

    model_config = ConfigDict(frozen=True)
    family: SourceFamily
    thin_architecture: str
    rotary: bool
    #: Per-head RMSNorm on q and k before RoPE: the thin basis acts after it (maps in the checkpoint).
    qk_norm: bool = False


#: Source architectures the converter accepts, and the architecture name of their thin twin.
SUPPORTED_SOURCES: dict[str, Family] = {
    "LlamaForCausalLM": Family(family=SourceFamily.LLAMA, thin_architecture="ThinKeyLlamaForCausalLM", rotary=True),
    "MistralForCausalLM": Family(family=SourceFamily.LLAMA, thin_architecture="ThinKeyLlamaForCausalLM", rotary=True),
    "Qwen2ForCausalLM": Family(family=SourceFamily.QWEN2, thin_architecture="ThinKeyQwen2ForCausalLM", rotary=True),
    "GPT2LMHeadModel": Family(family=SourceFamily.GPT2, thin_architecture="ThinKeyGPT2LMHeadModel", rotary=False),
    "Qwen3ForCausalLM": Family(
        family=SourceFamily.QWEN3, thin_architecture="ThinKeyQwen3ForCausalLM", rotary=True, qk_norm=True
    ),
    "Gemma3ForCausalLM": Family(
        family=SourceFamily.GEMMA3, thin_architecture="ThinKeyGemma3ForCausalLM", rotary=True, qk_norm=True
    ),
}
#: Strategies that keep RoPE exact on what they keep, the ones a QK-norm family can use.
QK_NORM_STRATEGIES = (RopeStrategy.PAIRS, RopeStrategy.MIXED, RopeStrategy.REBUILD)

#: Thin-key architecture name -> "module:Class" of its vLLM implementation (registered lazily).
VLLM_ARCHITECTURES: dict[str, str] = {
    "ThinKeyLlamaForCausalLM": "thinkeys.models.llama:ThinKeyLlamaForCausalLM",
    "ThinKeyQwen2ForCausalLM": "thinkeys.models.qwen2:ThinKeyQwen2ForCausalLM",
    "ThinKeyGPT2LMHeadModel": "thinkeys.models.gpt2:ThinKeyGPT2LMHeadModel",
    "ThinKeyQwen3ForCausalLM": "thinkeys.models.qwen3:ThinKeyQwen3ForCausalLM",
    "ThinKeyGemma3ForCausalLM": "thinkeys.models.gemma3:ThinKeyGemma3ForCausalLM",
}


class ThinKeyError(ValueError):
    """A thin-key checkpoint, conversion request or config is not valid. The message says why and how to fix it."""


class ThinKeyConfig(BaseModel):
    """The thin-key fields stored under ``config.json["thin_keys"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    format_version: Literal[1] = FORMAT_VERSION
    rank: int = Field(ge=1, description="r: width of every cached key head and every query head")
    head_dim: int = Field(ge=1, description="d: head size of the source model; width of values")
    rope: RopeStrategy = Field(description="how RoPE is carried into the r-dim space")
    rope_dims: int = Field(ge=0, description="the first rope_dims of the r dims are rotated")
    source_architecture: str = Field(description="architecture of the converted checkpoint")
    shared_kv: bool = Field(
        default=False, description="keys and values are one projection; one cached vector per token and KV head"
    )

    @model_validator(mode="after")
    def _check(self) -> "ThinKeyConfig":
        if self.rank > self.head_dim:
            raise ValueError(
                f"rank {self.rank} is larger than head_dim {self.head_dim}: "
                f"choose 1 <= rank <= {self.head_dim}"
            )
        if self.rope == RopeStrategy.NONE and self.rope_dims != 0:
            raise ValueError("rope 'none' needs rope_dims 0")
        if self.rope == RopeStrategy.REBUILD:
            if self.rope_dims != self.head_dim:
                raise ValueError(f"rope 'rebuild' rotates the rebuilt d-wide key: rope_dims must be head_dim ({self.head_dim})")
            if self.head_dim % self.rank:
                raise ValueError(f"rope 'rebuild' needs a rank that divides head_dim {self.head_dim}, not {self.rank}")
            if self.shared_kv:
                raise ValueError("rope 'rebuild' and shared_kv do not combine")
        elif self.rope != RopeStrategy.NONE:
            if self.rope_dims % 2:
                raise ValueError(f"rope_dims {self.rope_dims} must be even (RoPE rotates pairs of dims)")
            if not 2 <= self.rope_dims <= self.rank:
                raise ValueError(f"rope_dims {self.rope_dims} must be in [2, rank={self.rank}]")
        if self.shared_kv and self.rank != self.head_dim:
            raise ValueError(
                f"shared_kv stores one vector as key and value, so rank must equal head_dim "
                f"({self.head_dim}), not {self.rank}"
            )
        if self.shared_kv and self.rope != RopeStrategy.NONE and (self.rope != RopeStrategy.PAIRS or self.rope_dims != self.rank):
            raise ValueError("shared_kv with RoPE needs rope 'pairs' over all dims (rope_dims = rank): the source's own rotation")
        if self.source_architecture not in SUPPORTED_SOURCES:
            raise ValueError(
                f"source_architecture {self.source_architecture!r} is not one of {sorted(SUPPORTED_SOURCES)}"
            )
        if SUPPORTED_SOURCES[self.source_architecture].qk_norm:
            if self.rope not in QK_NORM_STRATEGIES or (self.rope != RopeStrategy.REBUILD and self.rope_dims != self.rank):
                raise ValueError(
                    f"{self.source_architecture} normalises q/k per head before RoPE: rope must be one of "
                    f"{[s.value for s in QK_NORM_STRATEGIES]} (rope_dims = rank, or head_dim for rebuild)"
                )
            if self.shared_kv:
                raise ValueError(f"shared_kv is not supported for {self.source_architecture} (its keys are normalised, its values not)")
        return self

    @property
    def rebuild(self) -> bool:
        """Keys rebuilt at read time from a cached r-wide latent (``rope: rebuild``)."""
        return self.rope == RopeStrategy.REBUILD

    @property
    def query_width(self) -> int:
        """Width of every query head: d for rebuild-at-read checkpoints (the source's queries), else r."""
        return self.head_dim if self.rebuild else self.rank

    @property
    def family(self) -> Family:
        return SUPPORTED_SOURCES[self.source_architecture]

    @property
    def thin_architecture(self) -> str:
        return self.family.thin_architecture

    # --- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if not self.shared_kv:  # written only when set, so ordinary thin checkpoints keep their config
            del out["shared_kv"]
        return out

    @classmethod
    def from_hf_config(cls, config: Any, *, where: str = "config.json") -> "ThinKeyConfig":
        """Read the thin-key fields from a HF config (a ``PretrainedConfig`` or a dict)."""
        raw = config.get(CONFIG_KEY) if isinstance(config, Mapping) else getattr(config, CONFIG_KEY, None)
        if raw is None:
            raise ThinKeyError(
                f"{where}: no '{CONFIG_KEY}' field; this is not a thin-key checkpoint "
                "(convert it first with `thinkeys convert SRC DST --rank R`)"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or CONFIG_KEY}: {err['msg']}" for err in exc.errors()
            )
            raise ThinKeyError(f"{where}: invalid '{CONFIG_KEY}' ({problems})") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ThinKeyConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ThinKeyError(f"{config_path}: missing; a checkpoint folder needs a config.json")
        return cls.from_hf_config(json.loads(config_path.read_text()), where=str(config_path))


def attention_scale(thin: ThinKeyConfig, config: Any) -> float:
    """The source model's softmax scale, which thin keys keep (q'.k' approximates q.k): Gemma 3's
    ``query_pre_attn_scalar ** -0.5``, else ``1 / sqrt(head_dim)``. ``config``: HF config or dict."""
    if thin.family.family == SourceFamily.GEMMA3:
        scalar = config.get("query_pre_attn_scalar") if isinstance(config, Mapping) else getattr(config, "query_pre_attn_scalar", None)
        if scalar is None:
            raise ThinKeyError("config.json: a Gemma 3 checkpoint needs query_pre_attn_scalar (its softmax scale)")
        return float(scalar) ** -0.5
    return thin.head_dim**-0.5


def is_thin_key_config(config: Any) -> bool:
    raw = config.get(CONFIG_KEY) if isinstance(config, Mapping) else getattr(config, CONFIG_KEY, None)
    return raw is not None


def qk_map_names(layer_prefix: str) -> tuple[str, str]:
    """Checkpoint names of a QK-norm layer's query and key maps, e.g. ``model.layers.3.self_attn.thin_q_map``."""
    return f"{layer_prefix}.self_attn.{QUERY_MAP_NAME}", f"{layer_prefix}.self_attn.{KEY_MAP_NAME}"


def rope_freqs_name(layer_prefix: str) -> str:
    """Checkpoint name of a layer's RoPE frequency table, e.g. ``model.layers.3.self_attn.thin_rope_freqs``."""
    return f"{layer_prefix}.self_attn.{ROPE_FREQS_NAME}"


def rebuild_table_name(layer_prefix: str) -> str:
    """Checkpoint name of a rebuild layer's key expansion table, e.g. ``model.layers.3.self_attn.thin_rebuild``."""
    return f"{layer_prefix}.self_attn.{REBUILD_TABLE_NAME}"
