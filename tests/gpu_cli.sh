#!/bin/sh
# tests/gpu_cli.sh TESSERA MODEL — the --device / --gpu-memory flags from the command line:
# a bad --device is a usage error (exit 2) naming the choices; --device cuda either runs (a
# GPU is visible) or fails with exit 1 and the reason ("no CUDA device (...)"); --device auto
# always runs; --gpu-memory 0 is a usage error.
t="$1"; m="$2"
fail() { echo "FAIL: $*"; exit 1; }
out=$("$t" generate -m "$m" -p Once -n 4 --temperature 0 --device tpu 2>&1); rc=$?
[ $rc = 2 ] || fail "--device tpu: exit $rc, expected 2: $out"
echo "$out" | grep -q "device must be cpu, cuda or auto, got 'tpu'" || fail "--device tpu: $out"
# TESSERA_DEVICE is the default of an absent --device (the CPU suite runs with it = cpu)
out=$(TESSERA_DEVICE=tpu "$t" generate -m "$m" -p Once -n 4 --temperature 0 2>&1); rc=$?
[ $rc = 1 ] || fail "TESSERA_DEVICE=tpu: exit $rc, expected 1: $out"
echo "$out" | grep -q "TESSERA_DEVICE must be cpu, cuda or auto, got 'tpu'" ||
  fail "TESSERA_DEVICE=tpu: $out"
TESSERA_DEVICE=tpu "$t" generate -m "$m" -p Once -n 4 --temperature 0 --device cpu >/dev/null 2>&1 ||
  fail "--device cpu must override TESSERA_DEVICE"
out=$("$t" generate -m "$m" -p Once -n 4 --temperature 0 --gpu-memory 0 2>&1); rc=$?
[ $rc = 2 ] || fail "--gpu-memory 0: exit $rc, expected 2: $out"
ref=$("$t" generate -m "$m" -p Once -n 4 --temperature 0 --device cpu 2>/dev/null) || fail "cpu run"
out=$("$t" generate -m "$m" -p Once -n 4 --temperature 0 --device cuda 2>&1); rc=$?
if [ $rc = 0 ]; then
  echo "--device cuda ran (a GPU is visible)"
else
  [ $rc = 1 ] || fail "--device cuda: exit $rc, expected 0 or 1: $out"
  echo "$out" | grep -q -- "--device cuda: no CUDA device (.*); use --device cpu" ||
    fail "--device cuda without a GPU: $out"
  echo "refused as expected: $out"
fi
auto=$("$t" generate -m "$m" -p Once -n 4 --temperature 0 --device auto --gpu-memory 1G 2>/dev/null) ||
  fail "--device auto did not run"
[ -n "$auto" ] || fail "--device auto: no output"
echo "cpu: $ref | auto: $auto"
echo PASS
