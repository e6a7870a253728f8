"""A model server over quiver: on each request it fetches the shopper's online features (streaming
aggregations, the latest login and the request-time `user_context` features, computed by quiver
as of the request) and returns the purchase-propensity model's prediction.

    python examples/model_server.py --model model/model.pkl --quiver localhost:50051 --port 8080

Endpoints (JSON over HTTP/1.1, standard library only):
- POST /predict {"user_id": "shopper_1"} -> {"user_id", "purchase_probability", "feature_ms",
  "model_ms", "total_ms"}: the time spent fetching features and predicting, per request;
- GET /context/<user_id> -> text/plain: the shopper's features as LLM prompt context (units,
  freshness), see quiver_client.context.prompt_context;
- GET /health -> {"status": "ok"}.

The model file is what examples/purchase_propensity.ipynb saves: {"model", "features", "columns"}.
Errors: 400 for a body without a string user_id, 502 with quiver's status code when the feature
fetch fails.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import numpy as np

from quiver_client import QuiverClient, QuiverError
from quiver_client.context import prompt_context


class Predictor:
    """The model and the feature store client, shared by all request threads."""

    def __init__(self, model_path: str, target: str, timeout: float):
        with open(model_path, "rb") as f:
            saved = pickle.load(f)  # noqa: S301 - a file this example wrote itself
        self.model = saved["model"]
        self.features: List[str] = saved["features"]
        self.columns: List[str] = saved["columns"]
        self.client = QuiverClient(target, timeout=timeout)
        self.registry = self.client.registry()

    def predict(self, user_id: str) -> Dict[str, Any]:
        started = time.perf_counter()
        feats = self.client.get_online_features({"user_id": [user_id]}, features=self.features)
        fetched = time.perf_counter()
        row = np.array([[np.nan if feats[c][0] is None else float(feats[c][0]) for c in self.columns]])
        probability = float(self.model.predict_proba(row)[0, 1])
        done = time.perf_counter()
        return {
            "user_id": user_id,
            "purchase_probability": probability,
            "feature_ms": (fetched - started) * 1000,
            "model_ms": (done - fetched) * 1000,
            "total_ms": (done - started) * 1000,
        }

    def context(self, user_id: str) -> str:
        feats = self.client.get_online_features({"user_id": [user_id]}, features=self.features)
        return prompt_context(feats, self.registry)


def handler(predictor: Predictor) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes; with Nagle's algorithm the body would wait for
        # the client's delayed ACK (~40 ms on Linux) on every kept-alive request.
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:  # quiet: a load test sends thousands
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/health":
                return self._json(200, {"status": "ok"})
            if self.path.startswith("/context/"):
                user_id = urllib.parse.unquote(self.path[len("/context/"):])
                try:
                    text = predictor.context(user_id)
                except QuiverError as e:
                    return self._json(502, {"error": e.code.name, "message": e.message})
                return self._send(200, text.encode(), "text/plain; charset=utf-8")
            self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/predict":
                return self._json(404, {"error": "not found"})
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                user_id = body["user_id"]
                if not isinstance(user_id, str) or not user_id:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return self._json(400, {"error": 'expected {"user_id": "<id>"}'})
            try:
                self._json(200, predictor.predict(user_id))
            except QuiverError as e:
                self._json(502, {"error": e.code.name, "message": e.message})

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quiver", default="localhost:50051", help="quiver's gRPC address")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    ap.add_argument("--timeout", type=float, default=2.0, help="feature fetch deadline, seconds")
    args = ap.parse_args()
    predictor = Predictor(args.model, args.quiver, args.timeout)
    server = ThreadingHTTPServer((args.host, args.port), handler(predictor))
    print(f"model server listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
