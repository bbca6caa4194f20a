#!/usr/bin/env bash
# serving.sh — the serving and speculation figures of issue 12:
#   1. `tessera serve` on the 100M Q8_0 shape (12 layers, n_embd 768, 12 heads, n_ff 2048,
#      vocab 32000), 64 tokens per request, throughput at concurrency 16 vs 1 with
#      ops/loadgen.py (aim: >= 4x), and with build/tests/bench_batch (when the tests are
#      built) the same ratio for the forward pass alone, its ceiling;
#   2. `tessera bench --verify-cost` on the 1B Q8_0 shape: one step of k+1 tokens / one
#      step of 1 token (aim: k=4 <= 1.3);
#   3. `tessera bench --spec oracle` on 1B Q8_0: greedy decode of 256 tokens with the oracle
#      drafter (every draft accepted) vs without, the ceiling of speculation (aim: >= 2.5x).
#
#   ops/bench/serving.sh [-t THREADS] [-r REPS] [--quick] [--spec-only] [--cache DIR]
#
#   -t, --threads N   threads of the server and of the benches (default: all cores)
#   -r, --reps N      repetitions of each figure; medians are printed (default 3)
#       --quick       -r 1 and fewer requests (a smoke run)
#       --spec-only   only figures 2 and 3 (verify cost, oracle ceiling): no server
#       --cache DIR   where the benchmark models are kept (default $TSR_BENCH_CACHE or
#                     ~/.cache/tessera; shared with compare.sh)
#
# TSR_Q80_ORDER=lanes in the environment runs every figure in the opt-in lanes order of
# Q8_0 (kernels/q80_lanes.h, `--q8-order lanes`): the server, bench_batch and bench all
# read it; the first line says which order ran.
#
# Run it under `flock /work/bench.lock` on a shared machine; it prints `uptime` before and
# after. Needs build/tessera and /usr/bin/python3 with python3-grpcio (ops/loadgen.py).
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=$(nproc)
REPS=3
N16=64 # requests at concurrency 16
N1=8   # requests at concurrency 1
SPEC_ONLY=0
CACHE="${TSR_BENCH_CACHE:-$HOME/.cache/tessera}"
while [ $# -gt 0 ]; do
    case "$1" in
    -t | --threads) THREADS="$2"; shift 2 ;;
    -r | --reps) REPS="$2"; shift 2 ;;
    --quick) REPS=1; N16=32; N1=4; shift ;;
    --spec-only) SPEC_ONLY=1; shift ;;
    --cache) CACHE="$2"; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "serving.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$THREADS" "$REPS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "serving.sh: -t and -r take a positive integer, got '$v'" >&2; exit 2; }
done
TSR=build/tessera
[ -x "$TSR" ] || { echo "serving.sh: $TSR is missing; run ops/build.sh release first" >&2; exit 1; }
VOCAB=../shared/models/vocab/ggml-vocab-llama-spm.gguf
mk() { # name mkmodel-shape-flags... -> path
    local f="$CACHE/bench-models/$1.gguf"
    shift
    if [ ! -f "$f" ]; then
        [ -f "$VOCAB" ] || { echo "serving.sh: $VOCAB is missing (the models folder)" >&2; exit 1; }
        mkdir -p "$CACHE/bench-models"
        echo "serving.sh: making $f" >&2
        "$TSR" mkmodel -o "$f.tmp" --vocab-from "$VOCAB" "$@" >&2
        mv "$f.tmp" "$f"
    fi
    echo "$f"
}
M100=$(mk 100m-Q8_0 --n-layer 12 --n-embd 768 --n-head 12 --n-ff 2048 --type Q8_0)
M1B=$(mk 1b-Q8_0 --n-layer 16 --n-embd 2048 --n-head 32 --n-head-kv 8 --n-ff 8192 --type Q8_0)

LOG=$(mktemp -d)
SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$LOG"; }
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "serving.sh: tessera $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $THREADS threads, medians of $REPS, Q8_0 order ${TSR_Q80_ORDER:-ggml} (TSR_Q80_ORDER)"
echo "uptime before: $(uptime)"

# ---- 1. serving throughput, concurrency 16 vs 1 ----
if [ "$SPEC_ONLY" = 0 ]; then
"$TSR" serve -m "$M100" -t "$THREADS" --listen 127.0.0.1:0 2>"$LOG/serve" &
SERVER=$!
ADDR=
for _ in $(seq 400); do
    ADDR=$(grep -o 'listening on [^ ]*' "$LOG/serve" 2>/dev/null | awk '{print $3}') || true
    [ -n "$ADDR" ] && break
    kill -0 "$SERVER" 2>/dev/null || { echo "serving.sh: tessera serve exited:" >&2; cat "$LOG/serve" >&2; exit 1; }
    sleep 0.05
