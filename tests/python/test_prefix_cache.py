#!/usr/bin/python3
"""test_prefix_cache.py — prefix caching of `tessera serve`, end to end, against a cold server.

The client is Debian's python3-grpcio; the server fixtures are test_serve.py's (ephemeral
ports, every process killed at the end). 64 requests whose prompts share prefixes of 0, 16,
100 and 300 tokens (system-prompt-like; the suffixes differ; one in 8 is 16..64 tokens of
the 300-token family with no suffix, wholly cached in the second wave, which copies its
last block: copy-on-write), greedy and seeded sampling,
some with logprobs, some resumed after a failover (resumed_tokens), run concurrently on a KV
pool small enough to force preemptions (and evictions), twice (the second wave hits what the
first left in the cache). Every answer must equal the cold server's (`--no-prefix-cache`,
same pool): token ids, finish reason, usage, and logprobs bit for bit. Admin.Status must
show hits, hit tokens, lookups, evictions and (second wave) copies, and no block may stay referenced at the end
(kv_blocks_used 0, kv_blocks_free = total); /metrics must report the same counters. The
same on `mpirun -np 4 tessera serve --tp 2 --pp 2 --kv-type f16` against a cold server of
that layout and KV type.

usage: test_prefix_cache.py --tessera BUILD/tessera [--models DIR] [--proto DIR]
                            [--mpirun PATH] [--lean] [-k NAME]
--lean (the sanitizer tree): 16 requests, one process only.
Prints one line per test and `N passed, M failed`; exits 1 on any failure.
"""
import argparse
import concurrent.futures as cf
import os
import random
import re
import struct
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_serve as ts  # noqa: E402  (its Server, stubs and helpers)
import tsrtest  # noqa: E402  (the runner)

BLOCK_BYTES = 5 * 2 * 4 * 8 * 4 * 16  # stories260K: layers x K,V x kv heads x head_dim x f32 x 16
SHARED = [0, 16, 100, 300]


