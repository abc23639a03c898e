"""The normal form of a request path (RFC 3986 §6.2.2), which routing and the
upstream both see.

A path is routed as the upstream will read it, or not at all. Upstreams decode
percent-escapes and resolve dot-segments before they look a path up (nginx does
both, and merges ``..`` across an encoded ``%2F``), so a path routed as sent can
be served from elsewhere: ``/public/..%2fadmin/`` matched ``/public/`` and nginx
served ``/admin/``. Hence:

- escapes of unreserved characters (``%41``, ``%2e``, ``%7E``) are decoded: it
  changes nothing a server may tell apart (§6.2.2.2), and ``%2e%2e`` is then
  plainly ``..``; every other escape is kept exactly as sent (hex case too);
- a malformed escape (``%zz``, ``%4``) or ``%00`` is refused (nginx: 400);
- a dot-segment is refused, not resolved (RFC 3986 §5.2.4 has clients remove
  them, so a client that sends one is probing), counting ``/``, ``\\``, ``%2F`` and
  ``%5C`` all as separators: whatever an upstream takes for a slash cannot make
  ``..`` out of ``..%2f`` or ``..\\``;
- a run of slashes is one slash (nginx's and Envoy's ``merge_slashes``): most
  servers read ``//admin/`` as ``/admin/``, so routed as sent it would reach
  ``/admin/`` through the ``/`` route, around ``/admin/``'s own;
- an escaped slash (``%2F``) or a backslash (raw or ``%5C``) is reported, not
  decoded: decoding it would change the path's segments, keeping it lets the
  upstream decide; the matched route's ``escaped_slashes`` says which (Envoy's
  ``path_with_escaped_slashes_action``).

The query is not a path: it is kept as sent.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# ``%2F`` and ``%5C`` (either case) and a raw backslash: what some server takes for "/"
_ESCAPED_SEPARATOR = re.compile(r"%2f|%5c|\\", re.IGNORECASE)
_SEPARATOR = re.compile(r"/|%2f|%5c|\\", re.IGNORECASE)
_SLASHES = re.compile(r"//+")


class BadPath(ValueError):
    """The path has no normal form that can be forwarded; the text says why."""


def normalize(path: str) -> tuple[str, bool]:
    """``path`` (no query) in normal form, and whether it holds an escaped slash or
    a backslash. Raises BadPath."""
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
                raise BadPath("a malformed percent-escape")
            char = chr(int(part[:2], 16))
            if char in _UNRESERVED:
                out.append(char + part[2:])
            elif char == "\0":
                raise BadPath("an escaped NUL (%00)")
            else:
                out.append("%" + part)
        path = "".join(out)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "." in path:
        for segment in _SEPARATOR.split(path):
            if segment == "." or segment == "..":
                raise BadPath("a dot-segment")
    # (a path with dots alone, /static/app.js, is the common case here: no search)
    escaped = ("%" in path or "\\" in path) and _ESCAPED_SEPARATOR.search(path) is not None
    return path, escaped
