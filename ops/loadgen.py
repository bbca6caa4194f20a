#!/usr/bin/python3
"""loadgen.py — load generator for `tessera serve`: gRPC (tessera.v1.Inference/Generate) or
HTTP (`--protocol http`: POST /v1/completions with stream=true, Server-Sent Events).

Runs N Generate requests with C in flight at once and prints throughput (generated
tokens/s over the wall time), time to first token and inter-token latency (p50 / p99).
Inter-token latency is measured per token: a message carrying k tokens that arrives t
after the previous one counts k gaps of t/k (the server coalesces tokens produced while
a send is in flight). Over HTTP the chunks carry their token ids (the vLLM extension
`return_token_ids`), so both protocols count tokens the same way; each thread keeps one
connection (HTTP/1.1 keep-alive) as a gRPC channel does.

Keys and TLS: `--api-key KEY` (gRPC `authorization` metadata / HTTP `Authorization: Bearer`),
`--tls-ca FILE` (TLS, verifying the server with this CA), `--tls-cert FILE --tls-key FILE`
(a client certificate for mutual TLS).

Needs Debian's python3-grpcio and python3-grpc-tools (run with /usr/bin/python3); the stubs
are generated from proto/ into a temporary folder at start.

  /usr/bin/python3 ops/loadgen.py --target 127.0.0.1:50051 --concurrency 16 --requests 200
  /usr/bin/python3 ops/loadgen.py --protocol http --target 127.0.0.1:8080 -c 16 -n 200

Prefix caching: `--shared-prefix N --suffix M` sends token-id prompts (gRPC prompt_ids) of
BOS + N - 1 ids shared by every request (a system prompt) + M ids of its own, random over
the model's vocabulary (ModelInfo), seeded; compare TTFT against `serve --no-prefix-cache`.

  /usr/bin/python3 ops/loadgen.py --target 127.0.0.1:50051 -c 1 -n 32 --shared-prefix 512 --suffix 32
"""
import argparse
import http.client
import json
import ssl
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park",
           "One day, a big bird", "The sun was", "Ben had a red ball", "Mom said",
           "There was a tree", "The cat sat on the mat and", "A girl named Sue"]


def load_stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="tsr-loadgen-")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir, "--python_out", out,
           "--grpc_python_out", out, "tessera.proto"]
    r = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        sys.exit("loadgen: cannot generate stubs from %s: %s" % (proto_dir, r.stderr.strip()))
    sys.path.insert(0, out)
    import tessera_pb2
    import tessera_pb2_grpc
    return out, tessera_pb2, tessera_pb2_grpc


