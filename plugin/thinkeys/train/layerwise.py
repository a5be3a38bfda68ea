"""Layer-wise distillation: fit each layer's thin q/k to the original layer's attention output.

Why first. A thin layer sees the original model's inputs almost unchanged (only q/k differ), so
each layer can be fitted on its own, on cached inputs, without back-propagating through the
whole network: one teacher forward pass captures, for every layer ``l``::

    x_l      the input of self_attn (the pre-attention norm output)     [N, T, D]
    y_l      the original attention output, after o_proj               [N, T, D]

and then each thin attention is trained (Adam, cosine decay) to minimise the relative error
``||attn_thin(x_l) - y_l||^2 / ||y_l||^2`` on minibatches of those windows, at a random subset of
query positions per step (:func:`attention_rows`: every position is still a key). A step costs a
fraction of one attention layer instead of the whole model and its LM head, so layer-wise fitting
moves the thin model most of the way cheaply; end-to-end distillation (:mod:`thinkeys.train.logit`)
then fixes what only shows up through the layers' interaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from thinkeys.checkpoint import REBUILD_TABLE_NAME, ThinKeyError
from thinkeys.reference import ThinQKNormAttention, thin_attention
from thinkeys.rope import apply_thin_rope


@dataclass
class TeacherActivations:
    inputs: list[torch.Tensor]  # per layer [N, T, D]: self_attn input
    outputs: list[torch.Tensor]  # per layer [N, T, D]: self_attn output (after o_proj)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ThinKeyError(f"layer-wise distillation supports Llama-family models; got {type(model).__name__}")
    return list(layers)


@torch.no_grad()
def capture_teacher(
    teacher: nn.Module, windows: torch.Tensor, *, progress: bool = True, dtype: torch.dtype = torch.float32
) -> TeacherActivations:
    """Run the teacher over ``windows`` ``[N, T]`` and keep every layer's attention input and output, stored as ``dtype``
    (:func:`fit_layer` computes in float32 on minibatches of them)."""
    layers = _decoder_layers(teacher)
    n, t = windows.shape
    hidden = teacher.config.hidden_size
    device = next(teacher.parameters()).device
    inputs = [torch.empty(n, t, hidden, device=device, dtype=dtype) for _ in layers]
    outputs = [torch.empty(n, t, hidden, device=device, dtype=dtype) for _ in layers]
    row = {"i": 0}

    def hooks_for(l: int) -> tuple[Callable, Callable]:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[l][row["i"]] = kwargs.get("hidden_states", args[0] if args else None)[0]

        def post(module: nn.Module, args: tuple, kwargs: dict, out: tuple) -> None:
            outputs[l][row["i"]] = out[0][0]

        return pre, post

    handles = []
    for l, layer in enumerate(layers):
        pre, post = hooks_for(l)
        handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    try:
        for i in tqdm(range(n), desc="teacher activations", unit="window", disable=not progress):
            row["i"] = i
            teacher(input_ids=windows[i : i + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return TeacherActivations(inputs, outputs)


def cosine_lr(base: float, progress: float, *, warmup: float = 0.05, final: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``final * base``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base * (progress / warmup)
    span = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * span)))


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def attention_rows(attn: nn.Module, x: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A thin attention's output (after o_proj) at query positions ``rows`` only, ``[B, Q, D]``.

    ``x`` ``[B, T, D]`` is the attention input of whole windows (every position is a key), ``v``
    ``[B, Hkv, T, d]`` its precomputed values (frozen), ``rows`` ``[Q]`` sorted query positions.
    Same maths as :class:`thinkeys.reference.ThinAttention` restricted to some queries: a step costs
    about ``Q / T`` of a full forward, so many more (and more varied) steps fit in the same time.
    """
    b, t, _ = x.shape
    if isinstance(attn, ThinQKNormAttention):  # Qwen3: d-wide projections, the norms, then the maps to r
        q, k = attn.thin_query_key(x[:, rows])[0], attn.thin_query_key(x)[1]
    else:
        width = getattr(attn, "query_width", attn.rank)  # rebuild-at-read: the source's d-wide queries
        q = attn.q_proj(x[:, rows]).view(b, len(rows), attn.num_heads, width)  # [B, Q, H, r]
        k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.rank)  # [B, T, Hkv, r]
    if getattr(attn, "rebuild", False):  # the d-wide pre-RoPE key rebuilt from its latent
        k = torch.einsum("btgr,gdr->btgd", k, getattr(attn, REBUILD_TABLE_NAME))
    q = apply_thin_rope(q, rows[None], attn.thin_rope_freqs)
    positions = torch.arange(t, device=x.device)
    k = apply_thin_rope(k, positions[None], attn.thin_rope_freqs)
    mask = (positions[None, :] <= rows[:, None])[None, None]  # [1, 1, Q, T]: causal
    out = thin_attention(q.transpose(1, 2), k.transpose(1, 2), v, mask, attn.scale)  # [B, Q, H * d]
    return attn.o_proj(out)


@torch.no_grad()
def _values(attn: nn.Module, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    n, t, _ = inputs.shape
    return torch.cat([
        attn.v_proj(inputs[i : i + batch].float()).view(-1, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        for i in range(0, n, batch)
    ])  # [N, Hkv, T, d]


def fit_layer(
    attn: nn.Module,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    queries: int = 64,
    freq_params: list[nn.Parameter] | None = None,
    freq_lr: float = 0.0,
) -> tuple[float, float]:
    """Train one thin attention on cached teacher activations; returns (error before, error after).

    ``inputs`` / ``targets`` ``[N, T, D]``. Each step takes ``batch`` windows (cycling in a seeded
    order) and ``queries`` random query positions of them (every position stays a key). The errors
    before/after are measured on all windows at a fixed seeded set of ``4 * queries`` positions.
    """
    n, t, _ = inputs.shape
    queries = min(queries, t)
    gen = torch.Generator().manual_seed(seed)
    values = _values(attn, inputs, batch)  # [N, Hkv, T, d]
    device = inputs.device
    probe = torch.randperm(t, generator=torch.Generator().manual_seed(seed + 1))[: min(4 * queries, t)].sort().values.to(device)

    def error_on_all() -> float:
        with torch.no_grad():
            num = den = 0.0
            for i in range(0, n, batch):
                target = targets[i : i + batch, probe].float()
                out = attention_rows(attn, inputs[i : i + batch].float(), values[i : i + batch], probe)
                num += float((out - target).pow(2).sum())
                den += float(target.pow(2).sum())
            return num / max(den, 1e-12)

    before = error_on_all()
    if steps <= 0:
        return before, before
    groups = [{"params": params, "lr": lr}]
    if freq_params:
        groups.append({"params": freq_params, "lr": freq_lr})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.98))
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for step in range(steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch].to(device)
        cursor += batch
        rows = torch.randperm(t, generator=gen)[:queries].sort().values.to(device)
        scale = cosine_lr(1.0, step / steps)
        for group, base in zip(optimizer.param_groups, (lr, freq_lr)):
            group["lr"] = base * scale
        out = attention_rows(attn, inputs[idx].float(), values[idx], rows)  # [b, Q, D]
        loss = relative_error(out, targets[idx][:, rows].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return before, error_on_all()
