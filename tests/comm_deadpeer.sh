#!/bin/sh
# comm_deadpeer.sh — ctest wrapper around comm_deadpeer (3 ranks, rank 2 SIGKILLs itself in
# the middle of an allreduce loop). Passes only when the MPI job
#   - ends within 10 s (a hard `timeout 20` guards against a hang: exit 124 = hung),
#   - exits non-zero, and
#   - its output names the dead rank: a line matching "rank 2 ... signal|killed|exited"
#     (Open MPI: "mpirun noticed that process rank 2 with PID 0 on node vm exited on signal 9").
# Usage: comm_deadpeer.sh <comm_deadpeer binary> [mpiexec]
set -u
bin=$1
mpiexec=${2:-mpirun}
log=$(mktemp /tmp/tsr_deadpeer.XXXXXX)
t0=$(date +%s%N)
timeout -k 5 20 "$mpiexec" --allow-run-as-root --oversubscribe -np 3 "$bin" >"$log" 2>&1
rc=$?
t1=$(date +%s%N)
ms=$(((t1 - t0) / 1000000))
cat "$log"
echo "comm_deadpeer.sh: mpirun exit status $rc after $ms ms"
fail=0
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 -a "$ms" -ge 20000 ]; then
    echo "FAIL: the job hung (killed by timeout)"
    fail=1
elif [ "$rc" -eq 0 ]; then
    echo "FAIL: the job exited 0 although a rank died"
    fail=1
fi
if [ "$ms" -gt 10000 ]; then
    echo "FAIL: the job took $ms ms to end (limit 10000)"
    fail=1
fi
if ! grep -Eiq 'rank 2 .*(signal|killed|exited)' "$log"; then
    echo "FAIL: the output does not name rank 2 as the dead rank"
    fail=1
fi
rm -f "$log"
[ "$fail" -eq 0 ] && echo "PASS: dead rank 2 ended the job in $ms ms with status $rc"
exit "$fail"
