"""Small pure parts of the engine: addresses, recipient lists, config, retry policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastsend import _accel, recipients
from fastsend.address import AddressError, normalize, py_normalize
from fastsend.config import ConfigError, RetryConfig, from_dict
from fastsend.retry import next_attempt, retry_hint


@pytest.mark.parametrize(
    "addr,expected",
    [
        ("a@example.com", ("a@example.com", "example.com")),
        ("Ann.Lee@Example.COM", ("Ann.Lee@example.com", "example.com")),
        ("jö@bücher.de", ("jö@xn--bcher-kva.de", "xn--bcher-kva.de")),
        ('"x y"@example.com', ('"x y"@example.com', "example.com")),
    ],
)
def test_good_addresses(addr: str, expected: tuple[str, str]) -> None:
    assert normalize(addr) == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "plain",
        "a@b",
        "a b@example.com",
        "a@-x.example",
        "a\r\n@example.com",
        "a@example.com\r\nRCPT TO:<x@y.z>",
        "@example.com",
        "a@",
        "<a@example.com>",
        "x" * 65 + "@a.com",
        # reads backwards / hides text in every client (the attachment-name trick)
        "gpj.exe\u202e@example.com",
        "a\u2066b@example.com",
        "a\u200bb@example.com",
        "a\u0085b@example.com",
        "a\ufeffb@example.com",
    ],
)
def test_bad_addresses(addr: str) -> None:
    with pytest.raises(AddressError):
        normalize(addr)


def test_addresses_in_scripts_that_need_joiners_or_rtl_stay() -> None:
    for addr in ("\u0645\u062d\u0645\u062f@example.com", "a\u200db@example.com", "jos\u00e9@example.com"):
        assert normalize(addr)[0] == addr


_ADDRESS_PARTS = st.sampled_from(
    [*"ab.@-+!#'`{}~_Z9 \"\\é\r\n\x00\u202e", "x" * 40, "example.org", "@", "..", "bücher.de", "[1.2.3.4]",
     "Ex-Ample.ORG", "a-.b", "x" * 64, "a@b.c", "ÿ"]
)  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(addr=st.one_of(st.lists(_ADDRESS_PARTS, max_size=12).map("".join), st.emails(), st.text()))
@example("a@b")
@example("." + "a@b.example")
@example("a.@b.example")
@example("a..b@c.example")
@example("x" * 64 + "@" + "d" * 63 + ".example")
@example("x" * 65 + "@d.example")
@example("x" * 60 + "@" + ".".join(["d" * 60] * 3) + ".ex")
@example("A@Bücher.DE")
@example("x" * 64 + "@" + ".".join(["d" * 62] * 3) + ".e")
def test_compiled_normalize_is_its_reference_twin(addr: str) -> None:
    """fastsend._core.normalize gives the reference's answer for every string:
    the same (address, domain) or the same AddressError text."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")

    def run(fn: object) -> object:
        try:
            return fn(addr)  # type: ignore[operator]
        except AddressError as e:
            return ("AddressError", str(e))

    assert run(_accel.compiled("normalize")) == run(py_normalize)


def test_csv_rows_with_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text(
        "email,name\na@example.com,Ann\nbad-address,Bob\n\nc@example.com,Cy\nd@example.com\n"
    )
    out = list(recipients.read(str(p)))
    good = [r for r in out if not isinstance(r, recipients.BadRow)]
    bad = [r for r in out if isinstance(r, recipients.BadRow)]
    assert [g[1] for g in good] == ["a@example.com", "c@example.com"]
    assert orjson.loads(good[0][3]) == {"name": "Ann"}
    assert [b.line for b in bad] == [3, 6]
    assert "missing @" in bad[0].error
    assert recipients.columns(str(p)) == {"email", "name"}


