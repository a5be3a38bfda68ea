"""``thinkeys convert SRC DST --rank R [--rope svd|pairs|mixed] [--calibration TEXT] [--dtype ...] [--force]``.

``thinkeys convert SRC DST --shared-kv [--dtype ...] [--force]``: a shared key-value checkpoint of a model
whose value projection equals its key projection (see ``thinkeys.convert.shared_kv``).
"""

from __future__ import annotations

import argparse

from thinkeys.convert.calibration import DEFAULT_CALIBRATION_TOKENS
from thinkeys.convert.convert import DTYPES
from thinkeys.convert.mixed import DEFAULT_NOPE_CONTEXT


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 or GPT-2)")
    parser.add_argument("dst", metavar="DST", help="folder to write the thin-key checkpoint to (must not exist)")
    parser.add_argument("--rank", "-r", type=int, default=None, help="key width r per head (1..head_dim; even with RoPE)")
    parser.add_argument(
        "--shared-kv",
        action="store_true",
        help="SRC's value projection equals its key projection (Q-K=V): write a shared key-value checkpoint that "
        "caches one vector per token and KV head (2x the stock capacity); no --rank, refused when v_proj != k_proj",
    )
    parser.add_argument(
        "--rope",
        choices=["pairs", "svd", "mixed", "rebuild", "none"],
        default=None,
        help="how RoPE is carried into the r dims: 'pairs' keeps the r/2 strongest rotary pairs exactly "
        "(default for RoPE models), 'svd' is the paper's SVD basis with the first r/2 frequencies "
        "(approximate, needs fine-tuning), 'mixed' keeps the strongest fast rotary pairs exactly and folds the "
        "slowly turning pairs into an unrotated low-rank part fitted to real activations (needs --calibration); "
        "'rebuild' caches an r-wide pre-RoPE latent and rebuilds the full key at read time (queries unchanged; "
        "joint query/key fit with --calibration, else the SVD of the key projection; slower attention); "
        "Qwen3 and Gemma 3 (q/k norm before RoPE) take pairs, mixed or rebuild; GPT-2 has no RoPE ('none', the default there)",
    )
    parser.add_argument(
        "--calibration",
        metavar="TEXT",
        default=None,
        help="text file (the tune split, e.g. data/wiki/tune.txt) to collect activation statistics from: "
        "'pairs' then chooses its pairs by real query/key energy; required by 'mixed'",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=DEFAULT_CALIBRATION_TOKENS,
        help=f"tokens of --calibration to run through the source model (default {DEFAULT_CALIBRATION_TOKENS})",
    )
    parser.add_argument(
        "--nope-context",
        type=float,
        default=DEFAULT_NOPE_CONTEXT,
        help="'mixed' only: a rotary pair turning less than 1 radian over this many tokens may be folded into "
        f"the unrotated part (default {DEFAULT_NOPE_CONTEXT}; larger is more conservative for long prompts)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: the source's)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from thinkeys.checkpoint import ThinKeyError
    from thinkeys.convert.convert import run_conversion

    if args.shared_kv:
        from thinkeys.convert.shared_kv import convert_shared_kv, shared_summary

        if args.rank is not None or args.rope or args.calibration:
            raise ThinKeyError("--shared-kv keeps the full key width and the source's RoPE: leave out --rank, --rope and --calibration")
        print(shared_summary(convert_shared_kv(args.src, args.dst, args.dtype, args.force)))
        return 0
    if args.rank is None:
        raise ThinKeyError("say how wide the thin keys are: --rank R (e.g. --rank 16 for head_dim 64), or pass --shared-kv")

    report = run_conversion(
        args.src, args.dst, args.rank, args.rope, args.dtype, args.force, progress=True,
        calibration=args.calibration, calibration_tokens=args.calibration_tokens, nope_context=args.nope_context,
    )
    print(report.summary())
    return 0
