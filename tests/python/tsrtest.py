"""tsrtest.py — fixtures shared by the Python end-to-end tests (test_serve.py,
test_coord.py, and through them test_robust.py, test_coord_front.py, ...).

  make_stubs  Python gRPC stubs generated from proto/ at test time (grpc_tools, else
              protoc with grpc_python_plugin), imported and returned;
  Proc        a tessera process (or an mpirun job of them) that prints 'listening on
              HOST:PORT' when it serves: started in its own session with its output in a
              log file, the port read from that log (and the HTTP port, 'http listening
              on', with http=True or wait_port), the process tree from /proc, a kill that
              leaves no rank behind, and a SIGTERM stop that returns the exit status.

  make_certs  a test CA, server and client certificates (openssl).
  promtool_check  `promtool check metrics` over a /metrics text.

  Runner      named tests, each timed: 'ok' / 'FAIL' lines with the traceback, then
              'N passed, M failed' (test_http.py, test_coord_front.py);
  run_tests   the runner of test_serve.py, test_robust.py, test_prefix_cache.py,
              test_coord.py: stubs in a temporary folder, then a Runner over the functions.

Each test module keeps its own helpers on top (channels, stubs, references); what is here
is only what they all did the same way. Run with Debian's /usr/bin/python3 (grpcio).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def make_stubs(proto_dir, out_dir, protos=("tessera.proto", "health.proto")):
    """Generate the stubs of `protos` into out_dir and import them: returns the modules
    (NAME_pb2, NAME_pb2_grpc for each proto, in order)."""
    protos = list(protos)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
           "--python_out", out_dir, "--grpc_python_out", out_dir] + protos
    r = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
        cmd = ["protoc", "-I", proto_dir, "--python_out", out_dir, "--grpc_python_out",
               out_dir, "--plugin=protoc-gen-grpc_python=" + plugin] + protos
        r2 = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, timeout=60)
        if r2.returncode != 0:
            raise RuntimeError("cannot generate stubs: %s / %s" % (r.stderr, r2.stderr))
    sys.path.insert(0, out_dir)
    mods = []
    for p in protos:
        base = os.path.splitext(os.path.basename(p))[0]
        mods.append(__import__(base + "_pb2"))
        mods.append(__import__(base + "_pb2_grpc"))
    return tuple(mods)


class Proc:
    """A tessera process (or `mpirun -np mpi_np ...` of it) on an ephemeral port."""

    LISTEN_RE = rb"listening on [^\s]+:(\d+)"
    HTTP_RE = rb"http listening on [^\s]+:(\d+)"

    def __init__(self, cmd, mpirun=None, mpi_np=0, wait_listen=True, timeout=60,
                 listen_re=LISTEN_RE, log_prefix="tsr-", fail_what="did not start",
                 log_dir=None, http=False):
        """log_dir: the folder of the log (a fresh name in it; default: the temp folder).
        http: also wait for the HTTP front door's line and keep its port in http_port."""
        self.log_path = tempfile.mktemp(prefix=log_prefix, suffix=".log", dir=log_dir)
        self.log = open(self.log_path, "w+b")
        env = dict(os.environ)
        if mpi_np:
            env.update(MPI_ENV)
            cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-np", str(mpi_np)] + cmd
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        self.port = None
        if not wait_listen:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(listen_re, self.output_bytes())
            if m:
                self.port = int(m.group(1))
                break
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        if self.port is None:
            out = self.output()
            self.kill()
            raise AssertionError("%s: %s\n%s" % (fail_what, " ".join(cmd), out[-3000:]))
        self.target = "127.0.0.1:%d" % self.port
        self.http_port = None
        if http:
            self.http_port = self.wait_port(self.HTTP_RE, max(1.0, deadline - time.time()))

    def wait_port(self, regex=HTTP_RE, timeout=10):
        """The port in the first line of the log that matches regex (default: the HTTP front
        door's 'http listening on HOST:PORT'), waiting up to timeout seconds for it; an
        AssertionError with the log's end when it does not come or the process ends."""
        deadline = time.time() + timeout
        while True:
            m = re.search(regex, self.output_bytes())
            if m:
                return int(m.group(1))
            if self.p.poll() is not None or time.time() > deadline:
                raise AssertionError("no line matching %r from %s\n%s" % (
                    regex, " ".join(self.cmd[:6]), self.output()[-3000:]))
            time.sleep(0.05)

    def output_bytes(self):
        if not self.log.closed:  # after kill() the log is closed, and still readable
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()

    def output(self):
        return self.output_bytes().decode("utf-8", "replace")

    def pids(self):
        """The process and its descendants (mpirun's ranks)."""
        out, todo = [], [self.p.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return out

    def wait(self, timeout):
        """The exit status, or None if still running after timeout seconds."""
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL to the session and to every descendant, then wait up to 10 s."""
        if self.p.poll() is None:
            pids = self.pids()
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.wait(10)
        if not self.log.closed:
            self.log.close()

    def stop(self, timeout=30):
        """SIGTERM (a clean shutdown), then the exit status; None when it still ran after
        timeout seconds (then killed as kill() does). The log stays readable."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        rc = self.wait(timeout)
        self.kill()
        return rc


class Runner:
    """Runs named tests (only those whose name contains `only`, when given): each prints
    'ok    NAME  T s', or 'FAIL  NAME  T s' and the traceback; summary() prints
    'N passed, M failed'."""

    def __init__(self, only=""):
        self.only = only or ""
        self.passed = self.failed = 0

    def selected(self, name):
        return not self.only or self.only in name

    def run(self, name, fn, *args):
        """fn(*args) as the test `name` (skipped when not selected); True if it passed."""
        if not self.selected(name):
            return False
        t0 = time.time()
        try:
            fn(*args)
        except Exception:
            self.fail(name, traceback.format_exc(), time.time() - t0)
            return False
        self.passed += 1
        print("ok    %-40s %.1f s" % (name, time.time() - t0), flush=True)
        return True

    def fail(self, name, why, t_s=0.0):
        """Count `name` as failed (a step outside run() that went wrong), with why."""
        self.failed += 1
        print("FAIL  %-40s %.1f s\n%s" % (name, t_s, why), flush=True)

    def summary(self, need_one=False):
        """Prints the counts; returns the exit status: 1 on any failure (or, with need_one,
        when no test ran: a selection that matches nothing is an error there)."""
        print("%d passed, %d failed" % (self.passed, self.failed))
        return 1 if self.failed or (need_one and not self.passed) else 0


def run_tests(tests, only="", setup=None):
    """Run each test function of `tests` by its name with a Runner. setup(stub_dir), when
    given, runs first with a temporary folder that is removed at the end (for make_stubs).
    Returns the exit status: 1 on any failure."""
    tmp = tempfile.mkdtemp(prefix="tsr-stubs-")
    r = Runner(only)
    try:
        if setup:
            setup(tmp)
        for t in tests:
            r.run(t.__name__, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r.summary()


def openssl(*args):
    r = subprocess.run(["openssl"] + list(args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, "openssl %s: %s" % (" ".join(args), r.stderr)


def make_certs(d):
    """A test CA, a server certificate for 127.0.0.1 / localhost and a client certificate
    in folder d (openssl, EC P-256; the recipe of test_http.py and test_coord_front.py).
    Returns p: name -> path ("ca.crt", "server.key", "client.crt", ...)."""
    p = lambda n: os.path.join(d, n)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", p("ca.key"), "-out", p("ca.crt"), "-days", "2",
            "-subj", "/CN=tessera test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        openssl("req", *ec, "-keyout", p(name + ".key"), "-out", p(name + ".csr"),
                "-subj", "/CN=tessera test " + name)
        with open(p(name + ".ext"), "w") as f:
            f.write(ext)
        openssl("x509", "-req", "-in", p(name + ".csr"), "-CA", p("ca.crt"), "-CAkey",
                p("ca.key"), "-CAcreateserial", "-out", p(name + ".crt"), "-days", "2",
                "-extfile", p(name + ".ext"))
    return p


def promtool_check(text):
    """`promtool check metrics` accepts text (a /metrics page): the exposition format and
    Prometheus' naming rules."""
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, "promtool check metrics: %s%s\n%s" % (r.stdout, r.stderr, text)
