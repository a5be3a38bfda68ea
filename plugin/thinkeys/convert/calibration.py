"""Calibration statistics: what the attention layers of the source model really see, on a little text.

Data-free choices model the attention input as isotropic. Real hidden states are far from it (a few
feature directions carry most of the magnitude), so the data-aware strategies
(:mod:`thinkeys.convert.mixed`, calibrated ``pairs``; :mod:`thinkeys.convert.rebuild`) work from
the first and second moments of every layer's attention input ``x`` (the post-norm hidden state
that q_proj/k_proj, or GPT-2's c_attn, read)::

    mean[i]   = E[x]        [D]
    moment[i] = E[x x^T]    [D, D]

and derive the query/key statistics of any projection ``y = W x + b`` from them exactly
(:func:`qk_moments`), so the source model is run once per conversion, not once per head.

Calibrate on text the model will not be evaluated on (the tune split, ``data/wiki/tune.txt``).
``read_token_ids`` / ``token_windows`` are shared with fine-tuning, which cuts its text the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinkeys.checkpoint import SUPPORTED_SOURCES, SourceFamily, ThinKeyError
from thinkeys.convert.families import QueryKey

#: Default of ``--calibration-tokens``.
DEFAULT_CALIBRATION_TOKENS = 8192
#: Tokens per forward pass when collecting statistics (capped by the model's context).
CALIBRATION_WINDOW = 1024
#: Fewer tokens than this give second moments too noisy to rank anything.
MIN_CALIBRATION_TOKENS = 256


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_token_ids(tokenizer: Any, text: str | Path) -> torch.Tensor:
    """All token ids of a text file, without special tokens, as a 1-D long tensor."""
    path = Path(text)
    if not path.is_file():
        raise ThinKeyError(f"{path}: no such text file (use the tune split, e.g. data/wiki/tune.txt)")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]  # no "too long" warning: it is cut into windows
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, window: int, max_tokens: int | None, *, seed: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, window]`` of ``ids`` (a trailing partial window is dropped).

    ``max_tokens`` keeps only the first ``max_tokens // window`` windows (at least one);
    ``seed`` shuffles the windows (after that cut) in a reproducible order.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // window
    if n == 0:
        raise ThinKeyError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: give more text")
    windows = ids[: n * window].view(n, window)  # [N, T]
    if max_tokens is not None:
        windows = windows[: max(1, max_tokens // window)]
    if seed is not None:
        windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))]
    return windows


@dataclass
class Calibration:
    """First and second moments of every layer's attention input, from ``tokens`` tokens of ``text``."""

    mean: list[torch.Tensor]  # per layer [D] float64
    moment: list[torch.Tensor]  # per layer [D, D] float64
    tokens: int
    text: str
    text_sha256: str

    @property
    def num_layers(self) -> int:
        return len(self.mean)

    def describe(self) -> dict[str, Any]:
        """Provenance for config.json: which text, how much of it."""
        return {"text": Path(self.text).name, "text_sha256": self.text_sha256, "tokens": self.tokens}


def _attention_input_module(model: torch.nn.Module, family: SourceFamily, i: int) -> torch.nn.Module:
    """The module whose input is layer ``i``'s attention input (post-norm hidden states)."""
    if family == SourceFamily.GPT2:
        return model.transformer.h[i].attn.c_attn
    return model.model.layers[i].self_attn.q_proj


@torch.no_grad()
def collect_calibration(
    src: str | Path, text: str | Path, *, tokens: int = DEFAULT_CALIBRATION_TOKENS, progress: bool = True
) -> Calibration:
    """Run the source model (transformers, fp32) over ``tokens`` tokens of ``text``; accumulate each layer's input moments."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, text = Path(src), Path(text)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ThinKeyError(f"--calibration-tokens {tokens}: use at least {MIN_CALIBRATION_TOKENS}")
    config = AutoConfig.from_pretrained(src)
    family = SUPPORTED_SOURCES[config.architectures[0]].family
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", CALIBRATION_WINDOW)
    window = min(CALIBRATION_WINDOW, context, tokens)
    ids = read_token_ids(AutoTokenizer.from_pretrained(src), text)
    if ids.numel() < MIN_CALIBRATION_TOKENS:
        raise ThinKeyError(f"--calibration {text}: only {ids.numel()} tokens; give at least {MIN_CALIBRATION_TOKENS}")
    windows = token_windows(ids, min(window, ids.numel()), tokens)  # [N, T], in text order

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    sums = [torch.zeros(hidden, dtype=torch.float64) for _ in range(n_layers)]
    outer = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(n_layers)]

    def accumulate(i: int):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, hidden).to(torch.float64)  # [B * T, D]
            sums[i] += x.sum(0)
            outer[i] += x.T @ x

        return hook

    hooks = [_attention_input_module(model, family, i).register_forward_pre_hook(accumulate(i)) for i in range(n_layers)]
    try:
        for w in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
            model(w[None])
    finally:
        for h in hooks:
            h.remove()
    n = windows.numel()
    return Calibration(
        mean=[s / n for s in sums],
        moment=[m / n for m in outer],
        tokens=n,
        text=str(text.absolute()),
        text_sha256=_sha256(text),
    )


@dataclass
class QKMoments:
    """Query/key statistics of one layer, per KV head (pre-RoPE)."""

    q_moment: torch.Tensor  # [Hkv, d, d]: E[q q^T], summed over the query heads of the group
    k_moment: torch.Tensor  # [Hkv, d, d]: E[k k^T]
    k_cov: torch.Tensor  # [Hkv, d, d]: Cov(k) = E[k k^T] - E[k] E[k]^T


def _projected_moment(w: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """``E[y y^T]`` of ``y = W x + b`` per head, from ``E[x]`` and ``E[x x^T]``: ``W M W^T + W m b^T + b m^T W^T + b b^T``."""
    w = w.to(torch.float64)  # [n, d, D]
    out = torch.einsum("ndD,DE,neE->nde", w, moment, w)  # [n, d, d]
    if b is not None:
        b = b.to(torch.float64)  # [n, d]
        wm = torch.einsum("ndD,D->nd", w, mean)  # [n, d]: W E[x]
        out = out + wm[:, :, None] * b[:, None, :] + b[:, :, None] * wm[:, None, :] + b[:, :, None] * b[:, None, :]
    return out


def qk_moments(qk: QueryKey, mean: torch.Tensor, moment: torch.Tensor) -> QKMoments:
    """Exact query/key moments of one layer from its attention-input moments (``mean`` ``[D]``, ``moment`` ``[D, D]``)."""
    mean, moment = mean.to(torch.float64), moment.to(torch.float64)
    n_heads, d, _ = qk.q_weight.shape
    n_kv = qk.k_weight.shape[0]
    q = _projected_moment(qk.q_weight, qk.q_bias, mean, moment)  # [H, d, d]
    q_group = q.reshape(n_kv, n_heads // n_kv, d, d).sum(1)  # [Hkv, d, d]
    k = _projected_moment(qk.k_weight, qk.k_bias, mean, moment)  # [Hkv, d, d]
    k_mean = torch.einsum("gdD,D->gd", qk.k_weight.to(torch.float64), mean)  # [Hkv, d]
    if qk.k_bias is not None:
        k_mean = k_mean + qk.k_bias.to(torch.float64)
    k_cov = k - k_mean[:, :, None] * k_mean[:, None, :]
    return QKMoments(q_moment=q_group, k_moment=k, k_cov=k_cov)
