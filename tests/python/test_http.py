#!/usr/bin/env python3
"""test_http.py — end-to-end tests of the HTTP front door, metrics, keys and TLS of
`tessera serve`, with clients Tessera did not write.

Clients: the official `openai` Python package (from ops/requirements-test.txt, run with the
test venv's python, ${TSR_VENV_PYTHON}), Python's http.client / raw sockets for malformed
requests, Debian's python3-grpcio (visible in the venv) for gRPC keys and TLS, Debian's
`promtool` and a real `prometheus` server for the metrics. Every server listens on
127.0.0.1 with an ephemeral port; every process is killed at the end whatever happens.

What is checked:
  - /v1/completions, streaming and not: greedy outputs equal `tessera generate` for the same
    prompt (text, finish reason, usage); 16 concurrent streams each exact; logprobs; stop
    strings; seeds;
  - 25+ malformed requests (bad JSON, wrong types, out-of-range values, refused fields, a
    10 MB body, a half-sent body, a client that vanishes mid-stream — its request is
    cancelled and its KV blocks freed) each get the documented status and OpenAI error body,
    and the server keeps serving;
  - `promtool check metrics` passes on /metrics during load; a real Prometheus scrapes it
    every second and answers histogram_quantile over the TTFT histogram plausibly;
  - keys: no / wrong key -> 401 and UNAUTHENTICATED; inference key on admin -> 403 and
    PERMISSION_DENIED; right keys work; SIGHUP re-reads the key file; 429 queue full; 503
    and /health 503 after drain;
  - TLS: grpcio with the test CA (openssl at test time) streams exactly over mutual TLS,
    plaintext against the TLS port fails cleanly, a client without a certificate is refused
    (gRPC and HTTPS); HTTPS with the openai client is exact; bad TLS / key files and open
    addresses without keys are clear errors at start.

usage: test_http.py --tessera BUILD/tessera --models DIR --proto DIR [-k NAME]
Prints one line per test and `N passed, M failed`; exits 1 on any failure.
"""
import argparse
import concurrent.futures as cf
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import openai

try:  # the HTTP client the openai package is built on
    import httpx2 as httpx
except ImportError:
    import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tsrtest  # noqa: E402  (stubs, processes, certificates, promtool, the runner)

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park",
           "One day, a big bird", "The sun was", "Ben had a red ball", "Mom said",
           "There was a tree", "The cat sat on the mat and", "A girl named Sue",
           "The boy was sad because", "In the forest", "Tim wanted to", "The fish swam",
           "She looked at the sky", "Happy"]

ARGS = None
TMP = None
pb = pbg = None


def make_stubs(proto_dir, out_dir):
    global pb, pbg
    pb, pbg = tsrtest.make_stubs(proto_dir, out_dir, protos=("tessera.proto",))


# ---------------------------------------------------------------------------------------
# processes


class Server(tsrtest.Proc):
    """A `tessera serve --http` process on ephemeral ports (port: gRPC, http_port: HTTP)."""

    def __init__(self, args, start_timeout=60):
        cmd = [ARGS.tessera, "serve", "-m", ARGS.model, "--listen", "127.0.0.1:0",
               "--http", "127.0.0.1:0", "-t", "1"] + args
        super().__init__(cmd, timeout=start_timeout,
                         listen_re=rb"serve: listening on [^\s]+:(\d+)", http=True,
                         log_prefix="serve-", log_dir=TMP, fail_what="server did not start")

    def stop(self):
        """SIGTERM: must exit 0 (clean shutdown; under ASan also leak-free)."""
        rc = super().stop(30)
        assert rc == 0, "serve exited %s after SIGTERM:\n%s" % (rc, self.output()[-4000:])


def generate_reference(prompt, n):
    """`tessera generate` for one prompt alone: the ground truth."""
    cmd = [ARGS.tessera, "generate", "-m", ARGS.model, "-p", prompt, "-n", str(n),
           "--temperature", "0", "--json", "-t", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "%s: %s" % (cmd, r.stderr)
    return json.loads(r.stdout)


_REFS = {}


def references(items):
    todo = [it for it in items if it not in _REFS]
    with cf.ThreadPoolExecutor(2) as ex:
        for it, ref in zip(todo, ex.map(lambda it: generate_reference(*it), todo)):
            _REFS[it] = ref
    return [_REFS[it] for it in items]


def oai_finish(ref):
    return "length" if ref["finish_reason"] == "length" else "stop"


def client(srv, key="unused", timeout=60, **kw):
    return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % srv.http_port, api_key=key,
                         max_retries=0, timeout=timeout, **kw)


