"""The thin-key model in plain PyTorch: the reference everything else is checked against.

:func:`load_thin_model` builds the source family's transformers model (Llama, Mistral, Qwen2, Qwen3 or
GPT-2) from a thin checkpoint's config, swaps every attention for :class:`ThinAttention` /
:class:`ThinGPT2Attention`, and loads the checkpoint strictly (every tensor used, every shape
checked). Everything but attention (embeddings, norms, MLPs, head, loss, generation) is
transformers' own, so ``model(input_ids, labels=...)`` gives the usual loss and logits.

The attention is written out in full rather than routed through a fused kernel, so it can be
read and trusted::

    q' = W_Q' x + b_Q'   [B, T, H, r]     k' = W_K' x + b_K'   [B, T, Hkv, r]     v  [B, T, Hkv, d]
    q', k' <- apply_thin_rope(., positions, thin_rope_freqs)   (first rope_dims of r; none for GPT-2)
    out = softmax(q' k'^T / sqrt(d) + causal mask) v             (GQA: each KV head serves H / Hkv queries)

QK-norm families (Qwen3, Gemma 3, :class:`ThinQKNormAttention`): q and k are projected d wide and
normalised by the source's own ``q_norm`` / ``k_norm``, then mapped to r by the checkpoint's
``thin_q_map`` / ``thin_k_map`` (``[Hkv, r, d]``), then rotated as above. Gemma 3's softmax scale is
its ``query_pre_attn_scalar ** -0.5``, and its sliding-window layers get transformers' own
sliding-window mask (the model builds one mask per layer type and hands each layer its own).

Shared K=V checkpoints (``thin_keys.shared_kv``): the value is the un-rotated key projection,
``v = W_K' x + b_K'`` (the checkpoint's ``v_proj``, equal to ``k_proj``, is loaded and not used).

Rebuild-at-read checkpoints (``rope: rebuild``): queries are the source's ``[B, T, H, d]``, the key
projection gives the latent ``c`` ``[B, T, Hkv, r]``, and the key is rebuilt as
``k = thin_rebuild[g] @ c`` (d wide) before both are rotated with the source's RoPE table.

Gradients flow to the thin q/k weights (:func:`thin_qk_parameters`), which is what recovery
fine-tuning trains. :func:`save_thin_model` writes the model back as a thin checkpoint.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thinkeys import hf_io
from thinkeys.checkpoint import KEY_MAP_NAME, QUERY_MAP_NAME, REBUILD_TABLE_NAME, ThinKeyConfig, ThinKeyError, attention_scale
from thinkeys.rope import apply_thin_rope

#: transformers class ("module:Class") built for each source architecture.
SOURCE_MODELS = {
    "LlamaForCausalLM": "transformers:LlamaForCausalLM",
    "MistralForCausalLM": "transformers:MistralForCausalLM",
    "Qwen2ForCausalLM": "transformers:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "transformers:Qwen3ForCausalLM",
    "Gemma3ForCausalLM": "transformers:Gemma3ForCausalLM",
    "GPT2LMHeadModel": "transformers:GPT2LMHeadModel",
}


def thin_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention with keys narrower than values.

    ``q`` ``[B, H, T, r]``, ``k`` ``[B, Hkv, S, r]``, ``v`` ``[B, Hkv, S, d]`` (S >= T: the last T
    keys are the queries' own positions). ``attention_mask`` is transformers' 4D mask ``[B, 1, T, S]``
    (additive float, or boolean "may attend"); None means plain causal. Returns ``[B, T, H * d]``.
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    k = k.repeat_interleave(group, dim=1)  # [B, H, S, r]
    v = v.repeat_interleave(group, dim=1)  # [B, H, S, d]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if attention_mask is None:
        t, s = q.shape[2], k.shape[2]
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, H, T, d]
    return out.transpose(1, 2).flatten(2)  # [B, T, H * d]


class _KeepsFreqsInFloat32(nn.Module):
    """Keeps the ``thin_rope_freqs`` buffer float32 through ``model.to(dtype)``.

    Rounding frequencies to bf16 would shift the angle ``position * freq`` by whole radians at
    long positions; HF and vLLM likewise compute RoPE angles in float32.
    """

    def _apply(self, fn, recurse=True):
        freqs = self.thin_rope_freqs
        super()._apply(fn, recurse)
        self.thin_rope_freqs = freqs.to(device=self.thin_rope_freqs.device, dtype=torch.float32)
        return self


class ThinAttention(_KeepsFreqsInFloat32):
    """Llama / Mistral / Qwen2 self-attention with r-wide queries and keys (drop-in for their ``self_attn``)."""

    def __init__(self, config: Any, thin: ThinKeyConfig, layer_idx: int, like: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.rank, self.head_dim = thin.rank, thin.head_dim
        self.shared_kv = thin.shared_kv
        self.rebuild = thin.rebuild
        self.query_width = thin.query_width
        self.scale = attention_scale(thin, config)  # the source model's scale: q'.k' approximates q.k
        hidden, r, d = config.hidden_size, thin.rank, thin.head_dim
        # Bias layout is the source module's (Qwen2: q/k/v biases; Llama: attention_bias).
        self.q_proj = nn.Linear(hidden, self.num_heads * thin.query_width, bias=like.q_proj.bias is not None)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * r, bias=like.k_proj.bias is not None)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=like.v_proj.bias is not None)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=like.o_proj.bias is not None)
        self.register_buffer("thin_rope_freqs", torch.zeros(self.num_kv_heads, thin.rope_dims // 2))
        if self.rebuild:  # [Hkv, d, r] key expansion A^T (trainable with the thin q/k, see thin_qk_parameters)
            self.register_parameter(REBUILD_TABLE_NAME, nn.Parameter(torch.zeros(self.num_kv_heads, d, r)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,  # the source's cos/sin for width d: not used, thin RoPE has its own table
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        b, t, _ = hidden_states.shape
        q, k = self.thin_query_key(hidden_states)  # [B, T, H, r], [B, T, Hkv, r] (rebuild: d-wide q, latent k)
        if self.rebuild:  # rebuild the d-wide pre-RoPE key from its cached latent
            table = getattr(self, REBUILD_TABLE_NAME)
            k = torch.einsum("btgr,gdr->btgd", k, table.to(k.dtype))  # [B, T, Hkv, d]
        if self.shared_kv:  # one projection: the value is the un-rotated key
            v = k
        else:
            v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, d]
        if position_ids is None:
            past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            position_ids = torch.arange(past, past + t, device=hidden_states.device)[None]  # [1, T]
        q = apply_thin_rope(q, position_ids, self.thin_rope_freqs)
        k = apply_thin_rope(k, position_ids, self.thin_rope_freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: [B, heads, T, .]
        if past_key_values is not None:  # the cache holds thin keys [B, Hkv, S, r] and values [B, Hkv, S, d]
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = thin_attention(q, k, v, attention_mask, self.scale)  # [B, T, H * d]
        return self.o_proj(out), None


    def thin_query_key(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated thin queries ``[B, T, H, r]`` (rebuild: the source's ``[B, T, H, d]``) and keys ``[B, T, Hkv, r]``."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.query_width)
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.rank)
        return q, k


class ThinQKNormAttention(ThinAttention):
    """Qwen3 self-attention: q/k projected d wide, normalised per head (the source's own norms), then mapped to r.

    Rebuild-at-read checkpoints keep the normalised query as it is (no query map) and map the
    normalised key to its r-wide latent; :meth:`ThinAttention.forward` rebuilds it.
    """

    def __init__(self, config: Any, thin: ThinKeyConfig, layer_idx: int, like: nn.Module) -> None:
        super().__init__(config, thin, layer_idx, like)
        hidden, d, r = config.hidden_size, thin.head_dim, thin.rank
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=like.q_proj.bias is not None)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=like.k_proj.bias is not None)
        self.q_norm, self.k_norm = like.q_norm, like.k_norm  # transformers' modules (their gain convention)
        if not self.rebuild:
            self.register_parameter(QUERY_MAP_NAME, nn.Parameter(torch.zeros(self.num_kv_heads, r, d)))
        self.register_parameter(KEY_MAP_NAME, nn.Parameter(torch.zeros(self.num_kv_heads, r, d)))

    def thin_query_key(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = hidden_states.shape
        n_kv, group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(hidden_states).view(b, t, self.num_heads, d))  # [B, T, H, d]
        k = self.k_norm(self.k_proj(hidden_states).view(b, t, n_kv, d))  # [B, T, Hkv, d]
        k = torch.einsum("btgd,grd->btgr", k, getattr(self, KEY_MAP_NAME))  # [B, T, Hkv, r]
        if self.rebuild:  # the source's normalised query; the key is the latent B k_norm(k)
            return q, k
        q_map = getattr(self, QUERY_MAP_NAME)  # [Hkv, r, d]
        q = torch.einsum("btgjd,grd->btgjr", q.view(b, t, n_kv, group, d), q_map).reshape(b, t, self.num_heads, self.rank)
        return q, k


class ThinGPT2Attention(_KeepsFreqsInFloat32):
    """GPT-2 self-attention with r-wide queries and keys (drop-in for ``GPT2Attention``; no RoPE).

    q, k and v are separate ``nn.Linear`` layers here, so that q/k can be trained alone, but the
    state dict shows the checkpoint's fused Conv1D ``c_attn`` (``[D, H r + H r + H d]``, input-major),
    through a state-dict hook and a load pre-hook.
    """

    def __init__(self, config: Any, thin: ThinKeyConfig, layer_idx: int, like: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.rank, self.head_dim = thin.rank, thin.head_dim
        self.shared_kv = thin.shared_kv
        self.scale = 1.0 / math.sqrt(thin.head_dim)
        hidden, heads, r, d = config.hidden_size, self.num_heads, thin.rank, thin.head_dim
        self.q_proj = nn.Linear(hidden, heads * r)
        self.k_proj = nn.Linear(hidden, heads * r)
        self.v_proj = nn.Linear(hidden, heads * d)
        self.c_proj = like.c_proj  # transformers' Conv1D output projection, unchanged
        self.resid_dropout = like.resid_dropout
        self.register_buffer("thin_rope_freqs", torch.zeros(heads, 0), persistent=False)  # no RoPE in GPT-2
        self.register_state_dict_post_hook(_fuse_c_attn)
        self.register_load_state_dict_pre_hook(_split_c_attn)

    def forward(
        self, hidden_states: torch.Tensor, past_key_values: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.rank).transpose(1, 2)  # [B, H, T, r]
        k = self.k_proj(hidden_states).view(b, t, self.num_heads, self.rank).transpose(1, 2)  # [B, H, T, r]
        if self.shared_kv:  # one projection: the value is the key
            v = k
        else:
            v = self.v_proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = thin_attention(q, k, v, attention_mask, self.scale)  # [B, T, H * d]
        return self.resid_dropout(self.c_proj(out)), None


_QKV = ("q_proj", "k_proj", "v_proj")


def _fuse_c_attn(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    weights = [state.pop(f"{prefix}{n}.weight") for n in _QKV]  # each [out, D]
    biases = [state.pop(f"{prefix}{n}.bias") for n in _QKV]
    state[f"{prefix}c_attn.weight"] = torch.cat([w.T for w in weights], dim=1)  # Conv1D: [D, 2Hr + Hd]
    state[f"{prefix}c_attn.bias"] = torch.cat(biases)  # [2Hr + Hd]


def _split_c_attn(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    w_name, b_name = f"{prefix}c_attn.weight", f"{prefix}c_attn.bias"
    if w_name not in state or b_name not in state:
        return  # reported as missing keys by load_state_dict
    widths = [module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features]
    for name, w, b in zip(_QKV, state.pop(w_name).split(widths, dim=1), state.pop(b_name).split(widths)):
        state[f"{prefix}{name}.weight"] = w.T  # [out, D]
        state[f"{prefix}{name}.bias"] = b


def _thin_attention_modules(model: nn.Module) -> list[ThinAttention | ThinGPT2Attention]:
    return [m for m in model.modules() if isinstance(m, (ThinAttention, ThinGPT2Attention))]


def thin_qk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The thin query/key projection weights and biases of every layer: what recovery fine-tuning trains."""
    params: list[nn.Parameter] = []
    for attn in _thin_attention_modules(model):
        for proj in (attn.q_proj, attn.k_proj):
            params += [p for p in (proj.weight, proj.bias) if p is not None]
        if getattr(attn, "rebuild", False):
            params.append(getattr(attn, REBUILD_TABLE_NAME))
        if isinstance(attn, ThinQKNormAttention):
            params += [getattr(attn, n) for n in (QUERY_MAP_NAME, KEY_MAP_NAME) if hasattr(attn, n)]
    if not params:
        raise ThinKeyError("model has no thin-key attention; load it with thinkeys.reference.load_thin_model")
    return params


def _build(config: Any, thin: ThinKeyConfig) -> nn.Module:
    module, cls = SOURCE_MODELS[thin.source_architecture].split(":")
    model = getattr(importlib.import_module(module), cls)(config)
    if thin.source_architecture == "GPT2LMHeadModel":
        for i, block in enumerate(model.transformer.h):
            block.attn = ThinGPT2Attention(config, thin, i, like=block.attn)
    else:
        attention = ThinQKNormAttention if thin.family.qk_norm else ThinAttention
        for i, layer in enumerate(model.model.layers):
            layer.self_attn = attention(config, thin, i, like=layer.self_attn)
    return model


def _load_strict(model: nn.Module, path: Path) -> dict[str, str]:
    """Load the checkpoint's tensors into ``model``: every tensor must be used and every weight given.

    Returns checkpoint name -> model state-dict name (they differ only for GPT-2 files saved
    without the ``transformer.`` prefix). Tied weights (e.g. GPT-2's ``lm_head`` = ``wte``) need
    only one of their names in the file.
    """
    file_state = hf_io.load_state_dict(path)
    expected = model.state_dict()  # checkpoint naming (GPT-2's c_attn fused by the hook)
    base = getattr(model, "base_model_prefix", "")
    names: dict[str, str] = {}
    for name in file_state:
        if name not in expected and base and f"{base}.{name}" in expected:
            names[name] = f"{base}.{name}"
        else:
            names[name] = name
    unexpected = [n for n, m in names.items() if m not in expected]
    if unexpected:
        raise ThinKeyError(
            f"{path}: tensor(s) the thin model does not have: {', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}; the weights do not match config.json (re-run `thinkeys convert`)"
        )
    for file_name, model_name in names.items():
        want, got = tuple(expected[model_name].shape), tuple(file_state[file_name].shape)
        if want != got:
            raise ThinKeyError(
                f"{path}: {file_name} has shape {list(got)}, but config.json (thin_keys rank "
                f"{model.config.thin_keys['rank']}) implies {list(want)}; the weights and config.json disagree"
            )
    aliases: dict[Any, list[str]] = {}  # tied tensors share storage: one name in the file is enough
    for name, t in expected.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else name
        aliases.setdefault(key, []).append(name)
    given = set(names.values())
    missing = [group[0] for group in aliases.values() if not given.intersection(group)]
    if missing:
        raise ThinKeyError(
            f"{path}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete"
        )
    model.load_state_dict({names[n]: t for n, t in file_state.items()}, strict=False)
    return names


def load_thin_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load a thin-key checkpoint folder as a transformers ``PreTrainedModel`` with plain thin attention.

    Raises :class:`ThinKeyError` if the folder is not a thin-key checkpoint or its weights do not
    match its config. The model is in eval mode; call ``.train()`` to fine-tune.
    """
    from transformers import AutoConfig

    path = Path(path)
    thin = ThinKeyConfig.from_pretrained(path)
    config = AutoConfig.from_pretrained(path, attn_implementation="eager")  # masks as explicit 4D tensors
    model = _build(config, thin)
    names = _load_strict(model, path)
    model.thin_checkpoint_names = names  # used by save_thin_model to write the same names back
    model.thin_keys = thin
    return model.to(device=device, dtype=dtype).eval()


def save_thin_model(model: nn.Module, dst: str | Path, *, source: str | Path, force: bool = False) -> Path:
    """Write ``model`` (from :func:`load_thin_model`, e.g. after fine-tuning) as a thin-key checkpoint.

    Tensor names are those of the checkpoint it was loaded from; config.json, tokenizer and
    generation config are copied from ``source`` (that checkpoint), with ``dtype`` updated. The
    folder is written atomically; an existing ``dst`` is an error unless ``force``.
    """
    names: dict[str, str] | None = getattr(model, "thin_checkpoint_names", None)
    if names is None:
        raise ThinKeyError("model was not loaded with thinkeys.reference.load_thin_model; cannot map its tensor names")
    source = Path(source)
    ThinKeyConfig.from_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    state = model.state_dict()
    dtype = next(model.parameters()).dtype
    hf_io.set_config_dtype(config, dtype)
    hf_io.write_checkpoint(dst, {file_name: state[model_name] for file_name, model_name in names.items()}, config, source, force=force)
    return Path(dst)


__all__ = ["load_thin_model", "save_thin_model", "thin_qk_parameters", "thin_attention", "ThinAttention", "ThinQKNormAttention", "ThinGPT2Attention"]