done
[ -n "$ADDR" ] || { echo "serving.sh: no 'listening on' from tessera serve in 20 s" >&2; cat "$LOG/serve" >&2; exit 1; }
loadgen() { # concurrency requests -> tokens/s
    /usr/bin/python3 ops/loadgen.py --target "$ADDR" -c "$1" -n "$2" --max-tokens 64 \
        --ignore-eos >"$LOG/lg" 2>&1 || { echo "serving.sh: loadgen failed:" >&2; cat "$LOG/lg" >&2; exit 1; }
    grep -q 'requests: *[0-9]* ok, 0 failed' "$LOG/lg" ||
        { echo "serving.sh: some requests failed:" >&2; cat "$LOG/lg" >&2; exit 1; }
    sed -n 's/^throughput: *\([0-9.]*\).*/\1/p' "$LOG/lg"
}
loadgen 4 8 >/dev/null # warm-up: fault the weights in, start the engine
T1=() T16=()
for _ in $(seq "$REPS"); do
    T1+=("$(loadgen 1 "$N1")")
    T16+=("$(loadgen 16 "$N16")")
done
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
SERVER=
t1=$(printf '%s\n' "${T1[@]}" | median)
t16=$(printf '%s\n' "${T16[@]}" | median)
echo
echo "serving, 100M Q8_0, 64 tokens per request (ops/loadgen.py, gRPC):"
printf '  concurrency  1: %8.1f tok/s   (%s)\n' "$t1" "${T1[*]}"
printf '  concurrency 16: %8.1f tok/s   (%s)\n' "$t16" "${T16[*]}"
printf '  ratio c16/c1:   %8.2f x       (aim >= 4)\n' "$(echo "$t16 $t1" | awk '{print $1/$2}')"
# The forward pass alone (no gRPC, scheduler, sampling, nor the load generator sharing the
# cores): a step of 16 sequences against one of 1, interleaved, each after 1 s of untimed
# steps of its own width (bench_batch -w), when the tests are built.
BB=build/tests/bench_batch
if [ -x "$BB" ]; then
    BR=()
    for _ in $(seq "$REPS"); do
        "$BB" -m "$M100" -t "$THREADS" -s 16 -r 9 >"$LOG/bb" 2>&1 ||
            { echo "serving.sh: bench_batch failed:" >&2; cat "$LOG/bb" >&2; exit 1; }
        BR+=("$(sed -n 's/^ *throughput ratio *\([0-9.]*\).*/\1/p' "$LOG/bb")")
    done
    printf '  engine ceiling: %8.2f x       (%s; bench_batch: 16 x t(1 seq) / t(16 seqs), forward pass only)\n' \
        "$(printf '%s\n' "${BR[@]}" | median)" "${BR[*]}"
fi
fi

# ---- 2. verify cost, 3. oracle ceiling (1B Q8_0) ----
VC=() OR=() PL=() SP=()
for _ in $(seq "$REPS"); do
    "$TSR" bench -m "$M1B" -t "$THREADS" -p 128 -n 8 -r 1 --verify-cost --json >"$LOG/vc" 2>"$LOG/err" ||
        { echo "serving.sh: tessera bench --verify-cost failed:" >&2; cat "$LOG/err" >&2; exit 1; }
    VC+=("$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))["verify_cost"]; print(v["k1"], v["k2"], v["k4"], v["k8"], v["step_1_token_ms"])' "$LOG/vc")")
    # 256 tokens: a sequence's draft length starts at 2 and grows by one a fully accepted
    # step (coordinator/engine.c, spec_adapt), so its first two steps verify 3 and 4 tokens,
    # not 5; over 64 tokens they are 2 of 14 steps (4.50 tokens a step, ~10 % under the
    # steady state the ceiling means), over 256 2 of 52 (4.90).
    "$TSR" bench -m "$M1B" -t "$THREADS" -p 32 -n 256 -r 1 --spec oracle --json >"$LOG/or" 2>"$LOG/err" ||
        { echo "serving.sh: tessera bench --spec oracle failed:" >&2; cat "$LOG/err" >&2; exit 1; }
    OR+=("$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))["speculation"]; print(v["speedup"], v["decode_tokens_per_s_plain"], v["decode_tokens_per_s_spec"], v["mean_accepted_length"])' "$LOG/or")")
done
col() { printf '%s\n' "${@:2}" | awk -v c="$1" '{print $c}' | median; }
echo
echo "speculation, 1B Q8_0 (tessera bench):"
printf '  verify cost (step of k+1 tokens / step of 1, %.1f ms): k=1 %.2f  k=2 %.2f  k=4 %.2f  k=8 %.2f   (aim k=4 <= 1.3)\n' \
    "$(col 5 "${VC[@]}")" "$(col 1 "${VC[@]}")" "$(col 2 "${VC[@]}")" "$(col 3 "${VC[@]}")" "$(col 4 "${VC[@]}")"
printf '  oracle ceiling (k=4, every draft accepted, 256 tokens): %.2f x  (%.2f -> %.2f tok/s, %.2f tokens per step)   (aim >= 2.5)\n' \
    "$(col 1 "${OR[@]}")" "$(col 2 "${OR[@]}")" "$(col 3 "${OR[@]}")" "$(col 4 "${OR[@]}")"
echo "uptime after:  $(uptime)"
