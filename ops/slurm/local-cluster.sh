#!/usr/bin/env bash
# local-cluster.sh start|stop|status DIR — a throwaway single-node Slurm cluster (munged +
# slurmctld + slurmd) that lives entirely under DIR, for tests and for trying the example
# batch job on a workstation. Needs root and the Debian packages slurmctld slurmd
# slurm-client munge (ops/install-deps.sh).
#
#   ops/slurm/local-cluster.sh start /tmp/slurm     # ~1-2 s; prints the node state
#   . /tmp/slurm/env                                 # exports SLURM_CONF for srun/sbatch/...
#   srun --mpi=pmix -O -n 2 build/tessera generate -m model.gguf -p hi --tp 2
#   ops/slurm/local-cluster.sh stop /tmp/slurm
#
# Everything uses absolute paths (a relative slurm.conf makes slurmstepd loop forever),
# a fresh munge key, free TCP ports (several clusters can run side by side), and no
# cgroup plugins (proctrack/linuxproc, task/none: works in containers and gVisor). The
# node line comes from `slurmd -C`, the node name from `hostname -s`. Every wait has a
# deadline; on failure the script says what failed, shows the relevant log lines, stops
# what it started and exits non-zero. `stop` cancels jobs, shuts the daemons down and
# kills what is left by the pids in DIR/run; it never touches processes it did not start.
set -u

die() {
  echo "local-cluster: FAILED: $*" >&2
  exit 1
}

usage() {
  echo "usage: $0 start|stop|status DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
CMD=$1
[ -n "$2" ] || usage
mkdir -p "$2" 2>/dev/null || die "cannot create $2"
D=$(cd "$2" && pwd -P) || die "cannot enter $2"
CONF=$D/slurm.conf
RUN=$D/run
LOG=$D/log
MUNGE_SOCK=$D/munge/munge.socket
# Inside someone else's Slurm job (CI on a cluster) its SLURM_* variables would point
# srun at a job this cluster does not know.
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_'); do unset "$v"; done

# now_ms: milliseconds since the epoch (for deadlines).
now_ms() { date +%s%3N; }

# show_logs: the last lines of every daemon log, for a failure report.
show_logs() {
  local f
  for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd.log; do
    [ -s "$f" ] || continue
    echo "---- last lines of $f (without the harmless first-start noise)" >&2
    grep -Ev 'state file|Trying backup state|Unauthorized credential for client' "$f" |
      tail -n "${1:-15}" >&2
  done
}

# pid_of NAME: the pid in DIR/run/NAME.pid if that process is alive and is NAME started
# for DIR (its command line names DIR: never a recycled pid of something else).
pid_of() {
  local p
  [ -r "$RUN/$1.pid" ] || return 1
  p=$(tr -dc 0-9 <"$RUN/$1.pid" 2>/dev/null)
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
    *"$1"*"$D/"*) echo "$p" ;;
    *) return 1 ;;
  esac
}

# wait_gone PID SECONDS: wait until PID has exited; 1 if it still runs at the deadline.
wait_gone() {
  local end=$(($(now_ms) + $2 * 1000))
  while kill -0 "$1" 2>/dev/null; do
    [ "$(now_ms)" -lt $end ] || return 1
    sleep 0.1
  done
  return 0
}

# free_port: an unused TCP port from the kernel.
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# with_timeout SECONDS CMD...: run a client command that must not hang.
with_timeout() {
  local t=$1
  shift
  timeout -k 2 "$t" "$@"
}

