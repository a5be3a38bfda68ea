#!/usr/bin/env bash
# Container entrypoint (also runs as is on a host with the package installed): serve a model with
# thin keys through vLLM's OpenAI-compatible server, configured from environment variables.
#
#   THINKEYS_MODEL              model folder (read-only is fine)    default /models/SmolLM2-135M-Instruct
#   THINKEYS_RANK               thin-key rank r; 0 / stock = serve the model unconverted     default 32
#   THINKEYS_ROPE               how RoPE is carried into r dims (rebuild | mixed | pairs | svd) default rebuild
#   THINKEYS_CALIBRATION        text the conversion is calibrated on (required by mixed; used by
#                               rebuild and pairs when present): the tune split  default /data/wiki/tune.txt
#   THINKEYS_KV_CACHE_MEMORY    KV-cache budget, vLLM units (1G = 1 GiB, 512M = 512 MiB)     default 1G
#   THINKEYS_MAX_MODEL_LEN      context limit in tokens                                      default 2048
#   THINKEYS_HOST               address inside the container                                 default 0.0.0.0
#   THINKEYS_PORT               port inside the container                                    default 8000
#   THINKEYS_SERVED_MODEL_NAME  name clients put in "model"                                  default smollm2-thin
#   THINKEYS_API_KEY            if set, /v1 requests need "Authorization: Bearer <key>"      default unset
#   THINKEYS_BIND_ADDRESS       host address the port is published on; anything but loopback
#                               makes THINKEYS_API_KEY mandatory (refuses to start)         default 127.0.0.1
#   THINKEYS_RECOVERED          auto: apply the recovered weights shipped in the image for this
#                               rank and strategy (configs/recovered/: r32-rebuild, r16-rebuild, r32-mixed)
#                               when the model is their base, else convert; none: always convert
#                               (unrecovered); a path to a delta
#                               from `thinkeys recovered make`: apply it (must fit the model)  default auto
#   THINKEYS_CACHE_DIR          writable folder for conversions                             default /var/cache/thinkeys
#   THINKEYS_EXTRA_ARGS         more vLLM server flags, split on spaces                      default empty
#
# A source checkpoint (no "thin_keys" in its config.json) is converted once with `thinkeys convert`
# into THINKEYS_CACHE_DIR (the conversion is written to a temporary folder and renamed, so a
# container stopped half-way leaves nothing half-written) and served from there; the model volume
# itself is never written. A thin-key checkpoint is served as it is. Any argument given to this
# script goes to `thinkeys serve` after the flags above (e.g. --print-command to see the command).
set -euo pipefail

MODEL=${THINKEYS_MODEL:-/models/SmolLM2-135M-Instruct}
RANK=${THINKEYS_RANK:-32}
ROPE=${THINKEYS_ROPE:-rebuild}
CALIBRATION=${THINKEYS_CALIBRATION:-/data/wiki/tune.txt}
KV_CACHE_MEMORY=${THINKEYS_KV_CACHE_MEMORY:-1G}
MAX_MODEL_LEN=${THINKEYS_MAX_MODEL_LEN:-2048}
HOST=${THINKEYS_HOST:-0.0.0.0}
PORT=${THINKEYS_PORT:-8000}
SERVED_MODEL_NAME=${THINKEYS_SERVED_MODEL_NAME:-smollm2-thin}
CACHE_DIR=${THINKEYS_CACHE_DIR:-/var/cache/thinkeys}
RECOVERED=${THINKEYS_RECOVERED:-auto}
THINKEYS=${THINKEYS_BIN:-thinkeys}

die() { echo "thinkeys-entrypoint: error: $*" >&2; exit 2; }

[ -f "$MODEL/config.json" ] || die "$MODEL/config.json not found: mount the model folder (THINKEYS_MODELS_DIR on the host, \
fetched with \`thinkeys fetch --models-dir models\` or \`docker compose --profile setup run --rm fetch\`) and set THINKEYS_MODEL"