def stream_completion(cl, model, prompt, n, **kw):
    """One streamed completion: (text, finish_reason, usage, n_chunks)."""
    text, fin, usage, chunks = "", None, None, 0
    s = cl.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                              stream=True, stream_options={"include_usage": True}, **kw)
    for ch in s:
        chunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.text
            if c.finish_reason:
                fin = c.finish_reason
    return text, fin, usage, chunks


def raw(srv, method, path, body=None, headers=None, timeout=30):
    """One HTTP request: (status, parsed JSON or text, headers)."""
    c = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read().decode("utf-8", "replace")
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return r.status, data, dict(r.getheaders())
    finally:
        c.close()


def check_error(status, body, want_status, want_param=None, needle=None):
    assert status == want_status, "expected HTTP %d, got %d: %s" % (want_status, status, body)
    assert isinstance(body, dict) and "error" in body, "not an OpenAI error body: %r" % (body,)
    e = body["error"]
    for k in ("message", "type", "param", "code"):
        assert k in e, "error body lacks %r: %r" % (k, e)
    assert e["message"], "empty error message"
    if want_param is not None:
        assert e["param"] == want_param, "expected param %r, got %r (%s)" % (
            want_param, e["param"], e["message"])
    if needle is not None:
        assert needle in e["message"], "expected %r in %r" % (needle, e["message"])


def metrics(srv, headers=None):
    st, body, _ = raw(srv, "GET", "/metrics", headers=headers)
    assert st == 200, "GET /metrics: %d %s" % (st, body)
    return body


def metric_value(text, name, labels=""):
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    assert m, "metric %s%s not found" % (name, labels)
    return float(m.group(1))


def wait_idle(srv, headers=None, timeout=10):
    """Until no request runs or waits and every KV block is free."""
    deadline = time.time() + timeout
    while True:
        t = metrics(srv, headers)
        busy = (metric_value(t, "tessera_requests_running"),
                metric_value(t, "tessera_requests_waiting"),
                metric_value(t, "tessera_kv_blocks_used"))
        if busy == (0, 0, 0):
            return t
        assert time.time() < deadline, "server not idle after %d s: running, waiting, KV " \
                                       "blocks used = %s" % (timeout, busy)
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# tests: the plain server


def t_models_health(s):
    st, body, _ = raw(s, "GET", "/v1/models")
    assert st == 200 and body["object"] == "list", body
    assert [m["id"] for m in body["data"]] == [MODEL], body
    st, body, _ = raw(s, "GET", "/health")
    assert st == 200 and body == {"status": "ok"}, (st, body)
    assert [m.id for m in client(s).models.list()] == [MODEL]


def t_completions_exact(s):
    cl = client(s)
    items = [(PROMPTS[i], n) for i, n in ((0, 40), (2, 7), (8, 64), (15, 1))]
    for (p, n), ref in zip(items, references(items)):
        r = cl.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
        c = r.choices[0]
        assert c.text == ref["text"], "%r: expected %r, got %r" % (p, ref["text"], c.text)
        assert c.finish_reason == oai_finish(ref), (c.finish_reason, ref["finish_reason"])
        assert r.usage.prompt_tokens == len(ref["prompt_ids"]), (r.usage, ref["prompt_ids"])
        assert r.usage.completion_tokens == len(ref["ids"]), (r.usage, len(ref["ids"]))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == MODEL and r.object == "text_completion" and r.id.startswith("cmpl-")
        text, fin, usage, chunks = stream_completion(cl, MODEL, p, n)
        assert text == ref["text"], "stream %r: expected %r, got %r" % (p, ref["text"], text)
        assert fin == oai_finish(ref), fin
        assert usage.prompt_tokens == len(ref["prompt_ids"]) and \
            usage.completion_tokens == len(ref["ids"]), usage
    # token ids as the prompt give the same
    ref = references([(PROMPTS[0], 40)])[0]
    r = cl.completions.create(model=MODEL, prompt=ref["prompt_ids"], max_tokens=40,
                              temperature=0)
    assert r.choices[0].text == ref["text"], r.choices[0].text


