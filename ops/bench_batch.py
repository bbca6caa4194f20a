#!/usr/bin/python3
"""bench_batch.py — throughput of `tessera batch` against the other ways to run a file of
prompts: `tessera generate` once per prompt, `tessera serve` fed by ops/loadgen.py, and
`tessera batch --coordinator` through a `tessera coordinator` with one replica.

  flock /work/bench.lock /usr/bin/python3 ops/bench_batch.py --threads 2

(defaults: build/tessera, 1000 prompts, 50 of them for the generate baseline, the model
made in /tmp if missing). It prints `uptime` before and after, each way as it finishes,
and a table at the end.

The model is made if missing (the issue's 100M shape: mkmodel --n-embd 768 --n-layer 12
--n-head 12 --n-head-kv 12 --n-ff 2048 --type q8_0, vocabulary from
../shared/models/vocab/ggml-vocab-llama-spm.gguf). Prompts: --prompts lines of 16..128
tokens (common English words, one token each with this vocabulary, after BOS), 64
generated tokens each (greedy, ignore_eos: random weights would stop anywhere).
Printed: generated tokens/s of each way (generate: the tokens of --gen-prompts prompts
over the wall time of their processes, start and model load included, as a user running
it per prompt pays them; also its decode-only rate), and the ratios; also generated
tokens per CPU-second (user + system time of the tessera processes: for the cluster way
the batch client, the coordinator and the replica together), which other tenants of a
shared machine disturb far less than wall time. The replica of serve and of the cluster
way runs with the same flags (-t, --max-seqs = --concurrency); --coord-concurrency sets
batch --coordinator's calls in flight (default --concurrency). --rounds R interleaves the three
ways R times and prints medians. Needs Debian's python3-grpcio for loadgen
(/usr/bin/python3).
"""
import argparse
import json
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was he for it with as his on be at by had not are but from "
         "or have an they which one you were all we her she there would their will when who "
         "him been has more if no out so said what up its about into than them can only "
         "other time new some could these two may first then do any like my now over such "
         "our man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state "
         "good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def make_input(path, n, seed=3):
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rnd.randint(15, 127)  # + BOS = 16..128 tokens
            prompt = " ".join(rnd.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"custom_id": "p%05d" % i, "prompt": prompt, "max_tokens": 64,
                                "temperature": 0, "ignore_eos": True}) + "\n")


