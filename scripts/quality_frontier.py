"""The frontier: users per GiB of KV against quality on held-out text and chat, stock vs thin, with and without 8-bit.

    python scripts/quality_frontier.py eval --checkpoint original=models/SmolLM2-135M-Instruct \
        --checkpoint r32=models/SmolLM2-135M-Instruct-thin-r32-mixed-recovered ...
    python scripts/quality_frontier.py table --served bench-results/quality/frontier/served.json

``eval`` scores each checkpoint in PyTorch fp32 (``thinkeys eval ppl`` / ``thinkeys eval chat``) on the
first 2,048 tokens (windows of 512) of three held-out texts no conversion or recovery step read:
Wikipedia eval articles (``data/wiki/eval.txt``), the King James Bible from Acts and quotations from
``fortunes`` (``data/heldout/``, ``thinkeys fetch --heldout``), and chat fidelity on the original's
greedy answers to 36 held-out prompts (``data/chat/eval.jsonl``). One JSON per checkpoint in
``bench-results/quality/frontier/evals/`` (skipped when present: the run resumes).

``table`` joins them with the KV accounting (``thinkeys.planner.make_plan``, the figures vLLM's engine
allocates: tests/test_accounting.py and tests/test_engine.py hold the two equal) at 1 GiB of KV and
2,048-token users, and with served 8-bit perplexities when given, into ``frontier.md``, ``frontier.json``
and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

OUT = Path("bench-results/quality/frontier")
TEXTS = {"wiki": "data/wiki/eval.txt", "kjv": "data/heldout/kjv.txt", "fortunes": "data/heldout/fortunes.txt"}
MAX_TOKENS, WINDOW = 2048, 512


def machine() -> str:
    from thinkeys.loadtest.report import Machine

    m = Machine.here()
    return f"{m.cpu}, {m.cores} cores, {m.memory_gib:.0f} GiB, no GPU; vLLM {m.vllm}"


def cmd_eval(args: argparse.Namespace) -> None:
    from thinkeys.evaluate.chat import chat_fidelity
    from thinkeys.evaluate.torch_backend import perplexity_torch

    (OUT / "evals").mkdir(parents=True, exist_ok=True)
    for spec in args.checkpoint:
        label, path = spec.split("=", 1)
        dest = OUT / "evals" / f"{label}.json"
        if dest.is_file() and not args.force:
            print(f"{label}: {dest} exists, skipped")
            continue
        started = time.perf_counter()
        config = json.loads((Path(path) / "config.json").read_text())
        result = {"label": label, "checkpoint": path, "thin_keys": config.get("thin_keys"), "ppl": {}}
        for name, text in TEXTS.items():
            r = perplexity_torch(path, text, window=WINDOW, max_tokens=MAX_TOKENS)
            result["ppl"][name] = r.ppl
            print(f"{label}: {name} PPL {r.ppl:.3f}")
        chat = chat_fidelity(path, args.references, max_new_tokens=args.max_new_tokens)
        result["chat"] = {"answer_ppl": chat.answer_ppl, "top1": chat.top1, "loops": chat.loops, "prompts": chat.prompts,
                          "answer_tokens": chat.answer_tokens,
                          "greedy": {a.prompt: a.greedy for a in chat.answers[:4]}}
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["machine"] = machine()
        dest.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{label}: chat answer PPL {chat.answer_ppl:.3f}, top-1 {chat.top1:.1%}, loops {chat.loops}/{chat.prompts}")


#: KV cache dtypes of the capacity columns: vLLM's default (the model dtype), ours, vLLM's own fp8.
KV_DTYPES = ("auto", "int8_per_token_head", "fp8")


def thin_keys_of(evaluation: dict) -> dict | None:
    """The ``thin_keys`` block of the evaluated checkpoint (stored in the eval JSON; else read from its config)."""
    if "thin_keys" in evaluation:
        return evaluation["thin_keys"]
    config = Path(evaluation["checkpoint"]) / "config.json"
    return json.loads(config.read_text()).get("thin_keys") if config.is_file() else None


def cmd_table(args: argparse.Namespace) -> None:
    from thinkeys.planner import make_plan

    evals = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "evals").glob("*.json"))}
    served = json.loads(Path(args.served).read_text()) if args.served else {}
    base = evals.pop("original")
    # original first, then by rank (widest first), rebuild before mixed, less recovery first
    order = sorted(evals, key=lambda k: (-(thin_keys_of(evals[k]) or {"rank": 99})["rank"],
                                         (thin_keys_of(evals[k]) or {}).get("rope") != "rebuild", len(k), k))
    evals = {"original": base, **{k: evals[k] for k in order}}
    stock_tokens = make_plan("smollm2-135m", rank=64, kv_memory="1GiB", context=2048).capacity_tokens.stock
    rows = []
    for label, e in evals.items():
        thin = thin_keys_of(e)
        rank = thin["rank"] if thin else None
        capacity = {}
        for kv in KV_DTYPES:
            plan = make_plan("smollm2-135m", rank=rank or 64, kv_memory="1GiB", context=2048, kv_dtype=kv)
            # stock + int8_per_token_head is ours at r = d; stock + fp8 and stock auto are vLLM's own
            capacity[kv] = plan.capacity_tokens.thin if (rank or kv != "auto") else plan.capacity_tokens.stock
        rows.append({
            "label": label, "checkpoint": e["checkpoint"], "rank": rank, "strategy": thin["rope"] if thin else "stock",
            "kv_tokens_1gib": capacity, "users_x": {kv: t / stock_tokens for kv, t in capacity.items()},
            "ppl": e["ppl"], "ppl_cost": {k: e["ppl"][k] / base["ppl"][k] - 1 for k in e["ppl"]},
            "chat_ratio": e["chat"]["answer_ppl"] / base["chat"]["answer_ppl"], "chat_top1": e["chat"]["top1"],
            "chat_loops": e["chat"]["loops"], "chat_prompts": e["chat"]["prompts"], "served": served.get(label),
        })
    (OUT / "frontier.json").write_text(json.dumps({"machine": machine(), "kv_memory": "1 GiB", "context": 2048,
                                                   "stock_kv_tokens_1gib": stock_tokens, "rows": rows}, indent=2) + "\n")
    lines = ["| checkpoint | r | recovery | users x: bf16 / int8 / fp8 cache | Wikipedia | KJV | fortunes | chat answer PPL x | chat top-1 | loops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        users = " / ".join(f"{r['users_x'][kv]:.2f}x" for kv in KV_DTYPES)
        cost = " | ".join(f"{r['ppl'][k]:.2f} ({r['ppl_cost'][k]:+.1%})" for k in TEXTS)
        recovery = ("-" if r["rank"] is None else "layer-wise + end-to-end" if "-lw-e2e" in r["label"]
                    else "layer-wise" if "-lw" in r["label"] else "none")
        if r["label"].endswith("-200k"):  # the same recipe with 3.4x the end-to-end tokens (session 8)
            recovery += " (200k tokens)"
        if "-long-" in r["label"]:  # the session-7 recipe: 4x the layer-wise steps and windows
            recovery = f"long {recovery}"
        queries = re.search(r"-q(\d+)$", r["label"])
        if queries:  # session 14's recipe: 256 layer-wise windows, a rank-K change of the query projection trains too
            recovery = f"{recovery.replace('layer-wise', 'layer-wise (256 windows)')}, rank-{queries[1]} query change"
        name = f"**{r['label']}** (default)" if r["label"] == args.default else r["label"]
        lines.append(f"| {name} | {r['rank'] or 64} | {recovery} | {users} | {cost} | {r['chat_ratio']:.3f}x | "
                     f"{r['chat_top1']:.1%} | {r['chat_loops']}/{r['chat_prompts']} |")
    (OUT / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = [("held-out text PPL cost, mean of Wikipedia / KJV / fortunes (%)",
               lambda r: 100 * sum(r["ppl_cost"].values()) / len(r["ppl_cost"])),
              ("chat: answer PPL ratio - 1 (%)", lambda r: 100 * (r["chat_ratio"] - 1))]
    for ax, (title, value) in zip(axes, panels):
        for i, r in enumerate(rows):
            color = f"C{i}"
            xs = [r["users_x"]["auto"], r["users_x"]["int8_per_token_head"]]
            y = value(r)
            ax.plot(xs, [y, y], color=color, linewidth=1, alpha=0.5)
            ax.scatter(xs[0], y, marker="o", s=50, color=color)
            ax.scatter(xs[1], y, marker="s", s=50, color=color)
            ax.annotate(r["label"], (xs[1], y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("users per GiB of KV (x stock bf16); o = bf16 cache, s = int8 cache")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct: users per GiB vs quality on text no step read (lower right is better)")
    fig.tight_layout()
    fig.savefig(OUT / "frontier.png", dpi=120)


def cmd_figures(args: argparse.Namespace) -> None:
    """The figures a shipped delta's manifest carries (``thinkeys recovered make --figures``), from the evals
    of the checkpoint the delta rebuilds: the frontier's, the confidence run's and the served perplexities."""
    evals = OUT / "evals"
    mine, original = (json.loads((evals / f"{label}.json").read_text()) for label in (args.label, "original"))
    figures: dict = {
        "measured_by": "python scripts/quality_frontier.py eval (fp32 PyTorch; first 2,048 tokens, windows of 512); "
                       "scripts/quality_confidence.py eval (32,704 tokens, paired-bootstrap 95% intervals); "
                       "served: scripts/kv_options_server.sh",
        "machine": mine["machine"],
        "ppl": {k: round(v, 3) for k, v in mine["ppl"].items()},
        "ppl_original": {k: round(v, 3) for k, v in original["ppl"].items()},
    }
    confidence = Path(args.confidence) / "evals" / f"{args.label}.json"
    if confidence.is_file():
        conf = json.loads((Path(args.confidence) / "confidence.json").read_text())
        row = next((r for r in conf["rows"] if r["label"] == args.label), None)
        if row is None:
            raise SystemExit(f"{args.label}: not in {args.confidence}/confidence.json; run quality_confidence.py table")
        figures["cost_32k_tokens"] = {t: {"cost": round(v["cost"], 4), "ci95": [round(x, 4) for x in v["ci95"]]}
                                      for t, v in row["texts"].items()}
    if args.served:
        figures["served_wiki_ppl"] = {
            {"auto": "bf16 cache"}.get(dt, dt): round(json.loads((Path(args.served) / f"ppl-{dt}.json").read_text())["ppl"], 3)
            for dt in KV_DTYPES}
    chat, chat0 = mine["chat"], original["chat"]
    figures["chat_answer_ppl_ratio"] = round(chat["answer_ppl"] / chat0["answer_ppl"], 4)
    figures["chat_top1"] = round(chat["top1"], 3)
    figures["chat_loops"] = f"{chat['loops']}/{chat['prompts']} (original {chat0['loops']}/{chat0['prompts']})"
    figures["recipe"] = args.recipe
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--checkpoint", action="append", required=True, help="LABEL=PATH (labels: original, r32, r16, ...)")
    e.add_argument("--references", default="data/chat/eval.jsonl")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--force", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("--served", help="JSON {row label: served Wikipedia PPL} from scripts/kv_options_server.sh runs")
    t.add_argument("--default", default="rebuild-r32-long-lw-e2e", help="label of the shipped default (marked in the table)")
    f = sub.add_parser("figures", help="a shipped delta's manifest figures (JSON for `thinkeys recovered make --figures`)")
    f.add_argument("--label", required=True, help="frontier eval label of the checkpoint the delta rebuilds")
    f.add_argument("--confidence", default="bench-results/quality/confidence", help="quality_confidence.py output folder")
    f.add_argument("--served", help="scripts/kv_options_server.sh output folder of that checkpoint")
    f.add_argument("--recipe", required=True, help="how the checkpoint was made, for people")
    f.add_argument("--out", required=True)
    args = parser.parse_args()
    {"eval": cmd_eval, "table": cmd_table, "figures": cmd_figures}[args.cmd](args)


if __name__ == "__main__":
    main()
