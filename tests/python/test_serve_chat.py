#!/usr/bin/python3
"""test_serve_chat.py — GenerateRequest.messages and ModelInfo's chat fields over gRPC.

The client is Debian's python3-grpcio with stubs generated from proto/ at test time (as
test_serve.py). Servers listen on 127.0.0.1 ephemeral ports; every RPC has a deadline.

What is checked:
  - a model with its own chat template (a small random llama made by `tessera mkmodel`
    with the vocabulary of vocab/ggml-vocab-phi-3.gguf, which carries Phi-3 mini's
    template): ModelInfo reports the family and the end-of-generation ids; Generate with
    messages gives exactly the ids of Generate with the prompt ids of the rendered text
    (Phi-3 mini's Jinja output, tokenized by the server's Tokenize), the same usage;
  - exactly one of prompt / prompt_ids / messages, else INVALID_ARGUMENT naming them; a bad
    role is INVALID_ARGUMENT naming it;
  - stories260K (no template): messages are FAILED_PRECONDITION, ModelInfo has no template
    and eog_ids = [EOS]; with --chat-template chatml, messages render as ChatML.

usage: test_serve_chat.py --tessera BUILD/tessera --models DIR --proto DIR
"""
import argparse
import os
import subprocess
import sys
import tempfile

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tsrtest  # noqa: E402  (stubs, processes)

P = argparse.ArgumentParser()
P.add_argument("--tessera", required=True)
P.add_argument("--models", required=True)
P.add_argument("--proto", required=True)
ARGS = P.parse_args()
FAILED = []
TIMEOUT = 60


def check(cond, what, detail=""):
    print(("ok    " if cond else "FAIL  ") + what + ("" if cond else "  " + str(detail)))
    if not cond:
        FAILED.append(what)


def make_stubs(out_dir):
    global pb, pbg
    pb, pbg, _, _ = tsrtest.make_stubs(ARGS.proto, out_dir)


class Server(tsrtest.Proc):
    """`tessera serve` of `model` on an ephemeral port, with an Inference stub (its log in
    the test's temporary folder)."""

    def __init__(self, model, args=()):
        super().__init__([ARGS.tessera, "serve", "-m", model, "--listen", "127.0.0.1:0", "-t",
                          "1"] + list(args), log_prefix="serve-", log_dir=TMP,
                         fail_what="server did not start")
        self.ch = grpc.insecure_channel(self.target)
        self.stub = pbg.InferenceStub(self.ch)

    def stop(self):
        """SIGTERM; the exit status (None if it had to be killed after 30 s)."""
        self.ch.close()
        return super().stop(30)


def generate(stub, **kw):
    ids, last = [], None
    for r in stub.Generate(pb.GenerateRequest(**kw), timeout=TIMEOUT):
        ids += list(r.token_ids)
        last = r
    return ids, last


def expect_error(stub, code, words, what, **kw):
    try:
        generate(stub, **kw)
        check(False, what, "no error")
    except grpc.RpcError as e:
        ok = e.code() == code and all(w in e.details() for w in words)
        check(ok, what, "%s: %s" % (e.code(), e.details()))


def msg(role, content):
    return pb.ChatMessage(role=role, content=content)


