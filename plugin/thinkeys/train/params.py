"""What recovery trains: the thin query/key projections, and optionally each layer's RoPE frequency table.

Rebuild-at-read checkpoints (``rope: rebuild``) keep the source's queries: there the latent key
projection ``k_proj`` ``[Hkv r, D]`` and its expansion ``thin_rebuild`` ``[Hkv, d, r]`` train, and with
``train_queries`` the source's d-wide ``q_proj`` ``[H d, D]`` too (queries are never cached, so the
cache is unchanged; the recovered delta grows by the query weights: 20 MB in bf16 for SmolLM2-135M).
With ``query_rank`` K the query change is trained as a rank-K product instead (LoRA-style,
:class:`LowRankUpdate`): ``q_proj.weight = W_teacher + U V``, U ``[H d, K]``, V ``[K, D]``, so the
delta stores two thin factors (``thinkeys recovered make --low-rank K``): 2.2 MB at K = 32 for SmolLM2-135M.
The update is relative to the teacher's query weights (which a rebuild checkpoint keeps), so a second
stage that starts from the first's output continues the same rank-K change rather than stacking another.
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

import torch
from torch import nn
from torch.nn.utils import parametrize

from thinkeys.checkpoint import KEY_MAP_NAME, QUERY_MAP_NAME, REBUILD_TABLE_NAME, ThinKeyError
from thinkeys.reference import ThinAttention, ThinGPT2Attention, ThinQKNormAttention

FREQS = "thin_rope_freqs"


def thin_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> module`` of every thin attention of a model from :func:`thinkeys.reference.load_thin_model`."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, (ThinAttention, ThinGPT2Attention))}
    if not found:
        raise ThinKeyError("the model has no thin-key attention; load it with thinkeys.reference.load_thin_model")
    return found


class LowRankUpdate(nn.Module):
    """Parametrization ``W -> W + U V`` (``W`` frozen): a rank-K change of a weight, LoRA-style.

    Initialised from the rank-K SVD of ``start - base`` (split evenly between the factors), so a run
    that continues from an earlier stage's weights keeps its change; when that is zero, U = 0 and V
    has orthonormal rows (seeded), so training starts at ``base`` exactly.
    """

    def __init__(self, base: torch.Tensor, start: torch.Tensor, rank: int, seed: int = 0):
        super().__init__()
        out_features, in_features = base.shape
        if not 1 <= rank <= min(out_features, in_features):
            raise ThinKeyError(f"--query-rank {rank}: must be between 1 and {min(out_features, in_features)}")
        change = start.detach().float() - base.detach().float()
        if change.abs().max() > 0:
            u, s, vh = torch.linalg.svd(change, full_matrices=False)
            root = s[:rank].sqrt()
            first, second = u[:, :rank] * root, root[:, None] * vh[:rank]
        else:
            gen = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=gen))
            first, second = torch.zeros(out_features, rank), q.T.contiguous()
        self.u = nn.Parameter(first.to(base.device))
        self.v = nn.Parameter(second.to(base.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.u @ self.v


def _low_rank_queries(prefix: str, proj: nn.Linear, base: torch.Tensor, rank: int, seed: int) -> dict[str, nn.Parameter]:
    if tuple(base.shape) != tuple(proj.weight.shape):
        raise ThinKeyError(f"{prefix}.q_proj: the teacher's query weights are {tuple(base.shape)}, the student's "
                           f"{tuple(proj.weight.shape)}; --query-rank needs a rebuild checkpoint of that teacher")
    update = LowRankUpdate(base, proj.weight, rank, seed)
    with torch.no_grad():
        proj.weight.copy_(base.to(proj.weight.dtype))  # the frozen part is the teacher's; the change lives in U V
    parametrize.register_parametrization(proj, "weight", update)
    return {f"{prefix}.q_proj.low_rank_u": update.u, f"{prefix}.q_proj.low_rank_v": update.v}


def trainable_tensors(model: nn.Module, *, train_freqs: bool = False, train_queries: bool = False,
                      query_rank: int | None = None, teacher: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """Freeze the model except thin q/k (and, with ``train_freqs``, the RoPE tables; with ``train_queries``, the
    source's query projection of rebuild-at-read layers, as a rank-``query_rank`` change of ``teacher``'s when
    given); returns ``name -> parameter`` (state-dict names; ``...q_proj.low_rank_u/v`` for the factors)."""
    if query_rank is not None and (not train_queries or teacher is None):
        raise ThinKeyError("--query-rank needs --train-queries (and the teacher whose query weights it changes)")
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
        if rebuild and query_rank is not None and "q_proj" in projections:
            base = teacher.get_submodule(prefix).q_proj.weight
            named.update(_low_rank_queries(prefix, attn.q_proj, base, query_rank, seed=len(named)))
            projections = tuple(p for p in projections if p != "q_proj")
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.requires_grad_(True)
                named[f"{prefix}.q_proj.bias"] = attn.q_proj.bias
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
    if query_rank is not None and not any(n.endswith(".q_proj.low_rank_u") for n in named):
        raise ThinKeyError("--query-rank: this checkpoint has no rebuild-at-read layer whose query projection trains "
                           "(it applies to `rope: rebuild` checkpoints of Llama-like models)")
    return named


def freeze_freqs(model: nn.Module) -> None:
    """Turn trained frequency tables back into plain float32 buffers (before casting or saving)."""
    for attn in thin_attention_modules(model).values():
        freqs = attn._buffers.get(FREQS)
        if isinstance(freqs, nn.Parameter):
            attn._buffers[FREQS] = freqs.detach().clone()


def merge_low_rank(model: nn.Module) -> None:
    """Fold every :class:`LowRankUpdate` into its weight (``W + U V``), leaving plain ``nn.Linear`` layers to save."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def layer_tensors(named: dict[str, nn.Parameter], layer_prefix: str) -> dict[str, nn.Parameter]:
    """The trainable tensors of one attention module (``layer_prefix`` like ``model.layers.3.self_attn``)."""
    return {n: p for n, p in named.items() if n.startswith(layer_prefix + ".")}