def t_logprobs_stop_seed(s):
    cl = client(s)
    ref = references([(PROMPTS[0], 40)])[0]
    r = cl.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                              logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 == len(lp.token_logprobs) == len(lp.top_logprobs), lp
    assert "".join(lp.tokens) == r.choices[0].text, (lp.tokens, r.choices[0].text)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3, (chosen, top)
        assert abs(max(top.values()) - chosen) < 1e-4, "greedy: chosen %f, top %s" % (chosen, top)
    # streamed logprobs: the same tokens
    toks = []
    for ch in cl.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0, logprobs=0, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            toks += ch.choices[0].logprobs.tokens
    assert toks == lp.tokens, (toks, lp.tokens)
    # stop string: the text before it, finish "stop"
    cut = ref["text"].find(" was")
    assert cut > 0, ref["text"]
    r = cl.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                              stop=[" was", "zzz"])
    assert r.choices[0].text == ref["text"][:cut] and r.choices[0].finish_reason == "stop", r
    # seeds: same seed, same sample; all sampling fields accepted
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0.9, top_p=0.95,
              seed=1234, presence_penalty=0.5, frequency_penalty=0.2,
              extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1})
    a = cl.completions.create(**kw).choices[0].text
    b = cl.completions.create(**kw).choices[0].text
    assert a == b and a, (a, b)
    # ignore_eos keeps going to max_tokens
    r = cl.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=300, temperature=0,
                              extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 300 and r.choices[0].finish_reason == "length", r.usage


def t_concurrent_streams_and_metrics(s):
    """16 concurrent streams, each exact; promtool on /metrics while they run; a real
    Prometheus scraping every second answers a TTFT quantile."""
    prom = Prometheus(s.http_port)
    try:
        assert prom.query_until('up{job="tessera"}') == 1, "Prometheus cannot scrape /metrics"
        cl = client(s)
        items = [(PROMPTS[i], 24 + 9 * i) for i in range(16)]
        refs = references(items)
        scrapes, stop = [], threading.Event()

        def scraper():
            while not stop.is_set():
                scrapes.append(metrics(s))
                time.sleep(0.1)

        th = threading.Thread(target=scraper)
        th.start()
        try:
            for rnd in range(2):  # two rounds: Prometheus sees the histogram grow
                with cf.ThreadPoolExecutor(16) as ex:
                    outs = list(ex.map(lambda it: stream_completion(cl, MODEL, *it), items))
                for (p, n), ref, (text, fin, usage, _) in zip(items, refs, outs):
                    assert text == ref["text"], "%r: expected %r, got %r" % (p, ref["text"], text)
                    assert fin == oai_finish(ref) and \
                        usage.completion_tokens == len(ref["ids"]), (fin, usage)
                time.sleep(1.2)
        finally:
            stop.set()
            th.join()
        busy = [t for t in scrapes if metric_value(t, "tessera_requests_running") > 0]
        assert busy, "no scrape saw a running request (%d scrapes)" % len(scrapes)
        for t in busy[:3] + scrapes[-1:]:
            tsrtest.promtool_check(t)
        t = wait_idle(s)
        tsrtest.promtool_check(t)
        assert metric_value(t, "tessera_time_to_first_token_seconds_count") >= 32
        assert metric_value(t, "tessera_request_generation_tokens_sum") >= \
            2 * sum(len(r["ids"]) for r in refs)
        assert metric_value(t, "tessera_rank_steps_total",
                            '{rank="0",stage="0",tp_rank="0"}') >= 0
        q = prom.query_until("histogram_quantile(0.5, sum by (le) "
                             "(rate(tessera_time_to_first_token_seconds_bucket[1m])))")
        assert 0 < q < 30, "TTFT median from Prometheus: %r s" % q
        print("    prometheus: TTFT p50 %.4f s" % q)
    finally:
        prom.stop()