# The server runs as the image's unprivileged user: a file fetched or converted on the host as another
# user with mode 0600 would fail later with a misleading "No such file or directory".
for f in "$MODEL"/*; do
  [ -r "$f" ] || die "$f is not readable by uid $(id -u) in the container: make the model folder readable \
by others on the host (chmod -R a+rX on it)"
done

SERVE_MODEL=$MODEL
if grep -q '"thin_keys"' "$MODEL/config.json"; then
  echo "thinkeys-entrypoint: $MODEL is a thin-key checkpoint; serving it as it is (THINKEYS_RANK ignored)" >&2
elif [[ "$RANK" =~ ^(0|stock|none|)$ ]]; then
  echo "thinkeys-entrypoint: THINKEYS_RANK=$RANK: serving $MODEL unconverted (stock keys)" >&2
else
  [[ "$RANK" =~ ^[0-9]+$ ]] || die "THINKEYS_RANK=$RANK is not a number: give the key rank r (e.g. 32), or 0 for the stock model"
  RECOVERED_MODEL="$CACHE_DIR/$(basename "$MODEL")-thin-r$RANK-$ROPE-recovered"
  SERVE_MODEL="$CACHE_DIR/$(basename "$MODEL")-thin-r$RANK-$ROPE"
  DELTA=()
  case "$RECOVERED" in
    none) ;;
    auto) SHIPPED=$("$THINKEYS" recovered path "r$RANK-$ROPE" 2>/dev/null) && DELTA=("$SHIPPED") ;;  # none ships: convert
    *) [ -f "$RECOVERED" ] || die "THINKEYS_RECOVERED=$RECOVERED: no such delta file; use auto, none or a *.safetensors from \`thinkeys recovered make\`"
       RECOVERED_MODEL="$CACHE_DIR/$(basename "$MODEL")-$(basename "$RECOVERED" .safetensors)"
       DELTA=("$RECOVERED") ;;
  esac
  if [ ${#DELTA[@]} -gt 0 ]; then
    if [ ! -f "$RECOVERED_MODEL/config.json" ]; then
      mkdir -p "$CACHE_DIR" || die "cannot create THINKEYS_CACHE_DIR=$CACHE_DIR: mount a writable volume there"
      echo "thinkeys-entrypoint: applying recovered weights ${DELTA[0]} to $MODEL" >&2
      if ! "$THINKEYS" recovered apply "${DELTA[0]}" --base "$MODEL" --out "$RECOVERED_MODEL"; then
        [ "$RECOVERED" = auto ] || die "THINKEYS_RECOVERED=$RECOVERED does not apply to $MODEL (see above)"
        echo "thinkeys-entrypoint: no shipped recovered weights apply to $MODEL at r = $RANK $ROPE; serving its conversion (unrecovered)" >&2
      fi
    fi
    [ -f "$RECOVERED_MODEL/config.json" ] && SERVE_MODEL=$RECOVERED_MODEL
  fi
  CALIBRATE=()
  if [ -f "$CALIBRATION" ]; then
    CALIBRATE=(--calibration "$CALIBRATION")
  elif [ "$ROPE" = mixed ]; then
    die "THINKEYS_ROPE=mixed is calibrated on text, and $CALIBRATION is not there: mount the data folder \
(THINKEYS_DATA_DIR on the host, fetched with \`thinkeys fetch --data-dir data\`), set THINKEYS_CALIBRATION, or use THINKEYS_ROPE=pairs"
  fi
  if [ ! -f "$SERVE_MODEL/config.json" ] && [ "$SERVE_MODEL" != "$RECOVERED_MODEL" ]; then
    mkdir -p "$CACHE_DIR" || die "cannot create THINKEYS_CACHE_DIR=$CACHE_DIR: mount a writable volume there"
    echo "thinkeys-entrypoint: converting $MODEL to rank $RANK ($ROPE) into $SERVE_MODEL" >&2
    "$THINKEYS" convert "$MODEL" "$SERVE_MODEL" --rank "$RANK" --rope "$ROPE" ${CALIBRATE[@]+"${CALIBRATE[@]}"}
  fi
fi

# On the CPU build VLLM_CPU_KVCACHE_SPACE (whole GiB) would override --kv-cache-memory-bytes.
unset VLLM_CPU_KVCACHE_SPACE
# The key goes through the environment (vLLM reads VLLM_API_KEY), not the command line `ps` shows.
if [ -n "${THINKEYS_API_KEY:-}" ]; then export VLLM_API_KEY=$THINKEYS_API_KEY; fi

# Published beyond loopback, the server must not start without an API key (thinkeys serve refuses).
REQUIRE_KEY=()
case "${THINKEYS_BIND_ADDRESS:-127.0.0.1}" in
  127.0.0.1|::1|localhost) ;;
  *) REQUIRE_KEY=(--require-api-key) ;;
esac

read -r -a EXTRA <<< "${THINKEYS_EXTRA_ARGS:-}"
SERVE=("$THINKEYS" serve "$SERVE_MODEL" ${REQUIRE_KEY[@]+"${REQUIRE_KEY[@]}"}
  --host "$HOST" --port "$PORT"
  --served-model-name "$SERVED_MODEL_NAME"
  --kv-cache-memory-bytes "$KV_CACHE_MEMORY"
  --max-model-len "$MAX_MODEL_LEN"
  ${EXTRA[@]+"${EXTRA[@]}"} "$@")
case " $* " in *" --print-command "*) exec "${SERVE[@]}" ;; esac

# Not exec'd: vLLM's server exits with status 0 when its engine process dies, which Docker's restart
# policy (on-failure) takes for a clean stop. A stop asked for (SIGTERM from `docker stop`, Ctrl-C) is
# passed on and its status kept; an exit nobody asked for becomes status 1, so the container restarts.
STOP=""
trap 'STOP=1; kill -TERM "$SERVER" 2>/dev/null || true' TERM INT
"${SERVE[@]}" &
SERVER=$!
set +e
wait "$SERVER"; STATUS=$?
while kill -0 "$SERVER" 2>/dev/null; do wait "$SERVER"; STATUS=$?; done  # a trapped signal ends `wait` early
if [ "$STATUS" -eq 0 ] && [ -z "$STOP" ]; then
  echo "thinkeys-entrypoint: error: the server exited without being asked to (its engine process died); exit status 1" >&2
  exit 1
fi
exit "$STATUS"
