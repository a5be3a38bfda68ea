"""How sure the perplexity costs are: the frontier's checkpoints on 16x the tokens, with paired bootstrap intervals.

    python scripts/quality_confidence.py eval --checkpoint original=models/SmolLM2-135M-Instruct \
        --checkpoint rebuild-r32-long-lw-e2e=models/SmolLM2-135M-Instruct-thin-r32-rebuild-recovered \
        --checkpoint rebuild-r16-long-lw-e2e=models/SmolLM2-135M-Instruct-thin-r16-rebuild-recovered
    python scripts/quality_confidence.py table

The frontier (``scripts/quality_frontier.py``) scores the first 2,048 tokens of each held-out text: four
windows of 512. ``eval`` scores the first ``--max-tokens`` (default 32,768: 64 windows) of the same three
texts in PyTorch fp32 (``thinkeys.evaluate.torch_backend.perplexity_torch``, the frontier's scorer) and
keeps every window's NLL, one JSON per checkpoint in ``bench-results/quality/confidence/evals/`` (skipped
when present: the run resumes). ``table`` then reports, per thin checkpoint and text:

- the cost over all windows, ``exp(mean NLL thin - mean NLL original) - 1`` per token;
- its 95% interval from a paired bootstrap over windows (the same windows resampled for both models,
  10,000 draws): how far another sample of the same kind of text could move it;
- the cost on the first 2,048 tokens (the frontier's figure) and the range over the disjoint 2,048-token
  blocks of the sample: how much a frontier-sized sample varies;
- for other recipes of the same rank, their perplexity against the shipped one's of that rank (``--against``), paired
  the same way: whether a recipe change moved anything beyond sampling noise.

Writes ``confidence.md``, ``confidence.json`` and ``confidence.png`` beside the evals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from quality_frontier import MAX_TOKENS as FRONTIER_TOKENS  # the frontier's texts, window and sample size
from quality_frontier import TEXTS, WINDOW, machine

OUT = Path("bench-results/quality/confidence")  # --out changes it
DRAWS = 10_000


def cmd_eval(args: argparse.Namespace) -> None:
    from thinkeys.evaluate.torch_backend import perplexity_torch

    (OUT / "evals").mkdir(parents=True, exist_ok=True)
    for spec in args.checkpoint:
        label, sep, path = spec.partition("=")
        if not sep or not label or not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--checkpoint {spec}: give LABEL=PATH with PATH a model folder holding config.json")
        dest = OUT / "evals" / f"{label}.json"
        if dest.is_file() and not args.force:
            print(f"{label}: {dest} exists, skipped")
            continue
        started = time.perf_counter()
        thin = json.loads((Path(path) / "config.json").read_text()).get("thin_keys")
        result = {"label": label, "checkpoint": path, "thin_keys": thin, "window": WINDOW, "max_tokens": args.max_tokens,
                  "texts": {}}
        for name, text in TEXTS.items():
            r = perplexity_torch(path, text, window=WINDOW, max_tokens=args.max_tokens)
            result["texts"][name] = {"ppl": r.ppl, "tokens_scored": r.tokens_scored, "text_sha256": r.text_sha256,
                                     "window_tokens": [WINDOW - 1] * (r.windows - 1) + [r.tokens_scored - (WINDOW - 1) * (r.windows - 1)],
                                     "window_nll": r.window_nll}
            print(f"{label}: {name} PPL {r.ppl:.3f} on {r.tokens_scored:,} tokens")
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["machine"] = machine()
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(dest)


def paired_costs(thin: dict, base: dict, rng) -> dict:
    """Cost over all windows, its paired bootstrap interval, and the frontier-sized blocks' costs."""
    import numpy as np

    if thin["text_sha256"] != base["text_sha256"] or thin["window_tokens"] != base["window_tokens"]:
        raise SystemExit("two evals compared here scored different text or windows: re-run both with the same --max-tokens and texts")
    nll_t, nll_b = np.array(thin["window_nll"]), np.array(base["window_nll"])
    tokens = np.array(base["window_tokens"], dtype=float)
    cost = math.exp((nll_t.sum() - nll_b.sum()) / tokens.sum()) - 1
    idx = rng.integers(0, len(tokens), size=(DRAWS, len(tokens)))
    draws = np.exp((nll_t[idx].sum(1) - nll_b[idx].sum(1)) / tokens[idx].sum(1)) - 1
    per_block = FRONTIER_TOKENS // WINDOW
    blocks = [math.exp((nll_t[i:i + per_block].sum() - nll_b[i:i + per_block].sum()) / tokens[i:i + per_block].sum()) - 1
              for i in range(0, len(tokens) - per_block + 1, per_block)]
    return {"cost": cost, "ci95": [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))],
            "tokens": int(tokens.sum()), "first_2048": blocks[0], "blocks_2048": blocks}


