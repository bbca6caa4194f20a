#!/usr/bin/python3
"""test_batch.py — end-to-end tests of `tessera batch` (JSONL in, JSONL out).

The input mixes OpenAI Batch API lines (/v1/completions) and plain {"custom_id", "prompt"}
lines, greedy and seeded sampling (top-k / top-p / min-p, penalties, stop strings), and
malformed lines (invalid JSON, unknown fields, a prompt longer than the context, a chat
line for a model without a chat template, bad values, a missing custom_id). The reference of every good
line is `tessera generate --json` with the same parameters, one process per line.

What is checked (`run`):
  - one process, results as they finish: every good line equals its reference (token ids,
    text, finish reason, prompt tokens), every malformed line has an error line with a
    message, each custom_id (or line number, for lines without one) exactly once;
  - `mpirun -np 2 ... --tp 2 --ordered`: the same lines, in input order;
  - kill -9 mid-run (plus a torn last line, as a crash mid-write leaves), then a rerun of
    the same command: same result; SIGTERM mid-run: exit 3 (incomplete), rerun completes;
  - --shard 0/3, 1/3, 2/3 and --merge -i INPUT: the same set of lines as the single run;
    a merge with a line twice, or a line missing, fails and writes nothing;
  - duplicate custom_ids in the input: exit 2 at start, nothing generated;
  - chat lines with --chat-template chatml equal `tessera chat --json`;
  - progress: a bar with done/total, tokens/s and ETA on a pseudo-terminal; periodic
    summary lines in a log (not a terminal); the final summary line.

Subcommands for tests/slurm_batch_check.sh: `make-input OUT N`, `refs INPUT REFS`,
`check INPUT REFS OUTPUT`.

usage: test_batch.py run --tessera BUILD/tessera --model stories260K.gguf
                         [--mpirun PATH] [--lines N] [--no-mpi]
Prints one line per test and `N passed, M failed`; exits 1 on any failure.
"""
import argparse
import concurrent.futures as cf
import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

CTX = 256  # -c for batch and generate: a prompt of 300 words is too long
WORDS = ("once upon a time there was a little girl named lily she loved to play outside "
         "with her dog the sun was bright and the sky was blue one day tom saw a big red "
         "ball in the park and he wanted to play with it").split()
TEMPS = [0.5, 0.625, 0.75, 0.875, 1.0]  # exact in binary: float and double agree
TOPP = [1.0, 0.9375, 0.875]
MINP = [0.0, 0.03125, 0.0625]

