"""Chat text for recovery and for scoring chat fidelity: what the original model answers, in its own words.

Recovery that reads only Wikipedia costs a thin model its chat behaviour (bench-results/quality:
the r = 16 model tuned on plain articles answers nothing). So ``thinkeys chat-data`` asks the
*original* model to answer instruction prompts, greedily, in its chat template, and writes:

``tune.txt``
    the recovery text: the original's chat transcripts (prompts made from templates over the
    Wikipedia **tune** split's titles and first paragraphs, :data:`TRAIN_TEMPLATES`), each rendered
    with the model's chat template, interleaved with an equal number of characters of tune-split
    articles, so end-to-end distillation sees chat and prose half and half.
``eval.jsonl``
    the references for :mod:`thinkeys.evaluate.chat`: the original's greedy answer to each
    held-out prompt of ``configs/chat/eval-prompts.json`` (hand-written, never read by conversion
    or recovery), with the answer's token ids.
``manifest.json``
    both files with their sha256 (``eval`` is refused by ``thinkeys finetune`` like the wiki eval
    split), the teacher's weights digest and the generation settings.

Generation runs in vLLM's offline engine (in-process, fp32, greedy): no server is started.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel
from thinkeys.checkpoint import ThinKeyError
from thinkeys.data import read_articles, sha256_file

RECIPE_VERSION = 1
EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "chat" / "eval-prompts.json"

#: Instruction templates for the recovery transcripts; ``{title}`` is a tune-split article title,
#: ``{paragraph}`` its first paragraph (cut to ~600 characters).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "What is {title}?",
    "Tell me three interesting facts about {title}.",
    "Explain {title} to a beginner in a few sentences.",
    "Write a short poem about {title}.",
    "Why is {title} important? Answer briefly.",
    "Summarize the following text in two sentences:\n\n{paragraph}",
    "Write three questions a student might ask after reading this:\n\n{paragraph}",
)


class ChatManifest(BaseModel):
    recipe_version: int = RECIPE_VERSION
    teacher: str
    teacher_weights_sha256: str
    wiki_tune_sha256: str
    eval_prompts_sha256: str
    max_new_tokens: int
    train_prompts: int
    eval_prompts: int
    seconds: float
    splits: dict[str, dict[str, Any]]


def _weights_digest(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ThinKeyError(f"{model_dir}: no *.safetensors weights; give the original Hugging Face model folder")
    digest = hashlib.sha256()
    for f in files:
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def train_prompts(articles: Iterable[str]) -> list[str]:
    """Every template over every tune article that has a paragraph of prose (deterministic order)."""
    prompts = []
    for block in articles:
        lines = block.split("\n")
        title, paragraphs = lines[0].strip(), [p for p in lines[1:] if len(p.split()) >= 25]
        if not title or not paragraphs:
            continue
        paragraph = paragraphs[0][:600].rsplit(" ", 1)[0] if len(paragraphs[0]) > 600 else paragraphs[0]
        prompts.extend(t.format(title=title, paragraph=paragraph) for t in TRAIN_TEMPLATES)
    return prompts


def eval_prompts(path: Path = EVAL_PROMPTS) -> list[str]:
    try:
        prompts = json.loads(path.read_text())["prompts"]
    except (OSError, ValueError, KeyError) as exc:
        raise ThinKeyError(f"{path}: not a prompt file with a 'prompts' list ({exc})") from None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ThinKeyError(f"{path}: 'prompts' must be a non-empty list of non-empty strings")
    return prompts


def render_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a one-turn conversation up to the assistant's answer (the chat template's own)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def greedy_answers(llm: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int) -> list[list[int]]:
    """The model's greedy answer token ids to each prompt, up to and including its end-of-turn token.

    ``llm`` is a ``vllm.LLM`` of the original model: batched decoding on the CPU engine is ~50x faster
    than transformers' ``generate`` here, and greedy answers are what the references need.
    """
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outs = llm.generate([TokensPrompt(prompt_token_ids=render_prompt(tokenizer, p)) for p in prompts], params, use_tqdm=True)
    answers = []
    for out in outs:
        ids = list(out.outputs[0].token_ids)
        if out.outputs[0].finish_reason == "stop" and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids.append(tokenizer.eos_token_id)  # vLLM drops the stop token from the output
        answers.append(ids)
    return answers


def make_chat_data(teacher: str | Path, wiki_dir: str | Path, out: str | Path, *, max_new_tokens: int = 160,
                   limit: int | None = None, force: bool = False) -> ChatManifest:
    """Write ``tune.txt``, ``eval.jsonl`` and ``manifest.json`` into ``out`` (atomically, see the module docstring)."""
    from transformers import AutoTokenizer

    teacher, wiki_dir, out = Path(teacher), Path(wiki_dir), Path(out)
    tune_path = wiki_dir / "tune.txt"
    if not tune_path.is_file():
        raise ThinKeyError(f"{tune_path}: no tune split; run `thinkeys fetch` first")
    if out.exists() and not force:
        raise ThinKeyError(f"{out} exists: pass --force to replace it")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    if not tokenizer.chat_template:
        raise ThinKeyError(f"{teacher}: the tokenizer has no chat template; chat data needs an instruction-tuned model")
    started = time.perf_counter()
    articles = read_articles(tune_path)
    prompts = train_prompts(articles)
    if limit is not None and limit < len(prompts):  # evenly spread over the articles and templates
        prompts = [prompts[i * len(prompts) // limit] for i in range(limit)]
    held_out = eval_prompts()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = LLM(model=str(teacher), dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
    train_answers = greedy_answers(llm, tokenizer, prompts, max_new_tokens=max_new_tokens)
    eval_answers = greedy_answers(llm, tokenizer, held_out, max_new_tokens=max_new_tokens)
    del llm

    transcripts = [tokenizer.decode(render_prompt(tokenizer, p) + a) for p, a in zip(prompts, train_answers)]
    chat_chars = sum(len(t) for t in transcripts)
    prose, taken = [], 0
    for block in articles:  # an equal share of tune-split prose, whole articles in file order
        if taken >= chat_chars:
            break
        prose.append(block)
        taken += len(block)
    blocks, step = [], max(1, len(transcripts) // max(1, len(prose)))
    for i, block in enumerate(prose):  # interleave: a few transcripts, then an article
        blocks.extend(transcripts[i * step:(i + 1) * step])
        blocks.append(block)
    blocks.extend(transcripts[len(prose) * step:])

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        (tmp / "tune.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        with open(tmp / "eval.jsonl", "w", encoding="utf-8") as f:
            for p, a in zip(held_out, eval_answers):
                f.write(json.dumps({"prompt": p, "answer": tokenizer.decode(a, skip_special_tokens=True),
                                    "answer_ids": a}) + "\n")
        manifest = ChatManifest(
            teacher=str(teacher),
            teacher_weights_sha256=_weights_digest(teacher),
            wiki_tune_sha256=sha256_file(tune_path),
            eval_prompts_sha256=sha256_file(EVAL_PROMPTS),
            max_new_tokens=max_new_tokens,
            train_prompts=len(prompts),
            eval_prompts=len(held_out),
            seconds=round(time.perf_counter() - started, 1),
            splits={
                "tune": {"file": "tune.txt", "sha256": sha256_file(tmp / "tune.txt"), "transcripts": len(transcripts),
                         "articles": len(prose), "chars": (tmp / "tune.txt").stat().st_size},
                "eval": {"file": "eval.jsonl", "sha256": sha256_file(tmp / "eval.jsonl"), "prompts": len(held_out)},
            },
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------- CLI: thinkeys chat-data

def build_parser(parser):  # noqa: ANN001 - argparse
    parser.description = (
        "Write recovery text made of the original model's own chat answers (plus tune-split prose) and the "
        "held-out chat references that `thinkeys eval chat` scores against."
    )
    parser.add_argument("teacher", metavar="ORIGINAL", help="the original (instruction-tuned) model folder")
    parser.add_argument("--wiki", default="data/wiki", help="folder of the Wikipedia splits (default %(default)s)")
    parser.add_argument("--out", default="data/chat", help="output folder (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use N recovery prompts, evenly spread over articles and templates (default: all)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:  # noqa: ANN001 - argparse
    m = make_chat_data(args.teacher, args.wiki, args.out, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       force=args.force)
    print(f"thinkeys chat-data: {m.train_prompts} recovery transcripts + {m.splits['tune']['articles']} articles -> "
          f"{args.out}/tune.txt; {m.eval_prompts} held-out references -> {args.out}/eval.jsonl ({m.seconds:.0f} s)")
    return 0
