#!/usr/bin/env bash
# slurm_batch_check.sh TESSERA MODEL_DIR_FILE — `tessera batch` under Slurm, on a
# throwaway single-node cluster (ops/slurm/local-cluster.sh) in a temporary directory,
# with the scripts users submit (ops/slurm/tessera-batch.sbatch, tessera-batch-array.sbatch):
#   1. `scontrol requeue` while the job runs (what preemption with PreemptMode=REQUEUE
#      does): the requeued job resumes and finishes;
#   2. `scancel --batch --signal=TERM` (what --signal=B:TERM@120 does before a time
#      limit): tessera stops, flushes, exits 3, the job requeues itself and finishes;
#   3. `scancel --signal=TERM` (the ranks only): the same;
#   3b. COORDINATOR=ADDR (no MODEL): the job sends the lines to a coordinator + replica
#      started here; the coordinator is killed mid-run: tessera exits 3 after
#      --retry-timeout, the job requeues itself, resumes once the coordinator is back on
#      its port (the replica rejoins) and completes;
#   4. `srun --mpi=pmix -n 2 tessera batch --tp 2` writes the lines of `mpirun -np 2 --tp 2`;
#   5. an array of 3 shards (--array=0-2) whose merge job (submitted by the first task,
#      afterok on the array) writes the same set of lines as the single job.
# Every output must answer each line of the 300-line input (tests/python/test_batch.py
# make-input: completions, plain prompts, greedy and seeded, 10 malformed) exactly once,
# every good line equal to `tessera generate --json` for its body. The model is the
# synthetic 2-layer Q8_0 one (ms per line with --max-seqs 1: slow enough to interrupt).
# Slurm holds a requeued job ~2 minutes before it is eligible again (its own delay, so
# that the old job's processes are gone); the test waits until no slurmstepd of the job
# is left, then moves the start time to now (`scontrol update StartTime=now`).
# Exit 77 (ctest: skipped) without root or the Slurm packages. ~65 s.
set -u
if [ $# -ne 2 ]; then
  echo "usage: $0 TESSERA MODEL (stories260K.gguf; the synthetic model next to it is used)" >&2
  exit 2
fi
abspath() { (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")"); }
TESSERA=$(abspath "$1")
MODEL=$(abspath "$(dirname "$2")/synthetic/synth-tiny-q8_0.gguf")
HERE=$(cd "$(dirname "$0")" && pwd -P)
CLUSTER=$HERE/../ops/slurm/local-cluster.sh
SB=$HERE/../ops/slurm/tessera-batch.sbatch
SBA=$HERE/../ops/slurm/tessera-batch-array.sbatch
TB=$HERE/python/test_batch.py
PY=/usr/bin/python3
PATH=$PATH:/usr/sbin
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_'); do unset "$v"; done

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_batch_check: SKIPPED (needs root to run slurmd/munged)"
  exit 77
fi
for b in munged slurmctld slurmd srun sbatch scontrol scancel; do
  if ! command -v $b >/dev/null 2>&1; then
    echo "slurm_batch_check: SKIPPED ($b not installed: apt-get install slurmctld slurmd slurm-client munge)"
    exit 77
  fi
done
[ -x "$TESSERA" ] || { echo "slurm_batch_check: FAILED: no binary $TESSERA"; exit 1; }
[ -r "$MODEL" ] || { echo "slurm_batch_check: FAILED: no model $MODEL"; exit 1; }

T0=$(date +%s%3N)
at() { echo "at $(($(date +%s%3N) - T0)) ms"; }
D=$(mktemp -d /tmp/tessera-slurm-batch.XXXXXX) || exit 1
FAILED=0
REFS_PID=""
COORD_PID=""
REP_PID=""
cleanup() {
  [ -n "$REFS_PID" ] && kill "$REFS_PID" 2>/dev/null
  for p in $COORD_PID $REP_PID; do kill -9 "$p" 2>/dev/null; done
  "$CLUSTER" stop "$D/cluster" >/dev/null 2>&1 || "$CLUSTER" stop "$D/cluster"
  if [ $FAILED -ne 0 ]; then
    for f in "$D"/cluster/log/slurmctld.log "$D"/cluster/log/slurmd.log; do
      [ -s "$f" ] && { echo "---- last lines of $f"; tail -n 15 "$f"; }
    done
  fi
  rm -rf "$D"
}
trap cleanup EXIT
trap 'FAILED=1; echo "slurm_batch_check: interrupted"; exit 1' INT TERM HUP
setsid bash -c 'while kill -0 "$3" 2>/dev/null; do sleep 1; done
  [ -d "$1/cluster" ] && "$2" stop "$1/cluster"; rm -rf "$1"' watchdog "$D" "$CLUSTER" $$ \
  </dev/null >/dev/null 2>&1 &

fail() {
  FAILED=1
  echo "slurm_batch_check: FAILED: $*"
  exit 1
}

# The input and, in the background while the cluster works, the generate references.
$PY "$TB" make-input "$D/in.jsonl" 300 || fail "make-input"
$PY "$TB" refs --tessera "$TESSERA" --model "$MODEL" "$D/in.jsonl" "$D/refs.json" \
  >"$D/refs.log" 2>&1 &
REFS_PID=$!

"$CLUSTER" start "$D/cluster" || fail "could not start the local Slurm cluster"
echo "slurm_batch_check: cluster started ($(at))"
export SLURM_CONF=$D/cluster/slurm.conf
export MODEL TESSERA INPUT=$D/in.jsonl
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
SLOW=(-c 256 --max-seqs 1 --flush-lines 4 --flush-interval 100)

state() { timeout -k 2 10 scontrol -o show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
reason() { timeout -k 2 10 scontrol -o show job "$1" 2>/dev/null | grep -o 'Reason=[A-Za-z_]*' | cut -d= -f2; }
steps_left() { ps -eo args | grep -c "^slurmstepd: \[$1[].]"; }

# wait_done JOB SECONDS: until COMPLETED (0) or another final state (1); a requeued job
# held by Slurm's BeginTime delay is started as soon as its old processes are gone.
wait_done() {
  local end=$(($(date +%s) + $2)) st r
  while [ "$(date +%s)" -lt $end ]; do
    st=$(state "$1")
    case "$st" in
      COMPLETED) return 0 ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
        echo "job $1: $st ($(reason "$1"))"
        return 1 ;;
      PENDING)
        r=$(reason "$1")
        if [ "$r" = BeginTime ] && [ "$(steps_left "$1")" -eq 0 ]; then
          timeout -k 2 10 scontrol update JobId="$1" StartTime=now >/dev/null 2>&1
        fi ;;
    esac
    sleep 0.3
  done
  echo "job $1 not done within $2 s (state ${st:-?})"
  return 1
}