class Prometheus:
    def __init__(self, http_port):
        self.dir = tempfile.mkdtemp(prefix="prom-", dir=TMP)
        cfg = os.path.join(self.dir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: tessera\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % http_port)
        self.log = open(os.path.join(self.dir, "log"), "w+")
        self.p = subprocess.Popen(["prometheus", "--config.file=" + cfg,
                                   "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
                                   "--web.listen-address=127.0.0.1:0"],
                                  stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.port = None
        deadline = time.time() + 30
        while time.time() < deadline and self.port is None:
            self.log.flush()
            with open(self.log.name) as f:
                log = f.read()
            m = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', log)
            if m and "Server is ready to receive web requests" in log:
                self.port = int(m.group(1))
            elif self.p.poll() is not None:
                break
            else:
                time.sleep(0.1)
        assert self.port, "prometheus did not start:\n" + open(self.log.name).read()[-2000:]

    def query_until(self, q, timeout=20):
        """The query's scalar value once Prometheus has enough samples (a number)."""
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (self.port, urllib.parse.urlencode({"query": q}))
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    last = json.loads(r.read())
            except urllib.error.HTTPError as e:  # 503 while its storage starts
                last = "HTTP %d" % e.code
                time.sleep(0.2)
                continue
            res = last.get("data", {}).get("result", [])
            if last.get("status") == "success" and res:
                v = float(res[0]["value"][1])
                if v == v:  # not NaN
                    return v
            time.sleep(0.5)
        raise AssertionError("no answer from Prometheus for %s: %s" % (q, last))

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            pass
        self.p.wait(10)
        self.log.close()


BIG = "x" * (10 * 1024 * 1024)

# (name, method, path, body, status, param, needle)
MALFORMED = [
    ("bad json", "POST", "/v1/completions", "{bad", 400, None, "not valid JSON"),
    ("empty body", "POST", "/v1/completions", "", 400, None, "not valid JSON"),
    ("array body", "POST", "/v1/completions", "[1,2]", 400, None, "JSON object"),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 4}, 400, "prompt", None),
    ("prompt number", "POST", "/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("prompt batch", "POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "batches"),
    ("prompt id range", "POST", "/v1/completions", {"prompt": [1, 999999]}, 400, "prompt", None),
    ("prompt too long", "POST", "/v1/completions", {"prompt": [1] * 9000}, 400, "prompt", "context"),
    ("max_tokens string", "POST", "/v1/completions", {"prompt": "a", "max_tokens": "10"}, 400,
     "max_tokens", "integer"),
    ("max_tokens zero", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400,
     "max_tokens", None),
    ("max_tokens float", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400,
     "max_tokens", None),
    ("temperature string", "POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400,
     "temperature", None),
    ("temperature negative", "POST", "/v1/completions", {"prompt": "a", "temperature": -1}, 400,
     "temperature", None),
    ("top_p zero", "POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("top_k below -1", "POST", "/v1/completions", {"prompt": "a", "top_k": -2}, 400, "top_k", None),
    ("presence out of range", "POST", "/v1/completions", {"prompt": "a", "presence_penalty": 3},
     400, "presence_penalty", None),
    ("n two", "POST", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n", None),
    ("best_of", "POST", "/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", None),
    ("echo", "POST", "/v1/completions", {"prompt": "a", "echo": True}, 400, "echo", None),
    ("logit_bias", "POST", "/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, 400,
     "logit_bias", None),
    ("logprobs too many", "POST", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400,
     "logprobs", None),
    ("stop not strings", "POST", "/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop", None),
    ("stop empty", "POST", "/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", None),
    ("stream not bool", "POST", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400,
     "stream", None),
    ("stream_options alone", "POST", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("seed string", "POST", "/v1/completions", {"prompt": "a", "seed": "x"}, 400, "seed", None),
    ("ignore_eos int", "POST", "/v1/completions", {"prompt": "a", "ignore_eos": 1}, 400,
     "ignore_eos", None),
    ("unknown model", "POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model",
     "does not exist"),
    ("chat unknown model", "POST", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", None),
    ("chat no template", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages", "chat template"),
    ("chat no messages", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("chat top_logprobs alone", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ("unknown route", "POST", "/v1/embeddings", {"input": "a"}, 404, None, "unknown route"),
    ("wrong method", "GET", "/v1/completions", None, 405, None, "use POST"),
]


def t_malformed(s):
    for name, method, path, body, want, param, needle in MALFORMED:
        try:
            st, resp, _ = raw(s, method, path, body)
            check_error(st, resp, want, param, needle)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (name, e))
    # unknown harmless fields are ignored, as the OpenAI API does
    st, body, _ = raw(s, "POST", "/v1/completions",
                      {"prompt": "a", "max_tokens": 2, "user": "u", "whatever": {"x": 1}})
    assert st == 200 and body["usage"]["completion_tokens"] == 2, (st, body)
    # a 10 MB body announced: refused before it is sent (the client waits for 100-continue)
    so = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
    so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BIG))
    r = http.client.HTTPResponse(so)
    r.begin()
    check_error(r.status, json.loads(r.read()), 413, needle="larger than")
    so.close()
    # ... or sent blindly: the server answers 413 and closes; the client may see its
    # upload cut short
    try:
        st, resp, _ = raw(s, "POST", "/v1/completions", BIG)
        check_error(st, resp, 413)
    except (BrokenPipeError, ConnectionResetError):
        pass
    # a 10 MB body with chunked transfer (no Content-Length): read, discarded, 413
    c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=30)
    c.request("POST", "/v1/completions", body=iter([BIG[:1 << 20].encode()] * 10),
              headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = c.getresponse()
    check_error(r.status, json.loads(r.read()), 413)
    c.close()
    # a half-sent body: the client vanishes; the server goes on
    so = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
    so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n{\"prompt\": \"Once")
    time.sleep(0.2)
    so.close()
    # a client that vanishes mid-stream: its request is cancelled, KV blocks freed
    before = metric_value(metrics(s), "tessera_requests_total", '{finish_reason="cancelled"}')
    for stream in (True, False):
        so = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
        body = json.dumps({"prompt": PROMPTS[3], "max_tokens": 8000, "temperature": 0,
                           "ignore_eos": True, "stream": stream}).encode()
        so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            got = b""
            while b"data: " not in got:
                got += so.recv(4096)
        else:
            time.sleep(0.05)
        so.close()
    t = wait_idle(s)
    after = metric_value(t, "tessera_requests_total", '{finish_reason="cancelled"}')
    assert after == before + 2, "cancelled requests: before %d, after %d" % (before, after)
    gen = metric_value(t, "tessera_request_generation_tokens_sum")
    # and the server keeps serving, exactly
    ref = references([(PROMPTS[0], 40)])[0]
    r = client(s).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
    assert r.choices[0].text == ref["text"], r.choices[0].text
    assert gen >= 0


# ---------------------------------------------------------------------------------------
# keys


def grpc_generate(stub, prompt, n, md=(), timeout=30):
    ids, text, last = [], "", None
    for r in stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=n, temperature=0),
                           timeout=timeout, metadata=md):
        ids += list(r.token_ids)
        text += r.text
        last = r
    return ids, text, last


def expect_rpc(fn, code, needle=None):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, "expected %s, got %s: %s" % (code, e.code(), e.details())
        if needle:
            assert needle in e.details(), "expected %r in %r" % (needle, e.details())
        return e
    raise AssertionError("expected %s, the call succeeded" % code)


def t_keys(api_file, admin_file):
    s = Server(["--api-key-file", api_file, "--admin-key-file", admin_file, "--max-seqs", "1",
                "--max-queue", "1", "-c", "8192"])
    try:
        assert "API keys required" in s.output(), s.output()
        API, ADMIN = {"Authorization": "Bearer api-key-1"}, {"Authorization": "Bearer admin-key-1"}
        # HTTP
        check_error(*raw(s, "POST", "/v1/completions", {"prompt": "a"})[:2], 401)
        st, body, hdr = raw(s, "POST", "/v1/completions", {"prompt": "a"},
                            {"Authorization": "Bearer nope"})
        check_error(st, body, 401, needle="invalid API key")
        assert hdr.get("WWW-Authenticate") == "Bearer", hdr
        check_error(*raw(s, "GET", "/v1/models", None, {"Authorization": "Basic abc"})[:2], 401)
        check_error(*raw(s, "GET", "/metrics", None, API)[:2], 403)
        check_error(*raw(s, "GET", "/metrics")[:2], 401)
        tsrtest.promtool_check(metrics(s, ADMIN))
        assert raw(s, "GET", "/health")[0] == 200  # no key for health checks
        try:
            client(s, key="wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        ref = references([(PROMPTS[0], 40)])[0]
        for key in ("api-key-1", "api-key-2", "admin-key-1"):
            r = client(s, key=key).completions.create(model=MODEL, prompt=PROMPTS[0],
                                                      max_tokens=40, temperature=0)
            assert r.choices[0].text == ref["text"], (key, r.choices[0].text)
        assert "api-key-1" not in s.output() and "admin-key-1" not in s.output()
        # gRPC
        ch = grpc.insecure_channel(s.target)
        inf, adm = pbg.InferenceStub(ch), pbg.AdminStub(ch)
        expect_rpc(lambda: grpc_generate(inf, "a", 2), grpc.StatusCode.UNAUTHENTICATED)
        expect_rpc(lambda: grpc_generate(inf, "a", 2, [("authorization", "Bearer nope")]),
                   grpc.StatusCode.UNAUTHENTICATED)
        expect_rpc(lambda: adm.Status(pb.StatusRequest(), timeout=5,
                                      metadata=[("authorization", "Bearer api-key-1")]),
                   grpc.StatusCode.PERMISSION_DENIED, "admin")
        adm.Status(pb.StatusRequest(), timeout=5, metadata=[("authorization", "Bearer admin-key-1")])
        ids, text, _ = grpc_generate(inf, PROMPTS[0], 40, [("authorization", "Bearer api-key-2")])
        assert ids == ref["ids"] and text == ref["text"], text
        # 429: one running, one waiting, the third is refused
        long_req = {"prompt": PROMPTS[3], "max_tokens": 8000, "temperature": 0,
                    "ignore_eos": True, "stream": True}
        socks = []
        for gauge in ("tessera_requests_running", "tessera_requests_waiting"):
            so = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
            b = json.dumps(long_req).encode()
            so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       b"api-key-1\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b))
            socks.append(so)
            deadline = time.time() + 10
            while metric_value(metrics(s, ADMIN), gauge) < 1:
                assert time.time() < deadline, "%s never reached 1" % gauge
                time.sleep(0.02)
        check_error(*raw(s, "POST", "/v1/completions", {"prompt": "a"}, API)[:2], 429)
        for so in socks:
            so.close()
        wait_idle(s, ADMIN)
        # SIGHUP re-reads the key file: the new key works, the removed one no longer
        with open(api_file, "w") as f:
            f.write("# rotated\nnew-key-3\n")
        s.p.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "key files re-read" not in s.output():
            assert time.time() < deadline, "no reload after SIGHUP:\n" + s.output()[-2000:]
            time.sleep(0.05)
        check_error(*raw(s, "GET", "/v1/models", None, API)[:2], 401)
        assert raw(s, "GET", "/v1/models", None, {"Authorization": "Bearer new-key-3"})[0] == 200
        # drain: 503 and /health 503
        adm.Drain(pb.DrainRequest(), timeout=5, metadata=[("authorization", "Bearer admin-key-1")])
        check_error(*raw(s, "POST", "/v1/completions", {"prompt": "a"},
                         {"Authorization": "Bearer new-key-3"})[:2], 503)
        st, body, _ = raw(s, "GET", "/health")
        assert st == 503 and body["status"] == "draining", (st, body)
        ch.close()
        s.stop()
    finally:
        s.kill()


# ---------------------------------------------------------------------------------------
# TLS


make_certs = tsrtest.make_certs  # a test CA, server and client certificates


def t_tls(p):
    s = Server(["--tls-cert", p("server.crt"), "--tls-key", p("server.key"),
                "--tls-client-ca", p("ca.crt")])
    try:
        assert "mutual TLS" in s.output(), s.output()
        rd = lambda n: open(p(n), "rb").read()  # noqa: E731
        ref = references([(PROMPTS[0], 40)])[0]
        creds = grpc.ssl_channel_credentials(root_certificates=rd("ca.crt"),
                                             private_key=rd("client.key"),
                                             certificate_chain=rd("client.crt"))
        ch = grpc.secure_channel(s.target, creds)
        ids, text, last = grpc_generate(pbg.InferenceStub(ch), PROMPTS[0], 40)
        assert ids == ref["ids"] and text == ref["text"], text
        ch.close()
        # plaintext against the TLS port: a clean failure
        ch = grpc.insecure_channel(s.target)
        expect_rpc(lambda: grpc_generate(pbg.InferenceStub(ch), "a", 2, timeout=5),
                   grpc.StatusCode.UNAVAILABLE)
        ch.close()
        # TLS without a client certificate: refused
        ch = grpc.secure_channel(s.target, grpc.ssl_channel_credentials(rd("ca.crt")))
        expect_rpc(lambda: grpc_generate(pbg.InferenceStub(ch), "a", 2, timeout=5),
                   grpc.StatusCode.UNAVAILABLE)
        ch.close()
        # HTTPS: the openai client with the CA and a client certificate is exact
        ctx = ssl.create_default_context(cafile=p("ca.crt"))
        ctx.load_cert_chain(p("client.crt"), p("client.key"))
        cl = openai.OpenAI(base_url="https://127.0.0.1:%d/v1" % s.http_port, api_key="x",
                           max_retries=0, timeout=30, http_client=httpx.Client(verify=ctx))
        text, fin, usage, _ = stream_completion(cl, MODEL, PROMPTS[0], 40)
        assert text == ref["text"] and usage.completion_tokens == len(ref["ids"]), text
        r = cl.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
        assert r.choices[0].text == ref["text"], r.choices[0].text
        # HTTPS without a client certificate: 403 (or no handshake at all)
        ctx2 = ssl.create_default_context(cafile=p("ca.crt"))
        try:
            c = http.client.HTTPSConnection("127.0.0.1", s.http_port, context=ctx2, timeout=10)
            c.request("GET", "/v1/models")
            r = c.getresponse()
            check_error(r.status, json.loads(r.read()), 403, needle="client certificate")
        except (ssl.SSLError, ConnectionError):
            pass
        # plain HTTP against the HTTPS port: no answer, the server goes on
        try:
            st = raw(s, "GET", "/v1/models", timeout=5)[0]
            raise AssertionError("plain HTTP on the HTTPS port answered %s" % st)
        except (http.client.HTTPException, ConnectionError, socket.timeout, OSError):
            pass
        r = cl.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
        assert r.choices[0].text == ref["text"]
        s.stop()
    finally:
        s.kill()


def t_chat(model_path, template=None):
    """/v1/chat/completions equals `tessera chat` (greedy) for the same messages: a real
    instruct model with its own template, or (sanitizer tree, --chat-tiny) the tiny model
    with --chat-template."""
    q, n = "What is the capital of France?", 20
    tmpl = ["--chat-template", template] if template else []
    cmd = [ARGS.tessera, "chat", "-m", model_path, "-p", q, "-n", str(n), "--temperature", "0",
           "--json", "-t", "1"] + tmpl
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "%s: %s" % (cmd, r.stderr)
    ref = json.loads(r.stdout)
    s = Server(["-m", model_path, "-c", "512"] + tmpl)
    try:
        name = os.path.basename(model_path)[:-len(".gguf")]
        cl = client(s, timeout=240)
        msgs = [{"role": "user", "content": q}]
        a = cl.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0)
        c = a.choices[0]
        assert c.message.content == ref["text"], "expected %r, got %r" % (ref["text"],
                                                                         c.message.content)
        assert c.message.role == "assistant" and a.object == "chat.completion", a
        assert c.finish_reason == oai_finish(ref), (c.finish_reason, ref["finish_reason"])
        assert a.usage.prompt_tokens == len(ref["prompt_ids"]), (a.usage, len(ref["prompt_ids"]))
        assert a.usage.completion_tokens == len(ref["ids"]), (a.usage, len(ref["ids"]))
        text, fin, usage, toks = "", None, None, []
        for ch in cl.chat.completions.create(model=name, messages=msgs, max_completion_tokens=n,
                                             temperature=0, stream=True, logprobs=True,
                                             top_logprobs=2,
                                             stream_options={"include_usage": True}):
            assert ch.object == "chat.completion.chunk", ch
            if ch.usage is not None:
                usage = ch.usage
            for c in ch.choices:
                text += c.delta.content or ""
                fin = c.finish_reason or fin
                if c.logprobs and c.logprobs.content:
                    toks += c.logprobs.content
        assert text == ref["text"] and fin == oai_finish(ref), (text, fin)
        assert usage.completion_tokens == len(ref["ids"]), usage
        assert len(toks) == len(ref["ids"]) and all(len(t.top_logprobs) == 2 for t in toks), toks
        # content as a list of text parts, and a bad role
        a = cl.chat.completions.create(model=name, max_tokens=n, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": q}]}])
        assert a.choices[0].message.content == ref["text"], a.choices[0].message.content
        st, body, _ = raw(s, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "wizard", "content": "hi"}]})
        check_error(st, body, 400, "messages")
        st, body, _ = raw(s, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "tools": []})
        check_error(st, body, 400, "tools")
        s.stop()
    finally:
        s.kill()


