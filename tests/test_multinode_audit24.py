"""Several nodes on one Redis, as an operator behind a balancer sees them
(session 24's audit).

Real parts: one redis-server, serve contexts (two nodes' configs, each its own
node name and local directory) with their real SMTP intake listeners, mail
sent to them over SMTP with aiosmtplib.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from tests._redis_helpers import start_redis
from tests._serve_helpers import Served, dsn, until
from tests.conftest import free_port
from tests.test_dmarc import BEGIN, mail, report

from fastsend import msgid
from fastsend.analytics.dmarc import DmarcStore, ingest_mail
from fastsend.config import from_dict
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.listeners import start_listeners
from fastsend.spool.base import DEFERRED, Result
from fastsend.spool.redis import RedisSpool


def _node(url: str, tmp: Path, name: str) -> ServeContext:
    d = tmp / name
    cfg = from_dict({"spool": {"dir": str(d), "url": f"{url}&node={name}&dir={d}"},
                     "intake": {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com",
                                # (a parse process spawned on a loaded machine: no cap met)
                                "parse_cpu_seconds": 30}})  # fmt: skip
    return open_context(cfg)


def _mail_to(ctx: ServeContext, raw: bytes, to: str = "dmarc@bounces.example.com", *,
             expect_refusal: bool = False) -> Any:  # fmt: skip
    """``raw`` to the node's intake over SMTP: its answer to DATA (text), or with
    ``expect_refusal`` the refusal's (code, text)."""

    async def go() -> Any:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await smtp.connect()
            try:
                errors, reply = await smtp.sendmail("", [to], raw)
            except aiosmtplib.SMTPResponseException as e:
                assert expect_refusal, (e.code, e.message)
                return e.code, e.message
            assert errors == {} and not expect_refusal, (errors, reply)
            await smtp.quit()
            return reply
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    return asyncio.run(go())


def test_dmarc_reports_are_the_clusters_on_every_node(redis_server: Any, tmp_path: Path) -> None:
    """A DMARC aggregate report mailed to node a's intake is in node b's
    ``/v1/dmarc`` figures; the same report mailed again to node b (a reporter's
    retry, another MX) counts once for the cluster; pruning works on Redis.
    Before: each node kept the reports that reached it in its own
    ``dmarc.db``, so b answered none, and the copy b took counted again."""
    url = redis_server.url()
    a, b = _node(url, tmp_path, "a"), _node(url, tmp_path, "b")
    try:
        raw = mail(gzip.compress(report()), "r.xml.gz", "application/gzip")
        assert "1 event" in _mail_to(a, raw)
        s = b.dmarc.summary(BEGIN - 86400, time.time())
        assert s["reports"] == 1, s
        top = s["unaligned_sources"][0]
        assert (top["source_ip"], top["unaligned"], top["org"]) == ("203.0.113.9", 7, "google.com")
        assert "0 event" in _mail_to(b, raw)  # the same report again, at the other node
        s = a.dmarc.summary(BEGIN - 86400, time.time())
        assert s["reports"] == 1 and sum(x["messages"] for x in s["domains"]) == 127, s
        ok = next(x for x in s["sources"] if x["source_ip"] == "127.0.0.2")
        assert (ok["aligned"], ok["unaligned"], ok["dkim_aligned"]) == (120, 0, 120)
        # Another org's report adds to it; a window before the reports holds nothing.
        assert ingest_mail(b.dmarc, mail(report("yahoo.com", "y1", [
            ("203.0.113.9", 3, "fail", "fail", "example.com", "x.test")]), "y.xml", "text/xml"))
        s = a.dmarc.summary(BEGIN - 86400, time.time())
        assert s["reports"] == 2 and {r["org"] for r in s["reporters"]} == {
            "google.com", "yahoo.com"}
        assert a.dmarc.summary(BEGIN - 5 * 86400, BEGIN - 86400)["reports"] == 0
        # Retention: the days before the cut go, on every node (the reports' ids
        # stay while they arrived after it, as in dmarc.db: a late copy is no new one).
        assert b.dmarc.prune(BEGIN + 86400) == 3
        s = a.dmarc.summary(BEGIN - 86400, time.time())
        assert (s["sources"], s["domains"]) == ([], []), s
        assert ingest_mail(a.dmarc, mail(gzip.compress(report()), "r.xml.gz",
                                         "application/gzip")) == []  # fmt: skip
        b.dmarc.prune(time.time() + 2 * 86400)
        assert a.dmarc.summary(BEGIN - 86400, time.time())["reports"] == 0
    finally:
        a.close()
        b.close()


