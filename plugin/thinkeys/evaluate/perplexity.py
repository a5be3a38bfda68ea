"""Perplexity over non-overlapping windows: the part shared by the PyTorch and the server backends.

The token stream of a text file is cut into consecutive windows of ``window`` tokens (the last one
may be shorter). Inside a window every token is predicted from the tokens before it in the same
window; the first token of each window has no context and is only context, never scored. So a
window of ``n`` tokens scores ``n - 1`` tokens, and::

    PPL = exp( sum of per-token negative log-likelihoods / tokens scored )

Both backends receive the same token ids (the text is tokenized once, without special tokens) and
return a sum of NLLs per window; :func:`evaluate_windows` drives them and builds the one result
model, so the two paths differ only in how a window is scored.
"""

from __future__ import annotations

import hashlib
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, Field
from tqdm import tqdm

from thinkeys.checkpoint import ThinKeyError

#: window token ids -> sum over positions 1..n-1 of -log p(token | previous tokens of the window)
WindowScorer = Callable[[list[int]], float]


class PerplexityResult(BaseModel):
    """What ``thinkeys eval ppl`` reports, identical in shape for both backends."""

    backend: Literal["pytorch", "server"]
    model: str = Field(description="checkpoint path (pytorch) or served model name (server)")
    server: str | None = Field(default=None, description="base URL of the server (server backend)")
    dtype: str | None = Field(default=None, description="compute dtype (pytorch backend)")
    text: str
    text_sha256: str
    window: int
    max_tokens: int | None
    windows: int
    tokens: int = Field(description="text tokens used, including each window's context-only first token")
    tokens_scored: int
    nll: float = Field(description="total negative log-likelihood of the scored tokens, in nats")
    nll_per_token: float
    ppl: float
    seconds: float
    window_nll: list[float] = Field(description="NLL sum of each window, in order")

    def table(self) -> str:
        rows = [
            ("backend", self.backend),
            ("model", self.model),
            *([("server", self.server)] if self.server else []),
            *([("dtype", self.dtype)] if self.dtype else []),
            ("text", self.text),
            ("window", str(self.window)),
            ("windows", str(self.windows)),
            ("tokens", f"{self.tokens:,}"),
            ("tokens scored", f"{self.tokens_scored:,}"),
            ("NLL (nats)", f"{self.nll:.3f}"),
            ("NLL / token", f"{self.nll_per_token:.5f}"),
            ("PPL", f"{self.ppl:.4f}"),
            ("time", f"{self.seconds:.1f} s ({self.tokens_scored / max(self.seconds, 1e-9):,.0f} tok/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def read_text(path: str | Path) -> str:
    """The evaluation text, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ThinKeyError(f"{path}: no such text file (the default corpus is made by `thinkeys fetch`: data/wiki/eval.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ThinKeyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ThinKeyError(f"{path}: the file is empty")
    return text


def make_windows(token_ids: Sequence[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``window`` tokens over the first ``max_tokens`` ids.

    The last window may be shorter; one of a single token would score nothing and is dropped.
    """
    if window < 2:
        raise ThinKeyError(f"--window {window}: a window needs at least 2 tokens (its first token is context only)")
    if max_tokens is not None and max_tokens < 2:
        raise ThinKeyError(f"--max-tokens {max_tokens}: at least 2 tokens are needed to score one")
    ids = list(token_ids[:max_tokens] if max_tokens is not None else token_ids)
    windows = [ids[start : start + window] for start in range(0, len(ids), window)]
    if windows and len(windows[-1]) < 2:
        windows.pop()
    if not windows:
        raise ThinKeyError(f"the text has {len(ids)} token(s): nothing to score (need at least 2)")
    return windows


def score_windows(windows: list[list[int]], scorer: WindowScorer, *, workers: int = 1, desc: str = "ppl") -> list[float]:
    """NLL sum of every window (in order), with a progress bar; ``workers`` > 1 scores concurrently."""
    nlls: list[float | None] = [None] * len(windows)
    bar = tqdm(total=len(windows), desc=desc, unit="window")
    done_nll, done_tokens = 0.0, 0

    def record(i: int, nll: float) -> None:
        nonlocal done_nll, done_tokens
        if not math.isfinite(nll):
            raise ThinKeyError(f"window {i} got a non-finite NLL ({nll}); the model produced inf/nan logits")
        nlls[i] = nll
        done_nll += nll
        done_tokens += len(windows[i]) - 1
        bar.set_postfix(ppl=f"{math.exp(done_nll / done_tokens):.3f}", refresh=False)
        bar.update(1)

    try:
        if workers <= 1:
            for i, w in enumerate(windows):
                record(i, scorer(w))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(scorer, w): i for i, w in enumerate(windows)}
                try:
                    for future in as_completed(futures):
                        record(futures[future], future.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return [float(n) for n in nlls]  # type: ignore[arg-type]


def evaluate_windows(
    token_ids: Sequence[int],
    scorer: WindowScorer,
    *,
    backend: Literal["pytorch", "server"],
    model: str,
    text_path: str | Path,
    window: int,
    max_tokens: int | None = None,
    workers: int = 1,
    server: str | None = None,
    dtype: str | None = None,
) -> PerplexityResult:
    """Window ``token_ids``, score every window with ``scorer`` and aggregate into a :class:`PerplexityResult`."""
    windows = make_windows(token_ids, window, max_tokens)
    start = time.perf_counter()
    nlls = score_windows(windows, scorer, workers=workers, desc=f"ppl ({backend})")
    seconds = time.perf_counter() - start
    scored = sum(len(w) - 1 for w in windows)
    total = math.fsum(nlls)
    return PerplexityResult(
        backend=backend,
        model=model,
        server=server,
        dtype=dtype,
        text=str(text_path),
        text_sha256=hashlib.sha256(Path(text_path).read_bytes()).hexdigest(),
        window=window,
        max_tokens=max_tokens,
        windows=len(windows),
        tokens=sum(len(w) for w in windows),
        tokens_scored=scored,
        nll=total,
        nll_per_token=total / scored,
        ppl=math.exp(total / scored),
        seconds=seconds,
        window_nll=nlls,
    )
