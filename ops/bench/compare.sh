#!/usr/bin/env bash
# compare.sh — Tessera against llama.cpp's llama-bench on the same GGUF files, same threads.
#
#   ops/bench/compare.sh [-t THREADS] [-r REPS] [-n GEN] [-d DEPTH] [-m MODELS] [--quick] [--cache DIR]
#
#   -t, --threads LIST  comma-separated thread counts (default: all cores)
#   -r, --reps N        repetitions, interleaved Tessera / llama.cpp (default 5)
#   -n, --gen N         decode tokens per repetition (default 32)
#   -d, --depth N       also decode GEN tokens after N positions: Tessera `bench -p N -n GEN`
#                       beside `llama-bench -p 0 -n GEN -d N` (rows tgGEN@dN; attention and
#                       the KV cache weigh there, not at an empty context)
#   -m, --models LIST   comma-separated, from q8_0, q4_0, q4_k_m (the 1B shape: n_embd 2048,
#                       16 layers, 32/8 heads, n_ff 8192, vocab 32000, made with
#                       `tessera mkmodel`), qwen (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M-ish
#                       real model via ops/fetch-model.sh), smollm2 (SmolLM2-135M-Instruct,
#                       Q4_1), gemma (Gemma-3-270M), or paths of GGUF files;
#                       default q8_0,q4_0,q4_k_m,qwen
#       --no-repack-too also run Tessera with --no-repack (TSR_NO_REPACK=1) in every
#                       repetition; its rows are marked /nr
#       --llama-no-repack-too  also run llama-bench --repack 0 in every repetition; its rows,
#                       marked /l0, give Tessera / that llama.cpp (on this Intel host
#                       llama.cpp's own repacked Q4_K kernels prefill slower than its plain
#                       ones, so its best setting differs per type)
#       --quick         -r 3 -n 16 -m q4_0,qwen
#       --cache DIR     where llama.cpp is built and the 1B files are kept (default
#                       $TSR_BENCH_CACHE or ~/.cache/tessera; llama.cpp in DIR/llama.cpp)
#
# Prefill is 128 tokens (llama-bench pp128 / `tessera bench -p 128`); decode is GEN tokens
# (llama-bench tgGEN, from an empty context; Tessera decodes after its 128-token prompt,
# so it reads slightly more KV per token: under 1% of the bytes on these models).
# Each repetition runs Tessera once, then llama-bench once, so drifting load hits both.
# The table gives medians, the ratio Tessera / llama.cpp, the memory read bandwidth that
# `tessera bench` measured in the same runs (median) and each decode's fraction of the
# roofline (bandwidth / bytes read per token, as `tessera bench` computes it).
# Builds llama.cpp on first use (ops/bench/llama-build.sh, a few minutes on 2 cores).
# Run it under `flock /work/bench.lock` on a shared machine; it prints `uptime` before
# and after. Needs build/tessera (ops/build.sh release).
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=$(nproc)
REPS=5
GEN=32
MODELS=q8_0,q4_0,q4_k_m,qwen
CACHE="${TSR_BENCH_CACHE:-$HOME/.cache/tessera}"
NR=0
LR0=0
DEPTH=0
usage() { sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
    -t | --threads) THREADS="$2"; shift 2 ;;
    -r | --reps) REPS="$2"; shift 2 ;;
    -n | --gen) GEN="$2"; shift 2 ;;
    -d | --depth) DEPTH="$2"; shift 2 ;;
    -m | --models) MODELS="$2"; shift 2 ;;
    --quick) REPS=3; GEN=16; MODELS=q4_0,qwen; shift ;;
    --no-repack-too) NR=1; shift ;;
    --llama-no-repack-too) LR0=1; shift ;;
    --cache) CACHE="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "compare.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$REPS" "$GEN"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: -r and -n take a positive integer, got '$v'" >&2; exit 2; }