def test_a_nodes_own_dmarc_db_is_carried_into_redis_once(redis_server: Any, tmp_path: Path) -> None:
    """A node that kept reports in its own ``dmarc.db`` (before they went to Redis)
    has them carried into the shared store at its start, once: a second start
    (the file renamed) adds nothing."""
    local = DmarcStore(str(tmp_path / "a"))
    assert ingest_mail(local, mail(gzip.compress(report()), "r.xml.gz", "application/gzip"))
    local.close()
    url = redis_server.url()
    a = _node(url, tmp_path, "a")
    a.close()
    assert (tmp_path / "a" / "dmarc.db.carried").exists()
    a = _node(url, tmp_path, "a")
    b = _node(url, tmp_path, "b")
    try:
        s = b.dmarc.summary(BEGIN - 86400, time.time())
        assert s["reports"] == 1 and sum(x["messages"] for x in s["domains"]) == 127, s
        # and the carried report is known: mailed again, it is not counted twice
        assert ingest_mail(b.dmarc, mail(gzip.compress(report()), "r.xml.gz",
                                         "application/gzip")) == []  # fmt: skip
        with sqlite3.connect(tmp_path / "a" / "dmarc.db.carried") as db:
            assert db.execute("SELECT COUNT(*) FROM reports").fetchone() == (1,)
    finally:
        a.close()
        b.close()


def test_a_bounce_that_meets_a_redis_outage_is_deferred_not_dropped(tmp_path: Path) -> None:
    """A bounce arriving while Redis does not answer (paused here: a restart, a
    failover, a partition) cannot be matched to its message nor suppress its
    recipient: the intake answers 451 4.3.0, so the reporting MTA retries, and
    the retry after the outage suppresses the address. Before: 250 "Ok: 0
    event(s)", the error logged, the bounce gone (the address mailed again)."""
    with start_redis() as srv:
        url = srv.url(socket_timeout="1")
        ctx = _node(url, tmp_path, "a")
        try:
            cid = ctx.tenant_campaign("shop")
            (mid,) = ctx.inject(cid, [("gone@example.org", "example.org", b"{}")])
            to = f"b-{msgid.token(mid, ctx.secret)}@bounces.example.com"
            raw = dsn("gone@example.org", mid).encode()
            srv.proc.send_signal(signal.SIGSTOP)
            try:
                code, text = _mail_to(ctx, raw, to, expect_refusal=True)
            finally:
                srv.proc.send_signal(signal.SIGCONT)
            assert code == 451 and "4.3.0" in text, (code, text)
            assert not ctx.suppression.contains("gone@example.org", tenant="shop")
            assert "1 event" in _mail_to(ctx, raw, to)  # the reporter's retry
            assert ctx.suppression.contains("gone@example.org", tenant="shop")
        finally:
            ctx.close()


def _off_by(spool: RedisSpool, seconds: float) -> float:
    """Make ``spool`` a node whose clock is ``seconds`` off Redis's (ahead if > 0):
    its skew measured as such; -> its time now."""
    spool.clock_offset = lambda: -seconds  # type: ignore[method-assign]
    spool._read_skew()
    return time.time() + seconds