do_stop() {
  local quiet=${1:-} name p rc=0
  # The pids first: the daemons remove their pid files as they shut down.
  local -A pids=()
  for name in slurmd slurmctld munged; do
    p=$(pid_of $name) && pids[$name]=$p
  done
  export SLURM_CONF=$CONF
  if [ -f "$CONF" ] && [ -n "${pids[slurmctld]:-}" ]; then
    # Cancel what still runs (a failed test may leave a step behind), then shut down.
    with_timeout 5 scancel --quiet --full -u "$(id -un)" >/dev/null 2>&1
    local end=$(($(now_ms) + 5000))
    while [ -n "$(with_timeout 3 squeue -h -o %i 2>/dev/null)" ] && [ "$(now_ms)" -lt $end ]; do
      sleep 0.2
    done
    with_timeout 5 scontrol shutdown >/dev/null 2>&1
  elif [ -n "${pids[slurmd]:-}" ]; then
    kill "${pids[slurmd]}" 2>/dev/null # no controller to tell it
  fi
  for name in slurmd slurmctld; do
    p=${pids[$name]:-}
    [ -n "$p" ] || continue
    if ! wait_gone "$p" 5; then
      echo "local-cluster: $name (pid $p) did not shut down in 5 s; killing it" >&2
      kill -9 "$p" 2>/dev/null
      wait_gone "$p" 2 || { echo "local-cluster: $name (pid $p) survives SIGKILL" >&2; rc=1; }
    fi
  done
  p=${pids[munged]:-}
  if [ -n "$p" ]; then
    kill "$p" 2>/dev/null
    if ! wait_gone "$p" 5; then
      kill -9 "$p" 2>/dev/null
      wait_gone "$p" 2 || { echo "local-cluster: munged (pid $p) survives SIGKILL" >&2; rc=1; }
    fi
  fi
  rm -f "$RUN"/*.pid
  [ -n "$quiet" ] || [ $rc -ne 0 ] || echo "local-cluster: stopped ($D)"
  return $rc
}

# fail_start MSG: report, show logs, stop what was started, exit 1.
fail_start() {
  echo "local-cluster: FAILED: $*" >&2
  show_logs 20
  do_stop quiet
  exit 1
}

do_start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser/SlurmdUser root, munged -f)"
  local b
  for b in munged munge unmunge slurmctld slurmd srun sinfo scontrol scancel squeue timeout; do
    command -v $b >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v $b >/dev/null 2>&1 ||
      die "$b not found: apt-get install slurmctld slurmd slurm-client munge (ops/install-deps.sh)"
  done
  PATH=$PATH:/usr/sbin
  if pid_of slurmctld >/dev/null || pid_of slurmd >/dev/null || pid_of munged >/dev/null; then
    die "a cluster already runs in $D (stop it first: $0 stop $D)"
  fi
  rm -rf "$D/state" "$D/spool" "$D/tmp" "$RUN" "$LOG" "$D/munge"
  mkdir -p "$D/state" "$D/spool" "$D/tmp" "$RUN" "$LOG" "$D/munge" || die "cannot create dirs in $D"
  chmod 755 "$D" "$D/munge"

  # munge: a fresh key for this cluster only.
  head -c 1024 /dev/urandom >"$D/munge/munge.key" && chmod 400 "$D/munge/munge.key" ||
    die "cannot write $D/munge/munge.key"
  munged -f --socket="$MUNGE_SOCK" --key-file="$D/munge/munge.key" --log-file="$LOG/munged.log" \
    --pid-file="$RUN/munged.pid" --seed-file="$D/munge/munged.seed" </dev/null >>"$LOG/munged.start" 2>&1 ||
    { cat "$LOG/munged.start" >&2; fail_start "munged did not start"; }
  local end=$(($(now_ms) + 10000)) ok=""
  while [ "$(now_ms)" -lt $end ]; do
    if with_timeout 3 munge -S "$MUNGE_SOCK" -n 2>/dev/null | with_timeout 3 unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then
      ok=1
      break
    fi
    sleep 0.1
  done
  [ -n "$ok" ] || fail_start "munge credentials do not round-trip through $MUNGE_SOCK within 10 s"

  # slurm.conf: the node line from slurmd -C, under this host's short name.
  local host node cport dport
  host=$(hostname -s) || die "hostname -s failed"
  node=$(slurmd -C 2>/dev/null | head -n 1)
  case "$node" in
    NodeName=*) ;;
    *) fail_start "slurmd -C printed no node line: '$node'" ;;
  esac
  node="NodeName=$host NodeAddr=127.0.0.1 ${node#NodeName=* }"
  cport=$(free_port) && dport=$(free_port) || fail_start "no free TCP port"
  [ "$cport" != "$dport" ] || dport=$(free_port)
  cat >"$CONF" <<EOF
# Generated by ops/slurm/local-cluster.sh: a single-node cluster under $D.
ClusterName=tessera
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$cport
SlurmdPort=$dport
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
TmpFS=$D/tmp
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
FirstJobId=$((1000 + RANDOM % 30000 * 100))
MinJobAge=300
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  echo "export SLURM_CONF=$CONF" >"$D/env"
  export SLURM_CONF=$CONF

  slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.start" 2>&1 ||
    { cat "$LOG/slurmctld.start" >&2; fail_start "slurmctld did not start"; }
  slurmd -f "$CONF" </dev/null >>"$LOG/slurmd.start" 2>&1 ||
    { cat "$LOG/slurmd.start" >&2; fail_start "slurmd did not start"; }

  # Wait (at most 20 s) until the node is idle.
  local state="" t0
  t0=$(now_ms)
  end=$((t0 + 20000))
  while [ "$(now_ms)" -lt $end ]; do
    pid_of slurmctld >/dev/null || { sleep 0.5; pid_of slurmctld >/dev/null || fail_start "slurmctld exited"; }
    pid_of slurmd >/dev/null || { sleep 0.5; pid_of slurmd >/dev/null || fail_start "slurmd exited"; }
    state=$(with_timeout 3 sinfo -h -n "$host" -o %t 2>/dev/null | head -n 1)
    case "$state" in idle | idle~) break ;; esac
    sleep 0.2
  done
  case "$state" in
    idle | idle~) ;;
    *) fail_start "node $host not idle within 20 s (state '${state:-no answer}'); slurmd $(pid_of slurmd >/dev/null && echo runs || echo is not running)" ;;
  esac
  echo "local-cluster: node $host idle after $(($(now_ms) - t0)) ms; SLURM_CONF=$CONF (. $D/env)"
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  status)
    export SLURM_CONF=$CONF
    for n in munged slurmctld slurmd; do
      if p=$(pid_of $n); then echo "$n: pid $p"; else echo "$n: not running"; fi
    done
    pid_of slurmctld >/dev/null && with_timeout 5 sinfo 2>&1
    ;;
  *) usage ;;
esac
