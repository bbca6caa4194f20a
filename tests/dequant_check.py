#!/usr/bin/env python3
"""Dequantization bit for bit against an independent reference.

For each GGUF file given, every tensor is dequantized by Tessera (tests/dequant_dump.c, which
calls kernels/quant's tsr_dequant_row) and by the `gguf` Python package
(gguf.quants.dequantize, NumPy code written apart from ggml's C); the float32 results must be
identical bit for bit (compared as uint32, so -0.0 / NaN payloads count). Prints one line per
(file, type) with the number of tensors and values compared; fails naming the first tensor and
element that differ.

usage: dequant_check.py DEQUANT_DUMP_BINARY FILE.gguf...
"""
import subprocess
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def check_file(dump_bin, path):
    reader = GGUFReader(path)
    proc = subprocess.run([dump_bin, path], capture_output=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"FAIL {path}: dequant_dump exited {proc.returncode}: {proc.stderr.decode()}")
    ours = np.frombuffer(proc.stdout, dtype=np.uint32)
    pos = 0
    per_type = {}
    for t in reader.tensors:
        want = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(-1)
        n = want.size
        if pos + n > ours.size:
            sys.exit(f"FAIL {path}: tensor {t.name}: Tessera wrote {ours.size} values in all, "
                     f"fewer than the file holds")
        got = ours[pos:pos + n]
        want_bits = want.view(np.uint32)
        if not np.array_equal(got, want_bits):
            k = int(np.nonzero(got != want_bits)[0][0])
            g = got[k:k + 1].view(np.float32)[0]
            sys.exit(f"FAIL {path}: tensor {t.name} ({t.tensor_type.name}) element {k}: "
                     f"expected {want[k]!r} [{want_bits[k]:08x}] (gguf package) got {g!r} "
                     f"[{got[k]:08x}] (Tessera)")
        pos += n
        name = t.tensor_type.name
        c = per_type.setdefault(name, [0, 0])
        c[0] += 1
        c[1] += n
    if pos != ours.size:
        sys.exit(f"FAIL {path}: Tessera wrote {ours.size} values, the file holds {pos}")
    for name, (nt, nv) in sorted(per_type.items()):
        print(f"ok {path.rsplit('/', 1)[-1]}: {name}: {nt} tensors, {nv} values bit-identical")
    return set(per_type)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    seen = set()
    for path in sys.argv[2:]:
        seen |= check_file(sys.argv[1], path)
    print("types checked:", ", ".join(sorted(seen)))


if __name__ == "__main__":
    main()
