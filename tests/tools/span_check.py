#!/usr/bin/env python3
"""Asserts how many spans of an OTLP/JSON-lines file match some conditions (for .vtc tests).

usage: span_check.py FILE COUNT [COND ...]
COND is FIELD=VALUE, FIELD!=VALUE or !KEY (the span has no attribute KEY), FIELD one of: kind
(server, client, internal), name, traceId, spanId, parentSpanId ("" for a root), status (unset,
ok, error), event (a span event name that must be present), or any attribute key (compared as
text; for a string[] attribute, such as a captured header, VALUE must be one of its elements).
Prints the matching spans; exits 1 when the count differs, or when a span repeats an attribute key.
"""
import json
import sys

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS = {0: "unset", 1: "ok", 2: "error"}


def spans(path):
    with open(path) as f:
        for line in f:
            if line.strip():
                for rs in json.loads(line)["resourceSpans"]:
                    resource = rs.get("resource", {}).get("attributes", [])
                    for ss in rs["scopeSpans"]:
                        for span in ss["spans"]:
                            keys = [a["key"] for a in span.get("attributes", [])]
                            if len(keys) != len(set(keys)):
                                # OTLP: attribute keys are unique within a span.
                                print(f"span_check: duplicate attribute keys in {json.dumps(span)}", file=sys.stderr)
                                sys.exit(1)
                            yield dict(span, _resource=resource)


def field(span, name):
    if name == "kind":
        return KINDS.get(span.get("kind"), "?")
    if name == "status":
        return STATUS.get(span.get("status", {}).get("code", 0), "?")
    if name == "event":
        return [e["name"] for e in span.get("events", [])]
    if name == "link":
        return [f'{l["traceId"]}/{l["spanId"]}' for l in span.get("links", [])]
    if name in ("name", "traceId", "spanId", "parentSpanId"):
        return span.get(name, "")
    attributes = span.get("attributes", [])
    if name.startswith("resource."):
        name, attributes = name[len("resource."):], span["_resource"]
    for a in attributes:
        if a["key"] == name:
            v = a["value"]
            if "arrayValue" in v:
                # string[] (captured headers): FIELD=VALUE means VALUE is one of the elements
                return [str(next(iter(e.values()))) for e in v["arrayValue"].get("values", [])]
            return str(next(iter(v.values())))
    return None


def matches(span, cond):
    if cond.startswith("!") and "=" not in cond:
        return field(span, cond[1:]) is None
    neg = "!=" in cond
    key, value = cond.split("!=" if neg else "=", 1)
    actual = field(span, key)
    ok = (value in actual) if isinstance(actual, list) else (actual == value)
    return ok != neg


def main():
    path, count, conds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    found = [s for s in spans(path) if all(matches(s, c) for c in conds)]
    for s in found:
        print(json.dumps({k: v for k, v in s.items() if k != "_resource"}, sort_keys=True))
    if len(found) != count:
        print(f"span_check: expected {count} spans matching {conds}, found {len(found)}", file=sys.stderr)
        sys.exit(1)
    print(f"span_check: {count} spans match {conds}")


if __name__ == "__main__":
    main()
