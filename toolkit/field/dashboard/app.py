"""The dashboard's web server: Starlette on uvicorn, live updates as server-sent events.

Routes: ``/`` the page, ``/static/*`` its script, style and the bundled chart library
(uPlot, no CDN), ``/events`` the event stream, ``/api/state`` everything as JSON,
``/metrics`` Prometheus' text format. The page gets the whole state once, then only
what changed (``FleetView.changes``); updates that come close together are sent as
one, so a thousand devices announcing themselves cost a few events, not a thousand.
"""
from __future__ import annotations

import json
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from toolkit.field.dashboard.metrics import registry_for, render
from toolkit.field.dashboard.view import FleetView

STATIC = Path(__file__).parent / "static"
COALESCE = 0.05  # seconds to gather the updates that follow the first
HEARTBEAT = 10.0  # seconds between keep-alive comments (proxies drop idle streams)


def _event(version: int, data: dict) -> bytes:
    return f"id: {version}\nevent: update\ndata: {json.dumps(data)}\n\n".encode()


def create_app(view: FleetView) -> Starlette:
    """The dashboard's ASGI app over ``view``."""
    metrics = registry_for(view)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        return JSONResponse(view.changes(0)[1])

    async def prometheus(request: Request) -> Response:
        body = await anyio.to_thread.run_sync(render, metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def events(request: Request) -> Response:
        async def stream():
            seen = -1  # nothing yet: the first event is the whole state
            while True:
                version = await anyio.to_thread.run_sync(view.wait, seen, HEARTBEAT)
                if await request.is_disconnected():
                    return
                if version <= seen:
                    yield b": keep-alive\n\n"
                    continue
                await anyio.sleep(COALESCE)
                seen, data = view.changes(seen)
                yield _event(seen, data)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    return Starlette(routes=[
        Route("/", index), Route("/api/state", state), Route("/metrics", prometheus),
        Route("/events", events), Mount("/static", StaticFiles(directory=STATIC)),
    ])