done
[[ "$DEPTH" =~ ^[0-9]+$ ]] || { echo "compare.sh: -d takes a number of positions, got '$DEPTH'" >&2; exit 2; }
[[ "$THREADS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
    { echo "compare.sh: -t takes a comma-separated list of thread counts, got '$THREADS'" >&2; exit 2; }

TSR=build/tessera
[ -x "$TSR" ] || { echo "compare.sh: $TSR is missing; run ops/build.sh release first" >&2; exit 1; }
LLAMA_BENCH=$(TSR_LLAMA_CACHE="$CACHE/llama.cpp" ops/bench/llama-build.sh | tail -1)

VOCAB=../shared/models/vocab/ggml-vocab-llama-spm.gguf
model_path() { # name -> GGUF path (made or fetched on first use)
    case "$1" in
    q8_0 | q4_0 | q4_k_m)
        local ty f
        ty=$(echo "$1" | tr a-z A-Z)
        f="$CACHE/bench-models/1b-$ty.gguf"
        if [ ! -f "$f" ]; then
            [ -f "$VOCAB" ] || { echo "compare.sh: $VOCAB is missing (the models folder)" >&2; exit 1; }
            mkdir -p "$CACHE/bench-models"
            echo "compare.sh: making $f (tessera mkmodel, 1B shape, $ty)" >&2
            "$TSR" mkmodel -o "$f.tmp" --vocab-from "$VOCAB" --n-layer 16 --n-embd 2048 \
                --n-head 32 --n-head-kv 8 --n-ff 8192 --type "$ty" >&2
            mv "$f.tmp" "$f"
        fi
        echo "$f" ;;
    qwen) ops/fetch-model.sh qwen2.5-coder-0.5b-instruct | tail -1 ;;
    smollm2) ops/fetch-model.sh smollm2-135m-instruct | tail -1 ;;
    gemma) ops/fetch-model.sh gemma-3-270m | tail -1 ;;
    *.gguf) [ -f "$1" ] || { echo "compare.sh: no file '$1'" >&2; exit 2; }; echo "$1" ;;
    *) echo "compare.sh: unknown model '$1' (q8_0, q4_0, q4_k_m, qwen, smollm2, gemma, or a .gguf path)" >&2; exit 2 ;;
    esac
}

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "compare.sh: tessera $(git rev-parse --short HEAD 2>/dev/null || echo '?') (Q8_0 order ${TSR_Q80_ORDER:-ggml}: TSR_Q80_ORDER), $LLAMA_BENCH"
echo "uptime before: $(uptime)"
IFS=, read -r -a model_list <<<"$MODELS"
IFS=, read -r -a thread_list <<<"$THREADS"
for m in "${model_list[@]}"; do
    f=$(model_path "$m")
    m=$(basename "$m" .gguf)
    for t in "${thread_list[@]}"; do
        for r in $(seq "$REPS"); do
            echo "  $m t=$t rep $r/$REPS" >&2
            # One Tessera run (its own warm-up token) and one llama-bench run (its warm-up).
            if ! "$TSR" bench -m "$f" -t "$t" -p 128 -n "$GEN" -r 1 --json \
                >"$OUT/tsr.$m.$t.$r.json" 2>"$OUT/tsr.err"; then
                echo "compare.sh: tessera bench failed on $f:" >&2; cat "$OUT/tsr.err" >&2; exit 1
            fi
            if [ "$NR" = 1 ] && ! TSR_NO_REPACK=1 "$TSR" bench -m "$f" -t "$t" -p 128 -n "$GEN" \
                -r 1 --json >"$OUT/tsrnr.$m.$t.$r.json" 2>"$OUT/tsr.err"; then
                echo "compare.sh: tessera bench --no-repack failed on $f:" >&2; cat "$OUT/tsr.err" >&2; exit 1
            fi
            if ! "$LLAMA_BENCH" -m "$f" -t "$t" -p 128 -n "$GEN" -r 1 -o jsonl \
                >"$OUT/llama.$m.$t.$r.jsonl" 2>"$OUT/llama.err"; then
                echo "compare.sh: llama-bench failed on $f:" >&2; tail -20 "$OUT/llama.err" >&2; exit 1
            fi
            if [ "$DEPTH" -gt 0 ]; then
                if ! "$TSR" bench -m "$f" -t "$t" -p "$DEPTH" -n "$GEN" -r 1 --json \
                    >"$OUT/tsrd.$m.$t.$r.json" 2>"$OUT/tsr.err"; then
                    echo "compare.sh: tessera bench -p $DEPTH failed on $f:" >&2; cat "$OUT/tsr.err" >&2; exit 1
                fi
                if ! "$LLAMA_BENCH" -m "$f" -t "$t" -p 0 -n "$GEN" -d "$DEPTH" -r 1 -o jsonl \
                    >"$OUT/llamad.$m.$t.$r.jsonl" 2>"$OUT/llama.err"; then
                    echo "compare.sh: llama-bench -d $DEPTH failed on $f:" >&2; tail -20 "$OUT/llama.err" >&2; exit 1
                fi
            fi
            if [ "$LR0" = 1 ] && ! "$LLAMA_BENCH" -m "$f" -t "$t" -p 128 -n "$GEN" -r 1 \
                --repack 0 -o jsonl >"$OUT/llamar0.$m.$t.$r.jsonl" 2>"$OUT/llama.err"; then
                echo "compare.sh: llama-bench --repack 0 failed on $f:" >&2; tail -20 "$OUT/llama.err" >&2; exit 1
            fi
        done
    done
