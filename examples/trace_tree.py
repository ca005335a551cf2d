#!/usr/bin/env python3
"""Print OTLP/JSON trace exports as indented span trees.

Usage: trace_tree.py FILE [--trace TRACE_ID] [--json-summary]

FILE holds OTLP/JSON lines: each non-blank line is one ExportTraceServiceRequest
in the OTLP JSON encoding ({"resourceSpans": [...]}).  Spans are grouped by
traceId; each trace is printed as

    trace <traceId> (<n> spans)
      SERVER GET /path  12.345 ms  status=200 cache=hit vxid=1001 (remote parent <id>)
        CLIENT backend fetch  3.210 ms  ...

Spans whose parent is not present in the file are printed as roots and marked
"(remote parent <id>)".  Children are sorted by start time, traces by their
earliest start time.  Malformed lines are reported on stderr and skipped.
Exit status is 1 when the file contains no spans at all (or cannot be read,
or --trace matches nothing).

--json-summary prints a JSON list of traces with their span trees instead.

Standard library only (Python 3.11+).
"""

import argparse
import json
import sys

KIND_NAMES = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}
# Some exporters emit the enum by name instead of by number.
KIND_BY_ENUM_NAME = {f"SPAN_KIND_{v}": k for k, v in KIND_NAMES.items()}
STATUS_BY_ENUM_NAME = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}

# (attribute key, label shown in the tree; None = show value only)
KEY_ATTRIBUTES = [
    ("http.request.method", None),
    ("url.path", None),
    ("http.response.status_code", "status"),
    ("varnish.cache_result", "cache"),
    ("varnish.vxid", "vxid"),
    ("varnish.backend", "backend"),
    ("error.type", "error.type"),
]


def any_value(v):
    """Decode an OTLP AnyValue object into a plain Python value."""
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            return v["intValue"]
    if "doubleValue" in v:
        try:
            return float(v["doubleValue"])
        except (TypeError, ValueError):
            return v["doubleValue"]
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [any_value(x) for x in (v["arrayValue"] or {}).get("values", [])]
    if "kvlistValue" in v:
        return attributes_to_dict((v["kvlistValue"] or {}).get("values", []))
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def attributes_to_dict(attrs):
    out = {}
    for kv in attrs or []:
        if isinstance(kv, dict) and "key" in kv:
            out[kv["key"]] = any_value(kv.get("value"))
    return out


def to_int(x, default=0):
    try:
        return int(x)
    except (TypeError, ValueError):
        return default


def norm_id(x):
    return x.lower() if isinstance(x, str) else ""


def parse_span(raw, resource, scope):
    if not isinstance(raw, dict):
        raise ValueError("span is not an object")
    trace_id = norm_id(raw.get("traceId"))
    span_id = norm_id(raw.get("spanId"))
    if not trace_id or not span_id:
        raise ValueError("span without traceId/spanId")
    kind = raw.get("kind", 0)
    if isinstance(kind, str):
        kind = KIND_BY_ENUM_NAME.get(kind, to_int(kind))
    status = raw.get("status") or {}
    code = status.get("code", 0)
    if isinstance(code, str):
        code = STATUS_BY_ENUM_NAME.get(code, to_int(code))
    start = to_int(raw.get("startTimeUnixNano"))
    end = to_int(raw.get("endTimeUnixNano"), start)
    return {
        "traceId": trace_id,
        "spanId": span_id,
        "parentSpanId": norm_id(raw.get("parentSpanId")) or None,
        "name": raw.get("name", ""),
        "kind": kind,
        "kindName": KIND_NAMES.get(kind, str(kind)),
        "start": start,
        "end": end,
        "durationMs": round((end - start) / 1e6, 3),
        "attributes": attributes_to_dict(raw.get("attributes")),
        "status": {"code": code, "message": status.get("message", "")},
        "links": [
            {"traceId": norm_id(l.get("traceId")), "spanId": norm_id(l.get("spanId"))}
            for l in raw.get("links") or [] if isinstance(l, dict)
        ],
        "events": [
            {
                "timeUnixNano": to_int(e.get("timeUnixNano")),
                "name": e.get("name", ""),
                "attributes": attributes_to_dict(e.get("attributes")),
            }
            for e in raw.get("events") or [] if isinstance(e, dict)
        ],
        "resource": resource,
        "scope": scope,
    }


def read_spans(path):
    """Return (spans, number_of_malformed_lines)."""
    spans = []
    bad = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict) or not isinstance(doc.get("resourceSpans", []), list):
                    raise ValueError("not an ExportTraceServiceRequest object")
                line_spans = []
                for rs in doc.get("resourceSpans") or []:
                    resource = attributes_to_dict((rs.get("resource") or {}).get("attributes"))
                    for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
                        sc = ss.get("scope") or ss.get("instrumentationLibrary") or {}
                        scope = {"name": sc.get("name", ""), "version": sc.get("version", "")}
                        for raw in ss.get("spans") or []:
                            line_spans.append(parse_span(raw, resource, scope))
            except (ValueError, TypeError, AttributeError) as exc:
                bad += 1
                print(f"{path}:{lineno}: skipping malformed line: {exc}", file=sys.stderr)
                continue
            spans.extend(line_spans)
    return spans, bad