def test_due_times_follow_the_shared_spools_clock_not_each_nodes(redis_server: Any) -> None:
    """Nodes whose clocks are two minutes apart (NTP broken on one) agree on when
    mail is due: each node's due times go by Redis's clock. Before: a node two
    minutes behind retried each deferral (a greylisting's too) two minutes early,
    and mail a node two minutes ahead spooled waited two minutes for the others."""
    url = redis_server.url()
    b = RedisSpool(url + "&node=b")  # in step
    ahead, behind = RedisSpool(url + "&node=ahead"), RedisSpool(url + "&node=behind")
    try:
        assert b.skew == 0.0
        t_ahead, t_behind = _off_by(ahead, 120.0), _off_by(behind, -120.0)
        assert (ahead.skew, behind.skew) == (-120.0, 120.0)
        cid = b.create_campaign({"from": "a@b.example"})
        # Spooled by the node ahead, "now" by its clock: due now for every node.
        (mid,) = ahead.add_messages(cid, [("x@d.example", "d.example", b"{}")], t_ahead)
        assert [c.id for c in b.claim_due(time.time(), 10)] == [mid]
        b.release([mid])
        # The node behind takes it and defers it for 60 s, by its clock.
        assert [c.id for c in behind.claim_due(t_behind, 10)] == [mid]
        behind.record_results([Result(mid, DEFERRED, 1, t_behind + 60, 451, "4.7.1", "greylisted")],
                              t_behind)  # fmt: skip
        assert b.claim_due(time.time(), 10) == []  # not a minute early
        assert behind.claim_due(t_behind + 30, 10) == []
        nd = behind.next_due()
        assert nd is not None and abs(nd - (t_behind + 60)) < 1, (nd, t_behind)
        nd = b.next_due()
        assert nd is not None and abs(nd - (time.time() + 60)) < 5, (nd, time.time())
        assert [c.id for c in ahead.claim_due(t_ahead + 61, 10)] == [mid]
        assert abs(ahead.message(mid)["next_at"] - (t_ahead + 60)) < 1
    finally:
        for s in (b, ahead, behind):
            s.close()


