"""A WSGI request's side of the thread: the environ (PEP 3333) made from an exchange,
``wsgi.input`` reading the client's body as the application asks for it, and
``wsgi.errors``.

The environ is made on the loop, before the job goes to a thread; ``wsgi.input``
is read in the application's thread, each chunk fetched on the loop through the
job's ``Bridge`` (``gatewayd.upstreams.wsgi``), so the body is never in memory as
a whole unless the application reads it all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .appscope import Target, client_of, scheme_of, server_of

if TYPE_CHECKING:
    from ..proxy.exchange import Exchange

log = logging.getLogger("gatewayd")

Fetch = Callable[[], bytes]  # the next chunk of the body; b"" at its end (blocks the thread)


class Input:
    """``wsgi.input``: the request body as a binary stream, read from the client chunk by
    chunk as the application asks (``wsgi.input_terminated``: a read past the end
    returns b"", whatever ``CONTENT_LENGTH`` says). ``read(n)`` returns ``n`` bytes
    unless the body ends first. An error reading (the body over ``max_body_size``,
    too slow, its client gone) is raised in the application's thread."""

    __slots__ = ("_buf", "_eof", "_error", "_fetch")

    def __init__(self, data: bytes = b"", fetch: Fetch | None = None) -> None:
        self._buf = bytearray(data)
        self._fetch = fetch
        self._eof = fetch is None
        self._error: BaseException | None = None  # what reading raised: raised again

    def _more(self) -> bool:
        """Append the next chunk; False at the end of the body."""
        if self._eof:
            return False
        if self._error is not None:
            raise self._error
        assert self._fetch is not None
        try:
            chunk = self._fetch()
        except BaseException as exc:
            self._error = exc
            raise
        if not chunk:
            self._eof = True
            self._fetch = None
            return False
        self._buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        buf = self._buf
        out = bytes(buf[:n])
        del buf[:n]  # (O(1) at a bytearray's front)
        return out

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._more():
                pass
            return self._take(len(self._buf))
        while len(self._buf) < size and self._more():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        start = 0
        while True:
            buf = self._buf
            end = buf.find(b"\n", start)
            if end >= 0:
                n = end + 1
                return self._take(n if limit < 0 else min(n, limit))
            if 0 <= limit <= len(buf):
                return self._take(limit)
            start = len(buf)
            if not self._more():
                return self._take(len(self._buf) if limit < 0 else min(limit, len(self._buf)))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        """(Applications may close it; the gateway owns the body.)"""


class Errors:
    """``wsgi.errors``: what the application writes there goes to gatewayd's log (a
    warning per write, prefixed with the upstream's name)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def write(self, text: str) -> int:
        text = str(text)
        if text.strip():
            log.warning("upstreams.%s: wsgi.errors: %s", self._name, text.rstrip("\n"))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def _latin1(s: str) -> str:
    """A str of the gateway's (UTF-8, surrogateescape) as PEP 3333's native string: its
    bytes, each one character."""
    return s if s.isascii() else s.encode("utf-8", "surrogateescape").decode("latin-1")


def environ_of(ex: Exchange, errors: Errors, multiprocess: bool) -> dict[str, Any]:
    """The WSGI environ of ``ex`` (PEP 3333), without ``wsgi.input``.

    ``SCRIPT_NAME`` is the prefix the route stripped and ``PATH_INFO`` the rest,
    percent-decoded; ``REMOTE_ADDR`` the client as the gateway knows it (the PROXY
    protocol's address, or the one trusted proxies forwarded). Each request header
    is ``HTTP_NAME`` (repeated ones joined with ", ", cookies with "; "), except
    Content-Type and Content-Length (``CONTENT_TYPE``, ``CONTENT_LENGTH``); a header
    whose name has an underscore is dropped, as the proxy drops it (``X_User`` would
    be read as ``X-User``, a spoofing path)."""
    request = ex.request
    target = Target(ex)
    host, port = client_of(ex)
    server_host, server_port = server_of(ex)
    version = request.version
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": _latin1(target.root_path),
        "PATH_INFO": target.wsgi_path,
        "QUERY_STRING": target.query.decode("latin-1"),
        "SERVER_NAME": server_host or "localhost",
        "SERVER_PORT": str(server_port),
        "SERVER_PROTOCOL": f"HTTP/{version.major}.{version.minor}",
        "REMOTE_ADDR": host,
        "REMOTE_PORT": str(port),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme_of(ex),
        "wsgi.errors": errors,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    for raw_name, raw_value in request.raw_headers:
        if b"_" in raw_name:
            continue
        value = raw_value.decode("latin-1")
        lname = raw_name.lower()
        if lname == b"content-type":
            environ["CONTENT_TYPE"] = value
            continue
        if lname == b"content-length":
            environ["CONTENT_LENGTH"] = value
            continue
        key = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
        prior = environ.get(key)
        if prior is None:
            environ[key] = value
        else:
            environ[key] = prior + ("; " if key == "HTTP_COOKIE" else ", ") + value
    body = ex.body
    if body is not None and body.length is not None:
        environ["CONTENT_LENGTH"] = str(body.length)  # (a chunked body read in full has one)
    return environ
