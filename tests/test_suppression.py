"""The suppression list (SQLite and Redis stores): CRUD, normalisation, expiry, import/export, bad input, CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsend.bounce import classify_reply
from fastsend.suppression import (
    GLOBAL_TENANT,
    SuppressionError,
    SuppressionList,
    Suppressions,
    normalize,
    parse_duration,
    suppress_from,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "redis"])
def sl(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Suppressions]:
    """One implementation, two stores: every test runs on SQLite and on Redis."""
    s: Suppressions
    if request.param == "sqlite":
        s = SuppressionList(tmp_path / "suppression.db", clock=clock)
    else:
        import redis

        from fastsend.serve.shared_state import RedisSuppressionList

        server = request.getfixturevalue("redis_server")
        prefix = "sup" + str(time.monotonic_ns())
        s = RedisSuppressionList(
            redis.Redis(host="127.0.0.1", port=server.port), prefix, clock=clock
        )
    yield s
    s.close()


def test_add_contains_remove(sl: Suppressions) -> None:
    e = sl.add("Kiji@Example.COM", "userunknown", source="bounce")
    assert (e.address, e.reason, e.source, e.tenant) == (
        "Kiji@example.com",
        "userunknown",
        "bounce",
        "default",
    )
    assert sl.contains("kiji@example.com")
    assert sl.contains("KIJI@EXAMPLE.COM")
    assert sl.contains("<kiji@example.com>")
    assert not sl.contains("other@example.com")
    assert not sl.contains("kiji@example.com", tenant="t2")
    assert sl.remove("kiji@EXAMPLE.com")
    assert not sl.remove("kiji@example.com")
    assert not sl.contains("kiji@example.com")


def test_tenants_are_separate(sl: Suppressions) -> None:
    sl.add("a@example.com", tenant="t1")
    assert sl.contains("a@example.com", tenant="t1")
    assert not sl.contains("a@example.com")
    assert [e.address for e in sl.list(tenant=None)] == ["a@example.com"]


def test_the_global_list_suppresses_for_every_tenant(sl: Suppressions) -> None:
    """The operator's global list (tenant "*") holds for every tenant, the
    operator's own campaigns too; a tenant's own entry is its reason first;
    removed from the global list, the address is mailed again (where no tenant
    list has it). There was no such list: an address every tenant must stop
    mailing (a legal request, a spam trap) had to be added for each tenant,
    and a tenant configured later mailed it."""
    assert GLOBAL_TENANT == "*"
    sl.add("Trap@Example.com", "spamtrap", tenant=GLOBAL_TENANT)
    sl.add("both@example.com", "unsubscribe", tenant="t1")
    sl.add("both@example.com", "manual", tenant=GLOBAL_TENANT)
    for tenant in ("t1", "t2", "default", "new-tenant"):
        assert sl.contains("trap@example.com", tenant=tenant), tenant
        assert sl.reasons_many(["trap@EXAMPLE.com", "x@example.com"], tenant=tenant) == {
            "trap@EXAMPLE.com": "spamtrap"
        }
    assert sl.reasons_many(["both@example.com"], tenant="t1") == {"both@example.com": "unsubscribe"}
    assert sl.reasons_many(["both@example.com"], tenant="t2") == {"both@example.com": "manual"}
    assert [e.address for e in sl.list(tenant=GLOBAL_TENANT)] == ["both@example.com",
                                                                 "Trap@example.com"]  # fmt: skip
    assert sl.remove("trap@example.com", tenant=GLOBAL_TENANT)
    assert not sl.contains("trap@example.com", tenant="t2")


def test_contains_many(sl: Suppressions) -> None:
    sl.add_many([f"u{i}@example.com" for i in range(0, 2000, 2)], "manual")
    batch = [f"U{i}@Example.com" for i in range(2000)] + ["not an address"]
    hit = sl.contains_many(batch)
    assert len(hit) == 1000
    assert "U0@Example.com" in hit and "U1@Example.com" not in hit
    assert sl.contains_many([]) == set()


def test_expiry(sl: Suppressions, clock: Clock) -> None:
    sl.add("soft@example.com", "mailboxfull", expires_in=parse_duration("30d"))
    sl.add("hard@example.com", "userunknown")
    assert sl.contains("soft@example.com")
    clock.now += 30 * 86400 + 1
    assert not sl.contains("soft@example.com")
    assert sl.contains_many(["soft@example.com", "hard@example.com"]) == {"hard@example.com"}
    assert [e.address for e in sl.list()] == ["hard@example.com"]
    assert len(list(sl.list(include_expired=True))) == 2
    assert sl.purge_expired() == 1
    assert len(sl) == 1


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "a@",
        "@example.com",
        "a b@example.com",
        "a@example",
        "a..b@example.com",
        "a@exa mple.com",
        "a@-example.com",
        "x" * 65 + "@example.com",
        "a\n@example.com",
    ],
)
def test_malformed_address(sl: Suppressions, bad: str) -> None:
    sl.add("keep@example.com")
    with pytest.raises(SuppressionError, match="malformed address"):
        sl.add_many(["ok@example.com", bad])
    # all-or-nothing: nothing from the bad batch, nothing already stored lost
    assert not sl.contains("ok@example.com")
    assert sl.contains("keep@example.com")


def test_bad_reason_and_expiry(sl: Suppressions) -> None:
    with pytest.raises(SuppressionError, match="reason"):
        sl.add("a@example.com", "Not A Reason!")
    with pytest.raises(SuppressionError, match="expires_in"):
        sl.add("a@example.com", expires_in=0)
    for bad in ("", "3x", "-1d", "0"):
        with pytest.raises(SuppressionError, match="duration"):
            parse_duration(bad)
    assert parse_duration("12h") == 43200 and parse_duration("90") == 90


def test_normalize() -> None:
    assert normalize("Kiji@Example.COM.") == ("kiji@example.com", "Kiji@example.com")
    assert normalize("mailto:a@b.example") == ("a@b.example", "a@b.example")


def test_import_export_round_trip(sl: Suppressions, tmp_path: Path, clock: Clock) -> None:
    sl.add("a@example.com", "userunknown", source="bounce")
    sl.add("b@example.com", "mailboxfull", expires_in=3600)
    sl.add("c@example.com", "complaint")
    csv_text = sl.export_csv()
    other = SuppressionList(tmp_path / "other.db", clock=clock)
    assert other.import_text(csv_text) == 3
    assert [(e.address, e.reason, e.source, e.expires) for e in other.list()] == [
        (e.address, e.reason, e.source, e.expires) for e in sl.list()
    ]
    other.close()


def test_import_plain_lines_and_errors(sl: Suppressions, tmp_path: Path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("# unsubscribes\nx@example.com\n\nY@Example.com\n")
    assert sl.import_file(f, reason="unsubscribe") == 2
    assert sl.get("y@example.com").reason == "unsubscribe"  # type: ignore[union-attr]
    bad = tmp_path / "bad.txt"
    bad.write_text("z@example.com\nnot-an-address\n")
    with pytest.raises(SuppressionError, match=r"bad\.txt: line 2: malformed address"):
        sl.import_file(bad)
    assert not sl.contains("z@example.com")
    assert sl.contains("x@example.com")
    with pytest.raises(SuppressionError, match="cannot read"):
        sl.import_file(tmp_path / "missing.txt")


def test_import_csv_with_email_column(sl: Suppressions) -> None:
    n = sl.import_text(
        "name,email,reason\nKiji,kiji@example.com,complaint\nMike,mike@example.com,\n"
    )
    assert n == 2
    assert sl.get("kiji@example.com").reason == "complaint"  # type: ignore[union-attr]
    assert sl.get("mike@example.com").reason == "manual"  # type: ignore[union-attr]


def test_suppress_from_classifications(sl: Suppressions) -> None:
    hard = classify_reply(550, "5.1.1", "User unknown")
    soft = classify_reply(452, "4.2.2", "Mailbox full")
    policy = classify_reply(550, "5.7.1", "blocked using zen.spamhaus.org")
    assert suppress_from(sl, "h@example.com", hard) is not None
    assert suppress_from(sl, "s@example.com", soft) is None
    assert suppress_from(sl, "p@example.com", policy) is None
    e = suppress_from(sl, "s@example.com", soft, soft_expires_in=86400)
    assert e is not None and e.expires is not None and e.reason == "mailboxfull"
    assert sl.get("h@example.com").reason == "userunknown"  # type: ignore[union-attr]


def test_suppress_from_bounce_records(sl: Suppressions) -> None:
    from fastsend.bounce import parse_bounce
    from test_bounce_parse import ARF, DSN

    for r in parse_bounce(DSN) + parse_bounce(ARF):
        suppress_from(sl, r.recipient, r)
    assert {e.address: e.reason for e in sl.list()} == {
        "nobody@example.org": "userunknown",
        "victim@isp.example": "complaint",
    }


def test_concurrent_handles(tmp_path: Path) -> None:
    a = SuppressionList(tmp_path / "s.db")
    b = SuppressionList(tmp_path / "s.db")
    a.add("x@example.com")
    assert b.contains("x@example.com")
    a.close()
    b.close()


def test_not_a_database(tmp_path: Path) -> None:
    f = tmp_path / "junk.db"
    f.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SuppressionError, match=r"junk\.db"):
        SuppressionList(f)


# ---------------------------------------------------------------- CLI
def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "suppress", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_round_trip(tmp_path: Path) -> None:
    spool = str(tmp_path)
    p = _cli("add", "A@Example.com", "b@example.com", "--reason", "unsubscribe", "--spool", spool)
    assert p.returncode == 0, p.stderr
    p = _cli("add", "c@example.com", "--expires", "30d", "--tenant", "t2", "--spool", spool)
    assert p.returncode == 0, p.stderr
    p = _cli("list", "--json", "--spool", spool)
    assert [line.split('"address":"')[1].split('"')[0] for line in p.stdout.splitlines()] == [
        "A@example.com",
        "b@example.com",
    ]
    p = _cli("list", "--all-tenants", "--spool", spool)
    assert len(p.stdout.splitlines()) == 3
    exported = _cli("export", "--spool", spool).stdout
    assert exported.startswith("address,reason")
    p = _cli("remove", "a@example.com", "--spool", spool)
    assert p.returncode == 0
    p = _cli("remove", "a@example.com", "--spool", spool)
    assert p.returncode == 1 and "not in the list" in p.stderr
    other = tmp_path / "other"
    other.mkdir()
    f = tmp_path / "export.csv"
    f.write_text(exported)
    p = _cli("import", str(f), "--spool", str(other))
    assert p.returncode == 0 and "imported 2" in p.stdout


def test_cli_global_list(tmp_path: Path) -> None:
    """``--global``: the list every tenant's mail is checked against."""
    spool = str(tmp_path)
    p = _cli("add", "legal@example.com", "--global", "--reason", "legal", "--spool", spool)
    assert p.returncode == 0 and "for every tenant (the global list)" in p.stdout, p.stderr
    p = _cli("list", "--global", "--spool", spool)
    assert p.stdout.startswith("legal@example.com\t*\tlegal\t"), p.stdout
    assert _cli("list", "--spool", spool).stdout == ""  # (the operator's own list: empty)
    with SuppressionList(tmp_path / "suppression.db") as s:
        assert s.contains("legal@example.com", tenant="acme")
    p = _cli("add", "x@example.com", "--global", "--tenant", "acme", "--spool", spool)
    assert p.returncode == 2 and "one or the other" in p.stderr
    p = _cli("add", "x@example.com", "--tenant", "*", "--spool", spool)
    assert p.returncode == 2 and "--tenant" in p.stderr  # (not a tenant's name)
    assert _cli("remove", "legal@example.com", "--global", "--spool", spool).returncode == 0
    with SuppressionList(tmp_path / "suppression.db") as s:
        assert not s.contains("legal@example.com", tenant="acme")


def test_cli_bad_input(tmp_path: Path) -> None:
    spool = str(tmp_path)
    _cli("add", "keep@example.com", "--spool", spool)
    p = _cli("add", "ok@example.com", "broken", "--spool", spool)
    assert p.returncode == 2 and "malformed address" in p.stderr
    p = _cli("add", "x@example.com", "--expires", "soon", "--spool", spool)
    assert p.returncode == 2 and "bad duration" in p.stderr
    p = _cli("import", str(tmp_path / "nope.csv"), "--spool", spool)
    assert p.returncode == 2 and "cannot read" in p.stderr
    p = _cli("list", "--spool", str(tmp_path / "missing-dir"))
    assert p.returncode == 2 and "not a directory" in p.stderr
    p = _cli("list", "--spool", spool)
    assert p.stdout.split("\t")[0] == "keep@example.com" and len(p.stdout.splitlines()) == 1