def _grpc_stream(it, spec_counts, lock):
    """The messages of a Generate stream, counting speculation from the last one."""
    for r in it:
        if r.HasField("usage"):
            with lock:
                spec_counts[0] += r.usage.spec_drafted
                spec_counts[1] += r.usage.spec_accepted
        yield r


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of tessera serve")
    ap.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight")
    ap.add_argument("--requests", "-n", type=int, default=64, help="requests in all")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--prompt", default=None, help="one prompt for all (default: a mix)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline per request, s")
    ap.add_argument("--speculation", choices=["default", "off", "auto"], default="default",
                    help="per-request speculative decoding (the server needs a drafter; "
                    "gRPC only: over HTTP the server's default applies)")
    ap.add_argument("--proto", default=os.path.join(ROOT, "proto"), help="proto folder")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc",
                    help="gRPC Generate or HTTP /v1/completions with SSE (default grpc)")
    ap.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY") or None,
                    help="key sent as 'Bearer KEY' (default: $TESSERA_API_KEY)")
    ap.add_argument("--api-key-file", default=None,
                    help="the first key of this file (as `tessera ctl --api-key-file`)")
    ap.add_argument("--tls-ca", default=None, help="TLS: verify the server with this CA (PEM)")
    ap.add_argument("--tls-cert", default=None, help="mutual TLS: client certificate (PEM)")
    ap.add_argument("--tls-key", default=None, help="mutual TLS: client key (PEM)")
    ap.add_argument("--input", default=None,
                    help="a `tessera batch` JSONL file: one request per line with its prompt, "
                         "max_tokens, temperature, seed, ignore_eos (sets --requests)")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                    help="token-id prompts: BOS + N - 1 ids shared by every request ...")
    ap.add_argument("--suffix", type=int, default=0, metavar="M",
                    help="... + M ids of its own (gRPC only)")
    a = ap.parse_args()
    if a.api_key_file:
        with open(a.api_key_file) as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            sys.exit("loadgen: --api-key-file %s: no key in the file" % a.api_key_file)
        a.api_key = keys[0]
    items = None
    if (a.shared_prefix or a.suffix) and (a.protocol != "grpc" or a.input or a.prompt):
        ap.error("--shared-prefix/--suffix are gRPC only, without --input or --prompt")
    if a.shared_prefix < 0 or a.suffix < 0 or ((a.shared_prefix or a.suffix) and
                                               a.shared_prefix + a.suffix < 1):
        ap.error("--shared-prefix and --suffix must be >= 0, together >= 1")
    if a.input:
        items = []
        with open(a.input) as f:
            for line in f:
                if line.strip():
                    o = json.loads(line)
                    items.append(o.get("body", o))
        a.requests = len(items)
    if a.concurrency < 1 or a.requests < 1 or a.max_tokens < 1:
        ap.error("--concurrency, --requests and --max-tokens must be >= 1")
    if (a.tls_cert is None) != (a.tls_key is None) or (a.tls_cert and not a.tls_ca):
        ap.error("--tls-cert and --tls-key go together, and need --tls-ca")
    for f in (a.tls_ca, a.tls_cert, a.tls_key):
        if f and not os.path.isfile(f):
            ap.error("cannot read %s" % f)
    md = [("authorization", "Bearer " + a.api_key)] if a.api_key else []

    stub_dir, pb, pbg = load_stubs(a.proto) if a.protocol == "grpc" else (None, None, None)
    try:
        stub = ch = None
        if a.protocol == "grpc":
            if a.tls_ca:
                rd = lambda f: open(f, "rb").read() if f else None  # noqa: E731
                creds = grpc.ssl_channel_credentials(rd(a.tls_ca), rd(a.tls_key),
                                                     rd(a.tls_cert))
                ch = grpc.secure_channel(a.target, creds)
            else:
                ch = grpc.insecure_channel(a.target)
            try:
                grpc.channel_ready_future(ch).result(timeout=10)
            except grpc.FutureTimeoutError:
                sys.exit("loadgen: cannot connect to %s within 10 s" % a.target)
            stub = pbg.InferenceStub(ch)
        id_prompts = None
        if a.shared_prefix or a.suffix:
            mi = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=md)
            # Ordinary tokens: above the byte/special ids at the bottom of most vocabularies.
            lo, hi = min(300, mi.vocab_size // 2), mi.vocab_size
            prng = random.Random(1234)
            head = ([mi.bos_id] if mi.HasField("bos_id") and mi.bos_id >= 0 else []) + [
                prng.randrange(lo, hi) for _ in range(max(a.shared_prefix - 1, 0))]
            id_prompts = [head + [prng.randrange(lo, hi) for _ in range(a.suffix)]
                          for _ in range(a.requests)]
        host, _, port = a.target.rpartition(":")
        ctx = None
        if a.tls_ca:
            ctx = ssl.create_default_context(cafile=a.tls_ca)
            if a.tls_cert:
                ctx.load_cert_chain(a.tls_cert, a.tls_key)
        lock = threading.Lock()
        next_req = [0]
        ttft, itl, errors = [], [], {}
        tokens = [0]
        spec_counts = [0, 0]  # drafted, accepted
        rng = random.Random(0)
        prompts = [a.prompt or rng.choice(PROMPTS) for _ in range(a.requests)]

        def http_generate(conn, q):
            """One streamed completion; yields the number of tokens of each chunk."""
            body = json.dumps(dict(q, stream=True, return_token_ids=True))
            hdr = {"Content-Type": "application/json", "Accept": "text/event-stream"}
            if a.api_key:
                hdr["Authorization"] = "Bearer " + a.api_key
            conn.request("POST", "/v1/completions", body=body, headers=hdr)
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError("HTTP %d: %s" % (r.status, r.read()[:200]))
            while True:
                line = r.readline()
                if not line:
                    raise RuntimeError("stream ended without [DONE]")
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    r.read()
                    return
                ev = json.loads(data)
                if "error" in ev:
                    raise RuntimeError(ev["error"].get("message", "error"))
                yield sum(len(c.get("token_ids", [])) for c in ev.get("choices", []))

        def worker():
            conn = None
            if a.protocol == "http":
                conn = (http.client.HTTPSConnection(host, int(port), context=ctx,
                                                    timeout=a.timeout) if ctx else
                        http.client.HTTPConnection(host, int(port), timeout=a.timeout))
            while True:
                with lock:
                    i = next_req[0]
                    if i >= a.requests:
                        return
                    next_req[0] += 1
                if items:
                    it = items[i]
                    q = dict(prompt=it["prompt"], max_tokens=it.get("max_tokens", 16),
                             temperature=it.get("temperature", 1.0),
                             ignore_eos=it.get("ignore_eos", False), seed=it.get("seed", i))
                elif id_prompts:
                    q = dict(prompt_ids=id_prompts[i], max_tokens=a.max_tokens,
                             temperature=a.temperature, ignore_eos=a.ignore_eos, seed=i)
                else:
                    q = dict(prompt=prompts[i], max_tokens=a.max_tokens,
                             temperature=a.temperature, ignore_eos=a.ignore_eos, seed=i)
                req = None
                if conn is None:
                    spec = {"default": pb.SPECULATION_DEFAULT, "off": pb.SPECULATION_OFF,
                            "auto": pb.SPECULATION_AUTO}[a.speculation]
                    req = pb.GenerateRequest(speculation=spec, **q)
                t0 = time.perf_counter()
                prev, first, gaps, n = None, None, [], 0
                try:
                    if conn is not None:
                        counts = http_generate(conn, q)
                    else:
                        counts = (len(r.token_ids) for r in
                                  _grpc_stream(stub.Generate(req, timeout=a.timeout,
                                                             metadata=md), spec_counts, lock))
                    for k in counts:
                        if k == 0:
                            continue
                        t = time.perf_counter()
                        if first is None:
                            first = t - t0
                            gaps += [(t - t0) / k] * (k - 1)
                        else:
                            gaps += [(t - prev) / k] * k
                        prev = t
                        n += k
                except grpc.RpcError as e:
                    with lock:
                        key = "%s: %s" % (e.code().name, (e.details() or "")[:80])
                        errors[key] = errors.get(key, 0) + 1
                    continue
                except (OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
                    with lock:
                        key = "%s: %s" % (type(e).__name__, str(e)[:80])
                        errors[key] = errors.get(key, 0) + 1
                    if conn is not None:
                        conn.close()  # reconnects on the next request
                    continue
                with lock:
                    tokens[0] += n
                    if first is not None:
                        ttft.append(first)
                    itl.extend(gaps)

        t_start = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True)
                   for _ in range(min(a.concurrency, a.requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        if ch is not None:
            ch.close()
    finally:
        if stub_dir:
            shutil.rmtree(stub_dir, ignore_errors=True)

    ok = a.requests - sum(errors.values())
    print("target:          %s (%s%s)" % (a.target, a.protocol, ", TLS" if a.tls_ca else ""))
    print("requests:        %d ok, %d failed, concurrency %d, max_tokens %d"
          % (ok, a.requests - ok, a.concurrency, a.max_tokens))
    if a.shared_prefix or a.suffix:
        print("prompts:         shared prefix %d + suffix %d token ids" % (a.shared_prefix,
                                                                          a.suffix))
    print("wall time:       %.2f s (%.2f requests/s)" % (wall, ok / wall))
    print("throughput:      %.1f generated tokens/s (%d tokens)" % (tokens[0] / wall, tokens[0]))
    print("TTFT:            p50 %.1f ms, p99 %.1f ms" % (pct(ttft, 50) * 1e3, pct(ttft, 99) * 1e3))
    print("inter-token:     p50 %.2f ms, p99 %.2f ms" % (pct(itl, 50) * 1e3, pct(itl, 99) * 1e3))
    if spec_counts[0]:
        print("speculation:     %d drafted, %d accepted (%.1f%%)" % (
            spec_counts[0], spec_counts[1], 100.0 * spec_counts[1] / spec_counts[0]))
    for k, v in sorted(errors.items()):
        print("error:           %dx %s" % (v, k))
    return 0 if ok == a.requests else 1


if __name__ == "__main__":
    sys.exit(main())
