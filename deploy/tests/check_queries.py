"""Every query of every Grafana dashboard and the signal of every alert
returns series from a live stack, through Prometheus's HTTP API.

Usage: check_queries.py PROMETHEUS_URL [REPO_ROOT]

The signal of an alert is its expression without the threshold: each side
of a top-level `and`/`or`/`unless`, with a trailing comparison against a
number removed (`rate(x[5m]) > 0.01` -> `rate(x[5m])`). An alert whose
signal returns nothing can never fire: a renamed metric or label breaks
it silently, which is what this check catches. Recording rules are queried
whole. Exits 1 listing every query that returned no series.
"""

import json
import pathlib
import re
import sys
import urllib.parse
import urllib.request

import yaml

COMPARISON = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*(bool\s+)?[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$")
SET_OP = re.compile(r"\s+(and|or|unless)(\s+(on|ignoring)\s*\([^)]*\))?\s+")


def top_level_parts(expr):
    """Splits at set operators outside parentheses, brackets and braces."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = SET_OP.match(expr, i)
            if m:
                parts.append(expr[start:i])
                start = i = m.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def wrapped(expr):
    """Whether the whole expression is one parenthesized group."""
    if not (expr.startswith("(") and expr.endswith(")")):
        return False
    depth = 0
    for i, c in enumerate(expr):
        depth += c == "("
        depth -= c == ")"
        if depth == 0 and i < len(expr) - 1:
            return False
    return True


def signals(expr):
    out = []
    for part in top_level_parts(" ".join(expr.split())):
        part = COMPARISON.sub("", part).strip()
        if wrapped(part):
            out.extend(signals(part[1:-1]))
        else:
            out.append(part)
    return out


def queries(root):
    out = []
    for path in sorted((root / "deploy/grafana/dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "1m")
                out.append((f"{path.name}: {panel['title']} ({t['refId']})", expr))
    rules = yaml.safe_load((root / "deploy/prometheus/rules.yml").read_text())
    for group in rules["groups"]:
        for r in group["rules"]:
            if "record" in r:
                out.append((f"rules.yml: {r['record']}", r["record"]))
            else:
                for i, s in enumerate(signals(r["expr"])):
                    out.append((f"rules.yml: alert {r['alert']} signal {i + 1}", s))
    return out


def query(prom, expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def main():
    prom = sys.argv[1].rstrip("/")
    root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else ".")
    empty = []
    qs = queries(root)
    for name, expr in qs:
        try:
            result = query(prom, expr)
        except urllib.error.HTTPError as e:
            empty.append(f"{name}: {expr}: {e.read().decode()}")
            continue
        if not result:
            empty.append(f"{name}: {expr}")
    if empty:
        print(f"{len(empty)} of {len(qs)} queries returned no series:", file=sys.stderr)
        for e in empty:
            print("  " + e, file=sys.stderr)
        sys.exit(1)
    print(f"all {len(qs)} dashboard queries, recording rules and alert signals return series")


if __name__ == "__main__":
    main()
