"""A small local API for the demo and the tests: customers and tickets behind an API key.

    GET  /customers/{id}     -> {"id", "email", "name"}
    POST /tickets            -> 201 {"id", ...body}; the same Idempotency-Key returns the same ticket
    GET  /tickets/{id}       -> the ticket

Every request needs ``X-API-Key: <key>``, else 401. ``requests`` records what arrived (method,
path, query, headers) so that tests can assert on it.

Run alone: ``python scripts/sample_api.py --port 8099 --key demo-key``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class SampleApi:
    api_key: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    tickets: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_idempotency_key: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_and_check])
        app.router.add_get("/customers/{id}", self.customer)
        app.router.add_post("/tickets", self.create_ticket)
        app.router.add_get("/tickets/{id}", self.ticket)
        return app

    @web.middleware
    async def _record_and_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            {
                "method": request.method,
                "path": request.raw_path.split("?")[0],
                "query": dict(request.query),
                "headers": dict(request.headers),
            }
        )
        if request.headers.get("X-API-Key") != self.api_key:
            return web.json_response({"error": "unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def customer(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        return web.json_response(
            {"id": cid, "email": f"{cid}@example.com", "name": f"Customer {cid}"}
        )

    async def create_ticket(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key and key in self.by_idempotency_key:
            return web.json_response(self.tickets[self.by_idempotency_key[key]], status=201)
        body = await request.json()
        ticket = {"id": f"t_{next(self._ids)}", **body}
        self.tickets[ticket["id"]] = ticket
        if key:
            self.by_idempotency_key[key] = ticket["id"]
        return web.json_response(ticket, status=201)

    async def ticket(self, request: web.Request) -> web.Response:
        ticket = self.tickets.get(request.match_info["id"])
        if ticket is None:
            return web.json_response({"error": "no such ticket"}, status=404)
        return web.json_response(ticket)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--key", default="demo-key")
    args = parser.parse_args()
    runner = web.AppRunner(SampleApi(args.key).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"sample API on http://127.0.0.1:{args.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