def child_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_s(pid):
    """CPU seconds (user + system) of a running process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_batch(a, t, inp, tmp):
    out = os.path.join(tmp, "out.jsonl")
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.time()
    c0 = child_cpu_s()
    r = subprocess.run([t, "batch", "-m", a.model, "-i", inp, "-o", out, "-t", str(a.threads),
                        "--progress-interval", "60"] + a.batch_flags,
                       capture_output=True, text=True)
    wall = time.time() - t0
    cpu = child_cpu_s() - c0
    if r.returncode != 0:
        sys.exit("batch failed: " + r.stderr[-2000:])
    gen = ptok = 0
    with open(out) as f:
        for line in f:
            u = json.loads(line)["response"]["body"]["usage"]
            gen += u["completion_tokens"]
            ptok += u["prompt_tokens"]
    print("batch:     %7.1f generated tokens/s (%d generated + %d prompt tokens, %.1f s wall, "
          "process start included)" % (gen / wall, gen, ptok, wall))
    print("           %.1f generated tokens per CPU-second (%.1f CPU-s)" % (gen / cpu, cpu))
    for l in r.stderr.splitlines():
        if " done: " in l or ": rank " in l:
            print("           " + l)
    sys.stdout.flush()
    return gen / wall, gen / cpu


def run_generate(a, t, inp):
    items = [json.loads(l) for l in open(inp)][:a.gen_prompts]
    gen = 0
    dec_t = 0.0
    t0 = time.time()
    c0 = child_cpu_s()
    for it in items:
        r = subprocess.run([t, "generate", "-m", a.model, "-p", it["prompt"], "-n", "64",
                            "--temperature", "0", "--ignore-eos", "--json", "-t",
                            str(a.threads)], capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        gen += len(d["ids"])
        if d["decode_tokens_per_s"] > 0:
            dec_t += (len(d["ids"]) - 1) / d["decode_tokens_per_s"]
    wall = time.time() - t0
    cpu = child_cpu_s() - c0
    print("generate:  %7.1f generated tokens/s (%d prompts, once each: %.1f s wall; decode "
          "alone %.1f tokens/s); %.1f generated tokens per CPU-second" % (
              gen / wall, len(items), wall, (gen - len(items)) / dec_t, gen / cpu), flush=True)
    return gen / wall, gen / cpu


def start_listening(cmd, what, env=None):
    """A tessera process whose stderr says 'listening on HOST:PORT' -> (Popen, port)."""
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + 120
    while time.time() < end:
        line = p.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on [^:]+:(\d+)", line)
        if m:
            # Keep draining stderr so the process never blocks on a full pipe.
            subprocess.Popen(["cat"], stdin=p.stderr, stdout=subprocess.DEVNULL)
            return p, m.group(1)
    p.kill()
    sys.exit("%s did not start" % what)


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_coord(a, t, inp, tmp):
    """batch --coordinator through a coordinator with one replica (serve's flags)."""
    coord, cport = start_listening([t, "coordinator", "--listen", "127.0.0.1:0"], "coordinator")
    addr = "127.0.0.1:" + cport
    rep = None
    try:
        rep, _ = start_listening([t, "serve", "-m", a.model, "--listen", "127.0.0.1:0", "-t",
                                  str(a.threads), "--max-seqs", str(a.concurrency), "--join",
                                  addr, "--name", "bench"], "replica")
        end = time.time() + 30
        while time.time() < end:
            r = subprocess.run([t, "ctl", "--coordinator", addr, "--json", "replicas"],
                               capture_output=True, text=True)
            if r.returncode == 0 and any(x.get("state") == "up"
                                         for x in json.loads(r.stdout).get("replicas", [])):
                break
            time.sleep(0.2)
        else:
            sys.exit("the replica did not join the coordinator")
        out = os.path.join(tmp, "out-coord.jsonl")
        if os.path.exists(out):
            os.unlink(out)
        cc = a.coord_concurrency or a.concurrency
        cpu_rep0, cpu_coord0 = proc_cpu_s(rep.pid), proc_cpu_s(coord.pid)
        t0 = time.time()
        c0 = child_cpu_s()
        r = subprocess.run([t, "batch", "--coordinator", addr, "-i", inp, "-o", out,
                            "--concurrency", str(cc), "--progress-interval", "60"],
                           capture_output=True, text=True)
        wall = time.time() - t0
        cpu_client = child_cpu_s() - c0
        cpu_rep = proc_cpu_s(rep.pid) - cpu_rep0
        cpu_coord = proc_cpu_s(coord.pid) - cpu_coord0
        if r.returncode != 0:
            sys.exit("batch --coordinator failed: " + r.stderr[-2000:])
        gen = 0
        with open(out) as f:
            for line in f:
                gen += json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
        cpu = cpu_client + cpu_rep + cpu_coord
        print("coord:     %7.1f generated tokens/s (batch --coordinator, %d calls in flight, one "
              "replica, %.1f s wall); %.1f generated tokens per CPU-second (replica %.1f, "
              "coordinator %.1f, batch client %.1f CPU-s)" % (
                  gen / wall, cc, wall, gen / cpu, cpu_rep, cpu_coord, cpu_client), flush=True)
        return gen / wall, gen / cpu
    finally:
        if rep:
            stop(rep)
        stop(coord)


def run_serve(a, t, inp):
    p = subprocess.Popen([t, "serve", "-m", a.model, "--listen", "127.0.0.1:0", "-t",
                          str(a.threads), "--max-seqs", str(a.concurrency)],
                         stderr=subprocess.PIPE, text=True)
    port = None
    try:
        end = time.time() + 120
        while time.time() < end:
            line = p.stderr.readline()
            if not line:
                break
            m = re.search(r"listening on [^:]+:(\d+)", line)
            if m:
                port = m.group(1)
                break
        if not port:
            sys.exit("serve did not start")
        t0 = time.time()
        r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "ops", "loadgen.py"),
                            "--target", "127.0.0.1:" + port, "--concurrency",
                            str(a.concurrency), "--input", inp, "--timeout", "3600"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("loadgen failed: " + r.stdout + r.stderr)
        cpu = proc_cpu_s(p.pid)
        m = re.search(r"throughput:\s+([\d.]+) generated tokens/s", r.stdout)
        v = float(m.group(1))
        m = re.search(r"\((\d+) tokens\)", r.stdout)
        gen = int(m.group(1))
        print("serve:     %7.1f generated tokens/s (loadgen, concurrency %d, %.1f s); %.1f "
              "generated tokens per CPU-second of the server (%.1f CPU-s, start included)" % (
                  v, a.concurrency, time.time() - t0, gen / cpu, cpu), flush=True)
        return v, gen / cpu
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "tessera"))
    ap.add_argument("--model", default="/tmp/tessera-bench-100m-q8_0.gguf")
    ap.add_argument("--vocab", default=os.path.join(ROOT, "..", "shared", "models", "vocab",
                                                    "ggml-vocab-llama-spm.gguf"))
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--gen-prompts", type=int, default=50,
                    help="prompts for the generate-per-prompt baseline (a rate: fewer is fine)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--coord-concurrency", type=int, default=0,
                    help="batch --coordinator's calls in flight (default: --concurrency)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the three runs, interleaved; medians (a shared machine is noisy)")
    ap.add_argument("--skip", default="", help="comma list of: batch,generate,serve,coord")
    ap.add_argument("batch_flags", nargs="*", help="extra flags for tessera batch (after --)")
    a = ap.parse_args()
    skip = set(x for x in a.skip.split(",") if x)
    t = a.tessera
    if not os.path.exists(a.model):
        print("making %s ..." % a.model, flush=True)
        subprocess.run([t, "mkmodel", "-o", a.model, "--vocab-from", a.vocab, "--n-embd", "768",
                        "--n-layer", "12", "--n-head", "12", "--n-head-kv", "12", "--n-ff",
                        "2048", "--type", "q8_0"], check=True)
    tmp = tempfile.mkdtemp(prefix="tsr-bench-batch-")
    inp = os.path.join(tmp, "in.jsonl")
    make_input(inp, a.prompts)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print("model %s, %d prompts x 64 tokens, %d threads, %d round(s); uptime: %s" % (
        a.model, a.prompts, a.threads, a.rounds, uptime()), flush=True)
    rounds = []
    for rd in range(a.rounds):
        res = {}
        if "batch" not in skip:
            res["batch"], res["batch_cpu"] = run_batch(a, t, inp, tmp)
        if "generate" not in skip:
            res["generate"], res["generate_cpu"] = run_generate(a, t, inp)
        if "serve" not in skip:
            res["serve"], res["serve_cpu"] = run_serve(a, t, inp)
        if "coord" not in skip:
            res["coord"], res["coord_cpu"] = run_coord(a, t, inp, tmp)
        line = "round %d:" % (rd + 1)
        for other, key in (("generate", "r_gen"), ("serve", "r_serve"), ("coord", "r_coord")):
            if "batch" in res and other in res:
                res[key] = res["batch"] / res[other]
                res[key + "_cpu"] = res["batch_cpu"] / res[other + "_cpu"]
                line += " batch/%s %.2fx (per CPU-second %.2fx)" % (other, res[key],
                                                                     res[key + "_cpu"])
        print(line, flush=True)
        rounds.append(res)
    med = lambda k: statistics.median(r[k] for r in rounds)
    print()
    print("uptime: %s" % uptime())
    print("%d prompts (generate: %d) x 64 generated tokens, %d threads, medians of %d round(s)"
          % (a.prompts, a.gen_prompts, a.threads, a.rounds))
    print("%-34s %14s %14s %12s %12s" % ("way", "gen tok/s", "tok/CPU-s", "batch/way",
                                         "per CPU-s"))
    for k, name in (("batch", "tessera batch (local)"), ("generate", "tessera generate per prompt"),
                    ("serve", "tessera serve + loadgen c%d" % a.concurrency),
                    ("coord", "batch --coordinator (1 replica)")):
        if k not in rounds[0]:
            continue
        ratio = ratio_cpu = "-"
        if "batch" in rounds[0] and k != "batch":
            ratio = "%.2fx" % statistics.median(r["batch"] / r[k] for r in rounds)
            ratio_cpu = "%.2fx" % statistics.median(r["batch_cpu"] / r[k + "_cpu"]
                                                    for r in rounds)
        print("%-34s %14.1f %14.1f %12s %12s" % (name, med(k), med(k + "_cpu"), ratio,
                                                 ratio_cpu))
    subprocess.run(["rm", "-rf", tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