def cmd_table(args: argparse.Namespace) -> None:
    import numpy as np

    evals = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "evals").glob("*.json"))}
    if "original" not in evals:
        raise SystemExit(f"no {OUT}/evals/original.json: run `eval --checkpoint original=...` first")
    base = evals.pop("original")
    evals = dict(sorted(evals.items(), key=lambda kv: (-(kv[1]["thin_keys"] or {"rank": 99})["rank"], kv[0])))  # widest first
    rng = np.random.default_rng(0)
    rows = [{"label": label, "checkpoint": e["checkpoint"], "rank": e["thin_keys"]["rank"], "machine": e["machine"],
             "texts": {t: paired_costs(e["texts"][t], base["texts"][t], rng) for t in TEXTS}}
            for label, e in evals.items()]
    references = {evals[label]["thin_keys"]["rank"]: label for label in args.against if label in evals}
    for r in rows:  # each other recipe against the reference of its rank, paired the same way
        ref = references.get(r["rank"])
        if ref is not None and r["label"] != ref:
            for t, c in r["texts"].items():
                vs = paired_costs(evals[r["label"]]["texts"][t], evals[ref]["texts"][t], rng)
                c["vs_reference"] = {"reference": ref, "ppl_ratio": vs["cost"], "ci95": vs["ci95"]}
    (OUT / "confidence.json").write_text(json.dumps({"window": WINDOW, "draws": DRAWS, "original": {
        t: {"ppl": base["texts"][t]["ppl"], "tokens": base["texts"][t]["tokens_scored"]} for t in TEXTS}, "rows": rows},
        indent=1) + "\n")
    lines = ["| checkpoint | text | tokens | PPL cost, all tokens | 95% interval (paired bootstrap) | first 2,048 tokens (frontier) | "
             "2,048-token blocks: min / median / max | PPL vs the reference of its rank (95% interval) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for t, c in r["texts"].items():
            lo, hi = c["ci95"]
            b = sorted(c["blocks_2048"])
            vs = c.get("vs_reference")
            against = (f"{vs['ppl_ratio']:+.1%} ({vs['ci95'][0]:+.1%} .. {vs['ci95'][1]:+.1%}) vs {vs['reference']}" if vs
                       else "(reference)" if r["label"] in args.against else "-")
            lines.append(f"| {r['label']} | {t} | {c['tokens']:,} | {c['cost']:+.1%} | {lo:+.1%} .. {hi:+.1%} | "
                         f"{c['first_2048']:+.1%} | {b[0]:+.1%} / {float(np.median(b)):+.1%} / {b[-1]:+.1%} | {against} |")
    (OUT / "confidence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, r in enumerate(rows):
        for j, (t, c) in enumerate(r["texts"].items()):
            x = j + (i - (len(rows) - 1) / 2) * 0.8 / len(rows)  # the rows side by side within each text
            lo, hi = c["ci95"]
            ax.scatter([x] * len(c["blocks_2048"]), [100 * b for b in c["blocks_2048"]], s=8, color=f"C{i}", alpha=0.3)
            ax.errorbar(x, 100 * c["cost"], yerr=[[100 * (c["cost"] - lo)], [100 * (hi - c["cost"])]], fmt="o",
                        color=f"C{i}", capsize=4, label=r["label"] if j == 0 else None)
            ax.scatter(x, 100 * c["first_2048"], marker="x", s=40, color="black", zorder=3,
                       label="first 2,048 tokens (the frontier's figure)" if i == j == 0 else None)
    ax.set_xticks(range(len(TEXTS)), list(TEXTS))
    ax.set_ylabel("PPL cost vs the original (%)")
    ax.set_title("PPL cost on all tokens with 95% paired bootstrap interval; dots: 2,048-token blocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "confidence.png", dpi=120)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--checkpoint", action="append", required=True, help="LABEL=PATH; the unmodified model's label is 'original'")
    e.add_argument("--max-tokens", type=int, default=32_768, help="tokens of each text scored (default: 64 windows of 512)")
    e.add_argument("--force", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("--against", nargs="+", default=["rebuild-r32-long-lw-e2e", "rebuild-r16-long-lw-e2e"],
                   help="reference thin checkpoints (the shipped ones): other recipes of a reference's rank are compared "
                   "with it, paired (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder (default %(default)s)")
    args = parser.parse_args()
    OUT = args.out
    {"eval": cmd_eval, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
