#!/usr/bin/python3
"""test_coord_front.py — the coordinator's front doors with keys and TLS, end to end.

Real processes: `tessera coordinator` with keys (--api-key-file / --admin-key-file) and TLS
(--tls-cert / --tls-key), a replica that itself serves TLS with its own key and joins it
(`serve --join --join-key-file --join-tls-ca`), the coordinator dialling it with
--replica-key-file / --replica-tls-ca; clients are `tessera ctl` (--tls-ca, --api-key-file,
$TESSERA_API_KEY) and Debian's python3-grpcio with the test CA (openssl at test time, as in
test_http.py). Greedy streams are compared with single-process `tessera generate`.

Tests (-k NAME runs those whose name contains NAME):
  secure   keyed + TLS replica serving through a keyed + TLS coordinator: exact stream;
           UNAUTHENTICATED (no / wrong key), PERMISSION_DENIED (inference key on Cluster),
           Health without a key; plaintext against the TLS port fails cleanly; ctl with
           --tls-ca and an admin key (file and environment), ctl's errors (no CA, no key,
           inference key, bad files: exit 1; flag misuse: exit 2); SIGHUP re-reads the keys;
           the coordinator's start errors (open address without keys, bad TLS files);
           HTTPS on the coordinator's --http port with the same keys (401 / 403) and exact.
  http     `coordinator --http` over two replicas: the official openai client, completions
           and chat, streaming and not, equal `tessera generate` / `tessera chat`; /v1/models
           lists the cluster's model, /health; a replica killed with SIGKILL mid-stream: the
           HTTP streams complete exactly (failover); promtool checks /metrics, which has
           per-replica labels and tessera_failovers_total > 0; bad requests keep their
           statuses (404 unknown model, 400 bad field / logprobs, 503 no replica);
           logprobs through the coordinator equal the replica's own HTTP (completions and
           chat, streaming and not, and across the failover); gRPC Generate calls through
           the coordinator move its TTFT / inter-token / end-to-end histograms.

usage: test_coord_front.py --tessera BUILD/tessera --models DIR --proto DIR [-k NAME]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import openai

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_coord as tc  # noqa: E402  (processes, references, streams)
import tsrtest  # noqa: E402  (processes, promtool, the runner)
from tsrtest import make_certs  # noqa: E402  (a test CA, server and client certs)

ARGS = None
TMP = None


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def ctl(target, *args, env=None, timeout=60):
    cmd = [ARGS.tessera, "ctl", "--coordinator", target, "--timeout", "20000"] + list(args)
    e = dict(os.environ)
    e.pop("TESSERA_API_KEY", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def expect_fail(r, code, *needles):
    out = r.stdout + r.stderr
    assert r.returncode == code, "expected exit %d, got %d: %s" % (code, r.returncode, out)
    for n in needles:
        assert n in out, "expected %r in the output, got: %s" % (n, out)


def expect_code(fn, code, *needles):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, "expected %s, got %s: %s" % (code, e.code(), e.details())
        for n in needles:
            assert n in (e.details() or ""), "expected %r in %r" % (n, e.details())
        return
    raise AssertionError("expected %s, the call succeeded" % code)


def md(key):
    return (("authorization", "Bearer " + key),)


# ---------------------------------------------------------------------------------------


def t_secure(p):
    api = write(os.path.join(TMP, "api.keys"), "# clients\napi-key-1\n")
    admin = write(os.path.join(TMP, "admin.keys"), "admin-key-1\n")
    rkey = write(os.path.join(TMP, "replica.keys"), "replica-key-1\n")
    procs = []
    try:
        co = tc.Proc([ARGS.tessera, "coordinator", "--listen", "127.0.0.1:0",
                      "--api-key-file", api, "--admin-key-file", admin,
                      "--tls-cert", p("server.crt"), "--tls-key", p("server.key"),
                      "--replica-key-file", rkey, "--replica-tls-ca", p("ca.crt"),
                      "--http", "127.0.0.1:0"])
        procs.append(co)
        out = co.output()
        assert "keys required" in out and "TLS on" in out, out
        # A replica with its own key and TLS joins with an admin key over TLS.
        rep = tc.Proc([ARGS.tessera, "serve", "-m", ARGS.model, "--listen", "127.0.0.1:0",
                       "-t", "1", "--kv-memory", "32M", "--api-key-file", rkey,
                       "--tls-cert", p("server.crt"), "--tls-key", p("server.key"),
                       "--join", co.target, "--name", "sec-a", "--join-key-file", admin,
                       "--join-tls-ca", p("ca.crt")])
        procs.append(rep)
        tls = ["--tls-ca", p("ca.crt")]

        def up():
            r = ctl(co.target, "replicas", "--json", "--api-key-file", admin, *tls)
            assert r.returncode == 0, r.stderr
            reps = {x["name"]: x for x in json.loads(r.stdout)["replicas"]}
            return "sec-a" in reps and reps["sec-a"]["state"] == "up"
        tc.wait_for(up, 60, "the TLS replica up through ctl --tls-ca")

        # grpcio with the test CA and an inference key: exact.
        ch = grpc.secure_channel(co.target, grpc.ssl_channel_credentials(
            open(p("ca.crt"), "rb").read()))
        stub = tc.pbg.InferenceStub(ch)
        kw = dict(prompt="Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True)
        ref = tc.references([kw])[0]
        ids, text = [], ""
        for m in stub.Generate(tc.pb.GenerateRequest(**kw), timeout=60,
                               metadata=md("api-key-1")):
            ids += list(m.token_ids)
            text += m.text
        assert ids == ref["ids"] and text == ref["text"], \
            "expected %s, got %s" % (ref["ids"], ids)
        # Keys: none, wrong, inference key on Cluster; Health needs none.
        gen = lambda meta: list(stub.Generate(tc.pb.GenerateRequest(**kw), timeout=30,  # noqa
                                              metadata=meta))
        expect_code(lambda: gen(()), grpc.StatusCode.UNAUTHENTICATED)
        expect_code(lambda: gen(md("nope")), grpc.StatusCode.UNAUTHENTICATED)
        expect_code(lambda: gen(md("replica-key-1")), grpc.StatusCode.UNAUTHENTICATED)
        cl = tc.pbg.ClusterStub(ch)
        expect_code(lambda: cl.ListReplicas(tc.pb.ListReplicasRequest(), timeout=30,
                                            metadata=md("api-key-1")),
                    grpc.StatusCode.PERMISSION_DENIED)
        assert len(cl.ListReplicas(tc.pb.ListReplicasRequest(), timeout=30,
                                   metadata=md("admin-key-1")).replicas) == 1
        h = tc.hpbg.HealthStub(ch).Check(tc.hpb.HealthCheckRequest(), timeout=30)
        assert h.status == tc.hpb.HealthCheckResponse.SERVING, h
        ch.close()
        # Plaintext against the TLS port: a clean failure, fast.
        t0 = time.time()
        ch2 = grpc.insecure_channel(co.target)
        expect_code(lambda: list(tc.pbg.InferenceStub(ch2).Generate(
            tc.pb.GenerateRequest(**kw), timeout=10, metadata=md("api-key-1"))),
            grpc.StatusCode.UNAVAILABLE)
        assert time.time() - t0 < 9, "plaintext against TLS took %.1f s" % (time.time() - t0)
        ch2.close()

        # HTTPS on the coordinator's HTTP port: the same keys and certificate.
        hp = co.wait_port()
        try:  # the HTTP client the openai package is built on (as test_http.py)
            import httpx2 as httpx
        except ImportError:
            import httpx
        hc = httpx.Client(verify=p("ca.crt"), timeout=60)
        cl = openai.OpenAI(base_url="https://127.0.0.1:%d/v1" % hp, api_key="api-key-1",
                           max_retries=0, http_client=hc)
        a = cl.completions.create(model="stories260K", prompt=kw["prompt"], max_tokens=24,
                                  temperature=0, extra_body={"ignore_eos": True})
        assert a.choices[0].text == ref["text"], (a.choices[0].text, ref["text"])
        r = hc.post("https://127.0.0.1:%d/v1/completions" % hp, json={"prompt": "x"})
        assert r.status_code == 401, (r.status_code, r.text)
        r = hc.get("https://127.0.0.1:%d/metrics" % hp,
                   headers={"authorization": "Bearer api-key-1"})
        assert r.status_code == 403, (r.status_code, r.text)
        r = hc.get("https://127.0.0.1:%d/metrics" % hp,
                   headers={"authorization": "Bearer admin-key-1"})
        assert r.status_code == 200 and 'replica="sec-a"' in r.text, (r.status_code, r.text)
        hc.close()

        # ctl: the environment's key, and its errors.
        r = ctl(co.target, "status", *tls, env={"TESSERA_API_KEY": "admin-key-1"})
        assert r.returncode == 0 and "1 up" in r.stdout, r.stdout + r.stderr
        expect_fail(ctl(co.target, "status", "--api-key-file", admin), 1, "--tls-ca")
        expect_fail(ctl(co.target, "status", *tls), 1, "refused", "--api-key-file")
        expect_fail(ctl(co.target, "status", *tls, "--api-key-file", api), 1, "admin key")
        expect_fail(ctl(co.target, "status", "--tls-ca", "/nonexistent.crt"), 1,
                    "--tls-ca /nonexistent.crt: cannot open")
        expect_fail(ctl(co.target, "status", "--tls-ca", api), 1, "not a PEM file")
        expect_fail(ctl(co.target, "status", *tls, "--api-key-file",
                        write(os.path.join(TMP, "empty.keys"), "# none\n")), 1, "no key")
        expect_fail(ctl(co.target, "status", *tls, "--tls-cert", p("client.crt")), 2,
                    "--tls-cert and --tls-key go together")
        expect_fail(ctl(co.target, "status", "--tls-cert", p("client.crt"), "--tls-key",
                        p("client.key")), 2, "--tls-ca")
        expect_fail(ctl(co.target, "status", *tls, "--api-key-file", admin, "--tls-cert",
                        p("server.crt"), "--tls-key", p("client.key")), 1, "--tls-key")

        # SIGHUP: a new admin key works, the old one no longer does.
        write(admin, "admin-key-2\n")
        os.kill(co.p.pid, signal.SIGHUP)
        tc.wait_for(lambda: "key files re-read" in co.output(), 20, "the SIGHUP reload")
        r = ctl(co.target, "status", *tls, env={"TESSERA_API_KEY": "admin-key-2"})
        assert r.returncode == 0, r.stderr
        expect_fail(ctl(co.target, "status", *tls, env={"TESSERA_API_KEY": "admin-key-1"}), 1,
                    "refused")
        # The replica's heartbeats carry admin-key-1 (read at its start): refused now, so it
        # goes down; a broken key file keeps the keys in force.
        write(admin, "admin-key-1\nadmin-key-2\n")
        os.kill(co.p.pid, signal.SIGHUP)
        tc.wait_for(lambda: co.output().count("key files re-read") == 2, 20, "a second reload")
        write(api, "")
        os.kill(co.p.pid, signal.SIGHUP)
        tc.wait_for(lambda: "keeping the previous keys" in co.output(), 20, "a refused reload")
        tc.wait_for(up, 30, "the replica up again after its key came back")
    except Exception:
        tc.dump_logs(procs)
        raise
    finally:
        for pr in procs:
            pr.kill()


def metrics_text(port):
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as r:
        return r.read().decode()


def metric(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return None


def chat_reference(q, n):
    cmd = [ARGS.tessera, "chat", "-m", ARGS.model, "-p", q, "-n", str(n), "--temperature", "0",
           "--json", "-t", "1", "--chat-template", "chatml"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "%s: %s" % (cmd, r.stderr)
    return json.loads(r.stdout)


def lp_completion(cl, stream, **kw):
    """A completion's (text, tokens, token_logprobs, top_logprobs, text_offset), the chunks
    of a stream joined."""
    if not stream:
        c = cl.completions.create(**kw).choices[0]
        lp = c.logprobs
        return c.text, lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    out = ["", [], [], [], []]
    for ch in cl.completions.create(stream=True, **kw):
        for c in ch.choices:
            out[0] += c.text
            if c.logprobs:
                for i, f in enumerate(("tokens", "token_logprobs", "top_logprobs",
                                       "text_offset")):
                    out[i + 1] += getattr(c.logprobs, f)
    return tuple(out)


def lp_chat(cl, stream, **kw):
    """A chat completion's (text, [(token, logprob, bytes, [(token, logprob, bytes)])])."""
    def entries(content):
        return [(t.token, t.logprob, t.bytes, [(x.token, x.logprob, x.bytes)
                                               for x in t.top_logprobs]) for t in content]
    if not stream:
        c = cl.chat.completions.create(**kw).choices[0]
        return c.message.content, entries(c.logprobs.content)
    text, content = "", []
    for ch in cl.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            text += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                content += entries(c.logprobs.content)
    return text, content


