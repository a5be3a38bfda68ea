"""``thinkeys convert SRC DST --rank R [--rope svd|pairs] [--dtype ...] [--force]``."""

from __future__ import annotations

import argparse

from thinkeys.convert.convert import DTYPES


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (Llama, Mistral, Qwen2 or GPT-2)")
    parser.add_argument("dst", metavar="DST", help="folder to write the thin-key checkpoint to (must not exist)")
    parser.add_argument("--rank", "-r", type=int, required=True, help="key width r per head (1..head_dim; even with RoPE)")
    parser.add_argument(
        "--rope",
        choices=["pairs", "svd", "none"],
        default=None,
        help="how RoPE is carried into the r dims: 'pairs' keeps the r/2 strongest rotary pairs exactly "
        "(default for RoPE models), 'svd' is the paper's SVD basis with the first r/2 frequencies "
        "(approximate, needs fine-tuning); GPT-2 has no RoPE ('none', the default there)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: the source's)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from thinkeys.convert.convert import run_conversion

    report = run_conversion(args.src, args.dst, args.rank, args.rope, args.dtype, args.force, progress=True)
    print(report.summary())
    return 0
