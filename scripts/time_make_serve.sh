#!/usr/bin/env bash
# Time `make serve` from a fresh clone, phase by phase: environment, fetch + convert, server ready.
# Usage: scripts/time_make_serve.sh [OUT_JSON]   (default bench-results/startup/make_serve.json)
# Runs in a scratch clone of this repository's HEAD; stops the server it started.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
out=$(realpath -m "${1:-$repo/bench-results/startup/make_serve.json}")  # absolute: the script runs in a scratch clone
port=${PORT:-8123}
work=$(mktemp -d)
trap 'kill -- -$server_pid 2>/dev/null || true; rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
now() { date +%s.%N; }
t0=$(now)
make setup >"$work/setup.log" 2>&1
t1=$(now)
make convert >"$work/convert.log" 2>&1
t2=$(now)
# its own process group (kill -- -PID stops vLLM's engine processes too) in this session: a server in a
# session of its own can starve this script of CPU (see own_process_group in plugin/thinkeys/loadtest/servers.py)
set -m
make serve PORT="$port" >"$work/serve.log" 2>&1 &
server_pid=$!
set +m
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  kill -0 $server_pid 2>/dev/null || { tail -40 "$work/serve.log"; exit 1; }
  sleep 1
done
t3=$(now)
mkdir -p "$(dirname "$out")"
python3 - "$out" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, platform, os, sys
out, t0, t1, t2, t3 = sys.argv[1], *map(float, sys.argv[2:])
r = {
    "setup_s": round(t1 - t0, 1), "fetch_and_convert_s": round(t2 - t1, 1),
    "server_ready_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1),
    "machine": f"{os.cpu_count()} vCPU {platform.machine()}, {platform.python_version()}",
}
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r))
PY