def check_close_logprobs(got, ref, tol=2e-3):
    """Completions logprobs [(token, logprob, {token: logprob})]: the same tokens, values
    within tol, the same alternatives (but for a near tie at the end of the list)."""
    assert [g[0] for g in got] == [r[0] for r in ref], (got, ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert abs(g[1] - r[1]) <= tol, "token %d: logprob %r, replica %r" % (i, g[1], r[1])
        for t in set(g[2]) | set(r[2]):
            if t in g[2] and t in r[2]:
                assert abs(g[2][t] - r[2][t]) <= tol, "token %d top %r: %r vs %r" % (i, t, g, r)
            else:
                lo = min(min(g[2].values()), min(r[2].values()))
                v = g[2].get(t, r[2].get(t))
                assert abs(v - lo) <= tol, "token %d: top lists differ: %r vs %r" % (i, g, r)


def t_http(p):
    procs = []
    try:
        co = tc.Proc([ARGS.tessera, "coordinator", "--listen", "127.0.0.1:0", "--http",
                      "127.0.0.1:0"])
        procs.append(co)
        hp = co.wait_port()
        cl = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % hp, api_key="none",
                           max_retries=0, timeout=120)
        # No replica yet: 503, never a hang.
        try:
            cl.completions.create(model="stories260K", prompt="x", max_tokens=2, timeout=30)
            raise AssertionError("a completion without replicas succeeded")
        except openai.APIStatusError as e:
            assert e.status_code in (404, 503), (e.status_code, e.message)
        reps = {}
        for name in ("a", "b"):
            # a also serves HTTP itself: the reference of logprobs through the coordinator
            extra = ["--http", "127.0.0.1:0"] if name == "a" else []
            reps[name] = tsrtest.Proc([ARGS.tessera, "serve", "-m", ARGS.model, "--listen",
                                       "127.0.0.1:0", "-t", "1", "--kv-memory", "32M", "--join",
                                       co.target, "--name", name, "--chat-template", "chatml"]
                                      + extra, listen_re=rb"serve: listening on [^\s]+:(\d+)",
                                      log_prefix="tsr-cfront-")
            procs.append(reps[name])
        direct = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % reps["a"].wait_port(),
                               api_key="none", max_retries=0, timeout=120)
        tc.wait_up(co.target, ["a", "b"])
        models = [m.id for m in cl.models.list().data]
        assert models == ["stories260K"], models

        # completions, streaming and not, and chat, equal the single-process references
        kws = [dict(prompt=tc.PROMPTS[i], max_tokens=n, temperature=0.0, ignore_eos=True)
               for i, n in ((0, 40), (2, 7), (5, 1))]
        for kw, ref in zip(kws, tc.references(kws)):
            a = cl.completions.create(model="stories260K", prompt=kw["prompt"],
                                      max_tokens=kw["max_tokens"], temperature=0,
                                      extra_body={"ignore_eos": True})
            assert a.choices[0].text == ref["text"], (kw, a.choices[0].text, ref["text"])
            assert a.usage.completion_tokens == len(ref["ids"]), a.usage
            assert a.usage.prompt_tokens == len(ref["prompt_ids"]), a.usage
            assert a.model == "stories260K", a.model
            text, usage = "", None
            for ch in cl.completions.create(model="stories260K", prompt=kw["prompt"],
                                            max_tokens=kw["max_tokens"], temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}):
                if ch.usage is not None:
                    usage = ch.usage
                text += "".join(c.text for c in ch.choices)
            assert text == ref["text"], ("stream", kw, text, ref["text"])
            assert usage and usage.completion_tokens == len(ref["ids"]), usage
        q = "What is the capital of France?"
        ref = chat_reference(q, 20)
        msgs = [{"role": "user", "content": q}]
        a = cl.chat.completions.create(model="stories260K", messages=msgs, max_tokens=20,
                                       temperature=0)
        assert a.choices[0].message.content == ref["text"], (a.choices[0].message, ref["text"])
        text = ""
        for ch in cl.chat.completions.create(model="stories260K", messages=msgs, max_tokens=20,
                                             temperature=0, stream=True):
            text += "".join(c.delta.content or "" for c in ch.choices)
        assert text == ref["text"], (text, ref["text"])

        # Logprobs through the coordinator: the same tokens, values and top lists as the
        # replica's own HTTP front door, completions and chat, streaming and not.
        kw = dict(model="stories260K", prompt=tc.PROMPTS[1], max_tokens=12, temperature=0,
                  logprobs=3, extra_body={"ignore_eos": True})
        ref = lp_completion(direct, False, **kw)
        assert len(ref[1]) == 12 and all(len(t) >= 1 for t in ref[3]), ref
        for stream in (False, True):
            got = lp_completion(cl, stream, **kw)
            assert got == ref, "completions logprobs (stream=%s):\n coordinator %r\n replica %r" % (
                stream, got, ref)
        kw = dict(model="stories260K", messages=msgs, max_tokens=10, temperature=0,
                  logprobs=True, top_logprobs=3)
        ref = lp_chat(direct, False, **kw)
        assert len(ref[1]) == 10 and all(len(t[3]) == 3 for t in ref[1]), ref
        for stream in (False, True):
            got = lp_chat(cl, stream, **kw)
            assert got == ref, "chat logprobs (stream=%s):\n coordinator %r\n replica %r" % (
                stream, got, ref)

        # gRPC Generate through the coordinator enters the request histograms of /metrics.
        before = metrics_text(hp)
        stub = tc.pbg.InferenceStub(grpc.insecure_channel(co.target))
        outs = [tc.stream(stub, dict(prompt=tc.PROMPTS[i], max_tokens=n, temperature=0.0,
                                     ignore_eos=True)) for i, n in ((3, 9), (4, 5))]
        after = metrics_text(hp)
        tsrtest.promtool_check(after)
        for fam, want in (("tessera_time_to_first_token_seconds_count", 2),
                          ("tessera_e2e_request_latency_seconds_count", 2),
                          ("tessera_inter_token_latency_seconds_count",
                           sum(len(o["ids"]) - 1 for o in outs)),
                          ("tessera_request_generation_tokens_sum", 14)):
            d = metric(after, fam) - metric(before, fam)
            assert d == want, "%s: +%r after 2 gRPC streams, expected +%r" % (fam, d, want)
        d = (metric(after, "tessera_requests_total", '{finish_reason="length"}')
             - metric(before, "tessera_requests_total", '{finish_reason="length"}'))
        assert d == 2, "tessera_requests_total{finish_reason=\"length\"}: +%r, expected +2" % d

        # Errors keep their statuses through the coordinator.
        for call, status, param in (
                (lambda: cl.completions.create(model="nope", prompt="x"), 404, "model"),
                (lambda: cl.completions.create(model="stories260K", prompt="x",
                                               temperature=-1), 400, "temperature"),
                (lambda: cl.completions.create(model="stories260K", prompt="x", logprobs=21),
                 400, "logprobs")):
            try:
                call()
                raise AssertionError("expected %d" % status)
            except openai.APIStatusError as e:
                assert e.status_code == status, (status, e.status_code, e.message)
                assert e.body and e.body.get("param") == param, e.body

        # Failover over HTTP: kill -9 a replica mid-stream; every stream completes exactly.
        # 600 tokens: b's streams must still run when it is killed on a fast machine.
        kws = [dict(prompt=tc.PROMPTS[i], max_tokens=600, temperature=0.0, ignore_eos=True)
               for i in range(4)]
        b_admin = tc.replica_admin(tc.replicas(co.target)["b"]["address"])
        refs = tc.references(kws)
        import concurrent.futures as cf

        def one(kw):
            text, lps = "", []
            extra = {"logprobs": 2} if kw is kws[0] else {}  # logprobs across the failover
            for ch in cl.completions.create(model="stories260K", prompt=kw["prompt"],
                                            max_tokens=kw["max_tokens"], temperature=0,
                                            stream=True, extra_body={"ignore_eos": True},
                                            **extra):
                text += "".join(c.text for c in ch.choices)
                for c in ch.choices:
                    if c.logprobs:
                        lps += list(zip(c.logprobs.tokens, c.logprobs.token_logprobs,
                                        c.logprobs.top_logprobs))
            return text, lps
        with cf.ThreadPoolExecutor(len(kws)) as ex:
            futs = [ex.submit(one, kw) for kw in kws]
            # Kill b while it runs one of the streams: its own Admin.Status polled from the
            # submission on (waiting first for a client to see text let b finish its streams
            # before the kill in a loaded CI run: no failover to count).
            assert tc.wait_replica_busy(b_admin, timeout=30), "b never ran one of the streams"
            os.kill(reps["b"].p.pid, signal.SIGKILL)
            outs = [f.result(timeout=180) for f in futs]
        for kw, (out, _), ref in zip(kws, outs, refs):
            assert out == ref["text"], "failover %r: expected %r\n got %r" % (
                kw["prompt"], ref["text"], out)
        # The logprobs streamed across the failover equal the surviving replica's own (values:
        # a resumed request recomputes its tokens as a prompt, so to rounding).
        a = direct.completions.create(model="stories260K", prompt=kws[0]["prompt"],
                                      max_tokens=kws[0]["max_tokens"], temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs
        check_close_logprobs(outs[0][1], list(zip(a.tokens, a.token_logprobs, a.top_logprobs)))
        text = metrics_text(hp)
        tsrtest.promtool_check(text)
        fo = metric(text, "tessera_failovers_total")
        assert fo is not None and fo >= 1, "tessera_failovers_total: %r\n%s" % (fo, text)
        assert metric(text, "tessera_replica_state",
                      '{replica="a",model="stories260K",state="up"}') == 1, text
        for fam in ("tessera_replica_outstanding_requests", "tessera_replica_requests_routed_total",
                    "tessera_time_to_first_token_seconds_bucket"):
            assert fam in text, fam
        assert metric(text, "tessera_requests_total", '{finish_reason="length"}') >= 10, text
        # b is down within its heartbeat timeout; health stays ok with a up
        tc.wait_for(lambda: metric(metrics_text(hp), "tessera_replica_state",
                                   '{replica="b",model="stories260K",state="down"}') == 1, 10,
                    "b down in /metrics")
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % hp, timeout=30) as r:
            assert r.status == 200, r.status
    except Exception:
        tc.dump_logs(procs)
        raise
    finally:
        for pr in procs:
            pr.kill()


