#!/usr/bin/env bash
# Install the Debian 12 packages Tessera needs to build and test (idempotent; needs root
# or sudo). Only what is missing is installed.
set -euo pipefail
PKGS=(build-essential cmake pkg-config procps libpcre2-dev libcjson-dev libcmocka-dev
      libopenmpi-dev openmpi-bin
      libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-grpcio
      python3-grpc-tools protobuf-compiler-grpc python3-venv python3-pip unzip
      libmicrohttpd-dev libgnutls28-dev prometheus openssl
      slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
