#!/usr/bin/env python3
"""Checks examples/collector/*.yaml (run by `make test`): both parse as YAML, the collector
receives OTLP over gRPC and HTTP and has a traces pipeline whose every component is defined,
the compose file runs that configuration with the OTLP ports published and Jaeger's UI."""
import os
import sys

import yaml

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "collector")


def load(name):
    with open(os.path.join(HERE, name)) as f:
        return yaml.safe_load(f)


def main():
    errors = []

    def check(cond, what):
        if not cond:
            errors.append(what)

    col = load("otel-collector.yaml")
    protocols = col["receivers"]["otlp"]["protocols"]
    check(protocols["grpc"]["endpoint"].endswith(":4317"), "receivers.otlp.protocols.grpc on 4317")
    check(protocols["http"]["endpoint"].endswith(":4318"), "receivers.otlp.protocols.http on 4318")
    traces = col["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in traces.get(kind, []):
            check(name in (col.get(kind) or {}), f"service.pipelines.traces.{kind}: {name} is not defined")
    check("otlp" in traces["receivers"], "the traces pipeline receives from otlp")
    check(any(e.startswith("otlp/jaeger") for e in traces["exporters"]), "the traces pipeline exports to Jaeger")

    compose = load("compose.yaml")["services"]
    collector = compose["collector"]
    check(any("otel-collector.yaml" in v for v in collector["volumes"]), "collector mounts otel-collector.yaml")
    ports = " ".join(collector["ports"])
    check("4317:4317" in ports and "4318:4318" in ports, "collector publishes 4317 and 4318")
    check(any(p.startswith("16686:") for p in compose["jaeger"]["ports"]), "jaeger publishes its UI")
    check(col["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in compose, "the Jaeger exporter targets a service")

    for e in errors:
        print(f"FAIL collector example: {e}")
    print(f"collector example: {'ok' if not errors else f'{len(errors)} failed'}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
