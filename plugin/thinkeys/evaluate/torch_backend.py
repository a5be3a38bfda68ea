"""Perplexity in PyTorch: the checkpoint is run by transformers (or by the thin-key reference model).

A thin-key checkpoint (config.json has ``thin_keys``) is not a stock transformers architecture, so it
is loaded with :func:`thinkeys.reference.load_thin_model`, the PyTorch reference that shares
:func:`thinkeys.rope.apply_thin_rope` with the vLLM model. Any other checkpoint is loaded with
``AutoModelForCausalLM``. Either way the model only has to answer ``model(input_ids).logits``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinkeys.checkpoint import ThinKeyError, is_thin_key_config
from thinkeys.evaluate.perplexity import PerplexityResult, WindowScorer, evaluate_windows, read_text

DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ThinKeyError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ThinKeyError(f"{path}: not a checkpoint folder (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except ValueError as exc:
        raise ThinKeyError(f"{config_path}: not valid JSON ({exc})") from None


def load_causal_lm(path: str | Path, dtype: str = "float32") -> Any:
    """A causal LM in eval mode from a checkpoint folder: thin-key reference or transformers."""
    path = Path(path)
    config = _read_config(path)
    torch_dtype = _torch_dtype(dtype)
    if is_thin_key_config(config):
        try:
            from thinkeys.reference import load_thin_model
        except ImportError as exc:
            raise ThinKeyError(f"{path} is a thin-key checkpoint but the PyTorch reference model is unavailable ({exc})") from None
        model = load_thin_model(path, torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ThinKeyError(f"{path}: could not load a tokenizer ({exc.__class__.__name__}: {exc})") from None


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a whole text, without special tokens (the same ids are sent to a server)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def torch_window_scorer(model: Any) -> WindowScorer:
    """Score a window with one forward pass: sum of cross-entropies of tokens 1..n-1, in fp32."""
    import torch
    import torch.nn.functional as F

    def score(window: list[int]) -> float:
        ids = torch.tensor([window], dtype=torch.long)  # [1, n]
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits  # [1, n, vocab]
            # position t predicts token t+1; the first token is context only
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")  # over n-1 tokens
        return float(nll)

    return score


def perplexity_torch(
    model_path: str | Path,
    text_path: str | Path,
    *,
    window: int = 512,
    max_tokens: int | None = None,
    dtype: str = "float32",
) -> PerplexityResult:
    """Perplexity of a checkpoint folder on a text file, in PyTorch (see :mod:`thinkeys.evaluate.perplexity`)."""
    _read_config(Path(model_path))  # a clear error before anything heavy is loaded
    text = read_text(text_path)
    tokenizer = load_tokenizer(model_path)
    token_ids = tokenize_text(tokenizer, text)
    model = load_causal_lm(model_path, dtype)
    return evaluate_windows(
        token_ids,
        torch_window_scorer(model),
        backend="pytorch",
        model=str(model_path),
        text_path=text_path,
        window=window,
        max_tokens=max_tokens,
        dtype=dtype,
    )
