#!/usr/bin/env python3
"""tessera chat, end to end (tests/chat.cmake).

What is checked and why:
  - `chat -p --json` renders the conversation with the template (--system, ChatML) and its
    greedy ids equal `generate --json` on the same rendered text (the same engine path);
  - stdin without a terminal: one answer per line, and the history is kept (the second
    prompt contains the first answer);
  - an interactive session on a pseudo-terminal: the prompt, an answer, /reset, Ctrl-C
    stopping a long answer while the session goes on, /quit;
  - with --mpirun: `chat -p` on tp 2 and on pp 2 gives the ids of one process;
  - errors: an unknown template name (usage error listing the families), a model without
    a chat template (says to pass --chat-template);
  - with --real (only that): `chat -p` on SmolLM2 against llama.cpp's chat cases in
    expected/real-models.json: llama.cpp's rendered text and prompt ids, its greedy ids up
    to the first near-tie, the end on end-of-generation.
Uses stories260K (no chat template of its own: --chat-template chatml).
"""
import argparse
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

P = argparse.ArgumentParser()
P.add_argument("--tessera", required=True)
P.add_argument("--models", required=True)
P.add_argument("--fetch-model", required=True)
P.add_argument("--mpirun", default="")
P.add_argument("--real", action="append", default=[], metavar="NAME")
A = P.parse_args()

STORIES = os.path.join(A.models, "stories260K.gguf")
FAILED = []


def check(cond, what, detail=""):
    if cond:
        print("ok   ", what)
    else:
        print("FAIL ", what, detail)
        FAILED.append(what)


