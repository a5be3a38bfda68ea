"""``thinkeys loadtest``: concurrent simulated users against OpenAI-compatible servers.

``thinkeys loadtest run [--url http://127.0.0.1:8000] --users 1,2,4,8``
    ramps N users against one server and reports, per N, completed / failed requests, output
    tokens/s, TTFT and TPOT p50/p95 and the server's running / waiting requests and preemptions.

``thinkeys loadtest compare --stock MODEL|URL --thin MODEL|URL [--thin ...] --kv-cache-memory 72M``
    the same ramp against a stock and a thin-key server (started here on 127.0.0.1 with the same KV
    budget and flags when given model folders, or already running when given URLs), side by side:
    the largest N served with no request waiting, and throughput at each N.

``thinkeys loadtest report RESULT.json``
    prints the table of a finished run again and redraws its ``.md`` and ``.png``.

``run`` and ``compare`` write ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``--out``. Every run is bounded:
``--requests-per-user`` per user and ``--time-limit`` seconds per step (requests still running then
are cancelled and counted). Only the URLs given are contacted; the default is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp

from thinkeys.checkpoint import ThinKeyError
from thinkeys.loadtest.report import LoadTestReport, TargetResult, compare_table, single_table, write_report
from thinkeys.loadtest.target import DEFAULT_URL, discover

DEFAULT_OUT = Path("bench-results/loadtest")


def _users(text: str) -> list[int]:
    try:
        users = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give user counts as a comma list, e.g. 1,2,4,8") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every user count must be >= 1")
    return users


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload (every run is bounded by request count and time)")
    g.add_argument("--users", type=_users, default=[1, 2, 4, 8], help="concurrent users per step, a comma list (default 1,2,4,8)")
    g.add_argument("--requests-per-user", type=int, default=2, help="requests each user sends one after another (default 2)")
    g.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (default 256)")
    g.add_argument("--output-len", type=int, default=128, help="generated tokens per request, EOS ignored (default 128)")
    g.add_argument("--api", choices=("completions", "chat"), default="completions", help="endpoint: /v1/completions or /v1/chat/completions")
    g.add_argument("--time-limit", type=float, default=120.0, help="seconds per step; requests still running then are cancelled (default 120)")
    g.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the server to go idle between steps (default 60)")
    g.add_argument("--metrics-interval", type=float, default=0.25, help="seconds between /metrics samples (default 0.25)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for <name>.json/.md/.png (default {DEFAULT_OUT})")
    o.add_argument("--name", help="file name stem (default: loadtest / compare)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="the servers' API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--tokenizer", help="local tokenizer folder for the prompts (default: the model folder the server reports, if it is on this machine)")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    sub = parser.add_subparsers(dest="loadtest_command", metavar="MODE", required=True)

    run = sub.add_parser("run", help="ramp N users against one server")
    run.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    run.add_argument("--model", help="served model name (default: the first one in /v1/models)")
    run.add_argument("--label", help="name of this server in the report (default: the served model name)")
    run.add_argument(
        "--metrics-url",
        action="append",
        help="a /metrics URL to sample (repeat for every replica behind a load balancer; default: URL/metrics)",
    )
    _add_client_args(run)
    _add_workload_args(run)

    cmp = sub.add_parser("compare", help="the same ramp against a stock and a thin-key server, side by side")
    cmp.add_argument("--stock", required=True, help="stock model folder (started here) or URL of a running server")
    cmp.add_argument("--thin", action="append", required=True, help="thin-key model folder or URL (repeat to compare several ranks)")
    s = cmp.add_argument_group("servers started here (model folders)")
    s.add_argument("--kv-cache-memory", help="KV-cache budget of every started server, e.g. 72M (MiB), 1G (GiB); required when starting")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit of started servers (default: prompt + output, rounded up to 256)")
    s.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="per-step token budget of started servers (default: max users x (prompt + 1), at least 2048, so that a "
        "burst of N prompts is admitted at once and waiting means waiting for KV memory)",
    )
    s.add_argument("--server-arg", action="append", default=[], metavar="FLAG", help="extra vLLM flag for every started server, e.g. --server-arg=--enforce-eager")
    s.add_argument("--log-dir", type=Path, default=None, help="server logs (default: <out>/logs)")
    s.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for started servers (default 900)")
    _add_client_args(cmp)
    _add_workload_args(cmp)

    rep = sub.add_parser("report", help="print and redraw (.md, .png) the results of an earlier run from its JSON")
    rep.add_argument("json", type=Path, help="a <name>.json written by run or compare")


def _workload(args: argparse.Namespace):
    from pydantic import ValidationError

    from thinkeys.loadtest.ramp import Workload

    try:
        return Workload(
            users=args.users,
            requests_per_user=args.requests_per_user,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            api=args.api,
            time_limit_s=args.time_limit,
            seed=args.seed,
            metrics_interval_s=args.metrics_interval,
            drain_timeout_s=args.drain_timeout,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'workload'}: {e['msg']}" for e in exc.errors())
        raise ThinKeyError(f"invalid workload ({problems})") from None


def _api_key(args: argparse.Namespace) -> str | None:
    import os

    return args.api_key or os.environ.get("OPENAI_API_KEY") or None


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


async def _run_targets(specs: list[dict], workload, *, progress: bool) -> list[TargetResult]:
    from thinkeys.loadtest.ramp import run_ramp

    async with aiohttp.ClientSession(trust_env=False) as session:
        targets = [await discover(session, **spec) for spec in specs]
    results = []
    for target in targets:
        results.append(TargetResult(target=target, steps=await run_ramp(target, workload, progress=progress)))
    return results


def _finish(report: LoadTestReport, args: argparse.Namespace, stem: str) -> int:
    paths = write_report(report, args.out, args.name or stem)
    print(compare_table(report) if len(report.results) > 1 else single_table(report.results[0]))
    print()
    for line in report.summary_lines():
        print(line)
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def run_single(args: argparse.Namespace) -> int:
    workload = _workload(args)
    print(f"thinkeys loadtest: {workload.total_requests} requests in {len(workload.users)} steps, at most {workload.max_seconds:.0f} s")
    spec = dict(url=args.url, label=args.label, model=args.model, tokenizer=args.tokenizer, api_key=_api_key(args), metrics_urls=args.metrics_url)
    results = asyncio.run(_run_targets([spec], workload, progress=not args.no_progress))
    return _finish(LoadTestReport(workload=workload, results=results), args, "loadtest")


def _labels(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(label, model or URL)`` for the stock server and every thin one."""
    from thinkeys.checkpoint import ThinKeyConfig

    labelled = [("stock", args.stock)]
    for i, thin in enumerate(args.thin):
        label = "thin" if len(args.thin) == 1 else f"thin-{i + 1}"
        if not _is_url(thin):
            config = ThinKeyConfig.from_pretrained(thin)  # also: a clear error if it is not a thin-key checkpoint
            label = f"thin-r{config.rank}" if len(args.thin) > 1 else "thin"
        labelled.append((label, thin))
    if len({label for label, _ in labelled}) != len(labelled):
        raise ThinKeyError(f"two servers would have the same label {[l for l, _ in labelled]}: compare different ranks or pass URLs")
    return labelled