@pytest.mark.parametrize(
    "header",
    [
        ["name", "email", "plan"],  # the usual list: a field type per header
        ["email"],  # no variables at all
        ['say "hi"', "email", "back\\slash", "é ü", ""],  # names msgspec cannot rename to
    ],
)
def test_csv_vars_are_the_json_of_the_row_dict(tmp_path: Path, header: list[str]) -> None:
    """Whatever the header, a row's vars are byte for byte the JSON of the dict
    of its variables (what the worker renders from), values escaped as JSON."""
    import csv

    values = ['Ann "A" \\ é', "\u2028line\nbreak", "", "\U0001f600", "<b>&"]
    p = tmp_path / "r.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k in range(len(values)):
            w.writerow(["x@example.com" if h == "email" else values[(k + j) % 5]
                        for j, h in enumerate(header)])  # fmt: skip
    out = list(recipients.read(str(p)))
    assert len(out) == len(values)
    ei = header.index("email")
    names = header[:ei] + header[ei + 1 :]
    for k, row in enumerate(out):
        assert not isinstance(row, recipients.BadRow)
        vals = [values[(k + j) % 5] for j, h in enumerate(header) if h != "email"]
        # (an unnamed column, a spreadsheet's empty one, is no variable)
        assert row[3] == orjson.dumps({n: v for n, v in zip(names, vals, strict=True) if n})


def test_csv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """One name, two values: which is meant? (It was last-wins, as in a dict.)"""
    p = tmp_path / "r.csv"
    p.write_text("a,email,a\nx,x@example.com,y\n")
    with pytest.raises(recipients.RecipientsError, match=r"line 1: .*'a' twice"):
        list(recipients.read(str(p)))