def test_phi3(tmp):
    model = os.path.join(tmp, "phi3-tiny.gguf")
    r = subprocess.run([ARGS.tessera, "mkmodel", "-o", model, "--vocab-from",
                        os.path.join(ARGS.models, "vocab", "ggml-vocab-phi-3.gguf"),
                        "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-ff", "128",
                        "--n-ctx", "512"], capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "mkmodel with the Phi-3 vocabulary", r.stderr)
    s = Server(model)
    try:
        info = s.stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)
        check(info.chat_template == "phi3", "ModelInfo.chat_template is phi3", info.chat_template)

        def tok(text):
            return list(s.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=False),
                                        timeout=TIMEOUT).ids)
        want_eog = {tok("<|endoftext|>")[0], tok("<|end|>")[0], info.eos_id}
        eog = set(info.eog_ids)
        check(want_eog <= eog and len(info.eog_ids) == len(eog),
              "ModelInfo.eog_ids has EOS, <|endoftext|> and <|end|>", list(info.eog_ids))
        conv = [msg("system", "ignored by Phi-3 mini"), msg("user", "Hello"),
                msg("assistant", "Hi there"), msg("user", "Who are you?")]
        rendered = ("<s><|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
                    "<|user|>\nWho are you?<|end|>\n<|assistant|>\n")
        pids = tok(rendered)
        check(pids[0] == info.bos_id and pids.count(info.bos_id) == 1,
              "the rendered text holds one BOS", pids[:4])
        a, la = generate(s.stub, messages=conv, max_tokens=12, temperature=0, ignore_eos=True)
        b, lb = generate(s.stub, prompt_ids=pids, max_tokens=12, temperature=0, ignore_eos=True)
        check(a == b and len(a) == 12, "messages generate the ids of the rendered prompt",
              "%s vs %s" % (a, b))
        check(la.usage.prompt_tokens == len(pids) == lb.usage.prompt_tokens,
              "usage counts the rendered prompt", (la.usage.prompt_tokens, len(pids)))
        expect_error(s.stub, grpc.StatusCode.INVALID_ARGUMENT,
                     ["prompt", "prompt_ids", "messages", "exactly one"],
                     "prompt and messages: INVALID_ARGUMENT naming the three",
                     prompt="hi", messages=conv, max_tokens=2)
        expect_error(s.stub, grpc.StatusCode.INVALID_ARGUMENT,
                     ["prompt", "prompt_ids", "messages", "exactly one"],
                     "prompt_ids and messages: INVALID_ARGUMENT naming the three",
                     prompt_ids=pids, messages=conv, max_tokens=2)
        expect_error(s.stub, grpc.StatusCode.INVALID_ARGUMENT,
                     ["prompt", "prompt_ids", "messages"],
                     "no input: INVALID_ARGUMENT naming the three", max_tokens=2)
        expect_error(s.stub, grpc.StatusCode.INVALID_ARGUMENT, ["messages", "robot"],
                     "a bad role: INVALID_ARGUMENT naming it",
                     messages=[msg("user", "hi"), msg("robot", "beep")], max_tokens=2)
        expect_error(s.stub, grpc.StatusCode.INVALID_ARGUMENT, ["content"],
                     "a NUL in a message: INVALID_ARGUMENT naming the field",
                     messages=[msg("user", "hi\x00there")], max_tokens=2)
    finally:
        rc = s.stop()
    check(rc == 0, "phi3 server exits 0 on SIGTERM", rc)


def test_stories():
    stories = os.path.join(ARGS.models, "stories260K.gguf")
    s = Server(stories)
    try:
        info = s.stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)
        check(not info.HasField("chat_template"), "no template: ModelInfo has none")
        check(list(info.eog_ids) == [info.eos_id], "stories260K: eog_ids is [EOS]",
              list(info.eog_ids))
        expect_error(s.stub, grpc.StatusCode.FAILED_PRECONDITION, ["messages", "chat template"],
                     "no template: messages are FAILED_PRECONDITION",
                     messages=[msg("user", "hi")], max_tokens=2)
        a, _ = generate(s.stub, prompt="Once upon a time", max_tokens=4, temperature=0)
        check(len(a) == 4, "no template: prompts still work")
    finally:
        s.stop()
    s = Server(stories, ["--chat-template", "chatml"])
    try:
        info = s.stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)
        check(info.chat_template == "chatml", "--chat-template chatml in ModelInfo")
        text = "<|im_start|>user\nOnce upon a time<|im_end|>\n<|im_start|>assistant\n"
        ids = list(s.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=TIMEOUT).ids)
        a, _ = generate(s.stub, messages=[msg("user", "Once upon a time")], max_tokens=8,
                        temperature=0)
        b, _ = generate(s.stub, prompt_ids=ids, max_tokens=8, temperature=0)
        check(a == b and a, "--chat-template chatml renders ChatML", "%s vs %s" % (a, b))
    finally:
        s.stop()
    r = subprocess.run([ARGS.tessera, "serve", "-m", stories, "--chat-template", "nosuch"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and "chatml" in r.stderr,
          "serve --chat-template with an unknown name is a usage error", r.stderr)


with tempfile.TemporaryDirectory(prefix="tsr-chat-") as TMP:
    make_stubs(TMP)
    test_phi3(TMP)
    test_stories()
if FAILED:
    print("%d check(s) failed: %s" % (len(FAILED), ", ".join(FAILED)))
    sys.exit(1)
print("all checks pass")
