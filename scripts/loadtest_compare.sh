#!/usr/bin/env bash
# The README's load-test figure: stock SmolLM2-135M-Instruct vs its thin-key conversions at r = 32
# (the rank `make serve` serves) and r = 16 (d/4), all three served by `thinkeys serve` on
# 127.0.0.1 with the SAME small KV budget, the same ramp of concurrent users against each.
# The conversions use the data-free 'pairs' strategy: the KV cache holds r-wide keys whatever the
# strategy ('mixed', the default of `make serve`, has the same geometry), and this run measures
# capacity under load, not quality.
#
#   scripts/loadtest_compare.sh   # writes bench-results/loadtest/compare.{json,md,png}; 43 min on a busy
#                                 # 2-core machine (3 server starts + 3 ramps of 7 steps), less when idle
#
# The KV budget is chosen so the stock server saturates at a modest N. SmolLM2 keeps 30 layers x
# 3 KV heads x (64 + 64) x bf16 = 22.5 KiB of KV per token; with blocks of 32 tokens, 18 MiB holds
# 25 blocks (vLLM keeps one back). A request of 70 prompt + 20 generated tokens takes 3 blocks from
# admission to its end, so stock holds 8 users at once, r = 32 (16.9 KiB per token) 33 blocks =
# 11 users, r = 16 (14.1 KiB) 39 blocks = 13 users (`thinkeys plan models/SmolLM2-135M-Instruct
# --rank 16 --context 96 --kv-memory 18MiB --block-size 32`). The ramp brackets those points.
# Small requests and a small budget keep the run within minutes on 2 shared cores; the ratio of
# users is set by bytes per token, not by request size.
# Servers run eager (--enforce-eager, the same for all three): torch.compile's warm-up of three
# servers at once took over 10 minutes on 2 shared cores, and the comparison is about capacity.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODELS=${MODELS:-models}
SRC=$MODELS/SmolLM2-135M-Instruct
KV=${KV:-18M}
USERS=${USERS:-4,8,9,11,12,13,14}
OUT=${OUT:-bench-results/loadtest}

[ -f "$SRC/config.json" ] || "$BIN/thinkeys" fetch --models-dir "$MODELS" --only model
for r in 32 16; do
  dst=$MODELS/SmolLM2-135M-Instruct-thin-r$r-pairs
  [ -f "$dst/config.json" ] || "$BIN/thinkeys" convert "$SRC" "$dst" --rank "$r" --rope pairs
done

exec "$BIN/thinkeys" loadtest compare \
  --stock "$SRC" \
  --thin "$MODELS/SmolLM2-135M-Instruct-thin-r32-pairs" \
  --thin "$MODELS/SmolLM2-135M-Instruct-thin-r16-pairs" \
  --kv-cache-memory "$KV" \
  --users "$USERS" --requests-per-user 2 --prompt-len 70 --output-len 20 \
  --server-arg=--enforce-eager --server-arg=--block-size=32 \
  --time-limit 180 --out "$OUT" --name compare --log-dir "${LOG_DIR:-bench-results/tmp/loadtest-logs}" \
  "$@"
