# lib.sh — what the ops/bench-*.sh scripts share; source it after `cd` to the repository:
#   bench_tmp        LOG, a temporary folder for the servers' logs, and PIDS, the servers
#                    started in the background (`... 2>"$LOG/x" & PIDS+=($!)`): on exit
#                    they are killed and LOG is removed;
#   addr LOG [PAT]   waits up to 60 s for "PAT HOST:PORT" in LOG (default PAT: "listening
#                    on") and prints the first HOST:PORT; else prints the log and exits 1;
#   median           the median of the numbers on stdin, one a line.
# shellcheck shell=bash

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$LOG"
}

bench_tmp() {
  LOG=$(mktemp -d)
  PIDS=()
  trap bench_cleanup EXIT
}

addr() {
  local pat=${2:-listening on} a
  for _ in $(seq 1200); do
    a=$(grep -o "$pat [^ ]*" "$1" 2>/dev/null | head -1 | awk '{print $NF}') &&
      [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.05
  done
  echo "no '$pat' in $1" >&2; cat "$1" >&2; exit 1
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
