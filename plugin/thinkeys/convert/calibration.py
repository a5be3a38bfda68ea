"""Calibration statistics: what real text makes each attention layer's queries and keys look like.

The data-free strategies only see weights, and model the attention input as isotropic. Real hidden
states are far from it (a few feature directions carry most of the magnitude), so the data-aware
strategies (calibrated ``pairs`` and ``mixed``, :mod:`thinkeys.convert.mixed`; the measured-only
:mod:`thinkeys.convert.rebuild`) work from the first two moments of every layer's attention input
``x`` (the post-norm hidden state that q_proj/k_proj read)::

    mean[i]     E[x]       [D]        (float64)
    moment[i]   E[x x^T]   [D, D]     (float64, uncentered)

Those are enough for every query/key statistic a strategy needs, because q and k are affine in x
(:func:`qk_moments`)::

    E[k] = W_K E[x] + b_K
    E[k k^T] = W_K E[xx^T] W_K^T + (bias terms)

so the statistics are independent of the rank and strategy: collected once per source model and
text (:func:`collect_calibration`), and cacheable on disk (:meth:`Calibration.save` / ``load``).

Calibrate (and fine-tune) on the ``tune`` split, evaluate on ``eval`` (``thinkeys fetch`` makes
both, split by article), so no score is ever measured on text the model was fitted to.
:func:`read_token_ids` / :func:`token_windows` are shared with fine-tuning, which cuts its text
the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinkeys import hf_io
from thinkeys.checkpoint import SUPPORTED_SOURCES, SourceFamily, ThinKeyError
from thinkeys.convert.families import QueryKey

#: Default of ``--calibration-tokens``: 16 windows of 512 tokens.
DEFAULT_CALIBRATION_TOKENS = 8192
#: Tokens per forward pass when collecting statistics.
DEFAULT_WINDOW = 512
#: Fewer tokens than this give second moments too noisy to rank anything.
MIN_CALIBRATION_TOKENS = 64
_FORMAT = "thinkeys-calibration-v1"


def read_token_ids(tokenizer: Any, text_path: str | Path) -> list[int]:
    """Token ids of a whole UTF-8 text file, without special tokens (as ``thinkeys eval ppl`` tokenizes)."""
    path = Path(text_path)
    if not path.is_file():
        raise ThinKeyError(
            f"{path}: no such text file; calibration and fine-tuning text is the 'tune' split that "
            "`thinkeys fetch` writes to data/wiki/tune.txt"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ThinKeyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ThinKeyError(f"{path}: the file is empty")
    # verbose=False: no "sequence longer than the model" warning, the ids are cut into windows
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_windows(ids: list[int], window: int, count: int | None = None, *, seed: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``window`` tokens cut from ``ids``, ``[n, window]`` (int64).

    ``count`` windows are taken evenly spread over the whole text (so calibration sees every part
    of the corpus, not just its first articles); ``None`` takes them all. With ``seed`` the windows
    come in a seeded random order (for training batches) instead of text order.
    """
    if window < 2:
        raise ThinKeyError(f"window {window}: needs at least 2 tokens")
    available = len(ids) // window
    if available == 0:
        raise ThinKeyError(f"the text has {len(ids)} tokens, fewer than one window of {window}: give more text")
    if count is None:
        count = available
    if count > available:
        raise ThinKeyError(
            f"asked for {count} windows of {window} tokens but the text has only {len(ids):,} tokens "
            f"({available} windows); ask for fewer tokens or give a longer text"
        )
    starts = torch.linspace(0, available - 1, count).round().long() * window  # evenly spread
    if seed is not None:
        starts = starts[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    table = torch.tensor(ids, dtype=torch.long)
    return torch.stack([table[s : s + window] for s in starts.tolist()])  # [n, window]


@dataclass
class Calibration:
    """Per-layer first and second moments of the attention input ``x``, from ``tokens`` tokens of a text."""

    mean: torch.Tensor  # [L, D] float64
    moment: torch.Tensor  # [L, D, D] float64, E[x x^T]
    tokens: int
    window: int
    text_sha256: str
    source: str

    @property
    def num_layers(self) -> int:
        return self.mean.shape[0]

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the converted checkpoint's config.json."""
        return {"tokens": self.tokens, "window": self.window, "text_sha256": self.text_sha256}

    def layer_moments(self, i: int, qk: QueryKey) -> "QKMoments":
        """Layer ``i``'s query/key moments, derived from its input moments through ``qk``."""
        return qk_moments(qk, self.mean[i], self.moment[i])

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"format": _FORMAT, "tokens": str(self.tokens), "window": str(self.window),
                "text_sha256": self.text_sha256, "source": self.source}
        save_file({"mean": self.mean.contiguous(), "moment": self.moment.contiguous()}, tmp, metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ThinKeyError(f"{path}: no such calibration file")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ThinKeyError(f"{path}: not a thinkeys calibration file (format {meta.get('format')!r})")
            return cls(
                mean=f.get_tensor("mean"),
                moment=f.get_tensor("moment"),
                tokens=int(meta["tokens"]),
                window=int(meta["window"]),
                text_sha256=meta["text_sha256"],
                source=meta["source"],
            )


def _attention_input_module(model: torch.nn.Module, family: SourceFamily, i: int) -> torch.nn.Module:
    """The module whose (first positional) input is layer ``i``'s attention input."""
    if family == SourceFamily.GPT2:
        return model.transformer.h[i].attn.c_attn
    return model.model.layers[i].self_attn.q_proj


@torch.no_grad()
def collect_calibration(
    src: str | Path,
    text_path: str | Path,
    *,
    tokens: int = DEFAULT_CALIBRATION_TOKENS,
    window: int = DEFAULT_WINDOW,
    progress: bool = True,
) -> Calibration:
    """Run the source model (transformers, fp32) over ``tokens`` tokens of ``text_path`` and collect :class:`Calibration`.

    The tokens are ``tokens / window`` windows spread evenly over the text; each layer's attention
    input is captured by a forward pre-hook and reduced to its moments on the fly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ThinKeyError(f"--calibration-tokens {tokens}: use at least {MIN_CALIBRATION_TOKENS}")
    config = AutoConfig.from_pretrained(src)
    if SUPPORTED_SOURCES[config.architectures[0]].qk_norm:  # statistics after q/k norm (thinkeys.convert.qk_norm)
        from thinkeys.convert.qk_norm import collect_post_norm_calibration

        return collect_post_norm_calibration(src, text_path, tokens=tokens, window=window, progress=progress)
    family = SUPPORTED_SOURCES[config.architectures[0]].family
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or window
    window = min(window, tokens, context)  # a small calibration is one shorter window
    ids = read_token_ids(AutoTokenizer.from_pretrained(src), text_path)
    batch = token_windows(ids, window, math.ceil(tokens / window))  # [n, window]

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    total = torch.zeros(n_layers, hidden, dtype=torch.float64)
    outer = torch.zeros(n_layers, hidden, hidden, dtype=torch.float64)

    def hook_for(i: int):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, hidden).to(torch.float64)  # [T, D]
            total[i] += x.sum(0)
            outer[i] += x.T @ x

        return hook

    handles = [_attention_input_module(model, family, i).register_forward_pre_hook(hook_for(i)) for i in range(n_layers)]
    try:
        for row in tqdm(batch, desc="calibration", unit="window", disable=not progress):
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = batch.numel()
    return Calibration(
        mean=total / n,
        moment=outer / n,
        tokens=n,
        window=window,
        text_sha256=hf_io.sha256_file(Path(text_path)),
        source=str(src),
    )


@dataclass
class QKMoments:
    """One layer's query/key statistics per KV head (pre-RoPE, source width d), float64."""

    q_moment: torch.Tensor  # [Hkv, d, d]: sum over the group's query heads of E[q q^T]
    k_moment: torch.Tensor  # [Hkv, d, d]: E[k k^T]
    k_mean: torch.Tensor  # [Hkv, d]: E[k]

    @property
    def k_cov(self) -> torch.Tensor:
        """Centered key covariance ``E[(k - E k)(k - E k)^T]``, ``[Hkv, d, d]``."""
        return self.k_moment - self.k_mean[..., :, None] * self.k_mean[..., None, :]


def qk_moments(qk: QueryKey, mean: torch.Tensor, moment: torch.Tensor) -> QKMoments:
    """Exact query/key moments of one layer from its attention-input moments (``mean`` [D], ``moment`` [D, D])."""
    n_heads, d, _ = qk.q_weight.shape
    n_kv = qk.k_weight.shape[0]
    mean, moment = mean.to(torch.float64), moment.to(torch.float64)

    def second(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.to(torch.float64)  # [n, d, D]
        m = torch.einsum("ndD,D->nd", w, mean)  # E[W x]
        s = torch.einsum("ndD,DE,neE->nde", w, moment, w)  # E[W x x^T W^T]
        if b is not None:  # E[(Wx + b)(Wx + b)^T] = W M W^T + W m b^T + b m^T W^T + b b^T
            b = b.to(torch.float64)
            s = s + m[:, :, None] * b[:, None, :] + b[:, :, None] * m[:, None, :] + b[:, :, None] * b[:, None, :]
            m = m + b
        return m, s  # [n, d], [n, d, d]

    k_mean, k_moment = second(qk.k_weight, qk.k_bias)
    _, q_moment = second(qk.q_weight, qk.q_bias)
    q_moment = q_moment.reshape(n_kv, n_heads // n_kv, d, d).sum(1)  # a group's logit errors add up
    return QKMoments(q_moment=q_moment, k_moment=k_moment, k_mean=k_mean)
