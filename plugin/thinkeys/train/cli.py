"""``thinkeys finetune SRC_THIN DST --teacher ORIGINAL --text data/wiki/tune.txt [...]``."""

from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser) -> None:
    from thinkeys.train.finetune import FinetuneSettings

    d = FinetuneSettings.model_fields
    parser.description = (
        "Recover a thin-key checkpoint by training only its thin query/key projections: a layer-wise stage "
        "(each layer's attention output fitted to the original's), then end-to-end distillation to the original "
        "model's next-token distribution. Resumable (state in --work-dir); DST is written only when done."
    )
    parser.add_argument("src", metavar="SRC_THIN", help="thin-key checkpoint folder (from `thinkeys convert`)")
    parser.add_argument("dst", metavar="DST", help="folder to write the recovered thin-key checkpoint to (must not exist)")
    parser.add_argument("--teacher", required=True, metavar="ORIGINAL", help="the original model SRC_THIN was converted from")
    parser.add_argument("--text", required=True, help="training text: the tune split (data/wiki/tune.txt); never the eval split")
    parser.add_argument("--work-dir", default=None, help="resumable state and log (default: .<DST name>.finetune beside DST)")
    parser.add_argument("--restart", action="store_true", help="discard the state in --work-dir instead of resuming from it")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--window", type=int, default=d["window"].default, help="tokens per training window (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"].default)

    lw = parser.add_argument_group("layer-wise stage")
    lw.add_argument("--layerwise-steps", type=int, default=d["layerwise_steps"].default,
                    help="Adam steps per layer, 0 to skip the stage (default %(default)s)")
    lw.add_argument("--layerwise-windows", type=int, default=d["layerwise_windows"].default,
                    help="tune windows the teacher's activations are captured on (default %(default)s)")
    lw.add_argument("--layerwise-batch", type=int, default=d["layerwise_batch"].default, help="windows per step (default %(default)s)")
    lw.add_argument("--layerwise-lr", type=float, default=d["layerwise_lr"].default, help="(default %(default)s)")
    lw.add_argument("--layerwise-queries", type=int, default=d["layerwise_queries"].default,
                    help="query positions per window and step; every position stays a key (default %(default)s)")
    lw.add_argument("--layerwise-store", choices=["float32", "bfloat16"], default=d["layerwise_store"].default,
                    help="dtype the teacher's activations are kept in: they take 2 x layers x windows x window x hidden "
                    "values (SmolLM2-135M, 128 windows: 9 GB in float32); bfloat16 halves that, training stays float32 "
                    "(default %(default)s)")

    e2e = parser.add_argument_group("end-to-end stage (runs when --e2e-steps or --e2e-minutes is given)")
    e2e.add_argument("--e2e-steps", type=int, default=None, help="optimizer steps")
    e2e.add_argument("--e2e-minutes", type=float, default=None, help="wall-time budget in minutes (the schedule follows it)")
    e2e.add_argument("--e2e-batch", type=int, default=d["e2e_batch"].default, help="windows per step (default %(default)s)")
    e2e.add_argument("--e2e-lr", type=float, default=d["e2e_lr"].default, help="AdamW peak learning rate (default %(default)s)")
    e2e.add_argument("--loss", choices=["kl", "ce", "kl+ce"], default=d["loss"].default,
                     help="kl: distil the original's next-token distribution (default); ce: plain LM loss on the text")

    parser.add_argument("--train-freqs", action="store_true", help="also train each head's RoPE frequency table")
    parser.add_argument("--train-queries", action="store_true",
                        help="rope: rebuild checkpoints: also train the source's (d-wide) query projection; the cache is "
                        "unchanged, the recovered delta grows by the query weights (measured at r = 16: 1.2-2.3%% lower "
                        "perplexity on held-out text)")
    parser.add_argument("--query-rank", type=int, default=None, metavar="K",
                        help="with --train-queries: train the query change as a rank-K product (LoRA-style) relative to "
                        "the teacher's query weights, so `thinkeys recovered make --low-rank K` ships it as two thin "
                        "factors (2.2 MB at K = 32 for SmolLM2-135M instead of 20 MB)")
    parser.add_argument("--freq-lr", type=float, default=d["freq_lr"].default, help="learning rate of the frequency tables")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, 1 "
                        "is often several times faster than 2: threads that wait for each other idle")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: train on a GPU when there is one")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of DST's weights (default: SRC_THIN's); training is always float32")


def run(args: argparse.Namespace) -> int:
    from thinkeys.train.finetune import finetune

    if args.threads is not None:
        if args.threads < 1:
            from thinkeys.checkpoint import ThinKeyError

            raise ThinKeyError(f"--threads {args.threads}: must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    report = finetune(
        args.src,
        args.dst,
        teacher=args.teacher,
        text=args.text,
        work_dir=args.work_dir,
        resume=not args.restart,
        force=args.force,
        device=args.device,
        window=args.window,
        seed=args.seed,
        layerwise_steps=args.layerwise_steps,
        layerwise_windows=args.layerwise_windows,
        layerwise_batch=args.layerwise_batch,
        layerwise_lr=args.layerwise_lr,
        layerwise_queries=args.layerwise_queries,
        layerwise_store=args.layerwise_store,
        e2e_steps=args.e2e_steps,
        e2e_minutes=args.e2e_minutes,
        e2e_batch=args.e2e_batch,
        e2e_lr=args.e2e_lr,
        loss=args.loss,
        train_freqs=args.train_freqs,
        train_queries=args.train_queries,
        query_rank=args.query_rank,
        freq_lr=args.freq_lr,
        dtype=args.dtype,
    )
    print(report.summary())
    return 0
