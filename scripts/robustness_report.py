"""Run the robustness tests and write their figures to bench-results/robustness/ (README.md + results.jsonl).

    python scripts/robustness_report.py            # runs the tests (~5-10 min on 2 cores), then writes
    python scripts/robustness_report.py --render   # re-renders README.md from the last results.jsonl
    python scripts/robustness_report.py tests/test_bad_requests.py   # reruns some; keeps the other figures

The figures are what the tests themselves measured and asserted on (tests/robustness.py:record),
so the README never shows a number the suite did not check. The run fails (and writes nothing)
when any test fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-results" / "robustness"
TESTS = [
    "tests/test_overload.py",
    "tests/test_client_faults.py",
    "tests/test_bad_requests.py",
    "tests/test_bad_checkpoints.py",
    "tests/test_convert_interrupt.py",
]


def run_tests(record_path: Path, tests: list[str]) -> None:
    env = {**os.environ, "THINKEYS_ROBUSTNESS_RECORD": str(record_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"robustness tests failed (exit {done.returncode}); nothing written")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render(records: list[dict]) -> str:
    by = defaultdict(list)
    for r in records:
        by[r["topic"]].append(r)
    out = ["## Robustness: overload, faults and bad input", ""]
    out += [
        "Measured by the robustness tests on tiny random-weight Llamas (2 layers, 2 KV heads, d = 32; thin r = 8), "
        "served by `thinkeys serve` as real HTTP servers on a 2-core CPU machine. Reproduce with "
        "`python scripts/robustness_report.py` (it runs the tests and rewrites this section from what they measured).",
        "",
    ]
    if by["overload"]:
        cap = by["capacity"][0] if by["capacity"] else {}
        out += [
            "### Overload: 4N streaming users on a KV budget that holds N",
            "",
            f"KV budget `--kv-cache-memory-bytes {cap.get('kv_cache_memory', '?')}` (1 MiB) per server, max_model_len {cap.get('max_model_len', '?')}; every user "
            "asks for the whole context (prompt + max_tokens = max_model_len) and streams; the server has the API key on.",
            "",
        ]
        rows = [
            [r["model"], r["users_held"], r["users_offered"], r["completed"], r["failed"], r["short"], int(r["engine_errors"]),
             int(r["peak_running"] or 0), int(r["peak_waiting"] or 0), int(r["preemptions"]), f"{r['peak_kv_usage']:.0%}",
             f"{r['kv_usage_after']:.0%}", f"{r['unhealthy_polls']} of {r['health_polls']}", r["seconds"]]
            for r in by["overload"]
        ]  # fmt: skip
        out += _table(
            ["model", "users held (N)", "offered (4N)", "completed", "failed", "short", "engine errors", "peak running",
             "peak waiting", "preemptions", "peak KV use", "KV use after", "unhealthy /health polls", "seconds"],
            rows,
        )  # fmt: skip
        out += ["", "Nothing failed or was cut short: vLLM queued the users it could not place and preempted "
                "(recomputed) running ones when blocks ran out. The same memory holds more thin-key users.", ""]
    if by["client_faults"]:
        r = by["client_faults"][0]
        out += ["### Client faults", "", "Five faulty clients at once, next to three well-behaved streaming users:", ""]
        out += _table(["fault", "what the client did"], [[k, v] for k, v in r["faults"].items()])
        out += [
            "",
            f"Afterwards (silent sockets still open): vLLM KV use {r['kv_usage_after']:.0%}, our savings endpoint listed "
            f"{r['active_users_after']} active users and vLLM {int(r['engine_errors'])} errors; the three clients that left were "
            f"aborted ({r['departed_tokens']} tokens generated for them, against {r['departed_tokens_if_not_aborted']} had they "
            "run to max_tokens); "
            f"{r['good_users_identical']} of {r['good_users']} good users got exactly the text "
            f"they get alone ({r['good_users_complete']} of {r['good_users']} ran to max_tokens). Nothing was lost.",
            "",
        ]
    if by["bad_requests"]:
        cases = by["bad_requests"][0]["cases"]
        out += ["### Bad requests: hand-picked", ""]
        out += _table(["request", "route", "status", "reason given"],
                      [[k, v["path"], v["status"], v.get("reason", "")] for k, v in cases.items()])  # fmt: skip
        out += [""]
    if by["schemathesis"]:
        r = by["schemathesis"][0]
        out += [
            "### Bad requests: property-based (schemathesis)",
            "",
            f"schemathesis {r['version']} over the served OpenAPI schema, {r['max_examples']} schema-valid and "
            f"{r['max_examples']} schema-violating examples per operation (derandomized): **{r['cases']} requests, "
            f"{r['server_errors']} server errors (5xx)**.",
            "",
        ]
        out += _table(["operation (mode)", "responses by status"],
                      [[op, ", ".join(f"{k}: {v}" for k, v in counts.items())] for op, counts in r["by_operation"].items()])  # fmt: skip
        reasons = r.get("top_reasons") or {}
        if reasons:
            out += ["", "Most frequent 4xx reasons per operation (what the generated requests ran into):", ""]
            out += _table(["operation (mode)", "reason (count)"],
                          [[op, "; ".join(f"{k} ({v})" for k, v in rs.items())] for op, rs in reasons.items()])  # fmt: skip
        for op, examples in (r.get("python_errors") or {}).items():
            for reason, request in examples.items():
                shown = request if len(request) <= 400 else request[:400] + " ...(cut)"
                out += ["", f"- {op}: answered 400 with a Python exception's text, `{reason}`, first for `{shown}`. "
                        "Minimal form: the hand-picked 'harmony-shaped chat message' above; vLLM's chat message union "
                        "admits openai_harmony's `Message` shape and its chat-template path then indexes it like a dict. "
                        "Not a 5xx and the server stays up, but the reason is vLLM's internal error text."]
        for failure in r["failures"]:
            out += ["", f"- 5xx: `{failure['request']}` -> {failure['response']}"]
        out += [""]
    if by["bad_checkpoints"]:
        out += ["### Bad checkpoints and settings at load time", "",
                "`thinkeys serve` refuses before vLLM starts, with one line naming the file and the field, exit code 2 "
                "(CKPT = the checkpoint folder):", ""]
        out += _table(["broken", "exit", "the one line"], [[r["case"], r["exit_code"], f"`{r['message']}`"] for r in by["bad_checkpoints"]])
        out += [""]
    if by["api_key"]:
        out += ["### API key", "", "Server started with `VLLM_API_KEY` and `--require-api-key`:", ""]
        out += _table(["route", "answer"], [[k, v] for k, v in by["api_key"][0]["routes"].items()])
        out += [""]
    if by["convert_interrupt"]:
        out += ["### Interrupted conversions", "", "`thinkeys convert` signalled at a chosen phase:", ""]
        out += _table(["signal", "phase", "over an existing conversion (--force)", "exit", "left behind"],
                      [[c["signal"], c["phase"], c["over_existing"], c["exit_code"], c["left_behind"]]
                       for c in by["convert_interrupt"][0]["cases"]])  # fmt: skip
        out += [""]
    out += [
        "### Not covered here",
        "",
        "- `thinkeys finetune` interrupt and resume (issue 8 tests it).",
        "- SIGKILL of `thinkeys convert`: the destination never appears, but the hidden `.DST.tmp-*` folder stays "
        "(no handler can run).",
        "- Checks run in `thinkeys serve` (and the container, which calls it); starting vLLM's server directly with "
        "`VLLM_PLUGINS=thinkeys` skips them.",
        "",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", help=f"test files to rerun (default: all of {', '.join(TESTS)})")
    parser.add_argument("--render", action="store_true", help="only re-render README.md from results.jsonl")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / "results.jsonl"

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    records = read(results)
    if not args.render:
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp) / "results.jsonl"
            run_tests(record, args.tests or TESTS)
            fresh = read(record)
        # A partial rerun replaces the topics it measured and keeps the others.
        topics = {r["topic"] for r in fresh}
        records = fresh if not args.tests else [r for r in records if r["topic"] not in topics] + fresh
        results.write_text("".join(json.dumps(r) + "\n" for r in records))
    (OUT / "README.md").write_text(render(records))
    print(f"wrote {OUT / 'README.md'} from {len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