def test_jsonl_rows(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text('{"email": "a@example.com", "n": 3, "tags": ["x"]}\nnot json\n[1]\n')
    out = list(recipients.read(str(p)))
    assert orjson.loads(out[0][3]) == {"n": "3", "tags": '["x"]'}  # type: ignore[index]
    assert isinstance(out[1], recipients.BadRow) and out[1].line == 2
    assert isinstance(out[2], recipients.BadRow) and out[2].line == 3


def test_csv_without_email_column(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("mail,name\na@example.com,Ann\n")
    with pytest.raises(recipients.RecipientsError, match="email"):
        list(recipients.read(str(p)))
    with pytest.raises(recipients.RecipientsError, match="not found"):
        list(recipients.read(str(tmp_path / "missing.csv")))


def test_config_parsing_and_errors() -> None:
    cfg = from_dict(
        {
            "routes": {"*": "127.0.0.1:2525", "Example.ORG": "relay.example.net:587"},
            "ips": {"source": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]},
            "workers": {"count": 2},
            "delivery": {"batch_size": 10, "idle_timeout": 1},
            "retry": {"min_backoff": 1, "max_backoff": 4, "max_age": 10},
        }
    )
    assert str(cfg.route_for("sub.example.org")) == "relay.example.net:587"
    assert str(cfg.route_for("other.test")) == "127.0.0.1:2525"
    assert cfg.ips_for_worker(0) == ["127.0.0.2", "127.0.0.4"]
    assert cfg.ips_for_worker(1) == ["127.0.0.3"]
    assert cfg.delivery.idle_timeout == 1.0
    for bad in (
        {"delivery": {"batch_sise": 1}},
        {"delivery": {"batch_size": "x"}},
        {"ips": {"source": ["not-an-ip"]}},
        {"routes": {"*": "host:99999"}},
        {"delivery": {"tls": "sometimes"}},
        {"ips": {"helo": "bad helo name"}},
    ):
        with pytest.raises(ConfigError):
            from_dict(bad)
    # A misspelt or unknown section is an error naming it, not a silent no-op.
    with pytest.raises(ConfigError, match=r"unknown section \[submision\]"):
        from_dict({"submision": {"listen": "127.0.0.1:587"}})
    # A setting that cannot apply is a warning naming it, never silence.
    routed = from_dict(
        {
            "routes": {"*": "relay.example.net:2525"},
            "shaping": {"domain": {"gmail.com": {"max_connections": 2},
                                   "relay.example.net": {"max_connections": 4}}},
        }
    )  # fmt: skip
    assert len(routed.warnings) == 1
    assert '[shaping.domain."gmail.com"] does not apply' in routed.warnings[0]
    assert "relay.example.net:2525" in routed.warnings[0]
    assert from_dict({"shaping": {"domain": {"gmail.com": {"max_connections": 2}}}}).warnings == []


def test_retry_backoff_doubles_caps_and_expires() -> None:
    p = RetryConfig(min_backoff=300, max_backoff=4000, max_age=5 * 86400, jitter=0)
    assert next_attempt(p, 1, 1000.0, 1000.0) == 1300.0
    assert next_attempt(p, 2, 1000.0, 1000.0) == 1600.0
    assert next_attempt(p, 10, 1000.0, 1000.0) == 5000.0  # capped at 4000 s
    assert next_attempt(p, 3, 1000.0 + 5 * 86400, 1000.0) is None  # past max age
    pj = RetryConfig(min_backoff=100, max_backoff=1000, max_age=1e9, jitter=0.2)
    delays = {next_attempt(pj, 1, 0.0, 0.0) for _ in range(50)}
    assert all(d is not None and 80 <= d <= 120 for d in delays) and len(delays) > 1


@pytest.mark.parametrize(
    ("text", "wait"),
    [
        ("451 4.7.1 Greylisting in action, please come back in 00:05:00", 300.0),  # milter-greylist
        ("450 4.7.1 Greylisted for 300 seconds", 300.0),
        ("451 4.3.2 Please try again in 30 minutes", 1800.0),
        ("421 4.7.0 retry after 900 seconds", 900.0),
        ("451 4.7.1 Too many messages, wait 60s", 60.0),
        ("421 4.7.0 Try again in 2 hours", 7200.0),
        ("421 4.7.0 Try again later, closing connection.", 0.0),  # (Gmail: no wait named)
        ("421 4.7.0 too many connections (try 2 times)", 0.0),
        ("452 4.2.2 Mailbox full, 500ms", 0.0),
        ("", 0.0),
    ],
)
def test_retry_hints_in_deferral_texts(text: str, wait: float) -> None:
    assert retry_hint(text) == wait


def test_a_deferral_naming_a_wait_is_not_retried_before_it(tmp_path: Path) -> None:
    """A receiver's "try again in 2 hours" (a real sink's 451): the message's next
    attempt is not before it, whatever the schedule says (min_backoff 1 s here);
    a plain 451 keeps the schedule. A wait is held to max_backoff (a text must
    not hold mail for days), and never brings a retry forward."""
    from tests._engine_helpers import run_fastsend, write_campaign, write_recipients

    from fastsend.sink import SinkProcess

    p = RetryConfig(min_backoff=300, max_backoff=4000, max_age=5 * 86400, jitter=0)
    assert next_attempt(p, 1, 1000.0, 1000.0, hint=1800.0) == 2800.0
    assert next_attempt(p, 1, 1000.0, 1000.0, hint=60.0) == 1300.0  # (never earlier)
    assert next_attempt(p, 1, 1000.0, 1000.0, hint=10 * 86400.0) == 5000.0  # max_backoff
    camp = write_campaign(tmp_path)
    lst = write_recipients(tmp_path, ["tempfail-a@x.example", "defer1-b@x.example"])
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text("[retry]\nmin_backoff = 1\nmax_backoff = 10800\njitter = 0\n")
    from tests.conftest import free_port

    port = free_port()
    with SinkProcess("--fault-text", 'tempfail="451 4.7.1 Greylisted, please try again in 2 hours"',
                     listen=f"127.0.0.1:{port}"):  # fmt: skip
        proc = run_fastsend("send", str(camp), "-r", str(lst), "-c", str(cfg), "--route",
                            f"*=127.0.0.1:{port}", "--spool", str(tmp_path / "spool"), "--json",
                            "--no-dkim", "--no-progress", "--max-wait", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    evs = [orjson.loads(x) for x in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()]
    first = {e["rcpt"]: e for e in evs if e["event"] == "deferred" and e["attempt"] == 1}
    hinted = first["tempfail-a@x.example"]
    assert "try again in 2 hours" in hinted["text"], hinted
    assert hinted["next_attempt"] - hinted["time"] >= 7200 - 1, hinted
    plain = first["defer1-b@x.example"]
    assert plain["next_attempt"] - plain["time"] < 60, plain


def test_event_log_isolates_a_raising_listener(tmp_path: Path) -> None:
    from fastsend.events import EventLog

    log = EventLog(str(tmp_path / "events.jsonl"))
    seen: list[dict[str, object]] = []

    def broken(events: list[dict[str, object]]) -> None:
        raise RuntimeError("boom")

    log.listeners.extend([broken, seen.extend])
    log.emit({"event": "delivered", "id": 1})
    log.emit_many([{"event": "bounced", "id": 2}])
    log.close()
    assert [e["id"] for e in seen] == [1, 2]  # the listener after the broken one saw both
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) == 2


def test_compiled_dispatch_twins_write_the_same_records() -> None:
    """fastsend._core.batch_record writes msgspec's bytes of the Batch (every
    int, str and bin size class, blobs), decodable as the worker decodes it;
    blob_digests and group_claims find and group as their references."""
    import random

    from fastsend import wire
    from fastsend.queue import dispatch
    from fastsend.spool import Claimed

    rng = random.Random(5)
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]  # fmt: skip
    strs = ["", "a", "é" * 40, "x" * 31, "x" * 32, "y" * 255, "y" * 256, "z" * 65536, "日本"]
    bins = [b"", b"{}", b"x" * 255, b"x" * 256, b"q" * 65536, wire.blob_ref("a" * 64)]
    rec, dig, grp = (_accel.compiled(n) for n in ("batch_record", "blob_digests", "group_claims"))
    for _ in range(200):
        items = [Claimed(rng.choice(ints), rng.randint(1, 3), rng.choice(strs), rng.choice("ab"),
                         rng.choice(bins), rng.choice(ints), 1.0)
                 for _ in range(rng.choice([0, 1, 15, 16, 300]))]  # fmt: skip
        camp, dom = rng.choice(ints), rng.choice(strs)
        blobs = {} if rng.random() < 0.5 else {"a" * 64: b"body"}
        want = dispatch.py_batch_record(camp, dom, items, blobs)
        assert rec(camp, dom, items, blobs) == want
        got = wire.to_worker_decoder.decode(want)
        assert isinstance(got, wire.Batch) and [i.id for i in got.items] == [c.id for c in items]
        assert dig(items) == dispatch.py_blob_digests(items)
        out = [({}, {}), ({}, {})]
        for fn, (inflight, groups) in zip((dispatch.py_group_claims, grp), out, strict=True):
            fn(items, inflight, groups)
        assert out[0] == out[1]
    with pytest.raises(OverflowError):
        rec(1, "d", [Claimed(2**70, 1, "r", "d", b"", 0, 1.0)], {})


