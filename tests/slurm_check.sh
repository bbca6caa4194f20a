#!/usr/bin/env bash
# slurm_check.sh TESSERA MODEL — Tessera under Slurm, on a throwaway single-node cluster
# (ops/slurm/local-cluster.sh) in a temporary directory:
#   1. `srun --mpi=pmix -O -n 2 ... --tp 2` and `... --pp 2` generate exactly the token ids
#      of a plain single-process run (greedy);
#   2. the example batch job ops/slurm/tessera-generate.sbatch (`sbatch -O -n 2`, waited
#      for) does too;
#   3. a launcher/layout mismatch (`srun -n 2 ... --tp 2 --pp 2`) fails with a message, and
#      so does `srun` without --mpi=pmix (Open MPI cannot start without PMIx).
# The cluster is always stopped (trap; plus a detached watchdog in case this script is
# killed with SIGKILL, e.g. by a ctest timeout). Exit 77 (ctest: skipped) without root or
# without the Slurm packages. Every command runs under a deadline (the worst case stays
# under ctest's 180 s); ~10 s in all, ~25 s with the sanitizers.
set -u
if [ $# -ne 2 ]; then
  echo "usage: $0 TESSERA MODEL" >&2
  exit 2
fi
abspath() { (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")"); }
TESSERA=$(abspath "$1")
MODEL=$(abspath "$2")
HERE=$(cd "$(dirname "$0")" && pwd -P)
CLUSTER=$HERE/../ops/slurm/local-cluster.sh
SBATCH_SCRIPT=$HERE/../ops/slurm/tessera-generate.sbatch
PY=/usr/bin/python3
[ -x $PY ] || PY=python3
PATH=$PATH:/usr/sbin
# Inside someone else's Slurm job (CI on a cluster) its SLURM_* variables would point
# srun at a job this cluster does not know.
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_'); do unset "$v"; done

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_check: SKIPPED (needs root to run slurmd/munged)"
  exit 77
fi
for b in munged slurmctld slurmd srun sbatch scontrol; do
  if ! command -v $b >/dev/null 2>&1; then
    echo "slurm_check: SKIPPED ($b not installed: apt-get install slurmctld slurmd slurm-client munge)"
    exit 77
  fi
done
[ -x "$TESSERA" ] || { echo "slurm_check: FAILED: no binary $TESSERA"; exit 1; }
[ -r "$MODEL" ] || { echo "slurm_check: FAILED: no model $MODEL"; exit 1; }

T0=$(date +%s%3N)
# at: "at N ms", the time since the start.
at() { echo "at $(($(date +%s%3N) - T0)) ms"; }
D=$(mktemp -d /tmp/tessera-slurm.XXXXXX) || exit 1
FAILED=0

cleanup() {
  "$CLUSTER" stop "$D" >/dev/null 2>&1 || "$CLUSTER" stop "$D"
  if [ $FAILED -ne 0 ]; then
    for f in "$D"/log/slurmctld.log "$D"/log/slurmd.log; do
      [ -s "$f" ] && { echo "---- last lines of $f"; tail -n 15 "$f"; }
    done
  fi
  rm -rf "$D"
}
trap cleanup EXIT
trap 'FAILED=1; echo "slurm_check: interrupted"; exit 1' INT TERM HUP
# Watchdog, detached from this script's process group and output: if the script dies
# without running its trap, stop the cluster anyway (only the daemons in $D/run/*.pid).
setsid bash -c 'while kill -0 "$3" 2>/dev/null; do sleep 1; done
  [ -d "$1" ] && "$2" stop "$1"; rm -rf "$1"' watchdog "$D" "$CLUSTER" $$ </dev/null >/dev/null 2>&1 &

fail() {
  FAILED=1
  echo "slurm_check: FAILED: $*"
  exit 1
}

# ids FILE: the "ids" array of the JSON object tessera printed, as "1,2,3".
ids() {
  $PY -c '
import json, sys
for line in open(sys.argv[1], errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        print(",".join(map(str, json.loads(line)["ids"])))
        sys.exit(0)
sys.exit(1)' "$1"
}

# check NAME RC OUTFILE ERRFILE: a run that must succeed with the reference ids.
check() {
  local got
  if [ "$2" -ne 0 ]; then
    echo "---- $1: stdout"; tail -n 20 "$3"; echo "---- $1: stderr"; tail -n 30 "$4"
    fail "$1 exited with status $2"
  fi
  got=$(ids "$3") || { echo "---- $1: stdout"; tail -n 20 "$3"; tail -n 30 "$4"; fail "$1 printed no JSON with ids"; }
  if [ "$got" != "$REF" ]; then
    echo "reference: $REF"
    echo "$1: $got"
    fail "$1 generated other tokens than the single-process run"
  fi
  echo "slurm_check: $1: same $(echo "$got" | tr ',' '\n' | wc -l) ids as the single-process run ($(at))"
}

GEN=(generate -m "$MODEL" -p "Once upon a time" -n 24 --temperature 0 --json -t 1)

# Reference: one process, no launcher.
timeout -k 2 15 "$TESSERA" "${GEN[@]}" >"$D/ref.out" 2>"$D/ref.err" ||
  { cat "$D/ref.err"; fail "the single-process run failed"; }
REF=$(ids "$D/ref.out") || fail "the single-process run printed no JSON with ids"
[ -n "$REF" ] || fail "the single-process run generated no tokens"

"$CLUSTER" start "$D" || fail "could not start the local Slurm cluster"
echo "slurm_check: cluster started ($(at))"
export SLURM_CONF=$D/slurm.conf

# 1. srun direct launch (PMIx), tp 2 and pp 2.
for layout in "--tp 2" "--pp 2"; do
  name="srun -n 2 ${layout}"
  # shellcheck disable=SC2086
  timeout -k 2 15 srun --mpi=pmix -O -n 2 "$TESSERA" "${GEN[@]}" $layout >"$D/srun.out" 2>"$D/srun.err"
  check "$name" $? "$D/srun.out" "$D/srun.err"
done

# 2. The example batch job (its srun step inherits -O from the job). Polled here rather
# than `sbatch --wait`, which looks at the job only after 2 s, then 10 s, 42 s, ...
mkdir -p "$D/job"
JOB=$(cd "$D/job" && MODEL=$MODEL TESSERA=$TESSERA PROMPT="Once upon a time" MAX_TOKENS=24 \
  timeout -k 2 15 sbatch --parsable -O -n 2 --job-name=slurm_check --output="$D/job/out.txt" \
  --error="$D/job/err.txt" "$SBATCH_SCRIPT" --temperature 0 --json 2>"$D/sbatch.err")
JOB=${JOB%%;*}
[ -n "$JOB" ] || { cat "$D/sbatch.err"; fail "sbatch did not submit the job"; }
END=$(($(date +%s%3N) + 30000))
STATE=""
while [ "$(date +%s%3N)" -lt $END ]; do
  INFO=$(timeout -k 2 10 scontrol -o show job "$JOB" 2>&1)
  STATE=$(echo "$INFO" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  case "$STATE" in
    PENDING | CONFIGURING | RUNNING | COMPLETING | "") sleep 0.2 ;;
    *) break ;;
  esac
done
case "$STATE" in
  COMPLETED) RC=0 ;;
  FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
    echo "$INFO" | tr ' ' '\n' | grep -E '^(JobState|Reason|ExitCode)='
    RC=1 ;;
  *)
    echo "$INFO"
    timeout -k 2 10 scancel "$JOB"
    fail "batch job $JOB not finished within 30 s (state ${STATE:-unknown})" ;;
