"""Quality of thin-key strategies on the default model, before and after recovery; writes bench-results/quality/.

Steps (each appends to / rewrites its JSON in ``--out``; run them in this order)::

    python scripts/quality_sweep.py calibrate                 # attention-input statistics of the source (tune text)
    python scripts/quality_sweep.py before                    # every strategy x rank, PPL without training
    python scripts/quality_sweep.py recover --rank 32 --minutes 30   # layer-wise, then end-to-end, within the budget
    python scripts/quality_sweep.py recover --rank 16 --minutes 30
    python scripts/quality_sweep.py served --rank 16          # one real `thinkeys serve`: served PPL vs PyTorch PPL
    python scripts/quality_sweep.py chat                      # greedy chat outputs, original vs recovered
    python scripts/quality_sweep.py table                     # README section, CSV and plot from the JSON files

Perplexity is ``thinkeys eval ppl``'s (non-overlapping windows, first token of each window is
context only), on the first ``--eval-tokens`` tokens of the held-out split (``data/wiki/eval.txt``);
calibration and training read only the tune split. Servable strategies are converted with
``thinkeys convert`` and scored by the PyTorch reference; the rebuild-at-read strategies are not
servable (they need a kernel that expands cached keys) and are scored as their PyTorch equivalent
(:mod:`thinkeys.convert.rebuild`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "models" / "SmolLM2-135M-Instruct"
TUNE = ROOT / "data" / "wiki" / "tune.txt"
EVAL = ROOT / "data" / "wiki" / "eval.txt"
OUT = ROOT / "bench-results" / "quality"
WORK = ROOT / ".cache" / "quality"
RANKS = (64, 32, 16, 8)
#: name -> (description, servable)
STRATEGIES: dict[str, tuple[str, bool]] = {
    "svd": ("paper: SVD basis, RoPE in the r-dim space with the first r/2 frequencies", True),
    "pairs": ("keep the r/2 rotary pairs with the most weight energy (data-free), exact RoPE on them", True),
    "pairs-cal": ("keep the r/2 rotary pairs with the most real query x key energy (calibrated)", True),
    "mixed": ("kept rotary pairs + shared-frequency bands + unrotated low-rank part over slow pairs (calibrated)", True),
    "rebuild-svd": ("cache thin pre-RoPE keys, rebuild k = U_r c and rotate at read (needs kernel work)", False),
    "rebuild-pca": ("same, basis from real key activations (needs kernel work)", False),
    "rebuild-joint": ("same, weighted by real queries and keys jointly (needs kernel work)", False),
}
WINDOW = 512
EVAL_TOKENS = 2048
CALIBRATION_TOKENS = 8192


def calibration_path() -> Path:
    return WORK / f"calibration-{CALIBRATION_TOKENS}.safetensors"


def load_json(name: str, default: Any) -> Any:
    path = OUT / name
    return json.loads(path.read_text()) if path.is_file() else default


def save_json(name: str, data: Any) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(OUT / name)


def machine() -> str:
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.python_version()}, torch threads {__import__('torch').get_num_threads()}"


def ppl_of(path_or_model: Any, *, name: str, eval_tokens: int) -> dict[str, Any]:
    """PPL of a checkpoint folder (thin or stock) or an in-memory transformers model, as `thinkeys eval ppl` computes it."""
    from thinkeys.evaluate.perplexity import evaluate_windows
    from thinkeys.evaluate.torch_backend import load_tokenizer, perplexity_torch, tokenize_text, torch_window_scorer

    if isinstance(path_or_model, (str, Path)):
        result = perplexity_torch(path_or_model, EVAL, window=WINDOW, max_tokens=eval_tokens)
    else:
        ids = tokenize_text(load_tokenizer(SRC), EVAL.read_text(encoding="utf-8"))
        result = evaluate_windows(ids, torch_window_scorer(path_or_model), backend="pytorch", model=name,
                                  text_path=EVAL, window=WINDOW, max_tokens=eval_tokens, dtype="float32")
    return {"ppl": result.ppl, "nll": result.nll, "tokens_scored": result.tokens_scored, "seconds": round(result.seconds, 1)}


# --- steps -----------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> None:
    from thinkeys.convert.calibration import collect_calibration

    if calibration_path().is_file() and not args.force:
        print(f"{calibration_path()} exists")
        return
    collect_calibration(SRC, TUNE, tokens=CALIBRATION_TOKENS).save(calibration_path())


def convert_strategy(strategy: str, rank: int, dst: Path) -> dict[str, Any]:
    from thinkeys.convert.calibration import Calibration
    from thinkeys.convert.convert import PROVENANCE_KEY, run_conversion

    cal = Calibration.load(calibration_path()) if strategy in ("pairs-cal", "mixed") else None
    rope = {"svd": "svd", "pairs": "pairs", "pairs-cal": "pairs", "mixed": "mixed"}[strategy]
    report = run_conversion(SRC, dst, rank, rope, None, True, progress=False, calibration=cal)
    prov = json.loads((dst / "config.json").read_text()).get(PROVENANCE_KEY, {})
    return {"key_energy_kept": float(report.retained_energy.mean()), "slots": prov.get("per_head_mean")}


def cmd_before(args: argparse.Namespace) -> None:
    from thinkeys.convert.calibration import Calibration
    from thinkeys.convert.rebuild import rebuild_model

    rows = load_json("before.json", {"rows": []})
    done = {(r["strategy"], r["rank"]) for r in rows["rows"]}
    rows["machine"], rows["eval_tokens"], rows["window"] = machine(), args.eval_tokens, WINDOW
    if "baseline" not in rows:
        rows["baseline"] = ppl_of(SRC, name="original", eval_tokens=args.eval_tokens)
        save_json("before.json", rows)
    base = rows["baseline"]["ppl"]
    for rank in args.ranks:
        for strategy in args.strategies:
            if (strategy, rank) in done:
                continue
            start = time.monotonic()
            row: dict[str, Any] = {"strategy": strategy, "rank": rank, "servable": STRATEGIES[strategy][1]}
            if STRATEGIES[strategy][1]:
                dst = WORK / "before" / f"{strategy}-r{rank}"
                row.update(convert_strategy(strategy, rank, dst))
                row.update(ppl_of(dst, name=dst.name, eval_tokens=args.eval_tokens))
            else:
                kind = strategy.removeprefix("rebuild-")
                cal = Calibration.load(calibration_path())
                model = rebuild_model(SRC, rank, kind, cal)
                row.update(ppl_of(model, name=strategy, eval_tokens=args.eval_tokens))
                del model
            row["pct_vs_original"] = 100 * (row["ppl"] / base - 1)
            row["wall_seconds"] = round(time.monotonic() - start, 1)
            rows["rows"].append(row)
            save_json("before.json", rows)
            print(f"{strategy:>14} r={rank:<3} PPL {row['ppl']:10.2f} ({row['pct_vs_original']:+.1f}%)", flush=True)


def recovered_dir(strategy: str, rank: int) -> Path:
    return ROOT / "models" / f"SmolLM2-135M-Instruct-thin-r{rank}-{strategy}-ft"


def cmd_recover(args: argparse.Namespace) -> None:
    """Layer-wise stage, then end-to-end distillation for what is left of ``--minutes`` (wall time, all included)."""
    from thinkeys.train.finetune import finetune

    start = time.monotonic()
    strategy, rank = args.strategy, args.rank
    init = WORK / "before" / f"{strategy}-r{rank}"
    if not (init / "config.json").is_file():
        convert_strategy(strategy, rank, init)
    stage1 = WORK / "recover" / f"{strategy}-r{rank}-layerwise"
    final = recovered_dir(strategy, rank)
    record: dict[str, Any] = {"strategy": strategy, "rank": rank, "budget_minutes": args.minutes, "machine": machine()}
    common = dict(teacher=SRC, text=TUNE, window=WINDOW, seed=0, force=True)
    lw = finetune(init, stage1, layerwise_steps=args.layerwise_steps, layerwise_windows=args.layerwise_windows,
                  layerwise_batch=2, layerwise_lr=args.layerwise_lr, layerwise_queries=args.layerwise_queries, dtype="float32",
                  work_dir=WORK / "recover" / f"{strategy}-r{rank}-layerwise.work", **common)
    record["layerwise"] = {"seconds": lw.seconds, "tokens": lw.tokens, "error": lw.layerwise_error,
                           "settings": lw.settings.model_dump(mode="json"), "wall_seconds": round(time.monotonic() - start, 1)}
    left = args.minutes - (time.monotonic() - start) / 60 - args.reserve_minutes
    e2e = finetune(stage1, final, e2e_minutes=max(left, 0.5), e2e_batch=1, e2e_lr=args.e2e_lr, loss=args.loss,
                   layerwise_steps=0, train_freqs=args.train_freqs, dtype="bfloat16",
                   work_dir=WORK / "recover" / f"{strategy}-r{rank}-e2e.work", **common)
    record["e2e"] = {"seconds": e2e.seconds, "tokens": e2e.tokens, "steps": e2e.e2e_steps,
                     "ppl_ratio_running": e2e.e2e_ppl_ratio_last, "settings": e2e.settings.model_dump(mode="json"),
                     "log": str(Path(e2e.work_dir) / "log.jsonl")}
    record["recovery_wall_seconds"] = round(time.monotonic() - start, 1)
    record["recovery_tokens"] = lw.tokens.get("layerwise", 0) + e2e.tokens.get("e2e", 0)
    print(f"recovery done in {record['recovery_wall_seconds'] / 60:.1f} min; scoring", flush=True)
    record["ppl_after_layerwise"] = ppl_of(stage1, name=stage1.name, eval_tokens=args.eval_tokens)
    record["ppl_after"] = ppl_of(final, name=final.name, eval_tokens=args.eval_tokens)
    record["checkpoint"] = str(final.relative_to(ROOT))
    recs = [r for r in load_json("recovery.json", []) if (r["strategy"], r["rank"]) != (strategy, rank)]
    save_json("recovery.json", recs + [record])
    print(json.dumps({k: record[k] for k in ("ppl_after_layerwise", "ppl_after", "recovery_wall_seconds")}), flush=True)


@contextlib.contextmanager
def served(model_dir: Path, name: str, log_path: Path, kv_gib: int = 2):
    """A real `thinkeys serve` subprocess with an explicit KV budget; yields its URL, stops it afterwards."""
    from thinkeys.loadtest.servers import Launch, free_port, run_servers, serve_env, server_command

    port = free_port()
    cmd = server_command(str(model_dir), port=port, served_model_name=name, max_model_len=2048)
    launch = Launch(name, str(model_dir), cmd, serve_env(VLLM_CPU_KVCACHE_SPACE=str(kv_gib)), port, log_path)
    with run_servers([launch], startup_timeout_s=1800) as (server,):
        yield server.base_url


def cmd_served(args: argparse.Namespace) -> None:
    from thinkeys.evaluate.server_backend import perplexity_server
    from thinkeys.evaluate.torch_backend import perplexity_torch

    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else recovered_dir(args.strategy, args.rank)
    name = ckpt.name
    torch_result = perplexity_torch(ckpt, EVAL, window=WINDOW, max_tokens=args.eval_tokens, dtype="float32")
    start = time.monotonic()
    with served(ckpt, name, OUT / f"server-{name}.log") as url:
        startup = time.monotonic() - start
        server_result = perplexity_server(url, name, EVAL, window=WINDOW, max_tokens=args.eval_tokens, workers=2)
    record = {
        "checkpoint": str(ckpt.relative_to(ROOT.resolve())) if ckpt.is_relative_to(ROOT.resolve()) else str(ckpt),
        "eval_tokens": args.eval_tokens,
        "ppl_pytorch_fp32": torch_result.ppl,
        "ppl_served": server_result.ppl,
        "relative_difference_pct": 100 * abs(server_result.ppl / torch_result.ppl - 1),
        "tokens_scored": [torch_result.tokens_scored, server_result.tokens_scored],
        "server_startup_seconds": round(startup, 1),
        "served_dtype": json.loads((ckpt / "config.json").read_text()).get("dtype"),
        "kv_cache_gib": 2,
    }
    recs = [r for r in load_json("served.json", []) if r["checkpoint"] != record["checkpoint"]]
    save_json("served.json", recs + [record])
    print(json.dumps(record, indent=2))


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
]


def cmd_chat(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkeys.reference import load_thin_model

    tok = AutoTokenizer.from_pretrained(SRC)
    models = {"original": lambda: AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()}
    for rank in args.ranks:
        ckpt = recovered_dir(args.strategy, rank)
        if ckpt.is_dir():
            models[ckpt.name] = lambda c=ckpt: load_thin_model(c)
        before = WORK / "before" / f"{args.strategy}-r{rank}"
        if before.is_dir():
            models[f"{args.strategy}-r{rank} (before recovery)"] = lambda c=before: load_thin_model(c)
    for extra in args.checkpoint or []:
        models[Path(extra).name] = lambda c=Path(extra): load_thin_model(c)
    out: dict[str, dict[str, str]] = {}
    for label, build in models.items():
        model = build()
        out[label] = {}
        for prompt in CHAT_PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            out[label][prompt] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
            print(f"[{label}] {prompt}\n  {out[label][prompt]}", flush=True)
        del model
    save_json("chat.json", {"max_new_tokens": args.max_new_tokens, "greedy": True, "outputs": out})


# --- table -------------------------------------------------------------------------------------------


def savings(rank: int) -> dict[str, Any]:
    from thinkeys.accounting import KVFootprint, compare, geometry_from_config, resolve_kv_dtype

    config = json.loads((SRC / "config.json").read_text())
    geometry = geometry_from_config(config, rank=rank)
    footprint = KVFootprint(geometry=geometry, kv_dtype=resolve_kv_dtype("auto", "bfloat16"), block_size=128)
    c = compare(footprint, kv_memory_bytes=1 << 30, context_tokens=8192)
    d = geometry.head_dim
    return {"key_saving_pct": 100 * (1 - rank / d), "kv_saving_pct": 100 * (1 - c.thin_footprint.bytes_per_token / c.stock_footprint.bytes_per_token),
            "concurrency_gain": c.concurrency_gain, "users_1gib_8k": [c.thin.max_users, c.stock.max_users]}


def cmd_table(args: argparse.Namespace) -> None:
    before = load_json("before.json", {"rows": []})
    recovery = {(r["strategy"], r["rank"]): r for r in load_json("recovery.json", [])}
    served_recs = {r["checkpoint"]: r for r in load_json("served.json", [])}
    base = before["baseline"]["ppl"]
    lines = ["| r | strategy | servable | PPL before | % vs original | PPL after recovery | % vs original | recovery (wall, tokens) | served vs PyTorch | key cache saved | KV saved | concurrency x (1 GiB, 8k ctx) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    csv_rows = []
    for rank in RANKS:
        s = savings(rank)
        for row in [r for r in before["rows"] if r["rank"] == rank]:
            rec = recovery.get((row["strategy"], rank))
            after = rec["ppl_after"]["ppl"] if rec else None
            srv = served_recs.get(rec["checkpoint"]) if rec else None
            lines.append(
                f"| {rank} | {row['strategy']} | {'yes' if row['servable'] else 'no (kernel work)'} | {row['ppl']:,.2f} | {row['pct_vs_original']:+.1f}% | "
                + (f"{after:.2f} | {100 * (after / base - 1):+.1f}% | {rec['recovery_wall_seconds'] / 60:.1f} min, {rec['recovery_tokens']:,} tok | " if rec else "- | - | - | ")
                + (f"{srv['relative_difference_pct']:.3f}% | " if srv else "- | ")
                + f"{s['key_saving_pct']:.0f}% | {s['kv_saving_pct']:.1f}% | {s['concurrency_gain']:.2f}x |"
            )
            csv_rows.append({"rank": rank, "strategy": row["strategy"], "servable": row["servable"], "ppl_before": row["ppl"],
                             "pct_before": row["pct_vs_original"], "ppl_after": after,
                             "pct_after": None if after is None else 100 * (after / base - 1),
                             "recovery_minutes": None if not rec else rec["recovery_wall_seconds"] / 60,
                             "recovery_tokens": None if not rec else rec["recovery_tokens"],
                             "served_vs_pytorch_pct": None if not srv else srv["relative_difference_pct"], **{k: v for k, v in s.items() if k != "users_1gib_8k"}})
    with (OUT / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    _plot(recovery, base)
    print("\n".join(lines))


def _plot(recovery: dict, base: float) -> None:
    """Running PPL ratio (student/original CE on not-yet-trained tune windows) against recovery time, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (strategy, rank), rec in sorted(recovery.items()):
        log = [json.loads(l) for l in Path(rec["e2e"]["log"]).read_text().splitlines()] if Path(rec["e2e"]["log"]).is_file() else []
        offset = rec["layerwise"]["wall_seconds"] / 60
        pts = [(offset + r["seconds"] / 60, math.exp(r["ce_student"] - r["ce_teacher"])) for r in log if r.get("ce_teacher") is not None]
        if not pts:
            continue
        k = max(1, len(pts) // 20)  # moving average over ~5% of the run
        xs = [p[0] for p in pts][k - 1:]
        ys = [sum(p[1] for p in pts[i - k + 1 : i + 1]) / k for i in range(k - 1, len(pts))]
        (line,) = ax.plot(xs, ys, label=f"{strategy} r={rank} (end-to-end)")
        lw_ratio = rec["ppl_after_layerwise"]["ppl"] / base
        ax.scatter([offset], [lw_ratio], marker="o", color=line.get_color())
        ax.scatter([rec["recovery_wall_seconds"] / 60], [rec["ppl_after"]["ppl"] / base], marker="*", s=80, color=line.get_color())
    ax.axhline(1.02, ls="--", lw=0.8, color="gray")
    ax.axhline(1.05, ls=":", lw=0.8, color="gray")
    ax.set_xlabel("recovery wall time (min, 2 shared CPU cores)")
    ax.set_ylabel("PPL / original PPL")
    ax.set_title("Recovery: dots = eval PPL after layer-wise, stars = final eval PPL;\nlines = running ratio on fresh tune windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "recovery.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: far faster than 2 on a busy shared machine)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--force", action="store_true")
    b = sub.add_parser("before")
    b.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    b.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    b.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    r = sub.add_parser("recover")
    r.add_argument("--strategy", default="mixed", choices=[s for s, (_, servable) in STRATEGIES.items() if servable])
    r.add_argument("--rank", type=int, required=True)
    r.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the whole recovery")
    r.add_argument("--reserve-minutes", type=float, default=1.5, help="kept back for loading models and writing DST")
    r.add_argument("--layerwise-steps", type=int, default=300)
    r.add_argument("--layerwise-windows", type=int, default=24)
    r.add_argument("--layerwise-lr", type=float, default=2e-3)
    r.add_argument("--layerwise-queries", type=int, default=64)
    r.add_argument("--e2e-lr", type=float, default=5e-4)
    r.add_argument("--loss", default="kl", choices=["kl", "ce", "kl+ce"])
    r.add_argument("--train-freqs", action="store_true")
    r.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    s = sub.add_parser("served")
    s.add_argument("--strategy", default="mixed")
    s.add_argument("--rank", type=int, default=None)
    s.add_argument("--checkpoint", default=None, help="any thin-key checkpoint (default: the recovered one of --strategy/--rank)")
    s.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    ch = sub.add_parser("chat")
    ch.add_argument("--strategy", default="mixed")
    ch.add_argument("--ranks", type=int, nargs="+", default=[32, 16])
    ch.add_argument("--max-new-tokens", type=int, default=40)
    ch.add_argument("--checkpoint", action="append", help="also this thin-key checkpoint (repeatable), e.g. the make serve default")
    sub.add_parser("table")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    {"calibrate": cmd_calibrate, "before": cmd_before, "recover": cmd_recover, "served": cmd_served,
     "chat": cmd_chat, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
