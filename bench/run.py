#!/usr/bin/env python3
"""make bench: the cost of tracing, measured side by side with plain Varnish.

One varnishd per configuration (all from the same Varnish and the same VCL, with or without the
module), a second varnishd as a fast synthetic origin, and wrk on loopback. Configurations are
run in short, interleaved, shuffled rounds, with a baseline run before and after each of them:
each run's requests per second are divided by the mean of those two baseline runs, so that the
machine's drift cancels out, and we report the median and the spread of those ratios, the noise
floor (the baseline against its own neighbours), latency, varnishd CPU time per request (from
/proc), instructions per request (perf stat), peak RSS, and spans exported vs dropped.

Spans go over OTLP/HTTP (protobuf) to tools/otlp-receiver in discard mode (it answers 200 and
counts), pinned with wrk so that it does not take varnishd's CPU; one configuration writes the
OTLP/JSON file exporter's lines to /dev/null instead, for comparison.

Environment: BENCH_ROUNDS (default 8), BENCH_SECONDS per run (2), BENCH_CONNECTIONS (10),
BENCH_WORKLOADS (hit,pass), BENCH_CONFIGS (all), BENCH_OUT (bench/results), BENCH_SEED (the
order of the configurations in each round; by default a new one per run, printed in the results:
with one fixed seed every run had the same order, so a bias from a configuration's place in the
round, if any, would repeat in every run instead of averaging out),
BENCH_PROFILE=<folder>: also `perf record` the varnishd child during the instruction pass, one
`<workload>-<configuration>.data` per run in that folder (read with `perf report -i`);
BENCH_PROFILE_EVENT picks what is sampled (default cycles:u; instructions:u attributes the
instruction counts). BENCH_COMPARE_SO=<folder holding another build's libvmod_opentracing.so>
adds, for every traced configuration, a twin `<configuration>@compare` that loads that build:
two commits compared in the same interleaved rounds, in the same phase of the machine. Both load
this checkout's vcl/opentracing.vcl: the other build must provide the functions it calls.
"""
import collections
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO_DIR = os.path.join(REPO, "target", "release")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "2"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "10"))
WORKLOADS = os.environ.get("BENCH_WORKLOADS", "hit,pass").split(",")
OUT = os.environ.get("BENCH_OUT", os.path.join(REPO, "bench", "results"))
PROFILE = os.environ.get("BENCH_PROFILE")
SEED = int(os.environ.get("BENCH_SEED") or random.SystemRandom().randrange(1 << 31))

# The module imported but its include left out (the `imported*` configurations): no call of ours
# runs per request.
IMPORT_ONLY = "import only"