esac
cp "$D/job/out.txt" "$D/job.out" 2>/dev/null || : >"$D/job.out"
cp "$D/job/err.txt" "$D/job.err" 2>/dev/null || : >"$D/job.err"
check "sbatch -n 2 tessera-generate.sbatch (job $JOB)" $RC "$D/job.out" "$D/job.err"
grep -q "2 ranks = tp 2 x pp 1" "$D/job.err" || fail "the batch job did not run tp 2 x pp 1"

# 3. Mismatches fail quickly, non-zero, with a message.
timeout -k 2 15 srun --mpi=pmix -O -n 2 "$TESSERA" "${GEN[@]}" --tp 2 --pp 2 >"$D/mm.out" 2>&1
RC=$?
if [ $RC -eq 0 ] || [ $RC -ge 124 ] || ! grep -q "has 2 ranks but --tp 2 --pp 2 needs 4" "$D/mm.out"; then
  tail -n 20 "$D/mm.out"
  fail "srun -n 2 with --tp 2 --pp 2: status $RC, expected a failure naming the rank count"
fi
echo "slurm_check: srun -n 2 --tp 2 --pp 2 refused ($(at)): $(grep -m 1 -o 'the MPI job has.*' "$D/mm.out")"
timeout -k 2 15 srun --mpi=none -O -n 2 "$TESSERA" "${GEN[@]}" --tp 2 >"$D/nopmix.out" 2>&1
RC=$?
if [ $RC -eq 0 ] || [ $RC -ge 124 ] || ! grep -q "PMI" "$D/nopmix.out"; then
  tail -n 20 "$D/nopmix.out"
  fail "srun --mpi=none -n 2: status $RC, expected a quick failure about PMI"
fi
echo "slurm_check: srun --mpi=none -n 2 fails with a PMI message (status $RC, $(at))"

"$CLUSTER" stop "$D" || fail "the local Slurm cluster did not stop cleanly"
echo "slurm_check: OK ($(($(date +%s%3N) - T0)) ms, cluster stopped)"