def run(args, stdin=None, timeout=120):
    r = subprocess.run([A.tessera] + args, input=stdin, capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def test_one_answer():
    rc, out, err = run(["chat", "-m", STORIES, "--chat-template", "chatml", "--system",
                        "You are a storyteller.", "-p", "Tell me about a cat.", "-n", "24",
                        "--temperature", "0", "-t", "1", "--json"])
    check(rc == 0, "chat -p --json exits 0", err)
    if rc:
        return
    o = json.loads(out.strip().splitlines()[-1])
    want = ("<|im_start|>system\nYou are a storyteller.<|im_end|>\n"
            "<|im_start|>user\nTell me about a cat.<|im_end|>\n<|im_start|>assistant\n")
    check(o["prompt"] == want, "chat renders the ChatML conversation", repr(o["prompt"]))
    check(o["template"] == "chatml", "chat reports the template")
    for k in ("prompt_ids", "ids", "text", "finish_reason", "prefill_tokens_per_s",
              "decode_tokens_per_s", "seed", "threads", "tp", "pp", "ranks"):
        check(k in o, "chat --json has key " + k)
    rc, gout, gerr = run(["generate", "-m", STORIES, "-p", want, "-n", "24", "--temperature",
                          "0", "-t", "1", "--json"])
    g = json.loads(gout.strip().splitlines()[-1]) if rc == 0 else {}
    check(rc == 0 and g["prompt_ids"] == o["prompt_ids"] and g["ids"] == o["ids"],
          "chat -p greedy ids equal generate on the rendered text",
          "%s vs %s" % (g.get("ids"), o["ids"]))
    # plain output: the answer on stdout, the figures on stderr
    rc, out2, err2 = run(["chat", "-m", STORIES, "--chat-template", "chatml", "--system",
                          "You are a storyteller.", "-p", "Tell me about a cat.", "-n", "24",
                          "--temperature", "0", "-t", "1"])
    check(rc == 0 and out2.rstrip("\n") == o["text"], "chat -p prints the answer",
          repr(out2) + " vs " + repr(o["text"]))
    check("prompt tokens" in err2, "chat -p prints its figures on stderr", err2)


def test_lines():
    rc, out, err = run(["chat", "-m", STORIES, "--chat-template", "llama2-sys", "-n", "8",
                        "--temperature", "0", "-t", "1", "--json"],
                       stdin=b"Hello there\nWhat next?\n")
    check(rc == 0, "chat reads messages from stdin", err)
    if rc:
        return
    objs = [json.loads(line) for line in out.strip().splitlines()]
    check(len(objs) == 2, "one answer per line", out)
    if len(objs) == 2:
        first = objs[0]["text"]
        check(objs[0]["prompt"] == "[INST] Hello there [/INST]", "first prompt",
              repr(objs[0]["prompt"]))
        check(objs[1]["prompt"] == "[INST] Hello there [/INST]" + first + "</s>[INST] What next?"
              " [/INST]", "the history is kept", repr(objs[1]["prompt"]))
    rc, out, err = run(["chat", "-m", STORIES, "--chat-template", "chatml", "-n", "4", "-t", "1"],
                       stdin=b"one\ntwo\nthree\n")
    check(rc == 0 and len(out.strip("\n").split("\n")) == 3, "plain answers, one line each",
          repr(out))


def test_errors():
    rc, out, err = run(["chat", "-m", STORIES, "--chat-template", "nosuch", "-p", "hi"])
    check(rc == 2 and "nosuch" in err and "chatml" in err and "llama3" in err,
          "an unknown template name is a usage error listing the families", err)
    rc, out, err = run(["chat", "-m", STORIES, "-p", "hi"])
    check(rc == 1 and "--chat-template" in err and "chatml" in err,
          "a model without a chat template says to pass --chat-template", err)
    rc, out, err = run(["chat", "-m", STORIES, "-p", ""])
    check(rc == 2, "an empty -p is a usage error", err)


class Pty:
    def __init__(self, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(A.tessera, [A.tessera] + args)
        self.buf = b""

    def expect(self, pattern, timeout=60.0):
        pattern = pattern.encode()
        end = time.time() + timeout
        while pattern not in self.buf:
            left = end - time.time()
            if left <= 0:
                return False
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    return False
                if not data:
                    return False
                self.buf += data
        i = self.buf.index(pattern) + len(pattern)
        self.seen, self.buf = self.buf[:i], self.buf[i:]
        return True

    def expect_bytes(self, n, timeout=60.0):
        """At least n more bytes of output."""
        end = time.time() + timeout
        while len(self.buf) < n and time.time() < end:
            r, _, _ = select.select([self.fd], [], [], max(0.0, end - time.time()))
            if r:
                data = os.read(self.fd, 4096)
                if not data:
                    break
                self.buf += data
        return len(self.buf) >= n

    def send(self, s):
        os.write(self.fd, s.encode())

    def wait(self, timeout=30.0):
        end = time.time() + timeout
        while time.time() < end:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(st)
            try:
                r, _, _ = select.select([self.fd], [], [], 0.1)
                if r:
                    self.buf += os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        return None


def test_interactive():
    # A long answer (up to the whole 4096-token context) to be interrupted.
    p = Pty(["chat", "-m", STORIES, "--chat-template", "chatml", "-t", "1", "--temperature", "0",
             "-c", "4096", "-n", "4000", "--ignore-eos"])
    check(p.expect("> "), "interactive: the prompt appears", repr(p.buf))
    p.send("Once upon a time\r")
    # past the echo of the line, wait for the first bytes of the answer, then Ctrl-C
    got = p.expect("Once upon a time\r\n", 30) and p.expect_bytes(8, 60)
    p.send("\x03")
    check(got and p.expect("[stopped]", 30), "interactive: Ctrl-C stops the answer",
          repr(p.buf[-300:]))
    check(p.expect("> ", 30), "interactive: the session goes on after Ctrl-C", repr(p.buf))
    p.send("/reset\r")
    check(p.expect("(conversation reset)", 30), "interactive: /reset", repr(p.buf))
    p.send("\x03")  # at the prompt: a hint, the session goes on
    check(p.expect("/quit", 30), "interactive: Ctrl-C at the prompt keeps the session",
          repr(p.buf))
    p.send("/quit\r")
    rc = p.wait()
    check(rc == 0, "interactive: /quit ends with status 0", "rc=%s %r" % (rc, p.buf[-300:]))


def test_layouts():
    base = ["chat", "-m", STORIES, "--chat-template", "chatml", "-p", "Once upon a time", "-n",
            "16", "--temperature", "0", "-t", "1", "--json"]
    rc, out, err = run(base)
    one = json.loads(out.strip().splitlines()[-1])["ids"] if rc == 0 else None
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for flag in ("--tp", "--pp"):
        r = subprocess.run([A.mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                            "-np", "2", A.tessera] + base + [flag, "2"], capture_output=True,
                           timeout=120, env=env)
        lines = [l for l in r.stdout.decode().splitlines() if l.startswith("{")]
        ids = json.loads(lines[-1])["ids"] if r.returncode == 0 and lines else None
        check(one is not None and ids == one, "chat %s 2 gives the ids of one process" % flag,
              "%s vs %s %s" % (ids, one, r.stderr.decode()[-500:]))


TIE_REF = 0.25  # logits: tests/real_models_check.c's near-tie rule (F16 vs F32 KV rounding)


def test_real(name):
    """`chat -p` on a real model against llama.cpp's chat cases with one user message (with
    and without --system): the rendered prompt and its ids are llama.cpp's, and the free-running
    greedy ids are llama.cpp's up to the first step where they differ, which must be a
    near-tie (llama.cpp's own top-2 margin below TIE_REF): past one, both continuations are
    right. An answer equal to llama.cpp's must end on end-of-generation where it does.
    (max_tokens: the case's when it ends on end-of-generation, else 24 to bound the time.)"""
    path = subprocess.run([A.fetch_model, name], capture_output=True,
                          check=True).stdout.decode().strip().splitlines()[-1]
    ref = json.load(open(os.path.join(A.models, "expected", "real-models.json")))
    cases = [c for c in ref["models"][name]["cases"] if c["kind"] == "chat"]
    n_run = 0
    for k, case in enumerate(cases):
        msgs = case["messages"]
        if msgs[-1]["role"] != "user" or any(m["role"] == "assistant" for m in msgs):
            continue  # chat -p takes a system and one user message
        args = ["chat", "-m", path, "-p", msgs[-1]["content"], "--temperature", "0", "-t", "2",
                "--json", "-n", str(24 if not case["eog"] else case["n_predict"])]
        if msgs[0]["role"] == "system":
            args += ["--system", msgs[0]["content"]]
        rc, out, err = run(args, timeout=600)
        check(rc == 0, "%s case %d: chat -p runs" % (name, k), err)
        if rc:
            continue
        n_run += 1
        o = json.loads(out.strip().splitlines()[-1])
        check(o["prompt"] == case["rendered"], "%s case %d: the template's text" % (name, k),
              repr(o["prompt"]))
        check(o["prompt_ids"] == case["prompt_ids"], "%s case %d: llama.cpp's prompt ids" % (name, k))
        want, got = case["ids"], o["ids"]
        n = min(len(want), len(got), case["reliable"])
        diff = next((i for i in range(n) if want[i] != got[i]), n)
        if diff < n:
            m = case["margins"][diff]
            check(m < TIE_REF, "%s case %d: greedy ids equal llama.cpp's up to a near-tie "
                  "(%d equal, then margin %.3f)" % (name, k, diff, m), "%s\nvs %s" % (got, want))
        else:
            check(True, "%s case %d: %d greedy ids equal llama.cpp's" % (name, k, n))
        if case["eog"] and diff == n:  # the same answer ends where llama.cpp's does
            check(o["finish_reason"] == "eos" and got == want,
                  "%s case %d: ends on end-of-generation, as llama.cpp" % (name, k),
                  "%s %s" % (o["finish_reason"], got))
    check(n_run >= 2, "%s: two chat cases run" % name, n_run)


if A.real:
    for name in A.real:
        test_real(name)
else:
    test_errors()
    test_one_answer()
    test_lines()
    test_interactive()
    if A.mpirun:
        test_layouts()
if FAILED:
    print("%d check(s) failed: %s" % (len(FAILED), ", ".join(FAILED)))
    sys.exit(1)
print("all checks pass")
