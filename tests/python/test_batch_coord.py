#!/usr/bin/python3
"""test_batch_coord.py — `tessera batch --coordinator ADDR` against a real cluster.

Real processes only: a `tessera coordinator`, two replicas that join it (`tessera serve
--join`, stories260K, --chat-template chatml so chat lines run), and `tessera batch` in
both modes. The reference of every line is local-mode `tessera batch` (the model loaded in
the process) on the same file with the same --seed: the outputs must be equal as sets of
lines, byte for byte — except the error line of a prompt too long for the context, which
the cluster judges (same key and code, its own message).

Tests:
  mixed      a 100-line file (Batch API completions, plain lines, chat lines, greedy and
             seeded sampling, unseeded lines seeded by --seed, 10 malformed lines) through
             the cluster: equal to the local run; --ordered too (input order); logprobs
             lines (token strings from the replicas' answers, a non-ASCII piece among the
             top 20) equal to the local run without -m MODEL, and with it.
  replica    (release) a replica killed with kill -9 mid-run: exit 0, each custom_id
             exactly once, every line exact (the coordinator resumes the broken streams).
  secure     (after mixed) a replica with an API key and mutual TLS, addressed directly:
             without the key, exit 1 naming the credentials; with --tls-ca/--tls-cert/
             --tls-key and $TESSERA_API_KEY (then --api-key-file), equal to the local run.
  coord      the coordinator killed mid-run: batch exits 3 ("incomplete") within its
             --retry-timeout, what it wrote is exact; the coordinator restarted on the same
             port, the replicas rejoin, the rerun of the same command completes: equal to
             the local run, each custom_id once.

usage: test_batch_coord.py --tessera BUILD/tessera --model stories260K.gguf [--lean]
(--lean: the sanitizer tree's version: mixed (50 lines) and coord (16 short lines).)
Prints one line per test and `N passed, M failed`; exits 1 on any failure.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_batch  # noqa: E402  (make_input: the mixed file of the batch tests)
import tsrtest  # noqa: E402  (Proc: a process on an ephemeral port)
from tsrtest import make_certs  # noqa: E402  (a test CA, server and client certs)

CTX = 256
SEED = 7


class Proc(tsrtest.Proc):
    """A tessera process whose stderr says 'listening on HOST:PORT', its log in tmp."""

    def __init__(self, cmd, tmp, name, timeout=60):
        super().__init__(cmd, timeout=timeout, log_prefix=name + "-", log_dir=tmp)


def make_long_input(path, n, tokens, seed=5):
    """n lines of long generations (so a run lasts long enough to be interrupted): greedy
    and seeded sampling, completions and plain lines."""
    rnd = random.Random(seed)
    words = test_batch.WORDS
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 8))).capitalize()
            body = {"prompt": prompt, "max_tokens": rnd.randint(*tokens)}
            if i % 2:
                body.update(temperature=rnd.choice([0.5, 0.75, 1.0]), seed=rnd.randint(0, 1 << 30),
                            top_p=rnd.choice([1.0, 0.875]))
            else:
                body["temperature"] = 0
            cid = "long-%03d" % i
            obj = ({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}
                   if i % 3 == 0 else dict(body, custom_id=cid))
            f.write(json.dumps(obj) + "\n")


def add_chat_lines(path, n, seed=9):
    """Chat lines (rendered with --chat-template chatml on both sides)."""
    rnd = random.Random(seed)
    with open(path, "a") as f:
        for i in range(n):
            body = {"messages": [{"role": "system", "content": "You tell stories."},
                                 {"role": "user", "content": rnd.choice(
                                     ["Tell me about Lily.", "What did Tom see?",
                                      [{"type": "text", "text": "A story "},
                                       {"type": "text", "text": "about a dog."}]])}],
                    "max_completion_tokens": rnd.randint(4, 20)}
            if i % 2:
                body["temperature"] = 0
            f.write(json.dumps({"custom_id": "chat-%d" % i, "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")


def norm(line):
    """The comparable form of an output line: the cluster's own message for a prompt too
    long for the context is not compared (the code is)."""
    o = json.loads(line)
    if o.get("error") and o["error"]["code"] == "prompt_too_long":
        o["error"]["message"] = "(cluster)"
        return json.dumps(o, sort_keys=True)
    return line


def read_lines(path):
    with open(path) as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def key_of(line):
    o = json.loads(line)
    return o["custom_id"] if o["custom_id"] is not None else "line:%d" % o["line"]


def expect_equal(ref_path, out_path, what):
    ref, out = read_lines(ref_path), read_lines(out_path)
    keys = [key_of(x) for x in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, "%s: custom_ids written more than once: %s" % (what, dup[:5])
    a, b = sorted(norm(x) for x in ref), sorted(norm(x) for x in out)
    if a != b:
        only_ref = [x for x in a if x not in set(b)]
        only_out = [x for x in b if x not in set(a)]
        raise AssertionError("%s: %d lines expected, %d got; %d differ.\nexpected: %s\ngot:      %s"
                             % (what, len(a), len(b), len(only_ref),
                                only_ref[:1], only_out[:1]))


def expect_subset(ref_path, out_path, what):
    ref = {key_of(x): norm(x) for x in read_lines(ref_path)}
    for x in read_lines(out_path):
        k = key_of(x)
        assert k in ref, "%s: unexpected line %s" % (what, x[:200])
        assert norm(x) == ref[k], "%s: line %s differs:\nexpected %s\ngot      %s" % (
            what, k, ref[k][:300], norm(x)[:300])


class Cluster:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.coord = None
        self.replicas = {}
        self.start_coordinator("127.0.0.1:0")
        for name in ("a", "b"):
            self.start_replica(name)
        self.wait_joined(2)

    def start_coordinator(self, listen):
        self.coord = Proc([self.args.tessera, "coordinator", "--listen", listen], self.tmp,
                          "coordinator")
        self.addr = "127.0.0.1:%d" % self.coord.port

    def start_replica(self, name):
        self.replicas[name] = Proc(
            [self.args.tessera, "serve", "-m", self.args.model, "-c", str(CTX), "-t", "1",
             "--chat-template", "chatml", "--listen", "127.0.0.1:0", "--join", self.addr,
             "--name", name], self.tmp, "replica-" + name)

    def wait_joined(self, n, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run([self.args.tessera, "ctl", "--coordinator", self.addr, "--json",
                                "replicas"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                up = [x for x in json.loads(r.stdout).get("replicas", [])
                      if x.get("state") == "up"]
                if len(up) >= n:
                    return
            time.sleep(0.2)
        raise AssertionError("replicas did not join %s within %d s" % (self.addr, timeout))

    def stop(self):
        for p in list(self.replicas.values()) + [self.coord]:
            if p:
                p.kill()


def batch_cmd(args, inp, out, *extra, coord=None):
    cmd = [args.tessera, "batch", "-i", inp, "-o", out, "--seed", str(SEED),
           "--progress-interval", "0"]
    if coord:
        cmd += ["--coordinator", coord]
    else:
        cmd += ["-m", args.model, "-c", str(CTX), "-t", "1", "--chat-template", "chatml"]
    return cmd + list(extra)


def run(cmd, timeout=240):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr


def wait_lines(path, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and len(read_lines(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError("batch ended before writing %d lines" % n)
        time.sleep(0.05)
    raise AssertionError("no %d lines in %s within %d s" % (n, path, timeout))


def t_mixed(args, tmp, cl):
    inp, ref = os.path.join(tmp, "mixed.jsonl"), os.path.join(tmp, "mixed.local.jsonl")
    test_batch.make_input(inp, 95 if not args.lean else 25)
    add_chat_lines(inp, 5)
    rc, err = run(batch_cmd(args, inp, ref))
    assert rc == 0, "local batch: exit %d\n%s" % (rc, err[-2000:])
    out = os.path.join(tmp, "mixed.coord.jsonl")
    rc, err = run(batch_cmd(args, inp, out, coord=cl.addr))
    assert rc == 0, "batch --coordinator: exit %d\n%s" % (rc, err[-2000:])
    expect_equal(ref, out, "mixed through the cluster")
    errs = [json.loads(x) for x in read_lines(out) if json.loads(x)["error"]]
    assert len(errs) == 9, "expected 9 error lines (the malformed ones), got %d" % len(errs)
    chats = [json.loads(x) for x in read_lines(out) if key_of(x).startswith("chat-")]
    assert len(chats) == 5 and all(c["response"]["body"]["object"] == "chat.completion"
                                   for c in chats), "chat lines: %s" % chats[:1]
    out2 = os.path.join(tmp, "mixed.ordered.jsonl")
    rc, err = run(batch_cmd(args, inp, out2, "--ordered", "--concurrency", "8", coord=cl.addr))
    assert rc == 0, "batch --coordinator --ordered: exit %d\n%s" % (rc, err[-2000:])
    expect_equal(ref, out2, "--ordered through the cluster")
    order = [key_of(x) for x in read_lines(out2)]
    ref_order = [key_of(x) for x in read_lines(ref)]
    # The local run writes as lines finish; input order is the ordered run's.
    with open(inp) as f:
        in_keys = []
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                k = o.get("custom_id") if isinstance(o, dict) else None
            except ValueError:
                k = None
            in_keys.append(k if isinstance(k, str) and k else "line:%d" % ln)
    assert order == in_keys, "--ordered: not in input order: %s ..." % order[:8]
    assert sorted(order) == sorted(ref_order)
    # logprobs: the token strings come with the replicas' answers (Logprobs.token), so the
    # lines equal local mode's without -m; with -m (the vocabulary checked) too.
    lp, lp_ref = os.path.join(tmp, "lp.jsonl"), os.path.join(tmp, "lp.local.jsonl")
    with open(lp, "w") as f:
        f.write(json.dumps({"custom_id": "lp1", "prompt": "Once upon a time", "max_tokens": 6,
                            "temperature": 0, "logprobs": 3}) + "\n")
        f.write(json.dumps({"custom_id": "lp2", "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": {"messages": [{"role": "user", "content": "Hi"}],
                                     "max_completion_tokens": 5, "temperature": 0.7,
                                     "seed": 3, "logprobs": True, "top_logprobs": 2}}) + "\n")
        # Among its top 20 a piece that is part of a UTF-8 character (shown as '?').
        f.write(json.dumps({"custom_id": "lp3", "prompt": "Caf\u00e9 \u2615 na\u00efve",
                            "max_tokens": 8, "temperature": 1.0, "seed": 1,
                            "logprobs": 20}) + "\n")
    rc, err = run(batch_cmd(args, lp, lp_ref))
    assert rc == 0, "local batch (logprobs): exit %d\n%s" % (rc, err[-2000:])
    tops = [t for x in read_lines(lp_ref) if key_of(x) == "lp3"
            for d in json.loads(x)["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"]
            for t in d]
    assert any("?" in t for t in tops), (
        "lp3: expected a partial UTF-8 piece ('?') among the alternatives, got: %s" % tops)
    lp_out = os.path.join(tmp, "lp.coord-novocab.jsonl")
    rc, err = run(batch_cmd(args, lp, lp_out, coord=cl.addr))
    assert rc == 0, "batch --coordinator (logprobs, no -m): exit %d\n%s" % (rc, err[-2000:])
    expect_equal(lp_ref, lp_out, "logprobs through the cluster without -m")
    lp_out = os.path.join(tmp, "lp.coord.jsonl")
    rc, err = run(batch_cmd(args, lp, lp_out, "-m", args.model, coord=cl.addr))
    assert rc == 0, "batch --coordinator -m (logprobs): exit %d\n%s" % (rc, err[-2000:])
    expect_equal(lp_ref, lp_out, "logprobs through the cluster with -m")
    return ("%d lines (chat, sampling, 10 malformed) equal to local mode, --ordered too; "
            "logprobs lines without -m too" % len(read_lines(ref)))


def t_secure(args, tmp, cl):
    inp, ref = os.path.join(tmp, "mixed.jsonl"), os.path.join(tmp, "mixed.local.jsonl")
    assert os.path.exists(ref), "needs the mixed test's files"
    p = make_certs(tmp)
    key = os.path.join(tmp, "api.keys")
    with open(key, "w") as f:
        f.write("# batch test\nsecret-batch-key\n")
    rep = Proc([args.tessera, "serve", "-m", args.model, "-c", str(CTX), "-t", "1",
                "--chat-template", "chatml", "--listen", "127.0.0.1:0", "--api-key-file", key,
                "--tls-cert", p("server.crt"), "--tls-key", p("server.key"),
                "--tls-client-ca", p("ca.crt")], tmp, "replica-secure")
    try:
        addr = "127.0.0.1:%d" % rep.port
        tls = ["--tls-ca", p("ca.crt"), "--tls-cert", p("client.crt"), "--tls-key",
               p("client.key")]
        env = dict(os.environ)
        env.pop("TESSERA_API_KEY", None)
        out = os.path.join(tmp, "mixed.secure-nokey.jsonl")
        r = subprocess.run(batch_cmd(args, inp, out, *tls, coord=addr), capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, (
            "without a key: exit %d, expected 1 naming UNAUTHENTICATED:\n%s" % (
                r.returncode, r.stderr[-1500:]))
        assert not os.path.exists(out) or not read_lines(out), "lines written without a key"
        out = os.path.join(tmp, "mixed.secure.jsonl")
        env["TESSERA_API_KEY"] = "secret-batch-key"
        r = subprocess.run(batch_cmd(args, inp, out, *tls, coord=addr), capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0 and "(TLS)" in r.stderr, "TLS + key: exit %d\n%s" % (
            r.returncode, r.stderr[-1500:])
        expect_equal(ref, out, "over mutual TLS with a key")
        env.pop("TESSERA_API_KEY")
        out = os.path.join(tmp, "mixed.secure-file.jsonl")
        r = subprocess.run(batch_cmd(args, inp, out, *tls, "--api-key-file", key, coord=addr),
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, "--api-key-file: exit %d\n%s" % (r.returncode,
                                                                   r.stderr[-1500:])
        expect_equal(ref, out, "with --api-key-file")
    finally:
        rep.kill()
    return "mutual TLS + API key (env and file) equal to local mode; no key: exit 1"


def long_reference(args, tmp):
    """Release: 64 lines of 120..200 tokens; lean: 16 lines of 40..60."""
    inp, ref = os.path.join(tmp, "long.jsonl"), os.path.join(tmp, "long.local.jsonl")
    if not os.path.exists(ref):
        make_long_input(inp, 16 if args.lean else 64, (40, 60) if args.lean else (120, 200))
        rc, err = run(batch_cmd(args, inp, ref))
        assert rc == 0, "local batch (long): exit %d\n%s" % (rc, err[-2000:])
    return inp, ref


def t_replica(args, tmp, cl):
    inp, ref = long_reference(args, tmp)
    out = os.path.join(tmp, "long.replica-kill.jsonl")
    # 16 calls in flight over 64 lines: the first lines finish while most still wait.
    p = subprocess.Popen(batch_cmd(args, inp, out, "--flush-lines", "1", "--concurrency", "16",
                                   coord=cl.addr), stderr=subprocess.PIPE, text=True)
    wait_lines(out, 1, p)
    assert p.poll() is None, "the run ended before the replica was killed"
    cl.replicas["a"].kill()
    n_at_kill = len(read_lines(out))
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, "exit %d after a replica's kill -9\n%s" % (p.returncode, err[-2000:])
    expect_equal(ref, out, "a replica killed mid-run")
    cl.start_replica("a")  # back for the next test
    cl.wait_joined(2)
    return "replica kill -9 after %d of %d lines: exit 0, every custom_id once and exact" % (
        n_at_kill, len(read_lines(ref)))


def t_coord(args, tmp, cl):
    inp, ref = long_reference(args, tmp)
    out = os.path.join(tmp, "long.coord-kill.jsonl")
    cmd = batch_cmd(args, inp, out, "--flush-lines", "1", "--retry-timeout", "2000",
                    "--max-retries", "3", "--concurrency", "4" if args.lean else "16",
                    coord=cl.addr)
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_lines(out, 2, p)
    port = cl.coord.port
    cl.coord.kill()
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    took = time.time() - t0
    assert p.returncode == 3, "exit %d after the coordinator's kill -9, expected 3\n%s" % (
        p.returncode, err[-2000:])
    assert "incomplete" in err and took < 20, "took %.1f s; stderr: %s" % (took, err[-1500:])
    n_first = len(read_lines(out))
    assert n_first < len(read_lines(ref)), "everything was done before the kill"
    expect_subset(ref, out, "before the coordinator's kill")
    cl.start_coordinator("127.0.0.1:%d" % port)  # the replicas rejoin within a heartbeat
    cl.wait_joined(2)
    rc, err = run(cmd)
    assert rc == 0, "rerun: exit %d\n%s" % (rc, err[-2000:])
    assert "resuming" in err, "the rerun did not resume: %s" % err[-1000:]
    expect_equal(ref, out, "coordinator killed, then rerun")
    return "coordinator kill -9: exit 3 in %.1f s (%d lines kept), rerun complete and exact" % (
        took, n_first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lean", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        print("FAIL: model %s is missing" % args.model)
        return 1
    tests = [("mixed", t_mixed), ("secure", t_secure)] + (
        [] if args.lean else [("replica", t_replica)]) + [("coord", t_coord)]
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="tsr-batch-coord-") as tmp:
        cl = None
        try:
            cl = Cluster(args, tmp)
            for name, fn in tests:
                t0 = time.time()
                try:
                    msg = fn(args, tmp, cl)
                    print("PASS %-8s %5.1f s  %s" % (name, time.time() - t0, msg), flush=True)
                    passed += 1
                except Exception:  # noqa: BLE001 — report and go on
                    print("FAIL %-8s %5.1f s\n%s" % (name, time.time() - t0,
                                                     traceback.format_exc()), flush=True)
                    failed += 1
        except Exception:  # noqa: BLE001
            print("FAIL setup\n%s" % traceback.format_exc())
            failed += 1
        finally:
            if cl:
                if failed:
                    for p in [cl.coord] + list(cl.replicas.values()):
                        print("---- %s\n%s" % (p.log_path, p.output()[-1500:]))
                cl.stop()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