def build_traces(spans):
    """Group spans into traces and link them into trees."""
    by_trace = {}
    for s in spans:
        by_trace.setdefault(s["traceId"], {})
        # Duplicate span ids (e.g. re-exported batches): keep the first one.
        by_trace[s["traceId"]].setdefault(s["spanId"], s)

    traces = []
    for trace_id, index in by_trace.items():
        for s in index.values():
            s["children"] = []
        roots = []
        for s in index.values():
            parent = s["parentSpanId"]
            if parent and parent in index and parent != s["spanId"]:
                index[parent]["children"].append(s)
            else:
                s["remoteParent"] = parent  # None for a true root
                roots.append(s)
        # Parent cycles would leave spans unreachable; promote them to roots.
        reachable = set()
        stack = list(roots)
        while stack:
            s = stack.pop()
            reachable.add(s["spanId"])
            stack.extend(s["children"])
        for s in index.values():
            if s["spanId"] not in reachable:
                for p in index.values():
                    p["children"] = [c for c in p["children"] if c is not s]
                s["remoteParent"] = s["parentSpanId"]
                roots.append(s)
                stack = [s]
                while stack:
                    c = stack.pop()
                    reachable.add(c["spanId"])
                    stack.extend(c["children"])

        key = lambda x: (x["start"], x["end"], x["spanId"])
        for s in index.values():
            s["children"].sort(key=key)
        roots.sort(key=key)
        traces.append({
            "traceId": trace_id,
            "spanCount": len(index),
            "start": min(s["start"] for s in index.values()),
            "roots": roots,
        })
    traces.sort(key=lambda t: (t["start"], t["traceId"]))
    return traces


def fmt_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and (not v or any(c.isspace() for c in v)):
        return json.dumps(v)
    return str(v)


def span_line(s):
    parts = [f"{s['kindName']} {s['name']}", f"{s['durationMs']:.3f} ms"]
    attrs = s["attributes"]
    extras = []
    shown_values = s["name"].split()
    for key, label in KEY_ATTRIBUTES:
        if key not in attrs:
            continue
        val = fmt_value(attrs[key])
        if label is None:
            # Method/path are usually already in the span name; avoid repeating.
            if val in shown_values:
                continue
            extras.append(val)
        else:
            extras.append(f"{label}={val}")
    if s["status"]["code"] == 2:
        msg = s["status"].get("message") or ""
        extras.append(f"[ERROR: {msg}]" if msg else "[ERROR]")
    if s["links"]:
        extras.append("links=" + ",".join(l["spanId"] for l in s["links"]))
    if s.get("remoteParent"):
        extras.append(f"(remote parent {s['remoteParent']})")
    line = "  ".join(parts)
    if extras:
        line += "  " + " ".join(extras)
    return line


def print_tree(traces, out):
    for i, t in enumerate(traces):
        if i:
            out.write("\n")
        out.write(f"trace {t['traceId']} ({t['spanCount']} spans)\n")
        stack = [(r, 1) for r in reversed(t["roots"])]
        while stack:
            s, depth = stack.pop()
            out.write("  " * depth + span_line(s) + "\n")
            stack.extend((c, depth + 1) for c in reversed(s["children"]))


def summarize(span):
    return {
        "spanId": span["spanId"],
        "parentSpanId": span["parentSpanId"],
        "remoteParent": span.get("remoteParent"),
        "name": span["name"],
        "kind": span["kindName"],
        "startTimeUnixNano": span["start"],
        "endTimeUnixNano": span["end"],
        "durationMs": span["durationMs"],
        "attributes": span["attributes"],
        "status": span["status"],
        "links": span["links"],
        "events": [e["name"] for e in span["events"]],
        "children": [summarize(c) for c in span["children"]],
    }


def json_summary(traces):
    return [
        {
            "traceId": t["traceId"],
            "spanCount": t["spanCount"],
            "roots": [summarize(r) for r in t["roots"]],
        }
        for t in traces
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print OTLP/JSON-lines trace exports as span trees.")
    parser.add_argument("file", metavar="FILE", help="OTLP/JSON lines file (one ExportTraceServiceRequest per line)")
    parser.add_argument("--trace", metavar="TRACE_ID", help="only show this trace id")
    parser.add_argument("--json-summary", action="store_true", help="print a JSON list of traces with span trees")
    args = parser.parse_args(argv)

    try:
        spans, _bad = read_spans(args.file)
    except OSError as exc:
        print(f"trace_tree: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    if not spans:
        print(f"trace_tree: no spans found in {args.file}", file=sys.stderr)
        return 1

    traces = build_traces(spans)
    if args.trace:
        want = args.trace.lower()
        traces = [t for t in traces if t["traceId"] == want]
        if not traces:
            print(f"trace_tree: trace {args.trace} not found in {args.file}", file=sys.stderr)
            return 1

    if args.json_summary:
        json.dump(json_summary(traces), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_tree(traces, sys.stdout)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(0)
