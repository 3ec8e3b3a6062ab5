"""A small web app to put behind lb_system (README: "Put it in front of your app").

Plain aiohttp, which lb_system already installs: nothing more to install. It has what a real
app has that a balancer could shadow: its own home page `/`, its own `/health` and `/metrics`.

    python examples/app.py --name web-1 --port 9001
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


def make_app(name: str) -> web.Application:
    """The app; `name` says which instance answered."""
    items = [{"id": 1, "title": "first"}, {"id": 2, "title": "second"}]

    async def home(request: web.Request) -> web.Response:
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
        return web.Response(text=f"<h1>Hello from {name}</h1><p>you came in over {scheme}</p>", content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"app": name, "ok": True})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=f'app_up{{instance="{name}"}} 1\n', content_type="text/plain")

    async def list_items(request: web.Request) -> web.Response:
        return web.json_response({"app": name, "path": request.path_qs, "items": items})

    app = web.Application()
    app.router.add_get("/", home)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/items", list_items)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps({"app": args.name, "listening": f"http://127.0.0.1:{args.port}"}), flush=True)
    web.run_app(make_app(args.name), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