# wait_lines FILE N: until FILE has N lines (0), or 30 s (1).
wait_lines() {
  local end=$(($(date +%s) + 30))
  while [ "$(date +%s)" -lt $end ]; do
    [ "$(cat "$1" 2>/dev/null | wc -l)" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

refs_ready() {
  if [ -n "$REFS_PID" ]; then
    wait "$REFS_PID" || { cat "$D/refs.log"; REFS_PID=""; fail "generate references"; }
    REFS_PID=""
  fi
}

# check NAME OUTPUT LOG: every line answered exactly once, exactly.
check() {
  refs_ready
  if ! $PY "$TB" check "$D/in.jsonl" "$D/refs.json" "$2" >"$D/check.txt" 2>&1; then
    cat "$D/check.txt"
    echo "---- $3"
    tail -n 30 "$3"
    fail "$1: the output is not exact"
  fi
  echo "slurm_batch_check: $1: $(cat "$D/check.txt") ($(at))"
}

# preempt NAME ACTION...: submit the job, interrupt it with ACTION once 30 lines are out,
# wait for the requeued job to finish, check.
preempt() {
  local name=$1 job out log
  shift
  out=$D/$name.jsonl
  log=$D/$name.log
  job=$(cd "$D" && OUTPUT=$out timeout -k 2 15 sbatch --parsable -n 1 -c 1 --job-name="$name" \
    --output="$log" "$SB" "${SLOW[@]}" 2>"$D/sbatch.err")
  job=${job%%;*}
  [ -n "$job" ] || { cat "$D/sbatch.err"; fail "$name: sbatch did not submit the job"; }
  wait_lines "$out" 30 || { tail -n 20 "$log"; fail "$name: job $job wrote no 30 lines in 30 s"; }
  local n_before
  n_before=$(wc -l <"$out")
  "$@" "$job" || fail "$name: '$* $job' failed"
  wait_done "$job" 90 || { tail -n 30 "$log"; fail "$name: job $job did not complete"; }
  grep -q "resuming: .* has [0-9]* lines" "$log" || { tail -n 30 "$log"; fail "$name: the job did not resume"; }
  grep -q "start 2" "$log" || { tail -n 30 "$log"; fail "$name: the job did not start twice"; }
  echo "slurm_batch_check: $name: interrupted with $n_before lines written; requeued, resumed, completed ($(at))"
  check "$name" "$out" "$log"
}

preempt requeue timeout -k 2 10 scontrol requeue
grep -q "exit 3" "$D/requeue.log" || echo "slurm_batch_check: (requeue: tessera was killed before its graceful stop; the torn-line repair covered it)"
preempt timelimit timeout -k 2 10 scancel --batch --signal=TERM
grep -q "SIGUSR1: no new lines" "$D/timelimit.log" && grep -q "requeueing job" "$D/timelimit.log" ||
  { tail -n 30 "$D/timelimit.log"; fail "timelimit: the script did not stop tessera gracefully and requeue"; }
preempt sigterm timeout -k 2 10 scancel --signal=TERM
grep -q "SIGTERM: no new lines" "$D/sigterm.log" && grep -q "requeueing job" "$D/sigterm.log" ||
  { tail -n 30 "$D/sigterm.log"; fail "sigterm: tessera did not stop gracefully / the job did not requeue itself"; }

# COORDINATOR: the job loads no model (MODEL unset) and talks to a cluster started here.
# wait_listen LOG: the address a tessera server printed ("listening on HOST:PORT").
wait_listen() {
  local end=$(($(date +%s) + 15)) a
  while [ "$(date +%s)" -lt $end ]; do
    a=$(grep -o 'listening on [0-9.]*:[0-9]*' "$1" 2>/dev/null | head -n 1 | cut -d' ' -f3)
    [ -n "$a" ] && { echo "$a"; return 0; }
    sleep 0.1
  done
  return 1
}
# wait_up ADDR: until the coordinator lists a replica UP.
wait_up() {
  local end=$(($(date +%s) + 15))
  while [ "$(date +%s)" -lt $end ]; do
    timeout -k 2 10 "$TESSERA" ctl --coordinator "$1" --json replicas 2>/dev/null |
      grep -q '"state":[[:space:]]*"up"' && return 0
    sleep 0.2
  done
  return 1
}
"$TESSERA" coordinator --listen 127.0.0.1:0 >"$D/coord-1.log" 2>&1 &
COORD_PID=$!
ADDR=$(wait_listen "$D/coord-1.log") || { cat "$D/coord-1.log"; fail "coordinator: did not start"; }
"$TESSERA" serve -m "$MODEL" -c 256 -t 1 --max-seqs 1 --listen 127.0.0.1:0 --join "$ADDR" \
  --name r1 >"$D/replica.log" 2>&1 &
REP_PID=$!
wait_up "$ADDR" || { tail -n 20 "$D/replica.log"; fail "coordinator: the replica did not join $ADDR"; }
out=$D/coordinator.jsonl
log=$D/coordinator.log
job=$(cd "$D" && env -u MODEL COORDINATOR="$ADDR" OUTPUT="$out" timeout -k 2 15 sbatch --parsable \
  -n 1 -c 1 --job-name=coordinator --output="$log" "$SB" --concurrency 4 --flush-lines 4 \
  --flush-interval 100 --retry-timeout 2000 --max-retries 2 2>"$D/sbatch.err")
job=${job%%;*}
[ -n "$job" ] || { cat "$D/sbatch.err"; fail "coordinator: sbatch did not submit the job"; }
wait_lines "$out" 30 || { tail -n 20 "$log"; fail "coordinator: job $job wrote no 30 lines in 30 s"; }
kill -9 "$COORD_PID"
{ wait "$COORD_PID"; } 2>/dev/null
COORD_PID=""
n_before=$(wc -l <"$out")
END=$(($(date +%s) + 30))
until grep -q "requeueing job" "$log" || [ "$(date +%s)" -ge $END ]; do sleep 0.2; done
grep -q "incomplete (exit 3)" "$log" && grep -q "requeueing job" "$log" ||
  { tail -n 30 "$log"; fail "coordinator: the job did not stop (exit 3) and requeue itself when the coordinator died"; }
"$TESSERA" coordinator --listen "$ADDR" >"$D/coord-2.log" 2>&1 &
COORD_PID=$!
wait_listen "$D/coord-2.log" >/dev/null || { cat "$D/coord-2.log"; fail "coordinator: did not restart on $ADDR"; }
wait_up "$ADDR" || { tail -n 20 "$D/replica.log"; fail "coordinator: the replica did not rejoin $ADDR"; }
wait_done "$job" 90 || { tail -n 30 "$log"; fail "coordinator: job $job did not complete"; }
grep -q "through the cluster at $ADDR" "$log" && grep -q "start 2" "$log" &&
  grep -q "resuming: .* has [0-9]* lines" "$log" ||
  { tail -n 30 "$log"; fail "coordinator: the requeued job did not resume through the cluster"; }
echo "slurm_batch_check: coordinator: killed with $n_before lines written; exit 3, requeued, resumed through the restarted coordinator, completed ($(at))"
check coordinator "$out" "$log"
kill "$COORD_PID" "$REP_PID" 2>/dev/null
{ wait "$COORD_PID" "$REP_PID"; } 2>/dev/null
COORD_PID=""
REP_PID=""

# srun --mpi=pmix, 2 ranks (--tp 2), straight from the shell: the same lines as
# `mpirun -np 2 ... --tp 2` (tp 2 sums in another order than one process, so the
# reference of this layout is the same layout under the other launcher).
timeout -k 2 120 srun --mpi=pmix -O -n 2 "$TESSERA" batch -m "$MODEL" -i "$INPUT" \
  -o "$D/srun-tp2.jsonl" -c 256 -t 1 --tp 2 >"$D/srun-tp2.log" 2>&1 ||
  { tail -n 20 "$D/srun-tp2.log"; fail "srun --mpi=pmix -n 2 tessera batch --tp 2"; }
timeout -k 2 120 mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$TESSERA" \
  batch -m "$MODEL" -i "$INPUT" -o "$D/mpirun-tp2.jsonl" -c 256 -t 1 --tp 2 \
  >"$D/mpirun-tp2.log" 2>&1 || { tail -n 20 "$D/mpirun-tp2.log"; fail "mpirun -np 2 tessera batch --tp 2"; }
grep -q "tp 2 x pp 1" "$D/srun-tp2.log" || fail "the srun job did not run tp 2"
if ! cmp -s <(sort "$D/srun-tp2.jsonl") <(sort "$D/mpirun-tp2.jsonl"); then
  fail "srun -n 2 --tp 2 and mpirun -np 2 --tp 2 wrote different lines"
fi
echo "slurm_batch_check: srun --mpi=pmix -n 2 --tp 2: the $(wc -l <"$D/srun-tp2.jsonl") lines of mpirun -np 2 --tp 2 ($(at))"

# Array of 3 shards + the merge job.
ARR=$(cd "$D" && OUTPUT=$D/array.jsonl timeout -k 2 15 sbatch --parsable -n 1 -c 1 --array=0-2 \
  --output="$D/array-%A_%a.log" "$SBA" -c 256 2>"$D/sbatch.err")
ARR=${ARR%%;*}
[ -n "$ARR" ] || { cat "$D/sbatch.err"; fail "array: sbatch did not submit"; }
END=$(($(date +%s) + 90))
while [ ! -s "$D/array.jsonl" ] && [ "$(date +%s)" -lt $END ]; do sleep 0.3; done
if [ ! -s "$D/array.jsonl" ]; then
  timeout -k 2 10 squeue -t all
  tail -n 20 "$D"/array-*.log "$D"/tessera-batch-merge-*.out 2>/dev/null
  fail "array: no merged output within 90 s"
fi
MJ=$(ls "$D"/tessera-batch-merge-*.out 2>/dev/null | head -n 1)
MJ=${MJ##*-}
MJ=${MJ%.out}
wait_done "$MJ" 30 || fail "array: the merge job $MJ did not complete"
grep -q "300 lines from 3 files" "$D"/tessera-batch-merge-*.out || { cat "$D"/tessera-batch-merge-*.out; fail "array: merge"; }
check "array of 3 + merge" "$D/array.jsonl" "$D/tessera-batch-merge-$MJ.out"
if ! cmp -s <(sort "$D/array.jsonl") <(sort "$D/requeue.jsonl"); then
  echo "lines only in one of them: $(comm -3 <(sort "$D/array.jsonl") <(sort "$D/requeue.jsonl") | wc -l)"
  fail "array: the merged output differs from the single job's (as sets of lines)"
fi
echo "slurm_batch_check: array of 3 + merge = the single job's output as a set ($(at))"

"$CLUSTER" stop "$D/cluster" || fail "the local Slurm cluster did not stop cleanly"
echo "slurm_batch_check: OK ($(($(date +%s%3N) - T0)) ms, cluster stopped)"