def test_the_loops_wake_waits_until_set_or_the_timeout() -> None:
    """Supervisor.wake: a wait returns at once when it is set, when it is set
    meanwhile (from another task), or after its timeout; clear() makes the
    next wait wait; a cancelled wait leaves no waiter behind."""
    import asyncio
    import time

    from fastsend.queue.state import Wake

    async def main() -> None:
        w = Wake()
        t0 = time.monotonic()
        await w.wait(0.05)  # not set: the timeout
        assert 0.04 <= time.monotonic() - t0 < 1.0 and not w.is_set()
        w.set()
        t0 = time.monotonic()
        await w.wait(5.0)  # set: at once
        assert time.monotonic() - t0 < 0.5 and w.is_set()
        w.clear()
        assert not w.is_set()
        asyncio.get_running_loop().call_later(0.02, w.set)
        t0 = time.monotonic()
        await w.wait(5.0)  # set while waiting
        assert time.monotonic() - t0 < 1.0 and w.is_set()
        w.clear()
        task = asyncio.ensure_future(w.wait(5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        w.set()  # no waiter left to settle
        await w.wait(5.0)

    asyncio.run(main())


def test_compiled_delivered_runs_is_its_reference_twin() -> None:
    """fastsend._core.delivered_runs (the SQLite spool's write of a flush's
    deliveries) gives the same UPDATE parameters (runs of consecutive ids per
    (attempts, code, enhanced), groups in first-seen order) and the same other
    outcomes, in order, as the reference, for ids in any order."""
    import random

    from fastsend.spool import BOUNCED, DEFERRED, DELIVERED, Result
    from fastsend.spool import sqlite as sq

    twin = _accel.compiled("delivered_runs")
    rng = random.Random(11)
    for t in range(300):
        n = rng.choice([0, 1, 2, 5, 60, 1000])
        ids = rng.sample(range(1, 4000), n) if t % 3 else list(range(100, 100 + n))
        if t % 2:
            rng.shuffle(ids)
        res = [Result(i, rng.choice([DELIVERED] * 8 + [DEFERRED, BOUNCED]),
                      rng.choice([1, 1, 1, 2, 300]), 0.0, rng.choice([250] * 5 + [251, 2**70]),
                      rng.choice(["2.0.0"] * 5 + ["", "2.1.5"]), "x")
               for i in ids]  # fmt: skip
        want = sq.py_delivered_runs(res, 5.0, DELIVERED)
        got = twin(iter(res) if t % 4 == 1 else res, 5.0, DELIVERED)
        assert got == want
        assert all(a is b for a, b in zip(got[1], want[1], strict=True))
    runs, rest = twin([Result(i, DELIVERED, 1, 0.0, 250, "2.0.0") for i in (7, 3, 4, 5, 9)], 1.0,
                      DELIVERED)  # fmt: skip
    assert runs == [(1, 1.0, 250, "2.0.0", 3, 5), (1, 1.0, 250, "2.0.0", 7, 7),
                    (1, 1.0, 250, "2.0.0", 9, 9)] and rest == []  # fmt: skip


def test_compiled_insert_params_is_its_reference_twin() -> None:
    """fastsend._core.insert_params appends what a multi-row INSERT binds
    (rcpt, domain, vars as text when they are UTF-8 bytes, else as given; the
    row's state in a mixed chunk) exactly as the reference, for any cut of
    the rows; a row that is not (rcpt, domain, vars) raises in both."""
    from fastsend.spool import sqlite as sq

    twin = _accel.compiled("insert_params")
    rows: list[Any] = [("a@b.example", "b.example", b'{"name":"\xc3\xa9"}'),
                       ["c@d.example", "d.example", b"\xff\xfe"], ("e@f", "f", "text"),
                       ("g@h", "h", bytearray(b"{}")), ("i@j", "j", b"")]  # fmt: skip
    states = [1, 0, 5, 0, 0]
    for at, end in ((0, 5), (1, 3), (2, 2), (0, 1), (4, 5)):
        for cut_states in (None, states):
            got: list[Any] = ["head"]
            want: list[Any] = ["head"]
            sq.py_insert_params(want, rows, at, end, cut_states)
            twin(got, rows, at, end, cut_states)
            assert got == want and list(map(type, got)) == list(map(type, want))
    for fn in (sq.py_insert_params, twin):
        with pytest.raises(ValueError):
            fn([], [("a@b", "b")], 0, 1, None)


def test_compiled_row_writer_is_its_reference_twin(tmp_path: Path) -> None:
    """fastsend._core.RowWriter (rows bound on the spool connection's own SQLite
    handle) writes the same rows, ids, states and stored types as the
    reference's multi-row INSERTs, for parts that cross the statement sizes,
    with and without rows of their own state; both return the first id that
    differs from the expected ones, raise on a bad row, refuse a closed
    connection, and the compiled one refuses a connection to another file."""
    import sqlite3

    from fastsend.spool import sqlite as sq

    twin = _accel.compiled("RowWriter")
    vars_: list[Any] = [b'{"name":"\xc3\xa9"}', b"\xff\xfe", "text", bytearray(b"{}"), b"", 7]
    rows: list[Any] = [(f"u{i}@d{i % 3}.example", f"d{i % 3}.example", vars_[i % 6])
                       for i in range(700)]  # fmt: skip
    rows[3] = list(rows[3])
    dumps = {}
    for name, cls in (("ref", sq.PyRowWriter), ("twin", twin)):
        path = str(tmp_path / f"{name}.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.executescript(sq.SCHEMA)
        w = cls(db, path, sq._insert_sql)
        got = []
        first = 1
        for at, end, state, own in ((0, 300, 1, None), (300, 301, 0, None), (301, 301, 0, None),
                                    (301, 700, 0, {301, 360, 557, 558, 699})):  # fmt: skip
            states = None
            if own is not None:
                states = [state] * len(rows)
                for i in own:
                    states[i] = 5
            got.append(w.insert(first, 9, 1.5, rows, at, end, state, states))
        got.append(w.insert(first, 9, 2.5, rows, 0, 3, 0, None))  # ids taken: 701, not 1
        for bad in ([("a@b", "b")], [("a@b", "b", b"{}", 1)]):
            with pytest.raises(ValueError):
                w.insert(704, 9, 1.0, bad, 0, 1, 0, None)
        dumps[name] = (got, db.execute(
            "SELECT id, campaign, rcpt, domain, vars, typeof(vars), state, created, next_at,"
            " updated FROM messages ORDER BY id").fetchall())  # fmt: skip
        w.close()
        w = cls(db, path, sq._insert_sql)
        db.close()
        with pytest.raises(sqlite3.ProgrammingError):
            w.insert(1, 9, 1.0, rows, 0, 1, 0, None)
    assert dumps["twin"] == dumps["ref"]
    got, table = dumps["ref"]
    assert got == [300, 301, 301, 700, 702] and len(table) == 702  # 701-702: a chunk of 2
    assert [r[6] for r in table if r[6] == 5] == [5] * 5 and table[2][4:6] == (b"text", "blob")
    other = sqlite3.connect(str(tmp_path / "other.db"), isolation_level=None)
    with pytest.raises(ImportError):
        twin(other, str(tmp_path / "ref.db"), sq._insert_sql)
    other.close()


def test_compiled_apply_delivered_is_its_reference_twin() -> None:
    """fastsend._core.apply_delivered takes the same claims, makes the same
    Results, counts, events and hook calls as the reference, stops at the same
    outcome (not a delivery) and skips answers whose claim is gone."""
    from fastsend import wire
    from fastsend.queue import outcomes
    from fastsend.spool import DELIVERED, Claimed, Result

    def run(fn: Any, events: bool, raising: bool) -> Any:
        inflight = {i: Claimed(i, i % 3, f"u{i}@x.example", "x.example", b"{}", i % 2, 1.0)
                    for i in range(0, 60) if i % 11 != 5}  # fmt: skip
        items = [wire.Res(i, wire.K_DEFERRED if i % 13 == 12 else wire.K_DELIVERED, 250,
                          "2.0.0", f"ok {i}", "mx", "127.0.0.2") for i in range(60)]  # fmt: skip
        seen: list[Any] = []
        failed: list[Any] = []

        def hook(c: Any, r: Any, state: int) -> None:
            seen.append((c.id, r.id, state))
            if raising and c.id % 7 == 0:
                raise RuntimeError("hook bug")

        results: list[Any] = []
        claims: list[Any] | None = [] if events else None
        answers: list[Any] = []
        delivered: dict[int, int] = {}
        counts = [0, 0]
        stops = []
        i = 0
        while True:
            i, c = fn(items, i, inflight.pop, [hook], failed.append, (Result, DELIVERED,
                      wire.K_DELIVERED, wire.Sent, wire.Res), results, claims, answers, delivered, counts)  # fmt: skip
            if c is None:
                break
            stops.append((i, c.id))
            i += 1
        assert all(f is hook for f in failed)
        return results, claims, answers, delivered, counts, stops, seen, len(failed), sorted(inflight)

    for events in (True, False):
        for raising in (True, False):
            want = run(outcomes.py_apply_delivered, events, raising)
            assert run(_accel.compiled("apply_delivered"), events, raising) == want
            assert want[5] and want[4][0] > want[4][1] > 0 and want[0]
