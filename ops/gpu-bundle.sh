#!/usr/bin/env bash
# ops/gpu-bundle.sh — package a CUDA build made HERE for a device machine whose image lacks
# the build's Debian dependencies (gRPC core, protobuf-c, Open MPI, libmicrohttpd, cJSON,
# PCRE2, GnuTLS, ...): ops/gpu-check.sh cannot configure there, so the binaries travel.
#   .gpu-carry/bundle.tar.xz  bundle/bin   tessera, gpu_check, spec_check, replica_check
#                             bundle/lib   every shared library they load except glibc's,
#                                          libstdc++/libgcc_s, the driver (libcuda) and NCCL
#                                          (208 MB: the device image's own is used)
#                             bundle/root  Open MPI 4.1 + PMIx + hwloc + libevent at their
#                                          Debian paths (mpirun, orted, MCA plugins), and
#                                          protoc + grpc_python_plugin (the gRPC test's stubs)
# ops/gpu-bundle-run.sh unpacks it on the device machine (never overwriting a file there)
# and runs the GPU checks and benchmarks. Build first, for the device's architecture only:
#   cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTESSERA_CUDA=ON \
#         -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-gpu -j2 \
#         --target tessera gpu_check spec_check replica_check
# then ops/gpu-stage.sh (models, llama.cpp source) and this script; the run carries
# [".gpu-carry"]. Usage: ops/gpu-bundle.sh [BUILD_DIR]   (default build-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-gpu}
out=.gpu-carry
bins=("$B/tessera" "$B/tests/gpu_check" "$B/tests/spec_check" "$B/tests/replica_check")
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "gpu-bundle: $b is missing (build it first, see the header)" >&2; exit 1; }
done
[ "$(nm -C "$B/tests/gpu_check" 2>/dev/null | grep -c tsr_cuda_)" -gt 0 ] || {
  echo "gpu-bundle: $B was not built with the CUDA backend (TESSERA_CUDA=ON)" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d /tmp/tsr_gpu_bundle.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
d="$tmp/bundle"
mkdir -p "$d/bin" "$d/lib" "$d/root"
cp "${bins[@]}" "$d/bin/"
strip --strip-debug "$d"/bin/* 2>/dev/null || true
# the libraries the binaries load, less what every Linux (or the driver, or NCCL's wheel)
# provides; a newer copy already on the device wins (same soname = same ABI)
# protoc + grpc_python_plugin: the gRPC test's Python stubs (the image has grpcio, no protoc)
tools=(/usr/bin/protoc /usr/bin/grpc_python_plugin)
for b in "${bins[@]}" "${tools[@]}"; do ldd "$b"; done | awk '/=> \// {print $1, $3}' | sort -u |
  grep -vE '^(libc|libm|libdl|libpthread|librt|libresolv|libstdc\+\+|libgcc_s|libcuda|libnccl)\.so' |
  while read -r name path; do cp -L "$path" "$d/lib/$name"; done
# Open MPI and what its launcher loads at run time (plugins, help texts, configuration)
pkgs=(libopenmpi3 openmpi-bin openmpi-common libpmix2 libhwloc15 libhwloc-plugins
      libevent-core-2.1-7 libevent-pthreads-2.1-7 libevent-2.1-7)
for p in "${pkgs[@]}"; do dpkg -L "$p"; done | sort -u | while read -r f; do
  if [ -L "$f" ] || [ -f "$f" ]; then echo "${f#/}"; fi
done >"$tmp/files"
for l in /usr/bin/mpirun /usr/bin/mpiexec "${tools[@]}"; do # mpirun: Debian's alternatives
  echo "${l#/}" >>"$tmp/files"
done
tar -C / -cf - -T "$tmp/files" | tar -C "$d/root" -xf -
for l in mpirun mpiexec; do rm -f "$d/root/usr/bin/$l"; ln -s orterun "$d/root/usr/bin/$l"; done
tar -C "$tmp" -cJf "$out/bundle.tar.xz" bundle
du -sh "$out/bundle.tar.xz"
repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$(( repo + $(du -sb "$out" | cut -f1) ))
echo "gpu-bundle: repository + .gpu-carry = $(( total / 1048576 )) MiB of the 64 MiB a run carries"
[ "$total" -lt $(( 62 * 1048576 )) ] || { echo "gpu-bundle: over the limit" >&2; exit 1; }
