"""ASGI applications the tests run under gatewayd (``interface = "asgi"``): raw
ones that show what the gateway gives them, and real Starlette and FastAPI apps.
What they see is recorded in ``SEEN`` (the test process is the gateway's)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

SEEN: dict[str, Any] = {"events": [], "chunks": 0, "startups": 0}


def event(name: str) -> None:
    SEEN["events"].append(name)
    marker = os.environ.get("GATEWAYD_TEST_EVENTS")  # (a gatewayd subprocess tells its test here)
    if marker:
        with open(marker, "a") as fh:
            fh.write(name + "\n")


async def scope_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with its scope as JSON (bytes as latin-1 text), and counts the
    request body's messages."""
    if scope["type"] == "lifespan":
        raise RuntimeError("no lifespan here")  # (as a plain callable often does)
    messages = []
    while True:
        message = await receive()
        messages.append((len(message.get("body", b"")), message.get("more_body", False)))
        if not message.get("more_body"):
            break
    shown = {k: v for k, v in scope.items() if k not in ("headers", "state")}
    shown["raw_path"] = scope["raw_path"].decode("latin-1")
    shown["query_string"] = scope["query_string"].decode("latin-1")
    shown["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
    shown["messages"] = messages
    body = json.dumps(shown).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def stream_out(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """?n=N chunks of 64 KiB with more_body, counted in SEEN["chunks"] as they are sent."""
    n = int(dict(p.split("=") for p in scope["query_string"].decode().split("&") if p).get("n", "4"))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
    chunk = b"x" * 65536
    try:
        for _ in range(n):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            SEEN["chunks"] += 1
        await send({"type": "http.response.body", "body": b""})
    except BaseException as exc:
        event(f"stream_out: {type(exc).__name__}")
        raise


async def long_poll(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Starts a response, then waits for the client to leave (receive), records it,
    then awaits once more (where the cancellation lands)."""
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"waiting\n", "more_body": True})
    message = await receive()
    event(f"long_poll: {message['type']}")
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        event("long_poll: cancelled")
        raise


async def sleeper(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Awaits ?ms= (default 10 s), recording a cancellation, then answers."""
    query = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
    try:
        await asyncio.sleep(int(query.get("ms", "10000")) / 1000)
    except asyncio.CancelledError:
        event("sleeper: cancelled")
        raise
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"slept"})


async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/raise: an exception before the head; /silent: returns without a response;
    /late: an exception after the head."""
    if scope["path"] == "/raise":
        raise ValueError("broken on purpose")
    if scope["path"] == "/late":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("broken after the head")


class Lifespanned:
    """An application with a lifespan: its startup fills the state each request sees;
    ``fail`` makes the startup fail with a message; the shutdown is recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if self.fail:
                        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
                        return
                    SEEN["startups"] += 1
                    event("startup")
                    scope["state"]["pool"] = "db-pool"
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    event("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        query = scope["query_string"].decode()
        if query.startswith("ms="):
            await asyncio.sleep(int(query[3:]) / 1000)
        body = json.dumps({"state": scope.get("state", {}).get("pool")}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        event("request")


lifespanned = Lifespanned()
failing_startup = Lifespanned(fail=True)


# -- Starlette ---------------------------------------------------------------------------
async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello {request.path_params.get('name', 'world')}")


async def info(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "root_path": request.scope["root_path"],
                         "query": dict(request.query_params), "client": request.client.host if request.client else None,
                         "url": str(request.url)})


async def upload(request: Request) -> JSONResponse:
    total = parts = 0
    async for chunk in request.stream():
        total += len(chunk)
        parts += 1
    return JSONResponse({"bytes": total, "parts": parts})


async def numbers(request: Request) -> StreamingResponse:
    async def gen() -> Any:
        for i in range(5):
            yield f"{i}\n".encode()
    return StreamingResponse(gen(), media_type="text/plain")


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol="echo" if "echo" in websocket.scope["subprotocols"] else None)
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text("starlette:" + text)
    except Exception:
        event("ws_echo: closed")


async def ws_refuse(websocket: WebSocket) -> None:
    await websocket.close(code=1008)


starlette_app = Starlette(routes=[
    Route("/hello", hello),
    Route("/hello/{name}", hello),
    Route("/info", info),
    Route("/upload", upload, methods=["POST"]),
    Route("/numbers", numbers),
    WebSocketRoute("/ws", ws_echo),
    WebSocketRoute("/refuse", ws_refuse),
    Mount("/sub", routes=[Route("/info", info)]),
])


# -- FastAPI -----------------------------------------------------------------------------
class Item(BaseModel):
    name: str
    price: float


fastapi_app = FastAPI()


@fastapi_app.post("/items/{item_id}")
async def create_item(item_id: int, item: Item, q: str | None = None) -> dict[str, Any]:
    return {"id": item_id, "name": item.name, "price": item.price, "q": q}


@fastapi_app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, Any]:
    return {"id": item_id}
