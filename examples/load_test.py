"""Load test of examples/model_server.py: how much of a prediction's latency is the feature fetch.

    python examples/load_test.py --url http://127.0.0.1:8080 --users model/users.json --requests 2000 --concurrency 8

Sends POST /predict for random shoppers (the ids the notebook wrote to users.json) from
`concurrency` threads (keep-alive connections) and prints one JSON object: requests, errors,
throughput, p50/p99 of the end-to-end latency (client side) and of the server-reported feature
fetch and model times, and the feature fetch's share of latency, two ways: of the server's time
per prediction (`feature_share`: sum of feature_ms over sum of total_ms) and of the latency the
client saw, HTTP and JSON included (`feature_share_of_client_latency`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Sequence


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def run(url: str, users: Sequence[str], requests: int, concurrency: int, seed: int = 1) -> Dict[str, Any]:
    if not users:
        raise ValueError("no user ids to request")
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    results: List[Dict[str, float]] = []
    errors: List[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(n: int) -> None:
        rng = random.Random(seed + n)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        for _ in iter(lambda: next(counter, None), None):
            body = json.dumps({"user_id": rng.choice(users)})
            started = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError as e:
                with lock:
                    errors.append(str(e))
                conn = http.client.HTTPConnection(host, port, timeout=30)
                continue
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if resp.status != 200:
                    errors.append(f"{resp.status} {data[:200]!r}")
                else:
                    out = json.loads(data)
                    out["client_ms"] = elapsed
                    results.append(out)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started

    def pick(key: str) -> List[float]:
        return [r[key] for r in results]

    return {
        "requests": requests,
        "ok": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "concurrency": concurrency,
        "throughput_rps": len(results) / wall if wall else 0.0,
        "client_p50_ms": percentile(pick("client_ms"), 50),
        "client_p99_ms": percentile(pick("client_ms"), 99),
        "feature_p50_ms": percentile(pick("feature_ms"), 50),
        "feature_p99_ms": percentile(pick("feature_ms"), 99),
        "model_p50_ms": percentile(pick("model_ms"), 50),
        "feature_share": sum(pick("feature_ms")) / max(sum(pick("total_ms")), 1e-9),
        "feature_share_of_client_latency": sum(pick("feature_ms")) / max(sum(pick("client_ms")), 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--users", default="model/users.json", help="JSON list of user ids (the notebook writes it)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with open(args.users) as f:
        users = json.load(f)
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise SystemExit(f"{args.users}: expected a JSON list of user ids")
    print(json.dumps(run(args.url, users, args.requests, args.concurrency), indent=2))


if __name__ == "__main__":
    main()