def t_start_errors(p):
    api = write(os.path.join(TMP, "api2.keys"), "k\n")
    cases = [
        (["--listen", "0.0.0.0:0"], 2, "without authentication"),
        (["--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.crt", "--tls-key",
          p("server.key")], 1, "--tls-cert /nonexistent.crt: cannot open"),
        (["--listen", "127.0.0.1:0", "--tls-cert", p("server.crt"), "--tls-key",
          p("client.key")], 1, "--tls-key"),
        (["--listen", "127.0.0.1:0", "--tls-cert", p("server.crt")], 2, "go together"),
        (["--listen", "127.0.0.1:0", "--api-key-file", "/nonexistent.keys"], 1,
         "--api-key-file /nonexistent.keys: cannot open"),
        (["--listen", "127.0.0.1:0", "--replica-key-file",
          write(os.path.join(TMP, "empty2.keys"), "\n")], 1, "no key"),
        (["--listen", "127.0.0.1:0", "--replica-tls-cert", p("client.crt"),
          "--replica-tls-key", p("client.key")], 2, "--replica-tls-ca"),
    ]
    for args, code, needle in cases:
        r = subprocess.run([ARGS.tessera, "coordinator"] + args, capture_output=True, text=True,
                           timeout=30)
        expect_fail(r, code, needle)
    # An open address with keys starts (and says keys are required).
    co = tc.Proc([ARGS.tessera, "coordinator", "--listen", "0.0.0.0:0", "--api-key-file", api])
    try:
        assert "keys required" in co.output(), co.output()
    finally:
        co.kill()


def main():
    global ARGS, TMP
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--proto", required=True)
    ap.add_argument("-k", default=None)
    ARGS = ap.parse_args()
    ARGS.models = os.environ.get("TESSERA_MODELS") or ARGS.models
    ARGS.model = os.path.join(ARGS.models, "stories260K.gguf")
    if not os.path.exists(ARGS.model):
        print("FAIL: missing %s (TESSERA_MODELS / --models)" % ARGS.model)
        return 1
    for tool in ("openssl", "promtool"):
        if not shutil.which(tool):
            print("FAIL: %s not found (ops/install-deps.sh)" % tool)
            return 1
    tc.ARGS = ARGS
    TMP = tempfile.mkdtemp(prefix="tsr-cfront-")
    r = tsrtest.Runner(ARGS.k)
    try:
        tc.make_stubs(os.path.abspath(ARGS.proto), TMP)
        certs = make_certs(TMP)
        for name, fn in (("secure", t_secure), ("http", t_http), ("start_errors", t_start_errors)):
            r.run(name, fn, certs)
        return r.summary(need_one=True)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