# name -> (uses the module, environment of varnishd)
CONFIGS = {
    "baseline": (False, {}),
    "disabled": (True, {"OTEL_SDK_DISABLED": "true"}),
    "sampled_0": (True, {"OTEL_TRACES_SAMPLER": "always_off"}),
    "sampled_1pct": (True, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
    "sampled_10pct": (True, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    "sampled_100pct": (True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
    "sampled_100pct_file": (True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_TRACES_EXPORTER": "file",
                                   "OPENTRACING_SPANS_FILE": "/dev/null"}),
}
# Run only when named in BENCH_CONFIGS: which background thread a cost comes from (100% sampling
# without the exporter, without the log tailer, without either).
DIAGNOSTIC_CONFIGS = {
    "sampled_100pct_no_export": (True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_TRACES_EXPORTER": "none"}),
    "sampled_100pct_no_vsl": (True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OPENTRACING_VSL": "off"}),
    "sampled_100pct_neither": (True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_TRACES_EXPORTER": "none",
                                      "OPENTRACING_VSL": "off"}),
}
# What the cost of the module at low sampling rates is made of (docs/performance.md, "What the
# 1% costs"): loaded and switched off, with no call of the include running (`imported_disabled`);
# loaded, tracing, its threads running, still no call (`imported`: the log tailer steps every
# transaction, none of which is traced).
DIAGNOSTIC_CONFIGS["imported_disabled"] = (IMPORT_ONLY, {"OTEL_SDK_DISABLED": "true"})
DIAGNOSTIC_CONFIGS["imported"] = (IMPORT_ONLY, {"OTEL_TRACES_SAMPLER": "always_off"})
# The same three at 10%, 1% and 0% sampling (named sampled_10pct_no_export and so on).
TEN_PERCENT = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
RATES = {"10pct": TEN_PERCENT, "1pct": dict(TEN_PERCENT, OTEL_TRACES_SAMPLER_ARG="0.01"),
         "0": {"OTEL_TRACES_SAMPLER": "always_off"}}
for _name in ("no_export", "no_vsl", "neither"):
    _module, _env = DIAGNOSTIC_CONFIGS[f"sampled_100pct_{_name}"]
    for _rate, _sampler in RATES.items():
        DIAGNOSTIC_CONFIGS[f"sampled_{_rate}_{_name}"] = (_module, dict(_env, **_sampler))
# The spans completed from each task's own log buffer instead of by the tailer
# (`OPENTRACING_VSL=task`), at every rate: sampled_100pct_task, sampled_1pct_task and so on.
for _rate, _sampler in dict(RATES, **{"100pct": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}}).items():
    DIAGNOSTIC_CONFIGS[f"sampled_{_rate}_task"] = (True, dict(_sampler, OPENTRACING_VSL="task"))
# Fewer, larger exports at 10% (see docs/performance.md, "The export at low sampling rates").
for _size in ("512", "2048", "4096"):
    DIAGNOSTIC_CONFIGS[f"sampled_10pct_batch_{_size}"] = (True, dict(TEN_PERCENT, OTEL_BSP_MAX_EXPORT_BATCH_SIZE=_size))
# The export's batch size at 100%: fewer, larger sends against more, smaller ones (which fit in the
# CPU's caches).
for _size in ("64", "512", "1024", "2048", "4096"):
    DIAGNOSTIC_CONFIGS[f"sampled_100pct_batch_{_size}"] = (
        True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": _size})
RECEIVER = os.path.join(REPO, "target", "release", "otlp-receiver")
if os.environ.get("BENCH_CONFIGS"):
    wanted = os.environ["BENCH_CONFIGS"].split(",")
    unknown = [w for w in wanted if w not in CONFIGS and w not in DIAGNOSTIC_CONFIGS]
    if unknown:
        raise SystemExit(f"bench: BENCH_CONFIGS: unknown {', '.join(unknown)}")
    CONFIGS = {k: v for k, v in {**CONFIGS, **DIAGNOSTIC_CONFIGS}.items() if k in wanted or k == "baseline"}
# name -> folder of the module it loads, for the twins of BENCH_COMPARE_SO (the others: SO_DIR).
MODULE_DIRS = {}
COMPARE_SO = os.environ.get("BENCH_COMPARE_SO")
if COMPARE_SO:
    if not os.path.isfile(os.path.join(COMPARE_SO, "libvmod_opentracing.so")):
        raise SystemExit(f"bench: BENCH_COMPARE_SO: no libvmod_opentracing.so in {COMPARE_SO}")
    for name, config in list(CONFIGS.items()):
        if config[0]:
            CONFIGS[name + "@compare"] = config
            MODULE_DIRS[name + "@compare"] = os.path.abspath(COMPARE_SO)

# The budget of issue 6 (cache hits): ratio to baseline at least this, p99 added at most 50 us.
BUDGET = {"sampled_100pct": 0.95, "sampled_1pct": 0.99}

ORIGIN_VCL = """vcl 4.1;
backend none none;
sub vcl_recv { return (synth(200)); }
sub vcl_synth {
    set resp.http.Cache-Control = "max-age=3600";
    synthetic({"%s"});
    return (deliver);
}
""" % ("x" * 1024)

PROXY_VCL = """vcl 4.1;
%(module)s
backend origin { .host = "127.0.0.1"; .port = "%(origin_port)d"; }
sub vcl_recv {
    if (req.url ~ "^/pass") { return (pass); }
}
"""
MODULE_LINES = 'import opentracing;\ninclude "opentracing.vcl";'


def module_lines(module):
    """The lines a configuration's VCL gets for `module` (a configuration's first field)."""
    if module == IMPORT_ONLY:
        return "import opentracing;"
    return MODULE_LINES if module else ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


class Varnishd:
    def __init__(self, name, workdir, vcl, env=None, cpu=None, module_dir=None):
        self.name, self.port = name, free_port()
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        vcl_file = os.path.join(self.dir, "main.vcl")
        with open(vcl_file, "w") as f:
            f.write(vcl)
        vmod_path = (module_dir or SO_DIR) + ":" + sh("pkg-config", "--variable=vmoddir", "varnishapi").strip()
        cmd = ["varnishd", "-F", "-j", "none", "-n", self.dir + "/n", "-a", f"127.0.0.1:{self.port}",
               "-f", vcl_file, "-s", "malloc,256m", "-p", f"vmod_path={vmod_path}",
               "-p", f"vcl_path={REPO}/vcl", "-p", "thread_pool_min=20", "-p", "thread_pools=1"]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu)] + cmd
        full_env = dict(os.environ, **(env or {}))
        self.log = open(os.path.join(self.dir, "varnishd.out"), "w")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # not left running when it never answered
            raise

    def wait_ready(self):
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"bench: varnishd {self.name} exited; see {self.log.name}")
                time.sleep(0.05)
        raise SystemExit(f"bench: varnishd {self.name} does not answer")

    def child_pid(self):
        out = sh("pgrep", "-P", str(self.proc.pid), "cache-main").split()
        return int(out[0])

    def cpu_seconds(self):
        with open(f"/proc/{self.child_pid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime, all threads

    def threads_cpu_seconds(self):
        """CPU time of the child's threads, summed by thread name (`cache-worker`, `otel-vsl`,
        ...), from schedstat (nanoseconds: /proc's stat counts in ticks of 10 ms, about what a
        background thread runs in a whole 2 s run)."""
        totals = collections.Counter()
        pid = self.child_pid()
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        totals[name] += int(f.read().split()[0]) / 1e9
                except FileNotFoundError:  # a kernel without CONFIG_SCHED_INFO: ticks then
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    totals[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                pass  # the thread ended meanwhile
        return totals

    def peak_rss_kib(self):
        with open(f"/proc/{self.child_pid()}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))

    def counters(self):
        try:
            out = json.loads(sh("varnishstat", "-n", self.dir + "/n", "-1", "-j", "-f", "OPENTRACING.*"))
        except subprocess.CalledProcessError:
            return {}
        counters = out.get("counters", out)
        return {k.split(".", 1)[1]: v["value"] for k, v in counters.items() if k.startswith("OPENTRACING.")}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def perf_available():
    if not shutil.which("perf"):
        return False
    r = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u,instructions:k", "true"],
                       capture_output=True, text=True)
    return r.returncode == 0 and "not supported" not in r.stderr


class InstructionCounter:
    """Counts the instructions the varnishd child executes (user + kernel) while it runs: an
    exact, noise-free second signal next to wall-clock throughput on a shared machine."""

    def __init__(self, pid):
        self.proc = subprocess.Popen(["perf", "stat", "-x,", "-e", "instructions:u,instructions:k", "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.05)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=10)
        counts = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit():
                counts[fields[2]] = int(fields[0])
        return counts.get("instructions:u"), counts.get("instructions:k")


class Profiler:
    """`perf record` of the varnishd child (user space, call graphs) for BENCH_PROFILE."""

    def __init__(self, pid, name):
        os.makedirs(PROFILE, exist_ok=True)
        out = os.path.join(PROFILE, name + ".data")
        self.proc = subprocess.Popen(["perf", "record", "-q", "-e", os.environ.get("BENCH_PROFILE_EVENT", "cycles:u"), "-F", "2999", "--call-graph", "dwarf,16384",
                                      "-p", str(pid), "-o", out],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.1)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Receiver:
    """tools/otlp-receiver in discard mode: decodes nothing, answers 200, counts spans."""

    def __init__(self, workdir, cpu=None):
        ready = os.path.join(workdir, "receiver-ready.json")
        self.stats = os.path.join(workdir, "receiver-stats.json")
        cmd = [RECEIVER, "--http", "127.0.0.1:0", "--mode", "discard", "--ready", ready, "--stats", self.stats]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu)] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with open(ready) as f:
                    self.port = json.load(f)["http"]
                    return
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        raise SystemExit(f"bench: {RECEIVER} did not start (make release builds it)")

    def spans(self):
        try:
            with open(self.stats) as f:
                return json.load(f).get("spans")
        except (OSError, ValueError):
            return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cpu_interrupts(cpu, names=("RES", "CAL")):
    """Rescheduling and function-call IPIs received so far by CPU `cpu` (machine-wide, from
    /proc/interrupts): wake-ups and socket buffers freed across CPUs land there. None if the
    file or the CPU's column is missing."""
    if cpu is None:
        return None
    try:
        with open("/proc/interrupts") as f:
            total = 0
            for line in f:
                fields = line.split()
                if fields and fields[0].rstrip(":") in names:
                    total += int(fields[1 + cpu])
            return total
    except (OSError, ValueError, IndexError):
        return None


def median_or_none(values):
    """The median of the values that are not None (None: not measured on this machine)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def wrk(port, path, seconds, cpu):
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu)] + cmd
    out = sh(*cmd)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[pct] = float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
    return {"rps": rps, "requests": total, "errors": int(errors.group(1)) if errors else 0,
            "p50_us": lat.get("50"), "p99_us": lat.get("99")}


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def versions():
    vd = subprocess.run(["varnishd", "-V"], capture_output=True, text=True)
    v = {"varnishd": (vd.stdout + vd.stderr).strip().splitlines()[0],
         "wrk": "", "rustc": sh("rustc", "--version").strip(), "kernel": platform.release(),
         "cpus": os.cpu_count(), "cpu_model": ""}
    try:
        v["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (IndexError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            v["cpu_model"] = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        v["commit"] = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip()
    except (subprocess.CalledProcessError, OSError):
        v["commit"] = "unknown"
    return v


def main():
    try:
        versions_ = versions()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"bench: {e}")
    workdir = tempfile.mkdtemp(prefix="vmod-opentracing-bench-")
    # varnishd under test on CPU 0, wrk on CPU 1; the origin floats.
    cpus = os.cpu_count() or 1
    vcpu, wcpu = (0, 1) if cpus >= 2 else (None, None)
    servers = []
    try:
        receiver = Receiver(workdir, cpu=wcpu)
        servers.append(receiver)
        otlp = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        origin = Varnishd("origin", workdir, ORIGIN_VCL)
        servers.append(origin)
        proxies = {}
        for name, (module, env) in CONFIGS.items():
            vcl = PROXY_VCL % {"module": module_lines(module), "origin_port": origin.port}
            proxies[name] = Varnishd(name, workdir, vcl, dict(otlp, **env) if module else env, cpu=vcpu,
                                     module_dir=MODULE_DIRS.get(name))
            servers.append(proxies[name])
        paths = {"hit": "/hit", "pass": "/pass"}
        for p in proxies.values():  # warm: the object is cached, connections open
            wrk(p.port, paths["hit"], 1, wcpu)
            wrk(p.port, paths["pass"], 1, wcpu)
        runs = {w: {c: [] for c in CONFIGS} for w in WORKLOADS}
        noise = {}
        use_perf = perf_available()
        rng = random.Random(SEED)
        started = time.time()
        def run(c, w):
            p = proxies[c]
            cpu0, threads0, ipis0 = p.cpu_seconds(), p.threads_cpu_seconds(), cpu_interrupts(vcpu)
            r = wrk(p.port, paths[w], SECONDS, wcpu)
            cpu1, threads1, ipis1 = p.cpu_seconds(), p.threads_cpu_seconds(), cpu_interrupts(vcpu)
            n = max(r["requests"], 1)
            r["ipis_per_1000_req"] = (ipis1 - ipis0) * 1000 / n if ipis0 is not None and ipis1 is not None else None
            r["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / n
            for key, thread in (("workers", "cache-worker"), ("tailer", "otel-vsl"), ("exporter", "otel-export")):
                r[f"{key}_cpu_us_per_req"] = (threads1[thread] - threads0[thread]) * 1e6 / n
            r["round"] = rnd
            return r

        for rnd in range(ROUNDS):
            for w in WORKLOADS:
                # The baseline runs before and after every configuration: each run is compared
                # with the mean of the two baseline runs around it, so that the machine's drift
                # (its speed changes by a factor of two over minutes) cancels out run by run.
                order = [c for c in CONFIGS if c != "baseline"]
                rng.shuffle(order)
                before = run("baseline", w)
                before["ratio"] = 1.0
                runs[w]["baseline"].append(before)
                for c in order:
                    r = run(c, w)
                    after = run("baseline", w)
                    after["ratio"] = 1.0
                    r["ratio"] = r["rps"] / ((before["rps"] + after["rps"]) / 2)
                    r["p99_added_us"] = (r["p99_us"] - (before["p99_us"] + after["p99_us"]) / 2
                                         if r["p99_us"] and before["p99_us"] and after["p99_us"] else None)
                    runs[w][c].append(r)
                    runs[w]["baseline"].append(after)
                    before = after
                # The noise floor: each inner baseline run against the mean of its neighbours.
                bs = runs[w]["baseline"][-(len(order) + 1):]
                for i in range(1, len(bs) - 1):
                    noise.setdefault(w, []).append(bs[i]["rps"] / ((bs[i - 1]["rps"] + bs[i + 1]["rps"]) / 2))
            print(f"bench: round {rnd + 1}/{ROUNDS} done ({time.time() - started:.0f} s)", file=sys.stderr)
        # A separate, untimed pass counts instructions (perf slows what it watches, so the timed
        # rounds run without it): user space, where our code runs, and kernel.
        instructions = {w: {} for w in WORKLOADS}
        if use_perf:
            for w in WORKLOADS:
                for c in CONFIGS:
                    counter = InstructionCounter(proxies[c].child_pid())
                    profiler = Profiler(proxies[c].child_pid(), f"{w}-{c}") if PROFILE else None
                    r = wrk(proxies[c].port, paths[w], SECONDS, wcpu)
                    user, kernel = counter.stop()
                    if profiler:
                        profiler.stop()
                    n = max(r["requests"], 1)
                    instructions[w][c] = {"user": user / n, "kernel": kernel / n} if user else None
        time.sleep(1)  # the last batches reach the receiver
        counters = {c: proxies[c].counters() for c in CONFIGS}
        received = receiver.spans()
        rss = {c: proxies[c].peak_rss_kib() for c in CONFIGS}
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {}
    for w in WORKLOADS:
        summary[w] = {}
        for c in CONFIGS:
            rs = runs[w][c]
            p99_added = [r["p99_added_us"] for r in rs if r.get("p99_added_us") is not None]
            ins = instructions[w].get(c)
            summary[w][c] = {
                "rps": spread([r["rps"] for r in rs]),
                "ratio": spread([r["ratio"] for r in rs]),
                "p50_us": statistics.median([r["p50_us"] for r in rs if r["p50_us"]]),
                "p99_us": statistics.median([r["p99_us"] for r in rs if r["p99_us"]]),
                "p99_added_us": statistics.median(p99_added) if p99_added and c != "baseline" else None,
                "cpu_us_per_req": spread([r["cpu_us_per_req"] for r in rs]),
                # The share of its CPU varnishd kept busy (requests/s x CPU per request): below
                # about 0.97 the run was not bound by varnishd's CPU.
                "cpu_busy": statistics.median([r["rps"] * r["cpu_us_per_req"] / 1e6 for r in rs]),
                "tailer_cpu_us_per_req": spread([r["tailer_cpu_us_per_req"] for r in rs]),
                "workers_cpu_us_per_req": spread([r["workers_cpu_us_per_req"] for r in rs]),
                "exporter_cpu_us_per_req": spread([r["exporter_cpu_us_per_req"] for r in rs]),
                "ipis_per_1000_req": median_or_none([r["ipis_per_1000_req"] for r in rs]),
                "instructions_per_req": ins,
                "errors": sum(r["errors"] for r in rs),
                "peak_rss_kib": rss[c],
                "spans_exported": counters[c].get("spans_exported"),
                "spans_dropped": sum(counters[c].get(k) or 0
                                     for k in ("spans_dropped", "spans_dropped_export", "spans_dropped_workspace"))
                if counters[c] else None,
            }
        summary[w]["baseline"]["noise"] = spread(noise[w]) if noise.get(w) else None
        # A second statistic beside the median of per-run ratios: the configuration's median
        # requests/s over the baseline's (the two can differ by a few points at this noise).
        for c in CONFIGS:
            summary[w][c]["ratio_of_medians"] = summary[w][c]["rps"]["median"] / summary[w]["baseline"]["rps"]["median"]
    verdicts = budget_verdicts(summary)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"when": stamp, "machine": versions_, "method": {
        "rounds": ROUNDS, "seconds_per_run": SECONDS, "connections": CONNECTIONS, "seed": SEED,
        "wrk_threads": 1, "pinning": "varnishd under test on CPU 0, wrk on CPU 1" if vcpu is not None else "none",
        "exporter": "OTLP/HTTP protobuf to tools/otlp-receiver (discard mode, pinned with wrk); "
                    "sampled_100pct_file: OTLP/JSON lines to /dev/null"
                    + (f"; @compare: the module from {COMPARE_SO}" if COMPARE_SO else "")},
        "received_by_receiver": received,
        "summary": summary, "budget": verdicts, "runs": runs}
    os.makedirs(OUT, exist_ok=True)
    md = markdown(result)
    for name in (f"{stamp}.json", "latest.json"):
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(result, f, indent=1)
    for name in (f"{stamp}.md", "latest.md"):
        with open(os.path.join(OUT, name), "w") as f:
            f.write(md)
    print(md)
    print(f"bench: results in {OUT}/{stamp}.md and .json", file=sys.stderr)


def budget_verdicts(summary):
    out = {}
    hit = summary.get("hit", {})
    for c, floor_ in BUDGET.items():
        if c in hit:
            ratio = hit[c]["ratio"]["median"]
            ok = ratio >= floor_
            if c == "sampled_100pct" and hit[c]["p99_added_us"] is not None:
                ok = ok and hit[c]["p99_added_us"] <= 50
            out[c] = {"ratio_median": ratio, "floor": floor_, "p99_added_us": hit[c]["p99_added_us"],
                      "within_budget": ok}
    if "disabled" in hit:
        # "No difference beyond the run-to-run spread": the median ratio of `disabled` lies within
        # the spread of the baseline measured against itself (each run against its neighbours).
        r = hit["disabled"]["ratio"]
        noise = hit["baseline"].get("noise")
        out["disabled"] = {"ratio_median": r["median"],
                           "noise": [noise["min"], noise["max"]] if noise else None,
                           # No noise floor without two configurations besides the baseline.
                           "within_budget": noise["min"] <= r["median"] <= noise["max"] if noise else None}
    return out


def markdown(res):
    m, meth = res["machine"], res["method"]
    lines = [f"# Benchmark {res['when']}", "",
             f"Commit {m.get('commit')}, {m['varnishd']}, {m['wrk']}, {m['rustc']}, "
             f"{m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}.", "",
             f"Method: {meth['rounds']} interleaved rounds x {meth['seconds_per_run']} s per configuration and "
             f"workload (order shuffled, BENCH_SEED={meth.get('seed', 42)}), wrk -t1 -c{meth['connections']}, "
             f"{meth['pinning']}; exporter: {meth['exporter']}. "
             "Ratio = requests/s divided by the mean of the two baseline runs just before and after: median "
             "[min-max].", ""]
    for w, rows in res["summary"].items():
        lines += [f"## Workload: {w}", "",
                  "| configuration | req/s (median) | ratio to baseline | ratio of medians | p50 us | p99 us | p99 added us "
                  "| varnishd CPU us/req | CPU busy | of which workers | of which VSL tailer | of which exporter | IPIs to its CPU /1000 req | user instructions/req | added | kernel instr./req "
                  "| peak RSS MiB | spans exported | dropped |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base_ins = rows["baseline"]["instructions_per_req"]
        for c, s in rows.items():
            r = s["ratio"]
            cpu = s["cpu_us_per_req"]
            added = "" if s["p99_added_us"] is None or c == "baseline" else f"{s['p99_added_us']:+.0f}"
            ins = s["instructions_per_req"]
            ipis_txt = "-" if s["ipis_per_1000_req"] is None else f"{s['ipis_per_1000_req']:.1f}"
            ins_txt = f"{ins['user']:.0f}" if ins else "-"
            kernel_txt = f"{ins['kernel']:.0f}" if ins else "-"
            ins_added = f"{ins['user'] - base_ins['user']:+.0f}" if ins and base_ins and c != "baseline" else ""
            rom = s.get("ratio_of_medians")
            rom_txt = "-" if rom is None else f"{rom:.3f}"
            busy = s.get("cpu_busy")
            busy_txt = "-" if busy is None else f"{busy:.2f}"
            lines.append(
                f"| {c} | {s['rps']['median']:.0f} | {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] | {rom_txt} "
                f"| {s['p50_us']:.0f} | {s['p99_us']:.0f} | {added} | {cpu['median']:.1f} | {busy_txt} | {s['workers_cpu_us_per_req']['median']:.1f} | {s['tailer_cpu_us_per_req']['median']:.2f} | {s['exporter_cpu_us_per_req']['median']:.2f} | {ipis_txt} | {ins_txt} | {ins_added} | {kernel_txt} "
                f"| {s['peak_rss_kib'] / 1024:.0f} | {s['spans_exported'] if s['spans_exported'] is not None else '-'} "
                f"| {s['spans_dropped'] if s['spans_dropped'] is not None else '-'} |")
        noise = rows["baseline"].get("noise")
        if noise:
            lines += ["", f"Noise floor (each inner baseline run against the mean of its two neighbours): "
                          f"{noise['median']:.3f} [{noise['min']:.3f}-{noise['max']:.3f}]."]
        lines.append("")
    lines += [f"Spans received by the OTLP receiver (all configurations, all workloads): {res.get('received_by_receiver')}.",
              ""]
    lines += ["## Budget (cache hits)", ""]
    for c, v in res["budget"].items():
        verdict = {True: "within budget", False: "OVER BUDGET",
                   None: "no verdict: no noise floor measured (run two configurations or more)"}[v["within_budget"]]
        lines.append(f"- {c}: ratio {v['ratio_median']:.3f} ({verdict})")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
