"""Multi-node on Redis (session 30's audit): a `send` that dies while a serve
node runs, a finished send's ``P:own`` field.

Real parts: redis-server, fastsend sink receivers, real kill -9 of a `send`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    run_killed_when,
    sink_log,
    write_campaign,
    write_recipients,
)
from tests._serve_helpers import until
from tests.test_redis_audit29 import _send, serve_node

from fastsend.sink import SinkProcess
from fastsend.spool import DEFERRED, Result, open_spool


def _own(url: str) -> dict[bytes, bytes]:
    s = open_spool(url + "&node=look")
    try:
        return dict(s.r.hgetall(f"{s.k}:own"))
    finally:
        s.close()


def test_a_send_killed_while_serve_runs_is_set_aside_within_its_lease(
    redis_server: Any, tmp_path: Path
) -> None:
    """A serve node (sink B) runs on a Redis spool with a 2 s lease; a send
    routed to sink A is killed -9 once A took a few of its 60 messages: the
    serve node says the campaign is set aside (paused, naming the `resume`)
    once the send's lease lapsed, B gets none of it. Before: said only at the
    next serve start; meanwhile its mail stayed unclaimed (no node claims a
    send's campaign) however long serve ran."""
    n = 60
    url = redis_server.url(lease="2")
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_a), "--latency-ms", "100") as a, \
            SinkProcess("--log", str(log_b)) as b:  # fmt: skip
        (ha, pa), (hb, pb) = a.addresses[0], b.addresses[0]
        srv = serve_node(tmp_path, f"{hb}:{pb}", url)
        try:
            run_killed_when(_send(tmp_path, url + f"&dir={tmp_path / 'sendlocal'}",
                                  f"*={ha}:{pa}", n),
                            lambda: len(sink_log(log_a)) >= 3)  # fmt: skip
            srv.wait_line("set aside")
        finally:
            srv.stop()
        said = "".join(srv.lines)
        assert f"--route '*={ha}:{pa}'" in said and "fastsend resume --spool" in said, said
        assert not sink_log(log_b)
        assert len(_own(url)) == 1  # (kept: `resume` adopts it)
        proc = run_fastsend("resume", "--spool", url + f"&dir={tmp_path / 'resumelocal'}",
                            "--json", "--no-progress", "--max-wait", "60")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(received_counts(log_a)) == {f"user{i}@d.example.net" for i in range(n)}
    assert not sink_log(log_b)


def test_a_killed_send_of_serves_own_config_is_delivered_by_the_serve_node(
    redis_server: Any, tmp_path: Path
) -> None:
    """A send given serve's own config alone (``-c``: its routes, to sink B) is
    killed -9 after B took a few of its 60 messages while the serve node runs:
    the serve node delivers the rest (the campaign is anyone's again once the
    send's lease lapsed). Before: the rest stayed unclaimed until a restart."""
    n = 60
    url = redis_server.url(lease="2")
    log_b = tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_b), "--latency-ms", "100") as b:
        hb, pb = b.addresses[0]
        srv = serve_node(tmp_path, f"{hb}:{pb}", url)
        try:
            args = _send(tmp_path, url + f"&dir={tmp_path / 'sendlocal'}", "", n)
            i = args.index("--route")
            del args[i:i + 2]
            i = args.index("--retry")
            del args[i:i + 2]
            run_killed_when([*args, "-c", str(srv.cfg)], lambda: len(sink_log(log_b)) >= 3)
            want = {f"user{i}@d.example.net" for i in range(n)}
            until("the rest delivered by the serve node",
                  lambda: set(received_counts(log_b)) >= want, timeout=120)  # fmt: skip
            until("the send's P:own field dropped", lambda: not _own(url), timeout=30)
        finally:
            srv.stop()
        assert "set aside" not in "".join(srv.lines)


