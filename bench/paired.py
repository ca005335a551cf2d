#!/usr/bin/env python3
"""Paired comparison: two configurations served side by side, at the same time, on one CPU.

    python3 bench/paired.py                          # the budget's pairs (see PAIRS)
    BENCH_PAIRS=sampled_100pct:sampled_100pct BENCH_PAIR_SO=/tmp/old/target/release \\
        python3 bench/paired.py                      # this build (A) against another (B)

Why: `make bench` runs configurations one after another, and this machine's speed changes by
a factor of two within seconds (a shared virtual machine): the ratio of two runs 2 s apart
scatters by ±15-30%, so a change of a few percent cannot be seen. Here both varnishds are
pinned to the same CPU and driven at the same time (one wrk each, on the other CPU), so both
live through the same moments of the machine; what each costs is its CPU time (all threads,
schedstat) divided by the requests it served in the same seconds. The ratio of the two costs
holds within about ±1% while the machine's speed swings by 60% (docs/performance-history.md,
"Paired comparison").

What it measures is CPU per request, not requests per second: with the CPU saturated, the
requests a varnishd can serve are inversely proportional to it, so 1 / ratio is the throughput
ratio the costs imply. Each process handles about half of its usual rate and shares the CPU's
caches with the other: costs that grow with the rate (memory held by spans in flight) come out
lower than alone (see the doc).

Options (environment): BENCH_PAIRS (a:b,... of configuration names from bench/run.py; default
the budget's configurations against the baseline, both ways round), BENCH_PAIR_SO (folder of another build's libvmod_opentracing.so for the pairs'
B side), BENCH_ROUNDS (8), BENCH_SECONDS (3), BENCH_OUT (bench/results), BENCH_WORKLOAD
(hit or pass). BENCH_CONFIGS and BENCH_COMPARE_SO, options of bench/run.py, must not be set
(importing it applies them).

A is started and measured first in each pair; for a small difference, run the pair both ways
(a:b,b:a) and more than once: each pair gets fresh processes.
"""
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the harness's servers, wrk and configurations)

# The budget's configurations against the baseline, each both ways round.
DEFAULT_PAIRS = ",".join(f"baseline:{c},{c}:baseline" for c in ("disabled", "sampled_0", "sampled_1pct", "sampled_100pct"))
PAIRS = [p.split(":") for p in os.environ.get("BENCH_PAIRS", DEFAULT_PAIRS).split(",")]
OTHER_SO = os.environ.get("BENCH_PAIR_SO")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "3"))
OUT = os.environ.get("BENCH_OUT", os.path.join(bench.REPO, "bench", "results"))
WORKLOAD = os.environ.get("BENCH_WORKLOAD", "hit")
ALL = {**bench.CONFIGS, **bench.DIAGNOSTIC_CONFIGS}
VARNISH_CPU, LOAD_CPU = 0, 1
# What a pair's ratio is good to, between runs (docs/performance.md, "Paired comparison").
RESOLUTION = 0.01


def cpu_seconds(proxy):
    return sum(proxy.threads_cpu_seconds().values())


def both(proxies):
    """One wrk per varnishd, started together; their results by side."""
    results = {}

    def drive(side, proxy):
        results[side] = bench.wrk(proxy.port, "/" + WORKLOAD, SECONDS, LOAD_CPU)

    threads = [threading.Thread(target=drive, args=item) for item in proxies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def compare(workdir, index, a, b, otlp, origin):
    """Rounds of A and B side by side: per round, B's CPU per request over A's."""
    proxies = {}
    try:
        for side, name in (("a", a), ("b", b)):
            module, env = ALL[name]
            vcl = bench.PROXY_VCL % {"module": bench.module_lines(module), "origin_port": origin.port}
            proxies[side] = bench.Varnishd(f"{index}{side}-{name}", workdir, vcl,
                                           dict(otlp, **env) if module else env,
                                           cpu=VARNISH_CPU, module_dir=OTHER_SO if side == "b" else None)
        for p in proxies.values():  # warm: the object cached, the connections open
            bench.wrk(p.port, "/" + WORKLOAD, 1, LOAD_CPU)
        rounds = []
        for _ in range(ROUNDS):
            before = {s: cpu_seconds(p) for s, p in proxies.items()}
            served = both(proxies)
            after = {s: cpu_seconds(p) for s, p in proxies.items()}
            if any(served[s]["errors"] for s in proxies):
                raise SystemExit(f"bench: {a}:{b}: error responses: {served}")
            cost = {s: (after[s] - before[s]) * 1e6 / max(served[s]["requests"], 1) for s in proxies}
            rounds.append({"a_rps": served["a"]["rps"], "b_rps": served["b"]["rps"],
                           "a_cpu_us_per_req": cost["a"], "b_cpu_us_per_req": cost["b"],
                           "cost_ratio": cost["b"] / max(cost["a"], 1e-9)})
            print(f"bench: {a}:{b}: {served['a']['rps']:.0f} and {served['b']['rps']:.0f} req/s, "
                  f"{cost['a']:.2f} and {cost['b']:.2f} us/req, ratio {rounds[-1]['cost_ratio']:.3f}",
                  file=sys.stderr)
        counters = proxies["b"].counters() if ALL[b][0] else {}
        return rounds, counters
    finally:
        for p in proxies.values():
            p.stop()


def main():
    if os.environ.get("BENCH_CONFIGS") or os.environ.get("BENCH_COMPARE_SO"):
        raise SystemExit("bench: paired.py takes BENCH_PAIRS and BENCH_PAIR_SO, not BENCH_CONFIGS or BENCH_COMPARE_SO")
    unknown = [n for pair in PAIRS for n in pair if n not in ALL]
    if unknown or any(len(p) != 2 for p in PAIRS):
        raise SystemExit(f"bench: BENCH_PAIRS: want a:b pairs of {', '.join(ALL)}; unknown {unknown}")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        raise SystemExit("bench: paired runs need two CPUs and taskset (both varnishds on one CPU, wrk on the other)")
    if ROUNDS < 1 or SECONDS < 1:
        raise SystemExit("bench: BENCH_ROUNDS and BENCH_SECONDS must be at least 1")
    versions = bench.versions()
    workdir = tempfile.mkdtemp(prefix="vmod-opentracing-paired-")
    servers = []
    results = []
    try:
        receiver = bench.Receiver(workdir, cpu=LOAD_CPU)
        servers.append(receiver)
        # The origin with wrk, off the varnishds' CPU (it answers every pass).
        origin = bench.Varnishd("origin", workdir, bench.ORIGIN_VCL, cpu=LOAD_CPU)
        servers.append(origin)
        otlp = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        for index, (a, b) in enumerate(PAIRS):
            rounds, counters = compare(workdir, index, a, b, otlp, origin)
            ratios = [r["cost_ratio"] for r in rounds]
            results.append({"a": a, "b": b, "b_build": OTHER_SO or "this build", "rounds": rounds,
                            "cost_ratio": bench.spread(ratios),
                            "implied_throughput_ratio": 1 / statistics.median(ratios),
                            "b_spans_dropped": sum(v for k, v in counters.items() if k.startswith("spans_dropped"))
                            if counters else None})
    finally:
        for server in reversed(servers):
            server.stop()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc = {"when": stamp, "machine": versions, "workload": WORKLOAD, "rounds": ROUNDS, "seconds": SECONDS,
           "pairs": results, "budget": budget_verdicts(results)}
    os.makedirs(OUT, exist_ok=True)
    for name in (f"paired-{stamp}", "latest-paired"):
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(OUT, name + ".md"), "w") as f:
            f.write(markdown(doc))
    print(markdown(doc))
    print(f"bench: results in {os.path.join(OUT, f'paired-{stamp}')}.md and .json (and latest-paired.*)",
          file=sys.stderr)


