"""A small Flask app to put behind lb_system (README: "Put it in front of your app").

Flask is this example's own need, never lb_system's (`pip install flask`). It has what a real
app has that a balancer could shadow: its own home page `/`, its own `/health` and `/metrics`.

    python examples/app.py --name web-1 --port 9001
"""

from __future__ import annotations

import argparse
import json

from flask import Flask, Response, request


def make_app(name: str) -> Flask:
    """The app; `name` says which instance answered."""
    app = Flask(name)
    items = [{"id": 1, "title": "first"}, {"id": 2, "title": "second"}]

    def as_json(data: object) -> Response:
        return Response(json.dumps(data), mimetype="application/json")

    @app.get("/")
    def home() -> Response:
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
        return Response(f"<h1>Hello from {name}</h1><p>you came in over {scheme}</p>", mimetype="text/html")

    @app.get("/health")
    def health() -> Response:
        return as_json({"app": name, "ok": True})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(f'app_up{{instance="{name}"}} 1\n', mimetype="text/plain")

    @app.get("/items")
    def list_items() -> Response:
        query = request.query_string.decode()
        return as_json({"app": name, "path": request.path + (f"?{query}" if query else ""), "items": items})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps({"app": args.name, "listening": f"http://127.0.0.1:{args.port}"}), flush=True)
    make_app(args.name).run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