def test_a_finished_sends_own_field_is_dropped_by_a_running_serve_node(
    redis_server: Any, tmp_path: Path
) -> None:
    """Two sends run to the end on a Redis spool while a serve node runs: their
    ``P:own`` fields go (nothing of them is left to deliver); serve sets
    nothing aside. Before: every send ever run kept its field for ever (and
    every claim of every node read ``P:own`` from the first send on)."""
    url = redis_server.url(lease="2")
    log_a = tmp_path / "a.jsonl"
    with SinkProcess("--log", str(log_a)) as a:
        ha, pa = a.addresses[0]
        srv = serve_node(tmp_path, f"{ha}:{pa}", url)
        try:
            for k in range(2):
                proc = run_fastsend(*_send(tmp_path, url + f"&dir={tmp_path / f's{k}'}",
                                           f"*={ha}:{pa}", 5), timeout=120)  # fmt: skip
                assert proc.returncode == 0, proc.stderr[-3000:]
            until("the finished sends' P:own fields dropped", lambda: not _own(url), timeout=30)
        finally:
            srv.stop()
        assert "set aside" not in "".join(srv.lines)


def test_send_spool_url_flag_wins_over_the_configs_spool_url(
    redis_server: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """``fastsend send -c CFG --spool redis://...B&dir=L`` where CFG has
    ``[spool] url`` A: the campaign goes to B, the node's files to L. Before:
    the mail went to A (the flag's URL ignored) and a directory named after the
    flag's URL ("redis:/127.0.0.1:PORT/0?...") was made in the working directory."""
    url_a, url_b = redis_server.url(), redis_server.url()
    log = tmp_path / "sink.jsonl"
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(f'[spool]\nurl = "{url_a}"\ndir = "cfglocal"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        args = _send(tmp_path, url_b + f"&dir={tmp_path / 'L'}", f"*={host}:{port}", 3)
        proc = run_fastsend(*args, "-c", str(cfg), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(received_counts(log)) == 3
    assert list(work.iterdir()) == []
    assert (tmp_path / "L" / "events.jsonl").exists()
    for url, n in ((url_a, 0), (url_b, 1)):
        s = open_spool(url + "&node=look")
        try:
            assert len(s.list_campaigns()) == n
        finally:
            s.close()


def test_a_site_taking_mail_again_gets_its_deferred_mail_at_once_on_redis(
    redis_server: Any, tmp_path: Path
) -> None:
    """On a Redis spool: 20 messages to d.example wait, deferred by the site
    (451 4.7.1) 1,000 s ago, due in an hour, 5 deferred for full mailboxes
    (4.2.2) and 3 by the site with a reply asking for an hour ("try again in
    3600 seconds"); a send to the site is deferred 3 times then delivered: the
    20 are brought forward and delivered in the same run, the 8 others wait.
    Before: bring_forward was a no-op on Redis (the send ended with the 20
    still deferred)."""
    url = redis_server.url()
    sp = open_spool(url + f"&node=seed&dir={tmp_path / 'seed'}")
    cid = sp.create_campaign({"from": "news@sender.example.com", "subject": "Earlier",
                              "text": "Hello\n"})  # fmt: skip
    now = time.time()
    rows = [(f"{p}{i}@d.example", "d.example", b"{}") for p, k in
            (("old", 20), ("full", 5), ("wait", 3)) for i in range(k)]  # fmt: skip
    sp.add_messages(cid, rows, now - 2000)
    claimed = sp.claim_due(now, 100)
    assert len(claimed) == 28
    reply = {"old": (451, "4.7.1", "451 4.7.1 busy"), "full": (452, "4.2.2", "452 4.2.2 full"),
             "wait": (421, "", "421 busy, try again in 3600 seconds")}  # fmt: skip
    kind = {c.id: next(p for p in reply if c.rcpt.startswith(p)) for c in claimed}
    sp.record_results([Result(c.id, DEFERRED, 1, now + 3600, *reply[kind[c.id]]) for c in claimed],
                      now - 1000)  # fmt: skip
    sp.close()
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["defer3-a@d.example"])
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool",
            url + f"&dir={tmp_path / 'L'}", "--route", f"*={host}:{port}",
            "--retry", "0.5,600,86400", "--max-wait", "20", "--json", "--no-progress",
            "--workers", "1", timeout=180,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = received_counts(log)
    assert set(got) == {"defer3-a@d.example", *(f"old{i}@d.example" for i in range(20))}, got
    recovered = [json.loads(line) for line in (tmp_path / "L" / "shaping.jsonl").read_text()
                 .splitlines() if "site_recovered" in line]  # fmt: skip
    assert [(e["site"], e["brought_forward"]) for e in recovered] == [("d.example", 20)]