done
echo "uptime after:  $(uptime)"
python3 - "$OUT" "$MODELS" "$THREADS" "$REPS" "$GEN" "$DEPTH" <<'EOF'
import glob, json, os, statistics, sys
out, models, threads, reps, gen = sys.argv[1], [os.path.basename(m)[:-5] if m.endswith(".gguf") else m for m in sys.argv[2].split(",")], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
depth = int(sys.argv[6])
med = statistics.median
def llama_rates(prefix, m, t):
    """llama-bench's pp and tg tokens/s of every repetition, from its JSONL files."""
    lj = [json.loads(l) for f in sorted(glob.glob(f"{out}/{prefix}.{m}.{t}.*.jsonl")) for l in open(f) if l.strip()]
    return ([x["avg_ts"] for x in lj if x["n_prompt"] > 0 and x["n_gen"] == 0],
            [x["avg_ts"] for x in lj if x["n_gen"] > 0 and x["n_prompt"] == 0])
print()
print(f"medians of {reps} interleaved runs; prefill pp128, decode tg{gen}; tok/s")
hdr = f"{'model':<11} {'thr':>3} {'test':<10} {'tessera':>9} {'llama.cpp':>9} {'ratio':>6}  {'GB/s':>5} {'roofline':>8} {'tsr roof':>8} {'llama roof':>10}"
print(hdr)
print("-" * len(hdr))
for m in models:
    for t in threads:
        tj = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/tsr.{m}.{t}.*.json"))]
        pp_l, tg_l = llama_rates("llama", m, t)
        pp_t = [x["prefill_tokens_per_s"] for x in tj]
        tg_t = [x["decode_tokens_per_s"] for x in tj]
        bw = med([x["mem_bw_gb_s"] for x in tj])
        bpt = tj[0]["bytes_per_token"]
        roof = bw * 1e9 / bpt
        r_pp = med(pp_t) / med(pp_l)
        r_tg = med(tg_t) / med(tg_l)
        tsr_roof = med([x["decode_roofline_ratio"] for x in tj])
        print(f"{m[:11]:<11} {t:>3} {'pp128':<10} {med(pp_t):>9.1f} {med(pp_l):>9.1f} {r_pp:>6.2f}")
        print(f"{m[:11]:<11} {t:>3} {'tg'+str(gen):<10} {med(tg_t):>9.2f} {med(tg_l):>9.2f} {r_tg:>6.2f}  {bw:>5.1f} {roof:>8.2f} {100*tsr_roof:>7.1f}% {100*med(tg_l)/roof:>9.1f}%")
        nj = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/tsrnr.{m}.{t}.*.json"))]
        if nj:
            pp_n = med([x["prefill_tokens_per_s"] for x in nj])
            tg_n = med([x["decode_tokens_per_s"] for x in nj])
            print(f"{m[:11]:<11} {t:>3} {'pp128/nr':<11}{pp_n:>9.1f} {med(pp_l):>9.1f} {pp_n / med(pp_l):>6.2f}")
            print(f"{m[:11]:<11} {t:>3} {'tg'+str(gen)+'/nr':<11}{tg_n:>9.2f} {med(tg_l):>9.2f} {tg_n / med(tg_l):>6.2f}  {'':>5} {'':>8} {100*tg_n/roof:>7.1f}%")
        dj = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/tsrd.{m}.{t}.*.json"))]
        if dj:
            tg_d = med([x["decode_tokens_per_s"] for x in dj])
            tg_dl = med(llama_rates("llamad", m, t)[1])
            bw_d = med([x["mem_bw_gb_s"] for x in dj])
            roof_d = bw_d * 1e9 / dj[0]["bytes_per_token"]
            test = f"tg{gen}@d{depth}"
            print(f"{m[:11]:<11} {t:>3} {test:<10} {tg_d:>9.2f} {tg_dl:>9.2f} {tg_d / tg_dl:>6.2f}  {bw_d:>5.1f} {roof_d:>8.2f} {100*med([x['decode_roofline_ratio'] for x in dj]):>7.1f}% {100*tg_dl/roof_d:>9.1f}%")
        pp_r, tg_r = llama_rates("llamar0", m, t)
        if pp_r:
            pp_r, tg_r = med(pp_r), med(tg_r)
            print(f"{m[:11]:<11} {t:>3} {'pp128/l0':<11}{med(pp_t):>9.1f} {pp_r:>9.1f} {med(pp_t) / pp_r:>6.2f}")
            print(f"{m[:11]:<11} {t:>3} {'tg'+str(gen)+'/l0':<11}{med(tg_t):>9.2f} {tg_r:>9.2f} {med(tg_t) / tg_r:>6.2f}  {'':>5} {'':>8} {'':>8} {100*tg_r/roof:>9.1f}%")
print()
print("ratio = Tessera / llama.cpp; GB/s = memory read bandwidth measured by `tessera bench` in")
print("the same runs with the same threads; roofline = GB/s / bytes read per decode token.")
print("tsr roof: the median of each Tessera decode over the read taken beside it (a shared")
print("host's bandwidth drifts); llama roof: llama.cpp's median decode over the median read.")
EOF
