"""``thinkeys eval``: evaluation commands.

``thinkeys eval ppl --model PATH --text FILE``      perplexity in PyTorch (thin-key or stock checkpoint)
``thinkeys eval ppl --server URL --served-model NAME --text FILE``
                                                  the same windows through a running vLLM server

``thinkeys eval chat --model PATH [--references data/chat/eval.jsonl]``
                                                  chat fidelity (see :mod:`thinkeys.evaluate.chat`)

The ppl commands print the same result (a table, or ``--json``); see :mod:`thinkeys.evaluate.perplexity`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thinkeys.checkpoint import ThinKeyError

DEFAULT_WINDOW = 512


def build_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    ppl = sub.add_parser(
        "ppl",
        help="perplexity over non-overlapping token windows",
        description="Perplexity over non-overlapping windows of --window tokens; the first token of each "
        "window is context only. Give --model (PyTorch) or --server with --served-model (vLLM server).",
    )
    where = ppl.add_argument_group("what to evaluate (one of)")
    where.add_argument("--model", type=Path, help="checkpoint folder, run in PyTorch (thin-key checkpoints use the reference model)")
    where.add_argument("--server", help="base URL of a running OpenAI-compatible vLLM server, e.g. http://127.0.0.1:8000")
    ppl.add_argument("--served-model", help="model name on the server (--server only)")
    ppl.add_argument("--tokenizer", type=Path, help="local tokenizer folder for --server (default: the server's /tokenize)")
    ppl.add_argument("--text", type=Path, required=True, help="UTF-8 text file, e.g. data/wiki/eval.txt")
    ppl.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    ppl.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text")
    ppl.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="PyTorch compute dtype (default float32)")
    ppl.add_argument("--concurrency", type=int, default=4, help="windows in flight at once (--server only, default 4)")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")

    chat = sub.add_parser(
        "chat",
        help="chat fidelity against the original's greedy answers (teacher-forced PPL, top-1, loops)",
        description="Score a model on the original model's greedy answers to held-out prompts (data/chat/eval.jsonl "
        "from `thinkeys chat-data`): answer perplexity, top-1 agreement, and whether its own greedy answers loop.",
    )
    chat.add_argument("--model", type=Path, required=True, help="checkpoint folder (thin-key or stock), run in PyTorch fp32")
    chat.add_argument("--references", type=Path, default=Path("data/chat/eval.jsonl"), help="(default %(default)s)")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer cap for the loop check (default %(default)s)")
    chat.add_argument("--no-generate", action="store_true", help="skip the greedy answers (teacher-forced scores only)")
    chat.add_argument("--generator", choices=["vllm", "torch"], default="vllm",
                      help="greedy answers from vLLM's engine, batched (default) or transformers' generate")
    chat.add_argument("--json", type=Path, help="also write the full result (every answer) to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "chat":
        return run_chat(args)
    if args.eval_command != "ppl":  # argparse enforces the choice; kept for new subcommands
        raise ThinKeyError(f"unknown eval command {args.eval_command!r}")
    if (args.model is None) == (args.server is None):
        raise ThinKeyError("give exactly one of --model PATH (PyTorch) or --server URL (with --served-model NAME)")
    if args.concurrency < 1:
        raise ThinKeyError(f"--concurrency {args.concurrency}: must be at least 1")
    if args.model is not None:
        if args.served_model or args.tokenizer:
            raise ThinKeyError("--served-model and --tokenizer go with --server, not --model")
        from thinkeys.evaluate.torch_backend import perplexity_torch

        result = perplexity_torch(args.model, args.text, window=args.window, max_tokens=args.max_tokens, dtype=args.dtype)
    else:
        if not args.served_model:
            raise ThinKeyError("--server needs --served-model NAME (the name the server was started with; see GET /v1/models)")
        from thinkeys.evaluate.server_backend import perplexity_server

        result = perplexity_server(
            args.server,
            args.served_model,
            args.text,
            window=args.window,
            max_tokens=args.max_tokens,
            tokenizer=args.tokenizer,
            workers=args.concurrency,
        )
    print(result.model_dump_json(indent=2) if args.json else result.table())
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from thinkeys.evaluate.chat import chat_fidelity

    result = chat_fidelity(args.model, args.references, generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
                           generator=args.generator)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.model_dump_json(indent=2) + "\n")
    loops = "-" if result.loops is None else f"{result.loops}/{result.prompts}"
    print(f"model {result.model}: answer PPL {result.answer_ppl:.4f} over {result.answer_tokens} reference tokens, "
          f"top-1 agreement {result.top1:.1%}, looping greedy answers {loops} ({result.seconds:.0f} s)")
    return 0