def t_start_errors(p, api_file):
    """Bad TLS / key files and open addresses without keys: clear errors, nothing served."""
    empty = os.path.join(TMP, "empty.keys")
    open(empty, "w").write("# no key\n\n")
    cases = [
        (["--tls-cert", "/nonexistent.crt", "--tls-key", p("server.key")], 1,
         "--tls-cert /nonexistent.crt: cannot open"),
        (["--tls-cert", p("server.crt"), "--tls-key", p("client.key")], 1, "--tls-key"),
        (["--tls-cert", p("server.crt"), "--tls-key", p("server.ext")], 1, "not a PEM file"),
        (["--tls-cert", p("server.crt")], 2, "go together"),
        (["--api-key-file", "/nonexistent.keys"], 1, "--api-key-file /nonexistent.keys"),
        (["--api-key-file", empty], 1, "no key in the file"),
        (["--listen", "0.0.0.0:0"], 2, "without authentication"),
        (["--http", "0.0.0.0:0"], 2, "without authentication"),
    ]
    for extra, code, needle in cases:
        cmd = [ARGS.tessera, "serve", "-m", ARGS.model, "--listen", "127.0.0.1:0", "-t", "1"] + extra
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == code and needle in r.stderr, \
            "%s: expected exit %d and %r, got %d: %s" % (extra, code, needle, r.returncode, r.stderr)