def test_a_node_that_cannot_reach_redis_fails_the_balancers_check(tmp_path: Path) -> None:
    """``GET /v1/health`` (no key: a balancer has none) answers 200 while the
    node's shared spool takes writes and 503 with a reason once it does not
    (Redis paused here: a partition between this node and Redis), 200 again
    after; unknown parameters are a 400. Before: the check deploy/haproxy.cfg
    made was the OpenAPI document, 200 all along, so such a node kept its
    share of the API calls and answered each with a 503."""
    with start_redis() as srv:
        node = Served(tmp_path, None, spool_url=srv.url(node="a", socket_timeout="1"),
                      serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
        try:
            assert node.req("GET", "/v1/health", tenant=None) == (200, {"status": "ok"})
            assert node.req("GET", "/v1/health?x=1", tenant=None)[0] == 400
            srv.proc.send_signal(signal.SIGSTOP)
            try:
                _st, out = until("a 503 from the check", lambda: _check_is(node, 503))
                assert out["status"] == "unavailable" and "spool" in out["reason"], out
                assert "127.0.0.1" not in out["reason"]  # (says no address)
                assert node.req("GET", "/v1/openapi.json", tenant=None)[0] == 200  # (the old check)
            finally:
                srv.proc.send_signal(signal.SIGCONT)
            until("the check ok again", lambda: _check_is(node, 200))
        finally:
            node.stop()


def _check_is(node: Served, status: int) -> tuple[int, Any] | None:
    got = node.req("GET", "/v1/health", tenant=None, timeout=30)
    return got if got[0] == status else None


def test_one_report_reaching_two_nodes_a_moment_apart_is_told_once(
    redis_server: Any, tmp_path: Path
) -> None:
    """The same DSN at node a's intake, then at node b's before a's event log
    handed its "bounced" event on (a reporter retrying at another MX after a
    slow answer): one "bounced" event for the cluster, the second intake
    answering 0 events; again at node a, the same. Before: each copy was
    counted (the rollups, the bounce-rate alarms and guardrails), as the check
    read the event index, which had the first only after a flush."""
    url = redis_server.url()
    a, b = _node(url, tmp_path, "a"), _node(url, tmp_path, "b")
    told: list[dict[str, Any]] = []
    for ctx in (a, b):
        ctx.events.listeners.append(told.extend)
    try:
        cid = a.tenant_campaign("shop")
        (mid,) = a.inject(cid, [("gone@example.org", "example.org", b"{}")])
        to = f"b-{msgid.token(mid, a.secret)}@bounces.example.com"
        raw = dsn("gone@example.org", mid).encode()
        assert "1 event" in _mail_to(a, raw, to)
        assert "0 event" in _mail_to(b, raw, to)
        assert "0 event" in _mail_to(a, raw, to)
        a.events.flush()
        b.events.flush()
        assert [e["id"] for e in told if e.get("event") == "bounced"] == [mid], told
        assert b.suppression.contains("gone@example.org", tenant="shop")
    finally:
        a.close()
        b.close()


def test_a_replayed_redacted_complaint_counts_once_for_the_cluster(
    redis_server: Any, tmp_path: Path
) -> None:
    """A complaint naming no recipient (RFC 6590 redaction) about mail sent to
    several recipients at once is its campaign's, counted once per group: a
    replay (anyone holding the report can mail it again, to pause the campaign
    through its complaint rate) is not counted, at another node nor after a
    restart. Before: each node, and each start, counted it once more."""
    from tests.test_bounce_unseen23 import ARF

    url = redis_server.url()
    a, b = _node(url, tmp_path, "a"), _node(url, tmp_path, "b")
    told: list[dict[str, Any]] = []
    for ctx in (a, b):
        ctx.events.listeners.append(told.extend)
    try:
        cid = a.tenant_campaign("shop")
        first, _ = a.inject(cid, [(x, "example.org", b"{}") for x in ("al@example.org",
                                                                     "bo@example.org")])  # fmt: skip
        mid = f"<{msgid.group_token(first, a.secret)}@x.example>"
        raw = ARF.format(fields="", to="redacted@example.org", mid=mid).encode()
        fbl = "fbl@bounces.example.com"
        assert "1 event" in _mail_to(a, raw, fbl)
        assert "0 event" in _mail_to(b, raw, fbl)
        a.close()
        a = _node(url, tmp_path, "a")  # (a restart)
        assert "0 event" in _mail_to(a, raw, fbl)
        b.events.flush()
        got = [(e["campaign"], e.get("group")) for e in told if e.get("event") == "complained"]
        assert got == [(cid, first)], told
    finally:
        a.close()
        b.close()


def test_get_dmarc_on_any_node_answers_for_the_cluster(redis_server: Any, tmp_path: Path) -> None:
    """Through the real servers: a DMARC report mailed to node a's intake is in
    node b's ``GET /v1/dmarc`` (an admin key), as a balancer would send the poll."""
    url = redis_server.url()
    ports = {}
    made: list[Served] = []
    try:
        for n in ("a", "b"):
            (tmp_path / n).mkdir()
            ports[n] = free_port()
            extra = ('[dashboard]\nadmin_tenants = ["acme"]\n[intake]\n'
                     f'listen = "127.0.0.1:{ports[n]}"\nverp_domain = "bounces.example.com"\n')  # fmt: skip
            made.append(Served(tmp_path / n, None, extra=extra,
                               spool_url=url + f"&node={n}&dir={tmp_path}/{n}/spool",
                               serve_args=("--no-workers", "--allow-volatile")))  # fmt: skip
        a, b = made

        async def send() -> None:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ports["a"], start_tls=False)
            await smtp.connect()
            raw = mail(gzip.compress(report()), "r.xml.gz", "application/gzip")
            errors, reply = await smtp.sendmail("", ["dmarc@bounces.example.com"], raw)
            assert errors == {} and "1 event" in reply, reply
            await smtp.quit()

        asyncio.run(send())
        st, out = b.req("GET", "/v1/dmarc?from=-3d", tenant="acme")
        assert st == 200 and out["reports"] == 1, out
        assert out["unaligned_sources"][0]["source_ip"] == "203.0.113.9", out
        assert a.req("GET", "/v1/dmarc?from=-3d", tenant="acme")[1] == out
    finally:
        for s in reversed(made):
            s.stop()
