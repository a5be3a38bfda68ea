#!/usr/bin/env bash
# The README's load-test figure: stock SmolLM2-135M-Instruct vs its thin-key conversions at r = 32
# (the default served model, `make serve`) and r = 16 (d/4), all three served by `thinkeys serve`
# on 127.0.0.1 with the SAME small KV budget, the same ramp of concurrent users against each.
#
#   scripts/loadtest_compare.sh            # ~15-25 min on 2 cores; writes bench-results/loadtest/compare.*
#
# The KV budget is chosen so the stock server saturates at a modest N: 72 MiB holds 25 blocks of
# 128 tokens of SmolLM2 KV (30 layers x 3 KV heads x (64 + 64) x bf16 = 22.5 KiB per token); one
# request (280 prompt + 96 generated tokens) takes 3 blocks from admission to the end, so stock
# holds 8 users, r = 32 holds 11 and r = 16 holds 13 (`thinkeys plan models/SmolLM2-135M-Instruct
# --rank 16 --context 384 --kv-memory 72MiB --block-size 128`; vLLM keeps one block back).
# The ramp brackets those points.
# Servers run eager (--enforce-eager, the same for all three): torch.compile's warm-up of three
# servers at once took over 10 minutes on 2 shared cores, and the comparison is about capacity.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODELS=${MODELS:-models}
SRC=$MODELS/SmolLM2-135M-Instruct
KV=${KV:-72M}
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
  --users "$USERS" --requests-per-user 2 --prompt-len 280 --output-len 96 \
  --server-arg=--enforce-eager \
  --time-limit 240 --out "$OUT" --name compare --log-dir "${LOG_DIR:-bench-results/tmp/loadtest-logs}" \
  "$@"