# ---------------------------------------------------------------------------------------


def main():
    global ARGS, TMP, MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--proto", required=True)
    ap.add_argument("--fetch-model", required=True, help="ops/fetch-model.sh")
    ap.add_argument("--chat-tiny", action="store_true",
                    help="chat on the tiny model with --chat-template chatml (sanitizer tree: "
                    "a real instruct model is too slow there)")
    ap.add_argument("-k", default=None, help="run only tests whose name contains this")
    ARGS = ap.parse_args()
    ARGS.model = os.path.join(ARGS.models, "stories260K.gguf")
    if not os.path.exists(ARGS.model):
        sys.exit("test_http: model missing: %s" % ARGS.model)
    for tool in ("promtool", "prometheus", "openssl"):
        if not shutil.which(tool):
            sys.exit("test_http: %s not found (ops/install-deps.sh)" % tool)
    MODEL = "stories260K"
    TMP = tempfile.mkdtemp(prefix="tsr-http-")
    make_stubs(os.path.abspath(ARGS.proto), TMP)
    r = tsrtest.Runner(ARGS.k)
    run = r.run
    try:
        s = Server(["-c", "8192"])  # long enough for a request a client abandons
        try:
            assert "loopback addresses only" in s.output(), s.output()
            run("models_health", t_models_health, s)
            run("completions_exact", t_completions_exact, s)
            run("logprobs_stop_seed", t_logprobs_stop_seed, s)
            run("concurrent_streams_metrics", t_concurrent_streams_and_metrics, s)
            run("malformed", t_malformed, s)
            run("plain_sigterm", s.stop)
        finally:
            s.kill()
        api_file, admin_file = os.path.join(TMP, "api.keys"), os.path.join(TMP, "admin.keys")
        with open(api_file, "w") as f:
            f.write("# inference keys\napi-key-1\n  api-key-2  \n\n")
        with open(admin_file, "w") as f:
            f.write("admin-key-1\n")
        run("keys", t_keys, api_file, admin_file)
        certs = make_certs(TMP)
        run("tls", t_tls, certs)
        run("start_errors", t_start_errors, certs, api_file)
        if ARGS.chat_tiny:
            run("chat", t_chat, ARGS.model, "chatml")
        elif r.selected("chat"):
            f = subprocess.run([ARGS.fetch_model, "smollm2-135m-instruct"], capture_output=True,
                               text=True, timeout=600)
            path = f.stdout.strip().splitlines()[-1] if f.stdout.strip() else ""
            if f.returncode != 0 or not os.path.exists(path):
                r.fail("chat", "cannot fetch smollm2-135m-instruct: %s" % f.stderr[-500:])
            else:
                run("chat", t_chat, path)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(r.summary(need_one=True))


if __name__ == "__main__":
    main()
