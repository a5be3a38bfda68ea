"""What recovery trains: the thin query/key projections, and optionally each layer's RoPE frequency table.

Rebuild-at-read checkpoints (``rope: rebuild``) keep the source's queries: there the latent key
projection ``k_proj`` ``[Hkv r, D]`` and its expansion ``thin_rebuild`` ``[Hkv, d, r]`` train, and with
``train_queries`` the source's d-wide ``q_proj`` ``[H d, D]`` too (queries are never cached, so the
cache is unchanged; the recovered delta grows by the query weights: 20 MB in bf16 for SmolLM2-135M).
QK-norm families (Qwen3) keep the source's d-wide projections and norms: their post-norm maps
``thin_q_map`` / ``thin_k_map`` ``[Hkv, r, d]`` train.

Everything else (embeddings, values, output projections, MLPs, norms) stays frozen, so the
fine-tuned checkpoint differs from its source only in q/k (and ``thin_rope_freqs`` with
``train_freqs``), and it is served by the same plugin unchanged.

The frequency table is a buffer of the reference attention (``thin_rope_freqs``, kept float32);
to train it, :func:`trainable_tensors` swaps it for a ``Parameter`` under the same buffer name, so
``state_dict()`` and :func:`thinkeys.reference.save_thin_model` see it exactly as before.
:func:`freeze_freqs` puts plain tensors back before the model is cast or saved.
"""

from __future__ import annotations

from torch import nn

from thinkeys.checkpoint import KEY_MAP_NAME, QUERY_MAP_NAME, REBUILD_TABLE_NAME, ThinKeyError
from thinkeys.reference import ThinAttention, ThinGPT2Attention, ThinQKNormAttention

FREQS = "thin_rope_freqs"


def thin_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> module`` of every thin attention of a model from :func:`thinkeys.reference.load_thin_model`."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, (ThinAttention, ThinGPT2Attention))}
    if not found:
        raise ThinKeyError("the model has no thin-key attention; load it with thinkeys.reference.load_thin_model")
    return found


def trainable_tensors(model: nn.Module, *, train_freqs: bool = False, train_queries: bool = False) -> dict[str, nn.Parameter]:
    """Freeze the model except thin q/k (and, with ``train_freqs``, the RoPE tables; with ``train_queries``, the
    source's query projection of rebuild-at-read layers); returns ``state-dict name -> parameter``."""
    for p in model.parameters():
        p.requires_grad_(False)
    named: dict[str, nn.Parameter] = {}
    for prefix, attn in thin_attention_modules(model).items():
        rebuild = getattr(attn, "rebuild", False)
        if rebuild:  # rebuild-at-read: queries stay the source's; the latent k_proj and its expansion train
            table = getattr(attn, REBUILD_TABLE_NAME)
            table.requires_grad_(True)
            named[f"{prefix}.{REBUILD_TABLE_NAME}"] = table
        if isinstance(attn, ThinQKNormAttention):  # Qwen3: the source's projections and norms stay; the maps train
            for name in (KEY_MAP_NAME,) if rebuild else (QUERY_MAP_NAME, KEY_MAP_NAME):
                p = getattr(attn, name)
                p.requires_grad_(True)
                named[f"{prefix}.{name}"] = p
            projections: tuple[str, ...] = ()
        else:
            projections = ("k_proj",) if rebuild and not train_queries else ("q_proj", "k_proj")
        for proj in projections:
            for kind in ("weight", "bias"):
                p = getattr(getattr(attn, proj), kind)
                if p is not None:
                    p.requires_grad_(True)
                    named[f"{prefix}.{proj}.{kind}"] = p
        freqs = attn._buffers.get(FREQS)
        if train_freqs and freqs is not None and freqs.numel():
            if not isinstance(freqs, nn.Parameter):
                freqs = nn.Parameter(freqs.detach().clone())
                attn._buffers[FREQS] = freqs  # same name, so state_dict / save are unchanged
            named[f"{prefix}.{FREQS}"] = freqs
    return named


def freeze_freqs(model: nn.Module) -> None:
    """Turn trained frequency tables back into plain float32 buffers (before casting or saving)."""
    for attn in thin_attention_modules(model).values():
        freqs = attn._buffers.get(FREQS)
        if isinstance(freqs, nn.Parameter):
            attn._buffers[FREQS] = freqs.detach().clone()


def layer_tensors(named: dict[str, nn.Parameter], layer_prefix: str) -> dict[str, nn.Parameter]:
    """The trainable tensors of one attention module (``layer_prefix`` like ``model.layers.3.self_attn``)."""
    return {n: p for n, p in named.items() if n.startswith(layer_prefix + ".")}