# Body defaults of a batch line (the OpenAI / gRPC ones), for the generate reference.
DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def make_input(path, n, seed=1):
    """n lines: 10 malformed ones spread through n - 10 good ones, plus one blank line."""
    rnd = random.Random(seed)
    bad = [
        'this is not json',
        '{"custom_id": "bad-unknown", "prompt": "Hi", "temprature": 0.5}',
        '{"custom_id": "bad-long", "prompt": "%s"}' % " ".join(["lily"] * 300),
        '{"custom_id": "bad-chat", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"messages": [{"role": "user", "content": "hi"}]}}',
        '{"custom_id": "bad-temp", "prompt": "Hi", "temperature": -1}',
        '{"prompt": "no custom id"}',
        '{"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", '
        '"body": {"input": "x"}}',
        '{"custom_id": "bad-maxtok", "prompt": "Hi", "max_tokens": 0}',
        '["an", "array"]',
        '{"custom_id": "bad-trunc", "prompt": "cut sh',
    ]
    good_n = n - len(bad)
    lines = []
    for i in range(good_n):
        words = rnd.randint(1, 12)
        prompt = " ".join(rnd.choice(WORDS) for _ in range(words))
        prompt = prompt[0].upper() + prompt[1:]
        body = {"prompt": prompt, "max_tokens": rnd.randint(4, 24)}
        if rnd.random() < 0.5:
            body["temperature"] = 0
        else:
            body["temperature"] = rnd.choice(TEMPS)
            body["seed"] = rnd.randint(0, 1 << 31)
            if rnd.random() < 0.5:
                body["top_k"] = rnd.choice([0, 5, 40])
            if rnd.random() < 0.5:
                body["top_p"] = rnd.choice(TOPP)
            if rnd.random() < 0.3:
                body["min_p"] = rnd.choice(MINP)
        if rnd.random() < 0.15:
            body["presence_penalty"] = 0.5
        if rnd.random() < 0.15:
            body["stop"] = rnd.choice([".", ["and", "the"], " was"])
        cid = "req-%04d" % i
        if i % 2 == 0:
            obj = {"custom_id": cid, "method": "POST", "url": "/v1/completions",
                   "body": dict(body, model="stories")}
        else:
            obj = dict(body, custom_id=cid)
        lines.append(json.dumps(obj))
    # Malformed lines at spread positions; one blank line (no output).
    for k, b in enumerate(bad):
        lines.insert(min(len(lines), 3 + k * (good_n // len(bad))), b)
    lines.insert(len(lines) // 2, "")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def read_input(path):
    """[(line_no, key, body or None)]: body for good-looking lines (the checker decides)."""
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                o = json.loads(line)
            except ValueError:
                out.append((ln, "#%d" % ln, None))
                continue
            if not isinstance(o, dict) or not isinstance(o.get("custom_id"), str):
                out.append((ln, "#%d" % ln, None))
                continue
            cid = o["custom_id"]
            body = o.get("body") if "url" in o else {k: v for k, v in o.items() if k != "custom_id"}
            if cid.startswith("bad-"):
                body = None
            out.append((ln, cid, body))
    return out


def gen_args(body):
    p = dict(DEFAULTS)
    p.update({k: v for k, v in body.items() if k in DEFAULTS or k in ("seed", "stop")})
    a = ["-p", body["prompt"], "-n", str(p["max_tokens"]), "--temperature", repr(float(p["temperature"])),
         "--top-k", str(p["top_k"]), "--top-p", repr(float(p["top_p"])), "--min-p",
         repr(float(p["min_p"])), "--repetition-penalty", repr(float(p["repetition_penalty"])),
         "--presence-penalty", repr(float(p["presence_penalty"])), "--frequency-penalty",
         repr(float(p["frequency_penalty"])), "-c", str(CTX), "-t", "1", "--json"]
    if "seed" in p:
        a += ["--seed", str(p["seed"])]
    stops = p.get("stop")
    if isinstance(stops, str):
        stops = [stops]
    for s in stops or []:
        a += ["--stop", s]
    return a


def make_refs(tessera, model, input_path, refs_path, keys=None, launcher=(), extra=()):
    """generate --json for every good line (or those in keys), two at a time; launcher and
    extra give the layout (mpirun -np 2 ... --tp 2)."""
    items = [(key, body) for _, key, body in read_input(input_path)
             if body is not None and (keys is None or key in keys)]

    def one(item):
        key, body = item
        r = subprocess.run(list(launcher) + [tessera, "generate", "-m", model] + gen_args(body) +
                           list(extra), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("generate for %s failed: %s" % (key, r.stderr[-500:]))
        d = json.loads(r.stdout.strip().splitlines()[-1])
        return key, {"ids": d["ids"], "text": d["text"], "finish_reason": d["finish_reason"],
                     "n_prompt": len(d["prompt_ids"])}

    refs = {}
    with cf.ThreadPoolExecutor(2) as ex:
        for key, ref in ex.map(one, items):
            refs[key] = ref
    if refs_path:
        with open(refs_path, "w") as f:
            json.dump(refs, f)
    return refs


def output_ids(output_path):
    out = {}
    with open(output_path) as f:
        for line in f:
            o = json.loads(line)
            if o.get("error") is None:
                out[o["custom_id"]] = o["response"]["body"]["choices"][0]["token_ids"]
    return out


def check_output(input_path, refs, output_path, ordered=False):
    """Raise AssertionError unless output_path answers every line of input_path exactly."""
    inp = read_input(input_path)
    want = {key: (ln, body) for ln, key, body in inp}
    seen = {}
    order = []
    with open(output_path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not data, "the output does not end with a newline"
    for i, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        o = json.loads(raw)
        cid = o.get("custom_id")
        key = cid if cid is not None else "#%d" % o["line"]
        assert key not in seen, "output lines %d and %d both answer %s" % (seen[key], i, key)
        seen[key] = i
        order.append(want[key][0] if key in want else -1)
        assert key in want, "output line %d answers %r, which is not in the input" % (i, key)
        ln, body = want[key]
        if body is None:
            e = o.get("error")
            assert o.get("response") is None and isinstance(e, dict) and e.get("message") and \
                e.get("code"), "line %d (%s) should be an error line, got %s" % (ln, key, raw[:300])
            continue
        assert o.get("error") is None, "line %d (%s) failed: %s" % (ln, key, o.get("error"))
        b = o["response"]["body"]
        assert o["response"]["status_code"] == 200
        c = b["choices"][0]
        ref = refs[key]
        assert c["token_ids"] == ref["ids"], "%s: ids\n  expected %s\n  got      %s" % (
            key, ref["ids"], c["token_ids"])
        assert c["text"] == ref["text"], "%s: text\n  expected %r\n  got      %r" % (
            key, ref["text"], c["text"])
        fr = "length" if ref["finish_reason"] == "length" else "stop"
        assert c["finish_reason"] == fr, "%s: finish_reason expected %s, got %s" % (
            key, fr, c["finish_reason"])
        assert b["usage"]["prompt_tokens"] == ref["n_prompt"], "%s: prompt_tokens %d vs %d" % (
            key, b["usage"]["prompt_tokens"], ref["n_prompt"])
        assert b["usage"]["completion_tokens"] == len(ref["ids"])
    missing = [k for k in want if k not in seen]
    assert not missing, "%d input lines have no output line, e.g. %s" % (len(missing), missing[:5])
    if ordered:
        assert order == sorted(order), "--ordered output is not in input order"
    return len(seen)


# ---------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args, tmp):
        self.tessera = args.tessera
        self.model = args.model
        self.mpirun = args.mpirun
        self.tmp = tmp
        self.input = os.path.join(tmp, "in.jsonl")
        self.refs = None

    def batch(self, out, *extra, mpi=False, env=None):
        cmd = [self.tessera, "batch", "-m", self.model, "-i", self.input, "-o", out, "-c",
               str(CTX), "-t", "1"] + list(extra)
        if mpi:
            cmd = [self.mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                   "-np", "2"] + cmd + ["--tp", "2"]
        return cmd

    def run(self, cmd, timeout=120):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r


def wait_lines(path, n, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def t_single(c):
    out = os.path.join(c.tmp, "single.jsonl")
    r = c.run(c.batch(out))
    assert r.returncode == 0, "exit %d: %s" % (r.returncode, r.stderr[-2000:])
    n = check_output(c.input, c.refs, out)
    assert "done:" in r.stderr and "lines ok" in r.stderr, r.stderr[-500:]
    return "%d lines answered exactly" % n


def t_mpi_ordered(c):
    """tp 2 sums the matmul halves in another order than one process: greedy lines agree
    with the single-process reference, but a sampled line may draw another token when two
    probabilities are within rounding. The reference of a tp 2 line is therefore
    `mpirun -np 2 tessera generate --tp 2`: run for every line that differs from the
    single-process reference and for 12 sampled lines that do not (an mpirun start costs
    ~0.5 s, one per line for all 290 would be minutes)."""
    out = os.path.join(c.tmp, "mpi.jsonl")
    r = c.run(c.batch(out, "--ordered", mpi=True), timeout=240)
    assert r.returncode == 0, "exit %d: %s" % (r.returncode, r.stderr[-2000:])
    assert "tp 2 x pp 1" in r.stderr, r.stderr[-500:]
    got = output_ids(out)
    differ = {k for k, ids in got.items() if k in c.refs and ids != c.refs[k]["ids"]}
    bodies = {k: b for _, k, b in read_input(c.input) if b is not None}
    greedy_differ = [k for k in differ if bodies[k].get("temperature", 1) == 0]
    same_sampled = sorted(k for k in got if k not in differ and k in bodies and
                          bodies[k].get("temperature", 1) != 0)
    probe = set(random.Random(2).sample(same_sampled, min(12, len(same_sampled))))
    launcher = [c.mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                "-np", "2"]
    tp2 = make_refs(c.tessera, c.model, c.input, None, keys=differ | probe, launcher=launcher,
                    extra=["--tp", "2"])
    refs = dict(c.refs)
    refs.update(tp2)
    n = check_output(c.input, refs, out, ordered=True)
    return ("%d lines in input order; %d equal the 1-process generate, %d (sampled: %d, "
            "greedy: %d) equal 'mpirun -np 2 generate --tp 2', as do %d probed others" % (
                n, len(got) - len(differ), len(differ), len(differ) - len(greedy_differ),
                len(greedy_differ), len(probe)))


def t_kill9_rerun(c):
    out = os.path.join(c.tmp, "kill9.jsonl")
    cmd = c.batch(out, "--max-seqs", "2", "--flush-lines", "4", "--flush-interval", "50")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ok = wait_lines(out, 20, p)
        assert ok, "the run ended before 20 lines were written: %s" % p.communicate()[1][-500:]
        p.kill()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    with open(out, "rb") as f:
        n_before = f.read().count(b"\n")
    # A crash mid-write leaves a torn last line: simulate one on top of the kill.
    with open(out, "ab") as f:
        f.write(b'{"id":"batch_req_0","custom_id":"req-9999","response":{"status')
    r = c.run(cmd)
    assert r.returncode == 0, "rerun: exit %d: %s" % (r.returncode, r.stderr[-2000:])
    assert "torn last line" in r.stderr and "resuming" in r.stderr, r.stderr[-1000:]
    n = check_output(c.input, c.refs, out)
    return "killed after %d lines; rerun cut the torn line, %d lines exact" % (n_before, n)


def t_sigterm_incomplete(c):
    out = os.path.join(c.tmp, "term.jsonl")
    cmd = c.batch(out, "--max-seqs", "2", "--flush-lines", "4", "--flush-interval", "50",
                  "--shutdown-grace", "5000")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_lines(out, 12, p), "the run ended too early"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, "SIGTERM: expected exit 3 (incomplete), got %d: %s" % (
        p.returncode, err[-1000:])
    assert "SIGTERM" in err and "rerun" in err, err[-1000:]
    with open(out, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "the output was not flushed whole at SIGTERM"
    n_part = data.count(b"\n")
    r = c.run(cmd)
    assert r.returncode == 0, "rerun: exit %d: %s" % (r.returncode, r.stderr[-2000:])
    n = check_output(c.input, c.refs, out)
    return "exit 3 after %d lines, rerun completed %d lines exactly" % (n_part, n)


def t_shards_merge(c):
    single = os.path.join(c.tmp, "single.jsonl")
    if not os.path.exists(single):
        r = c.run(c.batch(single))
        assert r.returncode == 0, r.stderr[-2000:]
    parts = []
    for i in range(3):
        out = os.path.join(c.tmp, "shard%d.jsonl" % i)
        r = c.run(c.batch(out, "--shard", "%d/3" % i))
        assert r.returncode == 0, "shard %d: exit %d: %s" % (i, r.returncode, r.stderr[-2000:])
        parts.append(out)
    merged = os.path.join(c.tmp, "merged.jsonl")
    r = c.run([c.tessera, "batch", "--merge", merged] + parts + ["-i", c.input])
    assert r.returncode == 0, "merge: exit %d: %s" % (r.returncode, r.stderr[-2000:])
    with open(merged) as f:
        m = f.read().splitlines()
    with open(single) as f:
        s = f.read().splitlines()
    assert len(m) == len(set(m)) and set(m) == set(s), \
        "merged shards differ from the single run: %d vs %d lines, %d in common" % (
            len(m), len(s), len(set(m) & set(s)))
    check_output(c.input, c.refs, merged)
    # A line twice across shards, and a missing shard: refused, nothing written.
    bad = os.path.join(c.tmp, "bad-merge.jsonl")
    r = c.run([c.tessera, "batch", "--merge", bad, parts[0], parts[1], parts[1]])
    assert r.returncode != 0 and "twice" in r.stderr and not os.path.exists(bad), r.stderr
    r = c.run([c.tessera, "batch", "--merge", bad, parts[0], parts[1], "-i", c.input])
    assert r.returncode != 0 and "no output line" in r.stderr and not os.path.exists(bad), r.stderr
    return "3 shards merged = single run (%d lines as a set); duplicates / gaps refused" % len(m)


def t_duplicates(c):
    dup_in = os.path.join(c.tmp, "dup.jsonl")
    with open(dup_in, "w") as f:
        f.write('{"custom_id": "x", "prompt": "Hi", "max_tokens": 2}\n')
        f.write('{"custom_id": "y", "prompt": "Hi", "max_tokens": 2}\n')
        f.write('{"custom_id": "x", "prompt": "Ho", "max_tokens": 2}\n')
    out = os.path.join(c.tmp, "dup-out.jsonl")
    r = c.run([c.tessera, "batch", "-m", c.model, "-i", dup_in, "-o", out, "-t", "1"])
    assert r.returncode == 2, "expected exit 2, got %d: %s" % (r.returncode, r.stderr)
    assert "duplicate custom_id" in r.stderr and "line 3" in r.stderr, r.stderr
    assert not os.path.exists(out) or os.path.getsize(out) == 0
    return "refused at start: " + [l for l in r.stderr.splitlines() if "duplicate" in l][0][:90]


def t_progress_log(c):
    out = os.path.join(c.tmp, "plog.jsonl")
    log = os.path.join(c.tmp, "plog.err")
    with open(log, "w") as lf:
        r = subprocess.run(c.batch(out, "--max-seqs", "2", "--progress-interval", "0.02"),
                           stdout=subprocess.DEVNULL, stderr=lf, timeout=120)
    with open(log) as f:
        text = f.read()
    assert r.returncode == 0, text[-1000:]
    prog = [l for l in text.splitlines() if "lines (" in l and "tokens/s" in l and "ETA" in l]
    assert len(prog) >= 2, "expected periodic progress lines in the log, got:\n" + text[-1500:]
    assert "\r" not in text and "\033" not in text, "terminal control codes in a log file"
    assert "done:" in text and "lines ok" in text and "generated tokens/s" in text
    return "%d progress lines, e.g. %s" % (len(prog), prog[-1][:100])


def t_progress_tty(c):
    out = os.path.join(c.tmp, "ptty.jsonl")
    cmd = c.batch(out, "--max-seqs", "2")
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(cmd[0], cmd)
    buf = b""
    end = time.time() + 120
    status = None
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                d = os.read(fd, 65536)
            except OSError:
                d = b""
            if not d:
                break
            buf += d
        wp, st = os.waitpid(pid, os.WNOHANG)
        if wp:
            status = st
            try:
                while True:
                    r, _, _ = select.select([fd], [], [], 0.1)
                    if not r:
                        break
                    d = os.read(fd, 65536)
                    if not d:
                        break
                    buf += d
            except OSError:
                pass
            break
    if status is None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
    os.close(fd)
    text = buf.decode("utf-8", "replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text[-1000:]
    bars = [s for s in text.split("\r") if "lines" in s and "tok/s" in s and "ETA" in s and "[" in s]
    assert len(bars) >= 2, "expected a redrawn progress bar on the terminal, got:\n" + text[-1500:]
    n = len(read_input(c.input))
    assert any("%d/%d lines" % (n, n) in b for b in bars), "no final bar at %d/%d:\n%s" % (
        n, n, text[-800:])
    return "%d bar redraws, last: %s" % (len(bars), bars[-1].strip()[:90])


def t_chat(c):
    """Chat lines (/v1/chat/completions) rendered with --chat-template chatml (stories260K
    has no template of its own) equal `tessera chat --json` for the same conversation."""
    convs = [("Be brief.", "Tell me a story", 12, 0, None), (None, "Once upon a time", 16, 0, None),
             ("You are a cat.", "What do you see?", 10, 0.75, 11), (None, "Lily", 8, 1.0, 5),
             (None, "The dog ran", 14, 0.5, 99)]
    inp = os.path.join(c.tmp, "chat.jsonl")
    with open(inp, "w") as f:
        for i, (sys_msg, user, n, temp, seed) in enumerate(convs):
            msgs = ([{"role": "system", "content": sys_msg}] if sys_msg else []) + [
                {"role": "user", "content": user}]
            body = {"messages": msgs, "max_tokens": n, "temperature": temp}
            if seed is not None:
                body["seed"] = seed
            f.write(json.dumps({"custom_id": "chat-%d" % i, "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")
    out = os.path.join(c.tmp, "chat-out.jsonl")
    r = c.run([c.tessera, "batch", "-m", c.model, "-i", inp, "-o", out, "-c", str(CTX), "-t", "1",
               "--chat-template", "chatml"])
    assert r.returncode == 0, "exit %d: %s" % (r.returncode, r.stderr[-2000:])
    got = {}
    with open(out) as f:
        for line in f:
            o = json.loads(line)
            assert o["error"] is None, o["error"]
            b = o["response"]["body"]
            assert b["object"] == "chat.completion"
            got[o["custom_id"]] = b["choices"][0]
    for i, (sys_msg, user, n, temp, seed) in enumerate(convs):
        cmd = [c.tessera, "chat", "-m", c.model, "--chat-template", "chatml", "-p", user, "-n",
               str(n), "--temperature", repr(float(temp)), "--top-k", "0", "--top-p", "1.0",
               "--min-p", "0.0", "-c", str(CTX), "-t", "1", "--json"]
        if sys_msg:
            cmd += ["-s", sys_msg]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        rr = c.run(cmd)
        assert rr.returncode == 0, rr.stderr[-1000:]
        ref = json.loads(rr.stdout.strip().splitlines()[-1])
        ch = got["chat-%d" % i]
        assert ch["token_ids"] == ref["ids"] and ch["message"]["content"] == ref["text"], \
            "chat-%d: expected %s %r, got %s %r" % (i, ref["ids"], ref["text"], ch["token_ids"],
                                                    ch["message"]["content"])
    return "%d chat lines equal 'tessera chat --json'" % len(convs)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tessera", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--mpirun", default="mpirun")
    r.add_argument("--lines", type=int, default=300)
    r.add_argument("--no-mpi", action="store_true")
    r.add_argument("-k", default="")
    m = sub.add_parser("make-input")
    m.add_argument("out")
    m.add_argument("n", type=int)
    f = sub.add_parser("refs")
    f.add_argument("--tessera", required=True)
    f.add_argument("--model", required=True)
    f.add_argument("input")
    f.add_argument("refs")
    k = sub.add_parser("check")
    k.add_argument("input")
    k.add_argument("refs")
    k.add_argument("output")
    args = ap.parse_args()
    if args.cmd == "make-input":
        make_input(args.out, args.n)
        return 0
    if args.cmd == "refs":
        make_refs(args.tessera, args.model, args.input, args.refs)
        return 0
    if args.cmd == "check":
        with open(args.refs) as fh:
            refs = json.load(fh)
        try:
            n = check_output(args.input, refs, args.output)
        except AssertionError as e:
            print("check: FAILED: %s" % e)
            return 1
        print("check: %d lines answered exactly, each once" % n)
        return 0

    for p in (args.tessera, args.model):
        if not os.path.exists(p):
            print("FAILED: %s does not exist" % p)
            return 1
    tmp = tempfile.mkdtemp(prefix="tessera-batch-")
    c = Ctx(args, tmp)
    t0 = time.time()
    make_input(c.input, args.lines)
    c.refs = make_refs(c.tessera, c.model, c.input, os.path.join(tmp, "refs.json"))
    print("refs: %d lines through tessera generate (%.1f s)" % (len(c.refs), time.time() - t0))
    tests = [t_single, t_chat, t_duplicates, t_kill9_rerun, t_sigterm_incomplete,
             t_shards_merge, t_progress_log, t_progress_tty]
    if not args.no_mpi:
        tests.insert(1, t_mpi_ordered)
    passed = failed = 0
    for t in tests:
        if args.k and args.k not in t.__name__:
            continue
        t1 = time.time()
        try:
            msg = t(c)
            passed += 1
            print("PASS %-22s %5.1f s  %s" % (t.__name__, time.time() - t1, msg))
        except Exception as e:  # noqa: BLE001 — report every failure and go on
            failed += 1
            print("FAIL %-22s %5.1f s  %s" % (t.__name__, time.time() - t1, e))
            if not isinstance(e, AssertionError):
                traceback.print_exc()
        sys.stdout.flush()
    print("%d passed, %d failed (%.1f s)" % (passed, failed, time.time() - t0))
    if failed == 0:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print("files kept in", tmp)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
