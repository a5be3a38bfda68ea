"""The load-test figure: throughput, queue and first-token latency against the number of users.

One line per server, so a stock and a thin-key server at the same KV budget read side by side: the
middle panel is the point of the comparison (where the server starts to keep users waiting), the
left one what that costs in throughput, the right one what a user feels (time to first token).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thinkeys.loadtest.report import LoadTestReport


def plot_report(report: "LoadTestReport", path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_queue, ax_ttft) = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, result in enumerate(report.results):
        color = colors[i % len(colors)]
        steps = sorted(result.steps, key=lambda s: s.users)
        n = [s.users for s in steps]
        label = result.target.label
        if result.target.kv_cache_tokens:
            label += f" ({result.target.kv_cache_tokens:,} KV tokens)"
        ax_tok.plot(n, [s.output_tok_s for s in steps], "o-", color=color, label=label)
        ax_queue.plot(n, [s.server.max_waiting for s in steps], "o-", color=color, label=f"{result.target.label}: waiting (max)")
        ax_queue.plot(n, [s.server.max_running for s in steps], "s--", color=color, alpha=0.6, label=f"{result.target.label}: running (max)")
        ax_ttft.plot(n, [s.ttft_ms.p95 / 1000 for s in steps], "o-", color=color, label=result.target.label)
        best = result.max_users_without_queue
        if best:
            for ax in (ax_tok, ax_queue, ax_ttft):
                ax.axvline(best, color=color, linestyle=":", linewidth=1.2)
            ax_queue.annotate(
                f"{result.target.label}: {best} users\nwith no one waiting",
                xy=(best, 0), xytext=(4, 18 + 26 * i), textcoords="offset points", color=color, fontsize=8,
            )
    w = report.workload
    ax_tok.set(title="Output throughput", xlabel="concurrent users N", ylabel="generated tokens / s")
    ax_queue.set(title="Server queue (vLLM /metrics)", xlabel="concurrent users N", ylabel="requests")
    ax_ttft.set(title="Time to first token, p95", xlabel="concurrent users N", ylabel="seconds")
    for ax in (ax_tok, ax_queue, ax_ttft):
        ax.grid(alpha=0.3)
        ax.set_xticks(w.users)
    ax_tok.legend(fontsize=8, loc="upper left")
    ax_queue.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"{w.prompt_len} prompt + {w.output_len} output tokens per request, {w.requests_per_user} requests per user"
        + (f"; {report.machine.cores}-core {report.machine.cpu}" if report.machine.cpu else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
