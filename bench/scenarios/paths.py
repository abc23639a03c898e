"""Paths routed one way and served another (issue 17 items 4 and 9), gatewayd and
nginx side by side.

Each proxy has a route ``/public/`` to a recording upstream, a route ``/site/``
for Host ``example.com`` only, and a route ``/api`` that strips its prefix
(nginx: ``location /api { proxy_pass http://up/; }``); anything else is 404 at
the proxy. Each case is one raw request on
its own connection; the table shows the proxy's status and the request line
the upstream got ("-": nothing reached it). A request that reaches the
upstream under another path than the route's is the defect: ``/public/..%2fadmin/``
is ``/admin/`` to an upstream that decodes ``%2F`` (nginx as an application
server does), and ``/../x`` is above the root.
"""

from __future__ import annotations

import asyncio
import textwrap

from ..aio import run as run_async
from ..context import Context
from ..procs import free_port
from ..report import Table
from ..servers import Server, _nginx_main, _repo, _start_nginx, gatewayd_head

# (what, request line, Host)
CASES: tuple[tuple[str, str, str], ...] = (
    ("plain", "GET /public/a HTTP/1.1", "x"),
    ("..%2f", "GET /public/..%2fadmin/ HTTP/1.1", "x"),
    ("..%2F", "GET /public/..%2Fadmin/ HTTP/1.1", "x"),
    ("%2e%2e%2f", "GET /public/%2e%2e%2fadmin/ HTTP/1.1", "x"),
    (".%2e%2f", "GET /public/.%2e%2fadmin/ HTTP/1.1", "x"),
    ("..%5c", "GET /public/..%5cadmin/ HTTP/1.1", "x"),
    ("..\\", "GET /public/..\\admin/ HTTP/1.1", "x"),
    ("%2e%2e/", "GET /public/%2e%2e/admin/ HTTP/1.1", "x"),
    ("%2f alone", "GET /public/a%2fb HTTP/1.1", "x"),
    ("unreserved escapes", "GET /%70ublic/%7Ea HTTP/1.1", "x"),
    ("%00", "GET /public/a%00b HTTP/1.1", "x"),
    ("bad escape", "GET /public/a%zz HTTP/1.1", "x"),
    ("TRACE", "TRACE /public/a HTTP/1.1", "x"),
    ("absolute, :80", "GET http://x:80/public/a HTTP/1.1", "x"),
    ("host route, Host with a trailing dot", "GET /site/a HTTP/1.1", "example.com."),
    ("strip /api: /api../x", "GET /api../x HTTP/1.1", "x"),
    ("strip /api: /api/x", "GET /api/x HTTP/1.1", "x"),
)


def run(ctx: Context) -> list[Table]:
    table = Table(
        "Paths: the proxy's status / the request line the upstream got",
        ["case", "request", *[f"{kind}" for kind in ctx.options.proxies]],
    )
    results: dict[str, list[str]] = {}
    for kind in ctx.options.proxies:
        if kind not in ("gatewayd", "nginx"):
            continue
        ctx.say(f"paths: {kind}")
        results[kind] = run_async(_cases(ctx, kind))
    kinds = list(results)
    table.columns = ["case", "request", *kinds]
    for i, (what, line, host) in enumerate(CASES):
        shown = line.replace(" HTTP/1.1", "") + ("" if host == "x" else f" (Host: {host})")
        table.add(what, f"`{shown}`", *[results[k][i] for k in kinds])
    table.notes.append("Each cell: status at the proxy / request line at the upstream (- when nothing "
                       "reached it). Routes: /public/, /site/ for Host example.com, /api (prefix stripped); "
                       "anything else 404.")
    return [table]


async def _cases(ctx: Context, kind: str) -> list[str]:
    got: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                got.append(head.split(b"\r\n", 1)[0])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    upstream = await asyncio.start_server(record, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    server = await asyncio.to_thread(_start, ctx, kind, up_port)
    out = []
    try:
        for _, line, host in CASES:
            before = len(got)
            status = await _send(server.port, f"{line}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            # (a forwarded request is recorded before its answer leaves the upstream, so
            # before the proxy's status line arrives: no wait needed)
            lines = [g.decode("latin-1").rsplit(" ", 1)[0] for g in got[before:]]
            out.append(f"{status} / " + (", ".join(f"`{x}`" for x in lines) if lines else "-"))
    finally:
        ctx.env.procs.stop(server.proc)
        upstream.close()
    return out


async def _send(port: int, data: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            head = await reader.readline()
        parts = head.split(b" ")
        return parts[1].decode() if len(parts) > 1 else "closed"
    except (TimeoutError, ConnectionError):
        return "closed"
    finally:
        writer.close()


def _start(ctx: Context, kind: str, up_port: int) -> Server:
    env = ctx.env
    d = env.folder(f"paths-{kind}")
    port = free_port()
    if kind == "gatewayd":
        conf = d / "gatewayd.toml"
        conf.write_text(gatewayd_head(port, up_port, d / "gatewayd.sock") + textwrap.dedent("""
            [[routes]]
            name = "public"
            path_prefix = "/public/"
            upstream = "up"

            [[routes]]
            name = "site"
            host = "example.com"
            path_prefix = "/site/"
            upstream = "up"

            [[routes]]
            name = "api"
            path_prefix = "/api"
            strip_prefix = true
            upstream = "up"
        """))
        proc = env.procs.start("gatewayd", [env.python, "-m", "gatewayd", "--config", str(conf)],
                               env.proxy_cpu, cwd=_repo())
        proc.wait_port(port)
        return Server("gatewayd", proc, port, conf, d)
    conf = _nginx_main(d, f"""
        server {{
            listen 127.0.0.1:{port};
            location /public/ {{
                proxy_pass http://127.0.0.1:{up_port};
            }}
            location /api {{
                proxy_pass http://127.0.0.1:{up_port}/;
            }}
            location / {{
                return 404;
            }}
        }}
        server {{
            listen 127.0.0.1:{port};
            server_name example.com;
            location /site/ {{
                proxy_pass http://127.0.0.1:{up_port};
            }}
        }}
    """)
    return _start_nginx(env, "nginx", d, conf, port, env.proxy_cpu)
