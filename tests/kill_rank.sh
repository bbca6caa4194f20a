#!/bin/sh
# kill_rank.sh TESSERA MODEL — a rank killed with SIGKILL mid-generation ends the whole
# replica within 10 s, non-zero, with a message naming the lost rank, and leaves no
# process behind.
set -u
TESSERA=$1
MODEL=$2
OUT=$(mktemp)
mpirun --oversubscribe --bind-to none -np 3 "$TESSERA" generate -m "$MODEL" -p "Once upon a time" \
  -n 3000 -c 3100 --ignore-eos --temperature 0 --pp 3 -t 1 >"$OUT" 2>&1 &
MPIRUN=$!
# Wait until the ranks are generating (text is streaming), at most 20 s.
i=0
while [ $i -lt 200 ] && [ "$(wc -c <"$OUT")" -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
VICTIM=$(pgrep -P $MPIRUN -f "tessera generate" | tail -n 1)
if [ -z "$VICTIM" ]; then
  echo "kill_rank: no rank process found; output:"; cat "$OUT"; kill -9 $MPIRUN; exit 1
fi
T0=$(date +%s.%N)
kill -9 "$VICTIM"
RC=0
# Deadline: 10 s for the job to end.
i=0
while kill -0 $MPIRUN 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $MPIRUN 2>/dev/null; then
  echo "kill_rank: FAILED: the job still runs 10 s after rank pid $VICTIM was killed"
  kill -9 $MPIRUN; pkill -9 -P $MPIRUN; exit 1
fi
wait $MPIRUN
RC=$?
T1=$(date +%s.%N)
echo "kill_rank: job ended $(awk "BEGIN { printf \"%.2f\", $T1 - $T0 }") s after the kill, exit status $RC"
tail -n 20 "$OUT" | tr -cd '\11\12\15\40-\176'
echo
if [ $RC -eq 0 ]; then echo "kill_rank: FAILED: exit status 0"; exit 1; fi
if ! grep -Eq "rank [0-9]+" "$OUT"; then echo "kill_rank: FAILED: no message names the lost rank"; exit 1; fi
LEFT=$(pgrep -f "tessera generate -m $MODEL" | wc -l)
if [ "$LEFT" -ne 0 ]; then echo "kill_rank: FAILED: $LEFT processes left behind"; exit 1; fi
echo "kill_rank: OK"
rm -f "$OUT"
