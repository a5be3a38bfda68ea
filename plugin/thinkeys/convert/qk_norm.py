"""Calibration statistics of QK-norm families (Qwen3, Gemma 3): moments of the *normalised* queries and keys.

In a QK-norm model the key is ``k_norm(W_K x)``, not a linear function of the attention input, so
the input moments of :class:`~thinkeys.convert.calibration.Calibration` cannot give the key
moments. The thin maps act after the norms, so their statistics are captured there: forward hooks
on every layer's ``q_norm`` / ``k_norm`` (transformers' own modules) reduce the normalised q and k
to the :class:`~thinkeys.convert.calibration.QKMoments` that ``pairs`` and ``mixed`` read
(queries summed over each KV group, keys per KV head), on the same evenly spread text windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinkeys import hf_io
from thinkeys.checkpoint import ThinKeyError
from thinkeys.convert.calibration import (
    DEFAULT_WINDOW,
    MIN_CALIBRATION_TOKENS,
    QKMoments,
    read_token_ids,
    token_windows,
)
from thinkeys.convert.families import QueryKey

_FORMAT = "thinkeys-postnorm-calibration-v1"
#: Source architectures whose transformers attention applies q_norm / k_norm to ``[B, heads, T, d]``.
HEADS_FIRST_NORMS = ("Gemma3ForCausalLM",)


@dataclass
class PostNormCalibration:
    """Per-layer moments of the normalised queries and keys, from ``tokens`` tokens of a text."""

    q_moment: torch.Tensor  # [L, Hkv, d, d] float64: sum over the group's query heads of E[q q^T]
    k_moment: torch.Tensor  # [L, Hkv, d, d] float64: E[k k^T]
    k_mean: torch.Tensor  # [L, Hkv, d] float64: E[k]
    tokens: int
    window: int
    text_sha256: str
    source: str

    @property
    def num_layers(self) -> int:
        return self.k_mean.shape[0]

    def describe(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "window": self.window, "text_sha256": self.text_sha256, "after": "qk_norm"}

    def layer_moments(self, i: int, qk: QueryKey) -> QKMoments:
        """Layer ``i``'s statistics (``qk`` is not needed: they were measured, not derived)."""
        return QKMoments(q_moment=self.q_moment[i], k_moment=self.k_moment[i], k_mean=self.k_mean[i])

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"format": _FORMAT, "tokens": str(self.tokens), "window": str(self.window),
                "text_sha256": self.text_sha256, "source": self.source}
        tensors = {"q_moment": self.q_moment, "k_moment": self.k_moment, "k_mean": self.k_mean}
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PostNormCalibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ThinKeyError(f"{path}: no such calibration file")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ThinKeyError(f"{path}: not a thinkeys post-norm calibration file (format {meta.get('format')!r})")
            return cls(
                q_moment=f.get_tensor("q_moment"),
                k_moment=f.get_tensor("k_moment"),
                k_mean=f.get_tensor("k_mean"),
                tokens=int(meta["tokens"]),
                window=int(meta["window"]),
                text_sha256=meta["text_sha256"],
                source=meta["source"],
            )


@torch.no_grad()
def collect_post_norm_calibration(
    src: str | Path,
    text_path: str | Path,
    *,
    tokens: int,
    window: int = DEFAULT_WINDOW,
    progress: bool = True,
) -> PostNormCalibration:
    """Run the source model (transformers, fp32) over ``tokens`` tokens and collect :class:`PostNormCalibration`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ThinKeyError(f"--calibration-tokens {tokens}: use at least {MIN_CALIBRATION_TOKENS}")
    config = AutoConfig.from_pretrained(src)
    window = min(window, tokens, getattr(config, "max_position_embeddings", None) or window)
    ids = read_token_ids(AutoTokenizer.from_pretrained(src), text_path)
    batch = token_windows(ids, window, math.ceil(tokens / window))  # [n, window]

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # transformers' Qwen3 normalises [B, T, heads, d]; its Gemma 3 normalises after the head transpose, [B, heads, T, d].
    heads_first = (getattr(config, "architectures", None) or [None])[0] in HEADS_FIRST_NORMS
    q_moment = torch.zeros(n_layers, n_kv, d, d, dtype=torch.float64)
    k_moment = torch.zeros(n_layers, n_kv, d, d, dtype=torch.float64)
    k_sum = torch.zeros(n_layers, n_kv, d, dtype=torch.float64)

    def q_hook(i: int):
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            out = out.transpose(-3, -2) if heads_first else out  # [B, T, H, d]
            q = out.reshape(-1, n_kv, out.shape[-2] // n_kv, d).to(torch.float64)  # [T, Hkv, group, d]
            q_moment[i] += torch.einsum("tgjd,tgje->gde", q, q)  # summed over the group's heads

        return hook

    def k_hook(i: int):
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            out = out.transpose(-3, -2) if heads_first else out  # [B, T, Hkv, d]
            k = out.reshape(-1, n_kv, d).to(torch.float64)  # [T, Hkv, d]
            k_moment[i] += torch.einsum("tgd,tge->gde", k, k)
            k_sum[i] += k.sum(0)

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.q_norm.register_forward_hook(q_hook(i)))
        handles.append(layer.self_attn.k_norm.register_forward_hook(k_hook(i)))
    try:
        for row in tqdm(batch, desc="calibration (after q/k norm)", unit="window", disable=not progress):
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = batch.numel()
    return PostNormCalibration(
        q_moment=q_moment / n,
        k_moment=k_moment / n,
        k_mean=k_sum / n,
        tokens=n,
        window=window,
        text_sha256=hf_io.sha256_file(Path(text_path)),
        source=str(src),
    )
