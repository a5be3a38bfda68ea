#!/bin/bash
# Perplexity (and the savings endpoint) through `thinkeys serve` for one thin checkpoint, with the
# float cache and the 8-bit caches, on the same text and windows as scripts/kv_options.py.
#
#   scripts/kv_options_server.sh [MODEL] [OUT]
#
# Writes OUT/ppl-<dtype>.json (`thinkeys eval ppl --server --json`) and OUT/savings-<dtype>.json
# (/v1/thinkeys/savings); one server at a time on 127.0.0.1:8765 with 1 GiB of KV cache.
set -u
cd "$(dirname "$0")/.."
M=${1:-models/SmolLM2-135M-Instruct-thin-r32-mixed-ft}
OUT=${2:-bench-results/kv-options/server}
mkdir -p "$OUT"
for DT in auto int8_per_token_head fp8; do
  VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/thinkeys serve "$M" --host 127.0.0.1 --port 8765 --served-model-name thin32 \
    --max-model-len 4096 --enforce-eager --kv-cache-dtype "$DT" > "$OUT/server-$DT.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do curl -sf http://127.0.0.1:8765/health > /dev/null && break; sleep 2; done
  .venv/bin/thinkeys eval ppl --server http://127.0.0.1:8765 --served-model thin32 --tokenizer "$M" \
    --text data/wiki/eval.txt --max-tokens 2048 --window 512 --json > "$OUT/ppl-$DT.json"
  curl -s http://127.0.0.1:8765/v1/thinkeys/savings > "$OUT/savings-$DT.json"
  kill -TERM "$PID"; wait "$PID"
  rm -f "$OUT/server-$DT.log"
done
