"""Snapshots as JSON lines, each route encoded once.

A presented route is a :class:`RouteDict`: a plain dict to every reader, plus
the JSON encoded from it, kept so that a route shared by several snapshots (the
single-process snapshot hands out the same object until one of its figures
changes, see ``snapshot.Presenter``) is encoded once. A dashboard asking 4 times
a second about 200 routes, few of them busy, then costs little more than the busy
ones. Presented snapshots are read-only to their consumers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, TypeVar

from ..stats.metrics import HistogramExport
from ..stats.process import GcExport
from .protocol import RouteSnapshot, Snapshot

HISTOGRAM_KEYS = ("latency_histogram", "gateway_latency_histogram", "queue_wait_histogram")
S = TypeVar("S", bound=Snapshot)


class RouteDict(dict[str, Any]):
    """A presented route carrying its JSON, with and without the bucket counts."""

    __slots__ = ("_base", "_json", "_json_all")
    _base: RouteSnapshot  # the same without the histograms
    _json: str | None
    _json_all: str | None


def route_object(base: RouteSnapshot, latency: HistogramExport, own: HistogramExport,
                 qwait: HistogramExport) -> RouteSnapshot:
    """``base`` (a route without its bucket counts) with the three histograms at the end,
    as a :class:`RouteDict`: the one way a presented route is made."""
    r = RouteDict(base)
    r["latency_histogram"] = latency
    r["gateway_latency_histogram"] = own
    r["queue_wait_histogram"] = qwait
    r._base = base
    r._json = r._json_all = None
    # a RouteDict is the dict a RouteSnapshot describes, with its encodings attached
    # (said by annotation, not typing.cast: this runs for every route presented)
    carrier: Any = r
    route: RouteSnapshot = carrier
    return route


def _no_default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[object], str]:
    """What ``json.dumps(obj, separators=(",", ":"))`` does, without its per-call set-up
    (a new encoder object and the circular-reference bookkeeping) when ``_json`` has C."""
    slow: Callable[[object], str] = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
    try:
        # json.encoder's C accelerator (as json.JSONEncoder.iterencode calls it): not in
        # the stubs, so reached through the module's namespace
        c_make_encoder = vars(json.encoder)["c_make_encoder"]
        if c_make_encoder is None:
            return slow
        it = c_make_encoder(None, _no_default, encode_basestring_ascii, None, ":", ",",
                            False, False, True)
        probe = {"a": [1, 2.5, None, True, "\u00e9"]}
        if "".join(it(probe, 0)) != slow(probe):
            return slow
    except (KeyError, TypeError):
        return slow

    def fast(obj: object) -> str:
        return "".join(it(obj, 0))

    return fast


to_json = _make_encoder()


def route_json(r: Mapping[str, Any], histograms: bool = False) -> str:
    """One presented route as JSON, with or without its bucket counts; computed once
    per :class:`RouteDict`."""
    if type(r) is RouteDict:
        if histograms:
            j = r._json_all
            if j is None:
                j = r._json_all = to_json(r)
        else:
            j = r._json
            if j is None:
                j = r._json = to_json(r._base)
        return j
    if histograms:
        return to_json(r)
    return to_json({k: v for k, v in r.items() if k not in HISTOGRAM_KEYS})


def without_histograms(snap: S) -> S:
    """``snap`` without bucket counts (routes' and GC generations'), ``snap`` untouched."""
    out = snap.copy()
    out["routes"] = [_route_base(r) for r in snap["routes"]]
    out["gc"] = _gc_without_histograms(snap["gc"])
    return out


def _route_base(r: RouteSnapshot) -> RouteSnapshot:
    m: Mapping[str, Any] = r
    if type(m) is RouteDict:
        return m._base
    out = r.copy()
    out.pop("latency_histogram", None)
    out.pop("gateway_latency_histogram", None)
    out.pop("queue_wait_histogram", None)
    return out


def _gc_without_histograms(g: GcExport) -> GcExport:
    gens = []
    for gen in g["generations"]:
        gen = gen.copy()
        gen.pop("histogram", None)
        gens.append(gen)
    return {**g, "generations": gens}


def snapshot_json(snap: Snapshot, histograms: bool = False, before: str = "",
                  after: str = "") -> str:
    """``before``, ``snap`` as compact JSON (``json.dumps`` with ``separators=(",", ":")``),
    ``after``: bucket counts only when asked for, routes already encoded not encoded
    again, the whole joined once."""
    parts = [before, "{"]
    fields: Mapping[str, Any] = snap
    for k, v in fields.items():
        if len(parts) > 2:
            parts.append(",")
        if k == "routes" and type(v) is list:
            parts.append('"routes":[')
            for i, r in enumerate(v):
                if i:
                    parts.append(",")
                parts.append(route_json(r, histograms))
            parts.append("]")
            continue
        if k == "gc" and not histograms:
            v = _gc_without_histograms(v)
        parts.append(encode_basestring_ascii(k) + ":" + to_json(v))
    parts.append("}")
    parts.append(after)
    return "".join(parts)