def make_requests(n):
    """n GenerateRequest kwargs: prefix family k % 4, differing suffixes."""
    rng = random.Random(20261204)
    fams = []
    for L in SHARED:
        fams.append([1] + [rng.randrange(259, 512) for _ in range(max(L - 1, 0))])
    out = []
    for k in range(n):
        fam = fams[k % 4]
        suffix = [rng.randrange(259, 512) for _ in range(5 + (k * 7) % 36)]
        prompt = (fam if fam[1:] else [1]) + suffix
        if k % 8 == 3:
            # block-aligned, no suffix: 16..64 tokens of the 300-token family, wholly cached
            # once a longer prompt of it ran (copy-on-write of the last block)
            prompt = fam[:16 * (1 + (k // 8) % 4)]
        kw = dict(prompt_ids=prompt, max_tokens=6 + k % 13, ignore_eos=True)
        if (k // 4) % 3 == 0:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=0.8, top_p=0.95, seed=1000 + k)
        if k % 2 == 1:
            kw["logprobs"] = 1
        if k % 16 == 6:  # a failover resume: the last 3 ids count as already generated
            kw["resumed_tokens"] = 3
        out.append(kw)
    return out


def f32(x):
    return struct.pack("<f", x)


def run_all(srv, reqs, concurrency=16):
    def one(kw):
        ids, lps, last = [], [], None
        for r in srv.inf.Generate(ts.pb.GenerateRequest(**kw), timeout=180):
            ids += list(r.token_ids)
            lps += [f32(lp.logprob) for lp in r.logprobs]
            last = r
        return dict(ids=ids, lps=lps, finish=last.finish_reason,
                    usage=(last.usage.prompt_tokens, last.usage.completion_tokens),
                    preempted=last.usage.preemptions)
    with cf.ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, reqs))


def compare(what, got, want, reqs):
    for k, (g, w) in enumerate(zip(got, want)):
        for key in ("ids", "finish", "usage", "lps"):
            if g[key] != w[key]:
                raise AssertionError(
                    "%s, request %d (prompt of %d ids, %s): %s differ\n  cold:   %s\n  cached: %s" % (
                        what, k, len(reqs[k]["prompt_ids"]),
                        "greedy" if reqs[k].get("temperature") == 0.0 else "seeded", key,
                        w[key], g[key]))


def settled(srv):
    return ts.wait_for(lambda: (lambda s: (s.requests_running == 0 and s.requests_queued == 0
                                           and s.kv_blocks_used == 0, s))(srv.status()),
                       30, "every request done and no KV block referenced")


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        body = r.read().decode()
    vals = {}
    for line in body.splitlines():
        m = re.match(r"^(tessera_prefix_cache_\w+|tessera_kv_blocks_cached) (\d+)$", line)
        if m:
            vals[m.group(1)] = int(m.group(2))
    return vals


def check(server_args, n_req, mpi_np=0, metrics=False, kv_type="f32"):
    reqs = make_requests(n_req)
    # 40 blocks = 640 positions: the longest prompts need 23 blocks each, so at most one or
    # two of them run at once and the rest wait, are preempted and evict cached blocks.
    block_bytes = BLOCK_BYTES // (2 if kv_type == "f16" else 1)
    common = ["--kv-type", kv_type, "--kv-memory", str(40 * block_bytes),
              "--max-batch-tokens", "64", "--max-seqs", "16"] + server_args
    cold = ts.Server(common + ["--no-prefix-cache"], mpi_np=mpi_np, start_timeout=120)
    try:
        want = run_all(cold, reqs)
        st = settled(cold)
        assert not st.prefix_cache and st.prefix_cache_lookups == 0 and st.kv_blocks_cached == 0, st
        cold_preempt = st.preemptions
    finally:
        cold.kill()
    extra = ["--http", "127.0.0.1:0"] if metrics else []
    warm = ts.Server(common + extra, mpi_np=mpi_np, start_timeout=120)
    try:
        got1 = run_all(warm, reqs)
        compare("first wave", got1, want, reqs)
        st1 = settled(warm)
        got2 = run_all(warm, reqs)
        compare("second wave", got2, want, reqs)
        st = settled(warm)
        print("    %s: %d requests x 2: lookups %d, hits %d (first wave %d), hit tokens %d, "
              "evictions %d, cached blocks %d/%d, copies %d, preemptions %d (cold: %d)" % (
                  ("tp 2 x pp 2" if mpi_np else "one process") + ", KV " + kv_type, n_req, st.prefix_cache_lookups,
                  st.prefix_cache_hits, st1.prefix_cache_hits, st.prefix_cache_hit_tokens,
                  st.prefix_cache_evictions, st.kv_blocks_cached, st.kv_blocks_total,
                  st.prefix_cache_copies,
                  st.preemptions, cold_preempt))
        assert st.prefix_cache, st
        assert st1.prefix_cache_hits > 0 and st.prefix_cache_hits > st1.prefix_cache_hits, st
        assert st.prefix_cache_hit_tokens >= 16 * st.prefix_cache_hits, st
        assert st.prefix_cache_lookups >= 2 * n_req, st
        assert st.prefix_cache_evictions > 0, st
        assert st.prefix_cache_copies > st1.prefix_cache_copies, st  # the second wave's
        # Preemption is forced by the pool size, but how often depends on how the 16
        # clients' requests arrive (a slow sanitizer build once ran one of the two servers
        # without any): the two servers together must have preempted.
        assert st.preemptions + cold_preempt > 0, (st.preemptions, cold_preempt)
        assert st.kv_blocks_used == 0 and st.kv_blocks_free == st.kv_blocks_total, st
        assert 0 < st.kv_blocks_cached <= st.kv_blocks_total, st
        if metrics:
            v = scrape(warm.wait_port())
            exp = {"tessera_prefix_cache_lookups_total": st.prefix_cache_lookups,
                   "tessera_prefix_cache_hits_total": st.prefix_cache_hits,
                   "tessera_prefix_cache_hit_tokens_total": st.prefix_cache_hit_tokens,
                   "tessera_prefix_cache_evictions_total": st.prefix_cache_evictions,
                   "tessera_prefix_cache_copies_total": st.prefix_cache_copies,
                   "tessera_kv_blocks_cached": st.kv_blocks_cached}
            assert v == exp, "/metrics %s, Admin.Status %s" % (v, exp)
    finally:
        warm.kill()


def test_one_process():
    check(["-t", "1"], 16 if ARGS.lean else 64, metrics=True)


def test_mpi_tp2_pp2():
    check(["--tp", "2", "--pp", "2", "-t", "1"], 32, mpi_np=4, kv_type="f16")


TESTS = [test_one_process, test_mpi_tp2_pp2]


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--models", default=os.path.join(HERE, "..", "..", "..", "shared", "models"))
    ap.add_argument("--proto", default=os.path.join(HERE, "..", "..", "proto"))
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--lean", action="store_true", help="sanitizer tree: one process, 16 requests")
    ap.add_argument("-k", default="")
    ARGS = ap.parse_args()
    ARGS.models = os.environ.get("TESSERA_MODELS") or ARGS.models
    ARGS.model = os.path.join(ARGS.models, "stories260K.gguf")
    ts.ARGS = ARGS
    if not os.path.exists(ARGS.model):
        print("missing model %s (set TESSERA_MODELS)" % ARGS.model)
        print("0 passed, 1 failed")
        return 1
    tests = [t for t in TESTS if not (ARGS.lean and t is test_mpi_tp2_pp2)]
    return tsrtest.run_tests(tests, ARGS.k,
                             setup=lambda tmp: ts.make_stubs(os.path.abspath(ARGS.proto), tmp))


if __name__ == "__main__":
    sys.exit(main())
