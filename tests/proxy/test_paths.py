"""The route a request matched is the path the upstream serves (issue 17 §4, §9).

Per-route behaviour the request corpus cannot set up (its gateway has one route):
``escaped_slashes``, ``strip_prefix`` at segment boundaries, host routes and a
Host with a trailing dot. The cases that need no route of their own (``..%2f``,
``%00``, TRACE, absolute-form with the default port, ...) are corpus cases
``target_*``, ``method_*`` and ``absolute_form_*``.
"""

from __future__ import annotations

import pytest

from gatewayd.config.loader import ConfigError, parse

from ..builders import gateway_config
from ..conftest import raw_request, status_of

pytestmark = pytest.mark.usefixtures("no_error_logged")


async def get(port: int, target: str, host: str = "x") -> tuple[int, bytes]:
    resp = await raw_request(port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    reason = b""
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-gatewayd-reason:"):
            reason = line.split(b":", 1)[1].strip()
    return status_of(resp), reason


async def test_escaped_slashes_refused_unless_the_matched_route_keeps_them(start_gateway, upstream):
    """/public/..%2fadmin/ reached the upstream through /public/ (nginx then served
    /admin/): now 400 and the upstream sees nothing. A route with escaped_slashes =
    "keep" forwards an escaped slash as sent, but never a dot-segment made with one."""
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "public"
        path_prefix = "/public/"
        upstream = "app"

        [[routes]]
        name = "files"
        path_prefix = "/files/"
        escaped_slashes = "keep"
        upstream = "app"
    """)
    for target in ("/public/..%2fadmin/", "/public/%2e%2e%2fadmin/", "/public/.%2e%2fadmin/",
                   "/public/..%2Fadmin/", "/public/a%2Fb", "/public/a%5cb", "/public/a\\b",
                   "/files/..%2fadmin/", "/files/a/..%5C..%5Cb", "/files%2Fa"):
        assert await get(gw.port, target) == (400, b"bad_target"), target
    assert upstream.requests == []
    assert await get(gw.port, "/files/a%2Fb%5Cc") == (200, b"")
    assert await get(gw.port, "/public/%2e%2E.x/%7e") == (200, b"")  # "...x" is a name, not a dot-segment
    assert [r["target"] for r in upstream.requests] == ["/files/a%2Fb%5Cc", "/public/...x/~"]
    routes = gw.runtime.table.routes
    assert (routes["files"].stats.requests, routes["public"].stats.requests) == (1, 1)


async def test_strip_prefix_matches_whole_segments(start_gateway, upstream):
    """Prefix /api with strip_prefix turned /api../x into /../x upstream. Now such a
    prefix matches only where a segment or the query begins, as an operator who
    writes /api means; /api../x and /apix go to the next route, unstripped."""
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "api"
        path_prefix = "/api"
        strip_prefix = true
        upstream = "app"

        [[routes]]
        name = "root"
        path_prefix = "/"
        upstream = "app"

        [[routes]]
        name = "v1"
        path_prefix = "/v1/"
        strip_prefix = true
        upstream = "app"
    """)
    for target in ("/api../x", "/apix", "/api", "/api?q=1", "/api/a/b", "/api//a", "/v1/", "/v1/a..", "/v1"):
        assert (await get(gw.port, target))[0] == 200, target
    forwarded = [r["target"] for r in upstream.requests]
    assert forwarded == ["/api../x", "/apix", "/", "/?q=1", "/a/b", "/a", "/", "/a..", "/v1"]
    routes = gw.runtime.table.routes
    assert [routes[n].stats.requests for n in ("api", "root", "v1")] == [4, 3, 2]
    for target in forwarded:
        assert target.startswith("/") and ".." not in target.split("/")


async def test_host_with_a_trailing_dot_matches_its_routes(start_gateway, upstream):
    """Host: example.com. is the fully qualified example.com: it must not miss the
    example.com route (and fall to the catch-all or a 404)."""
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "site"
        host = "example.com"
        upstream = "app"
    """)
    assert await get(gw.port, "/a", host="example.com.") == (200, b"")
    assert await get(gw.port, "/a", host="Example.COM.:8080") == (200, b"")
    assert await get(gw.port, "http://example.com.:80/a", host="example.com") == (200, b"")
    assert await get(gw.port, "/a", host="example.com..") == (404, b"no_route")
    assert gw.runtime.table.routes["site"].stats.requests == 3


@pytest.mark.parametrize(("prefix", "why"), [
    ("/a/../b", "a dot-segment"),
    ("/a/%2e%2e/b", "a dot-segment"),
    ("/a%zz", "a malformed percent-escape"),
    ("/%61pi", "normal form"),
])
def test_path_prefix_in_normal_form(tmp_path, prefix: str, why: str):
    """Requests are matched in normal form: a prefix in any other can never match."""
    text = f"""
        [upstreams.app]
        servers = ["http://127.0.0.1:9"]

        [[routes]]
        name = "r"
        path_prefix = "{prefix}"
        upstream = "app"
    """
    with pytest.raises(ConfigError) as err:
        parse(gateway_config(tmp_path, text).read_text(), "g.toml")
    assert "path_prefix: expected" in str(err.value) and why in str(err.value), str(err.value)


def test_escaped_slashes_is_validated(tmp_path):
    text = """
        [upstreams.app]
        servers = ["http://127.0.0.1:9"]

        [[routes]]
        name = "r"
        escaped_slashes = "decode"
        upstream = "app"
    """
    with pytest.raises(ConfigError) as err:
        parse(gateway_config(tmp_path, text).read_text(), "g.toml")
    assert "escaped_slashes: expected" in str(err.value), str(err.value)