def run_compare(args: argparse.Namespace) -> int:
    from thinkeys.loadtest.servers import start_servers

    workload = _workload(args)
    labelled = _labels(args)
    to_start = [(label, model) for label, model in labelled if not _is_url(model)]
    for label, model in to_start:
        if not Path(model).is_dir():
            raise ThinKeyError(f"--{label.split('-')[0]} {model}: no such model folder (or give a server URL, http://...)")
    if to_start and not args.kv_cache_memory:
        raise ThinKeyError("starting servers needs --kv-cache-memory (the same KV budget for all, e.g. 72M or 1G)")
    extra = list(args.server_arg)
    if not any(a.startswith("--max-num-batched-tokens") for a in extra):
        budget = args.max_num_batched_tokens or max(2048, max(workload.users) * (workload.prompt_len + 1))
        extra += ["--max-num-batched-tokens", str(budget)]
    max_model_len = args.max_model_len or -(-(workload.prompt_len + workload.output_len + 8) // 256) * 256
    print(
        f"thinkeys loadtest compare: {', '.join(l for l, _ in labelled)}; {workload.total_requests} requests per server "
        f"in {len(workload.users)} steps, at most {workload.max_seconds:.0f} s per server"
    )
    log_dir = args.log_dir or args.out / "logs"
    with start_servers(
        to_start, kv_cache_memory=args.kv_cache_memory or "", max_model_len=max_model_len, extra_args=extra,
        log_dir=log_dir, startup_timeout_s=args.startup_timeout,
    ) as servers:
        started = {s.label: s.base_url for s in servers}
        specs = [
            dict(url=started.get(label, model), label=label, tokenizer=args.tokenizer, api_key=_api_key(args))
            for label, model in labelled
        ]
        results = asyncio.run(_run_targets(specs, workload, progress=not args.no_progress))
    return _finish(LoadTestReport(workload=workload, results=results), args, "compare")


def run_report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        report = LoadTestReport.model_validate_json(args.json.read_text())
    except (OSError, ValidationError) as exc:
        raise ThinKeyError(f"{args.json}: not a load-test result ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    args.out, args.name = args.json.parent, args.json.stem
    return _finish(report, args, args.json.stem)


@contextlib.contextmanager
def _exit_on_sigterm():
    """While a run lasts, SIGTERM/SIGHUP raise SystemExit, so that started servers are stopped by their ``finally``.

    (SIGINT already raises KeyboardInterrupt, unless a non-interactive shell started us in the
    background, which makes it ignored: then SIGTERM is the way to stop a run.)
    """

    def handler(signum, frame):  # noqa: ARG001
        sys.exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    with _exit_on_sigterm():
        if args.loadtest_command == "compare":
            return run_compare(args)
        if args.loadtest_command == "report":
            return run_report(args)
        return run_single(args)