def budget_verdicts(results):
    """The budget of issue #6 read from the side-by-side costs (hits against the baseline): the
    throughput the CPU per hit implies, against the same floors as bench/run.py; tracing off
    within the method's resolution (1%)."""
    out = {}
    if WORKLOAD != "hit" or OTHER_SO:
        return out  # the budget is this build's, on hits
    # A configuration's cost against the baseline from every pair that has both, either way
    # round (the side a process runs on tilts its figure by a few tenths of a percent): the
    # geometric mean of the configuration's CPU per hit over the baseline's.
    costs = {}
    for r in results:
        ratio = r["cost_ratio"]["median"]
        if r["a"] == "baseline" and r["b"] != "baseline":
            costs.setdefault(r["b"], []).append(ratio)
        elif r["b"] == "baseline" and r["a"] != "baseline":
            costs.setdefault(r["a"], []).append(1 / ratio)
    for c, ratios in costs.items():
        implied = 1 / statistics.geometric_mean(ratios)
        if c in bench.BUDGET:
            out[c] = {"implied_throughput": implied, "pairs": len(ratios), "floor": bench.BUDGET[c],
                      "within_budget": implied >= bench.BUDGET[c]}
        elif c == "disabled":
            out[c] = {"implied_throughput": implied, "pairs": len(ratios), "resolution": RESOLUTION,
                      "within_budget": abs(1 - implied) <= RESOLUTION}
    return out

def markdown(doc):
    m = doc["machine"]
    lines = [f"# Paired comparison {doc['when']}", "",
             f"Commit {m.get('commit')}, {m.get('varnishd')}, {m.get('rustc')}, {m.get('cpus')} CPUs "
             f"({m.get('cpu_model')}), Linux {m.get('kernel')}.", "",
             f"Method: `bench/paired.py`. Each pair's two varnishds pinned to CPU 0 and driven at the same "
             f"time by one wrk each (-t1 -c{bench.CONNECTIONS}, CPU 1), {doc['rounds']} rounds x "
             f"{doc['seconds']} s, workload {doc['workload']}. Cost = CPU time of all the varnishd child's "
             f"threads (schedstat) / requests it served in the same seconds; ratio = B's cost / A's.", "",
             "| A | B | B's build | B's CPU per request / A's: median [min-max] | implied throughput B / A | "
             "A us/req | B us/req | req/s A, B (median) | B's spans dropped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["pairs"]:
        c = r["cost_ratio"]
        med = lambda k: statistics.median(x[k] for x in r["rounds"])  # noqa: E731
        lines.append(f"| {r['a']} | {r['b']} | {r['b_build']} | {c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}] | "
                     f"{r['implied_throughput_ratio']:.3f} | {med('a_cpu_us_per_req'):.2f} | "
                     f"{med('b_cpu_us_per_req'):.2f} | {med('a_rps'):.0f}, {med('b_rps'):.0f} | "
                     f"{'-' if r['b_spans_dropped'] is None else r['b_spans_dropped']} |")
    if doc.get("budget"):
        lines += ["", "## Budget (cache hits, side by side)", ""]
        for c, v in doc["budget"].items():
            verdict = "within budget" if v["within_budget"] else "OVER BUDGET"
            limit = f"floor {v['floor']}" if "floor" in v else f"within ±{v['resolution']:.0%} of 1"
            lines.append(f"- {c}: implied throughput {v['implied_throughput']:.3f} from {v['pairs']} pair(s) "
                         f"({limit}): {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
