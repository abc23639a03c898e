"""The dashboard's pure functions: rates, deltas, events and formatting from
successive snapshots, without a terminal or a socket."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dashboard import fmt
from dashboard.model import (
    History,
    RateWindow,
    Sample,
    Totals,
    events_between,
    most_pressed,
    ordered,
    rate,
    route_views,
    server_views,
    totals,
    waiters,
)
from dashboard.socketpath import ConfigProblem, socket_from_config
from dashboard.widgets import COLUMNS, NARROW, WIDE_WIDTH, narrow_cells, row_cells, summary_text, width_of


def route(name: str = "app", **over: Any) -> dict[str, Any]:
    r = {"name": name, "in_flight": 3, "max_concurrency": 10, "queued": 0, "max_queue": 100,
         "oldest_wait_ms": 0.0, "waiters": [], "requests": 1000,
         "responses": {"2xx": 990, "5xx": 10}, "rejected": {"queue_full": 5, "queue_timeout": 2},
         "cancelled": 3, "upstream_errors": 0, "latency_ms": {"p50": 11.0, "p90": 20.0, "p99": 35.0}}
    r.update(over)
    return r


def snap(t: float = 1000.0, routes: list[dict[str, Any]] | None = None, **over: Any) -> dict[str, Any]:
    s = {"version": "0.1.0", "pid": 42, "uptime_s": t - 900.0, "time": t, "generation": 1,
         "last_reload": None, "connections": 5, "tasks": 9,
         "loop_lag_ms": {"last": 0.5, "max": 4.0},
         "gc": {"collections": [10, 2, 1], "pauses": 13, "pause_ms": {"last": 0.1, "max": 3.0, "total": 20.0}},
         "routes": routes if routes is not None else [route()], "workers": [{"pid": 42}]}
    s.update(over)
    return s


def sample(t: float = 1000.0, **kw: Any) -> Sample:
    return Sample(snap(t, **kw), received=t)


# ----------------------------------------------------------------------------- rates
def test_rate_is_the_increase_per_second_and_blank_when_unknown_or_backwards() -> None:
    assert rate(150.0, 100.0, 2.0) == 25.0
    assert rate(100.0, 100.0, 1.0) == 0.0
    assert rate(90.0, 100.0, 1.0) is None  # a counter went backwards: a restart, not a rate
    assert rate(None, 100.0, 1.0) is None
    assert rate(100.0, None, 1.0) is None
    assert rate(100.0, 50.0, None) is None


def test_route_views_rates_against_an_earlier_sample() -> None:
    a = sample(1000.0, routes=[route(requests=1000, rejected={"queue_full": 5, "queue_timeout": 2},
                                     upstream_errors=1)])
    b = sample(1002.0, routes=[route(requests=1400, rejected={"queue_full": 9, "queue_timeout": 2},
                                     upstream_errors=5)])
    [v] = route_views(b, a)
    assert v.name == "app"
    assert v.rps == 200.0
    assert v.rejected_rps == 2.0
    assert v.error_rps == 2.0
    assert (v.in_flight, v.max_concurrency, v.p50, v.p99) == (3, 10, 11.0, 35.0)
    assert (v.queue_full, v.queue_timeout) == (9, 2)


def test_route_views_without_a_base_or_across_a_restart_have_no_rates() -> None:
    a = sample(1000.0)
    [v] = route_views(a, None)
    assert v.rps is None and v.rejected_rps is None
    restarted = Sample(snap(1001.0, pid=43, uptime_s=0.5, routes=[route(requests=10)]), 1001.0)
    [v] = route_views(restarted, a)
    assert v.rps is None
    # same pid (a container's pid 1) but uptime went backwards: also a restart
    again = Sample(snap(1002.0, uptime_s=0.2, routes=[route(requests=5)]), 1002.0)
    [v] = route_views(again, a)
    assert v.rps is None


def test_unknown_fields_are_ignored_and_missing_or_mistyped_ones_are_blank() -> None:
    odd = {"name": "odd", "in_flight": "three", "max_concurrency": True, "requests": float("nan"),
           "latency_ms": [1, 2], "rejected": None, "brand_new_field": {"x": 1}}
    s = Sample({"routes": [odd, {"no": "name"}, "junk", route("ok")], "surprise": 1}, 1.0)
    views = route_views(s, Sample({"routes": "not a list"}, 0.0))
    assert [v.name for v in views] == ["odd", "ok"]
    v = views[0]
    assert (v.in_flight, v.max_concurrency, v.p50, v.queue_full, v.rps) == (None, None, None, None, None)
    cells = row_cells(v)
    assert len(cells) == len(COLUMNS)
    assert [c[0] for c in cells][2:] == [""] * (len(COLUMNS) - 2)
    # the header copes with an empty snapshot and one of the wrong shapes
    assert "?" in summary_text(Sample({}, 0.0)).plain
    assert summary_text(Sample({"gc": 5, "loop_lag_ms": "x", "last_reload": 3}, 0.0)).plain


def test_totals_sum_routes_present_in_both_samples() -> None:
    a = sample(1000.0, routes=[route("a", requests=100, queued=1), route("b", requests=50, queued=0)])
    b = sample(1001.0, routes=[route("a", requests=300, queued=4), route("b", requests=60, queued=2),
                               route("new", requests=9999, queued=1)],
               gc={"pause_ms": {"total": 23.5}})
    t = totals(b, a)
    assert t.rps == 210.0  # "new" was added by a reload: its count has no earlier value
    assert t.queued == 7
    assert t.loop_lag_ms == 0.5
    assert t.gc_ms_per_s == 3.5
    assert totals(b, None).rps is None


def test_rate_window_base_is_about_a_second_old_and_forgets_another_process() -> None:
    w = RateWindow(1.0)
    for i in range(9):  # 4 a second
        w.push(sample(1000.0 + i * 0.25))
    base = w.base()
    assert base is not None and base.snap["time"] == 1001.0  # newest at least 1 s before 1002.0
    w.push(Sample(snap(1002.25, pid=99, uptime_s=0.1), 1002.25))
    assert w.base() is None


def test_history_keeps_the_last_n_values_and_draws_a_blank_as_the_previous_value() -> None:
    h = History(3)
    for rps in (1.0, 2.0, None, 4.0):
        h.add(Totals(rps, 0.0, None, None))
    assert h.values("rps") == [2.0, 2.0, 4.0]
    assert h.values("loop_lag_ms") == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- events
def test_events_reload_ok_with_its_changes_and_a_failed_reload() -> None:
    a = sample(1000.0)
    ok = sample(1001.0, generation=2,
                last_reload={"ok": True, "time": 1000.5, "error": None, "changes": ["route app: max_queue 100 -> 50"]},
                routes=[route(max_queue=50)])
    [e] = events_between(a, ok)
    assert e.level == "info" and e.time == 1000.5
    assert e.text == "reload ok, generation 2: route app: max_queue 100 -> 50"
    bad = copy.deepcopy(ok.snap)
    bad.update(time=1002.0, last_reload={"ok": False, "time": 1001.5, "error": "config.toml:3: nope", "changes": []})
    [e] = events_between(ok, Sample(bad, 1002.0))
    assert e.level == "error" and "FAILED" in e.text and "config.toml:3: nope" in e.text
    assert events_between(ok, Sample(copy.deepcopy(ok.snap), 1001.1)) == []


def test_events_limit_changes_restart_and_a_reload_that_ends_set_limit() -> None:
    a = sample(1000.0)
    b = sample(1000.25, routes=[route(max_concurrency=11)])
    [e] = events_between(a, b)
    assert e.text == "limit app: max_concurrency 10 -> 11"
    reloaded = sample(1000.5, routes=[route(max_concurrency=10)], generation=2,
                      last_reload={"ok": True, "time": 1000.4, "changes": []})
    texts = [e.text for e in events_between(b, reloaded)]
    assert texts == ["reload ok, generation 2: no changes",
                     "limit app: max_concurrency 11 -> 10 (set_limit ended by the reload)"]
    restarted = Sample(snap(1003.0, pid=77, uptime_s=1.0), 1003.0)
    [e] = events_between(b, restarted)
    assert e.level == "warning" and e.text == "gatewayd restarted (pid 77)"
    assert events_between(None, a) == []


# ----------------------------------------------------------------------------- order and formatting
def test_ordered_names_alphabetically_figures_largest_first_blanks_last() -> None:
    a = sample(1000.0, routes=[route("b", requests=0), route("a", requests=0), route("c", requests=0),
                               route("x", requests="?")])
    b = sample(1001.0, routes=[route("b", requests=10), route("a", requests=30), route("c", requests=20),
                               route("x", requests="?")])
    views = route_views(b, a)
    assert ordered(views, "name") == ["a", "b", "c", "x"]
    assert ordered(views, "name", reverse=True) == ["x", "c", "b", "a"]
    assert ordered(views, "rps") == ["a", "c", "b", "x"]
    assert ordered(views, "rps", reverse=True) == ["b", "c", "a", "x"]
    assert ordered(views, "no such column") == ["a", "b", "c", "x"]


def test_waiters_oldest_first_and_junk_dropped() -> None:
    items = [{"wait_ms": 5.0, "path": "/b"}, "junk", {"wait_ms": 50.0, "path": "/a"}, {"path": "/c"}]
    assert [w["path"] for w in waiters(items)] == ["/a", "/b", "/c"]
    assert waiters(None) == []


@pytest.mark.parametrize(("fn", "value", "text"), [
    (fmt.ms, 0.4231, "0.42ms"), (fmt.ms, 12.34, "12.3ms"), (fmt.ms, 340.0, "340ms"), (fmt.ms, 2100.0, "2.10s"),
    (fmt.ms, None, ""), (fmt.age, 0.0, "-"), (fmt.age, 1500.0, "1.50s"),
    (fmt.count, 12345.0, "12345"), (fmt.count, 1234567.0, "1235k"), (fmt.count, None, ""),
    (fmt.per_second, 0.0, "0"), (fmt.per_second, 3.25, "3.2"), (fmt.per_second, 1234.4, "1234"),
    (fmt.duration, 45.0, "45s"), (fmt.duration, 303.0, "5m03s"), (fmt.duration, 3720.0, "1h02m"),
    (fmt.duration, 273600.0, "3d04h"), (fmt.size, 45293568.0, "43.2 MiB"),
])
def test_formatting(fn: Any, value: Any, text: str) -> None:
    assert fn(value) == text


def test_bar_ratio_and_one_line() -> None:
    assert fmt.bar(5, 10, 4) == "██  "
    assert fmt.bar(1, 1000, 4) == "▏   "  # one request in flight is never drawn as nothing
    assert fmt.bar(20, 10, 4) == "████"
    assert fmt.bar(None, 10, 3) == "   "
    assert fmt.ratio(3, 100) == "3/100"
    assert fmt.ratio(None, 100) == "/100"
    assert fmt.one_line("first\nsecond", 20) == "first…"
    assert fmt.one_line("x" * 30, 10) == "x" * 9 + "…"


# ----------------------------------------------------------------------------- socket path
def test_socket_path_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "gw.toml"
    cfg.parent.mkdir()
    cfg.write_text('[control]\nsocket = "run/gw.sock"\n')
    assert socket_from_config(cfg) == tmp_path / "etc" / "run" / "gw.sock"
    cfg.write_text('[control]\nsocket = "/var/run/gatewayd.sock"\n')
    assert socket_from_config(cfg) == Path("/var/run/gatewayd.sock")
    cfg.write_text('[server]\nlisten = ["127.0.0.1:1"]\n')
    assert socket_from_config(cfg) == tmp_path / "etc" / "gatewayd.sock"
    for text, expected in (("[control]\nsocket = 5\n", "control.socket: expected a path string"),
                           ("[control\n", "gw.toml"), ("control = 1\n", "control: expected a table")):
        cfg.write_text(text)
        with pytest.raises(ConfigProblem, match=expected):
            socket_from_config(cfg)
    with pytest.raises(ConfigProblem, match="No such file"):
        socket_from_config(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------- issue 19
def test_served_and_shed_rates_from_served_and_gateway_answers() -> None:
    """A gatewayd that counts both: served/s from ``served``, shed/s from
    ``gateway_answers`` (sheds, refusals, errors), whatever the other counters say."""
    a = sample(1000.0, routes=[route(served=100, gateway_answers=50)])
    b = sample(1002.0, routes=[route(served=110, gateway_answers=850, requests=5000)])
    [v] = route_views(b, a)
    assert (v.served_rps, v.shed_rps) == (5.0, 400.0)


def test_served_and_shed_rates_fall_back_on_responses_and_rejected() -> None:
    """An older gatewayd: served = responses less the 503s in ``rejected`` (every
    reason), shed = those 503s; without responses, the requests less the 503s."""
    a = sample(1000.0, routes=[route(responses={"2xx": 100, "5xx": 7}, rejected={"queue_full": 5, "queue_timeout": 2})])
    b = sample(1002.0, routes=[route(responses={"2xx": 110, "5xx": 807},
                                     rejected={"queue_full": 605, "queue_timeout": 102, "overloaded": 100})])
    [v] = route_views(b, a)
    assert (v.served_rps, v.shed_rps) == (5.0, 400.0)
    a = sample(1000.0, routes=[route(responses=None, requests=100, rejected={"queue_full": 0})])
    b = sample(1001.0, routes=[route(responses=None, requests=130, rejected={"queue_full": 20})])
    [v] = route_views(b, a)
    assert (v.served_rps, v.shed_rps) == (10.0, 20.0)


def test_most_pressed_is_the_deepest_queue_then_the_oldest_waiter_and_keeps_ties() -> None:
    views = route_views(sample(routes=[route("a", queued=3, oldest_wait_ms=10.0),
                                       route("b", queued=3, oldest_wait_ms=900.0),
                                       route("c", queued=1, oldest_wait_ms=5000.0)]), None)
    assert most_pressed(views) == "b"
    views = route_views(sample(routes=[route("a", queued=3, oldest_wait_ms=10.0),
                                       route("b", queued=3, oldest_wait_ms=10.0)]), None)
    assert most_pressed(views) == "a" and most_pressed(views, current="b") == "b"
    assert most_pressed(route_views(sample(routes=[route("a"), route("b")]), None)) is None


def test_servers_and_their_state_changes_become_events() -> None:
    def ups(state: str) -> list[dict[str, Any]]:
        return [{"name": "app", "servers": [
            {"url": "http://10.0.0.1:80", "state": "up", "in_flight": 1, "failures": 0},
            {"url": "http://10.0.0.2:80", "state": state, "failures": 3, "last_error": "upstream_connect"}]},
            {"name": "odd", "servers": "x"}, 7]

    a, b = sample(1000.0, upstreams=ups("up")), sample(1001.0, upstreams=ups("ejected"))
    assert [(s.upstream, s.url, s.state, s.healthy) for s in server_views(b)] == [
        ("app", "http://10.0.0.1:80", "up", True), ("app", "http://10.0.0.2:80", "ejected", False)]
    [e] = events_between(a, b)
    assert (e.level, e.text) == ("warning", "upstream app: http://10.0.0.2:80 up -> ejected (upstream_connect)")
    assert events_between(b, sample(1002.0, upstreams=ups("up")))[0].level == "info"
    assert "servers 1/2 up" in summary_text(b).plain and "servers" not in summary_text(sample()).plain


def test_narrow_layout_fits_80_columns_with_every_incident_figure() -> None:
    """80 columns less the table's border (2) and scroll bar (1); the wide one needs more."""
    assert width_of(NARROW) <= 77 < WIDE_WIDTH
    keys = [c.key for c in NARROW]
    for key in ("in_flight", "queued", "served_rps", "shed_rps", "p50", "p99", "cancelled", "upstream_errors"):
        assert key in keys
    a = sample(1000.0, routes=[route(in_flight=100, max_concurrency=100, queued=200, max_queue=200)])
    b = sample(1001.0, routes=[route(in_flight=100, max_concurrency=100, queued=200, max_queue=200,
                                     responses={"2xx": 1990, "5xx": 20010}, rejected={"queue_full": 20005},
                                     cancelled=12345, upstream_errors=99999)])
    cells = narrow_cells(route_views(b, a)[0])
    for (text, _), col in zip(cells, NARROW, strict=True):
        assert len(text) <= col.width, (col.key, text)
    assert [t for t, _ in cells][1:] == ["100/100", "200/200", "1002", "19998", "11.0ms", "35.0ms", "12345", "99999"]
