"""The event log's Rows batches (accepted/delivered events in columns): the
compiled line writers against their references, and emit_rows against
emit_many of the same events as dicts (file bytes, order, listeners)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from fastsend import _accel, events, wire
from fastsend.events import AcceptedRows, DeliveredRows, EventLog
from fastsend.spool import Claimed

ODD_TEXT = [
    "user@example.com",
    "",
    'quo"te@example.com',
    "back\\slash@example.com",
    "tab\there",
    "nul\x00and\x1f",
    "del\x7f",
    "ünïcode@exämple.de",
    "日本語@例え.jp",
    "line\u2028sep",
    "emoji 😀 text",
    "a" * 3000,
]
ODD_INTS = [0, 1, -1, 250, 2**31, 2**63 - 1, -(2**63), 2**63, 2**80, -(2**70)]


def claims_results(n: int = 300) -> tuple[list[Claimed], list[wire.Res]]:
    claims, results = [], []
    for i in range(n):
        t = ODD_TEXT[i % len(ODD_TEXT)]
        claims.append(Claimed(ODD_INTS[i % len(ODD_INTS)] + i, i % 7, t, "example.com", b"{}",
                              i % 4, 1.0))  # fmt: skip
        results.append(wire.Res(i, 0, ODD_INTS[(i * 3) % len(ODD_INTS)], ODD_TEXT[(i + 1) % 12],
                                ODD_TEXT[(i + 2) % 12], ODD_TEXT[(i + 5) % 12] if i % 5 else "",
                                "127.0.0.2" if i % 3 else ODD_TEXT[(i + 3) % 12],
                                queue_id="" if i % 2 else ODD_TEXT[(i + 4) % 12]))  # fmt: skip
    return claims, results


def test_compiled_line_writers_are_their_reference_twins() -> None:
    """The same bytes as msgspec's encode_lines of the dicts, odd values included
    (quotes, backslashes, control characters, non-ASCII, ints past 64 bits)."""
    acc_c, del_c = _accel.compiled("accepted_lines"), _accel.compiled("delivered_lines")
    assert acc_c is not events.py_accepted_lines and del_c is not events.py_delivered_lines
    claims, results = claims_results()
    for now in (1_700_000_000.123456, 0.0, 1e21, 17):
        want = events.py_delivered_lines(now, claims, results)
        assert del_c(now, claims, results) == want
        assert want.count(b"\n") == len(claims)
        assert [msgspec.json.decode(x) for x in want.splitlines()] == events.delivered_dicts(
            now, claims, results
        )
        ids = [c.id for c in claims]
        rcpts = [c.rcpt for c in claims]
        for tenant in ("default", 'ten"ant', "ténant"):
            want = events.py_accepted_lines(now, 5, tenant, ids, rcpts)
            assert acc_c(now, 5, tenant, ids, rcpts) == want
        assert del_c(now, [], []) == b"" == acc_c(now, 1, "t", [], [])
    with pytest.raises(ValueError):
        del_c(1.0, claims, results[:-1])
    bad = [Claimed(1, 1, "\udcff@example.com", "example.com", b"{}", 0, 1.0)]
    for fn in (events.py_delivered_lines, del_c):
        with pytest.raises(UnicodeEncodeError):
            fn(1.0, bad, results[:1])


def test_emit_rows_writes_and_tells_as_emit_many(tmp_path: Path) -> None:
    """Dicts and Rows batches interleaved: the file holds the lines emit_many
    writes for the same events as dicts, in the same order; a listener without
    a rows handler gets the dicts, one with a handler the batch."""
    claims, results = claims_results(40)
    d1 = DeliveredRows(1_700_000_000.5)
    d1.claims += claims[:20]
    d1.results += results[:20]
    d2 = DeliveredRows(1_700_000_001.5)
    d2.claims += claims[20:]
    d2.results += results[20:]
    a = AcceptedRows(1_700_000_002.5, 3, "acme", [7, 8], ["a@b.example", "c@d.example"])
    other = {"time": 1.0, "event": "deferred", "id": 99, "text": "4.0.0 later"}
    other2 = dict(other, id=100)
    parts: list[Any] = [d1, other, other2, DeliveredRows(2.0), d2, a]
    flat = [*d1.dicts(), other, other2, *d2.dicts(), *a.dicts()]

    logs = []
    for name, emit in (("rows", "emit_rows"), ("dicts", "emit_many")):
        log = EventLog(str(tmp_path / f"{name}.jsonl"))
        seen: list[dict[str, Any]] = []
        batches: list[Any] = []
        log.listen(seen.extend)
        log.listen(lambda evs: None, rows=batches.append)
        getattr(log, emit)(parts if emit == "emit_rows" else flat)
        log.close()
        logs.append((tmp_path / f"{name}.jsonl").read_bytes())
        assert seen == flat
        if emit == "emit_rows":
            assert batches == [d1, d2, a]  # the empty batch is not told
    assert logs[0] == logs[1] and logs[0].count(b"\n") == len(flat)
    assert {orjson.loads(line)["schema"] for line in logs[0].splitlines()} == {1}
    assert os.path.getsize(tmp_path / "rows.jsonl") > 0


def test_a_failing_rows_handler_is_reported_once(tmp_path: Path, capsys: Any) -> None:
    log = EventLog(None)
    got: list[Any] = []

    def broken(rows: Any) -> None:
        raise RuntimeError("boom")

    log.listen(lambda evs: None, rows=broken)
    log.listen(got.extend)
    a = AcceptedRows(1.0, 1, "t", [1], ["a@b.example"])
    log.emit_rows([a])
    log.emit_rows([a])
    assert got == a.dicts() * 2  # the other listener still sees every batch
    assert capsys.readouterr().err.count("failed (reported once)") == 1


def test_compiled_writers_read_any_object_as_getattr_does() -> None:
    """The compiled loops read struct fields from their slots: a list mixing
    other objects with the same attributes (a namespace, a struct subclass)
    gives what the reference gives through getattr."""
    from types import SimpleNamespace

    from fastsend.analytics import rollup
    from fastsend.queue import dispatch

    class Sub(Claimed):
        pass

    claims, results = claims_results(24)
    mixed_c: list[Any] = []
    mixed_r: list[Any] = []
    for i, (c, r) in enumerate(zip(claims, results, strict=True)):
        if i % 3 == 1:
            c = SimpleNamespace(id=c.id, campaign=c.campaign, rcpt=c.rcpt, domain=c.domain,
                                vars=c.vars, attempts=c.attempts, created=c.created)  # fmt: skip
            r = SimpleNamespace(**{f: getattr(r, f) for f in r.__struct_fields__})
        elif i % 3 == 2:
            c = Sub(c.id, c.campaign, c.rcpt, c.domain, c.vars, c.attempts, c.created)
        mixed_c.append(c)
        mixed_r.append(r)
    now = 1_700_000_000.25
    want = events.py_delivered_lines(now, claims, results)
    assert _accel.compiled("delivered_lines")(now, mixed_c, mixed_r) == want
    accs = []
    for fn in (rollup.py_count_delivered, _accel.compiled("count_delivered")):
        acc: dict[Any, list[int]] = {}
        mem: list[Any] = []
        fn(now, mixed_c, mixed_r, acc, mem, rollup.NC, rollup._DELIVERED)
        accs.append((acc, mem))
    assert accs[0] == accs[1]
    plain = [c for c in mixed_c if not isinstance(c, SimpleNamespace) and abs(c.id) < 2**62]
    assert _accel.compiled("batch_record")(5, "d", plain, {}) == dispatch.py_batch_record(
        5, "d", plain, {}
    )
    for fn in (dispatch.py_group_claims, _accel.compiled("group_claims")):
        inflight: dict[int, Any] = {}
        groups: dict[Any, list[Any]] = {}
        fn(mixed_c, inflight, groups)
        assert inflight == {c.id: c for c in mixed_c}
        assert sum(map(len, groups.values())) == len(mixed_c)
    with pytest.raises(AttributeError):
        _accel.compiled("delivered_lines")(now, [SimpleNamespace(id=1)], results[:1])
