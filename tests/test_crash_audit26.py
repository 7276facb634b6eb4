"""Crash safety audited again (crash26), from outside: the real ``fastsend``
command, fastsend's own sink and its log, the event log.

- A worker killed -9 had every message it had been handed counted an attempt
  of unknown outcome (a deferred event "outcome unknown", one attempt more, its
  backoff), also the mail still on its ready queues that no connection had
  taken: 2,476-3,776 of a 4,000 window, where only a few per connection had
  their message written. A worker now notes each message it begins to write
  (a DATA's 354 answered, a BDAT LAST, a provider's request) in memory shared
  with the supervisor (``fastsend.ring.WriteLog``) before the bytes go out;
  only those count unknown, the rest go back with no attempt.
- Providers: a grouped request refused whole for one recipient goes again in
  halves (``HTTPTransport.bisect``); a half the provider throttled (429) was
  answered deferred, an attempt each and its backoff, where a throttled request
  is none: its recipients now wait in the lane as any throttled request's.
- A provider's event settling an unknown outcome on a ``serve --no-workers``
  node (no supervisor: nothing there ever said the events noted untold were
  written) left the message noted untold in the spool: the next start told its
  "delivered" event again (``"resumed": true``). Such a node now says them told
  once its event log has them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests._engine_helpers import (
    send_killing_a_worker,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)
from tests._provider_servers import (
    MAILGUN_SIGNING,
    Recorder,
    ThreadedApp,
    mailgun_app,
    mailgun_serve_config,
    submit_hello,
)
from tests._serve_helpers import Served, http, until
from tests.test_provider_audit24 import _mailgun_post
from tests.test_transports_http import SAME, events, send


def _unknown(spool: Path) -> list[str]:
    """The recipients of the events saying "outcome unknown" (a worker died)."""
    return [json.loads(line)["rcpt"] for line in (spool / "events.jsonl").read_text().splitlines()
            if "outcome unknown" in line]  # fmt: skip


def test_a_worker_killed_mid_send_counts_unknown_only_what_it_had_written(
    tmp_path: Path,
) -> None:
    """1,200 messages to one site over 2 connections of pipelined groups of 4
    (the sink answers each write after 30 ms): the whole list is in the
    worker's window, nearly all of it on its ready queue. The worker is killed
    -9 once the sink took 40: what counts unknown is at most what was on the
    wire (one group per connection), each of them one attempt more; every
    other message goes out once more with no attempt counted. Before, all of
    the window not yet told (1,100+) counted unknown."""
    n, conns, group = 1200, 2, 4
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f"[delivery]\nmax_connections = {conns}\npipeline = {group}\n")
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    s, got = send_killing_a_worker(
        ["--latency-ms", "30"], log, camp, rcpts, spool, conf, addrs,
        lambda workers: workers[0] if workers and len(sink_log(log)) >= 40 else None,
    )  # fmt: skip
    unknown = _unknown(spool)
    # What was written and not yet told: the groups on the wire (the pool grows
    # a quick connection's group up to 4x `pipeline`) and an ended one whose
    # results were still to be flushed (measured: 32; before, 500).
    assert len(unknown) <= 3 * conns * group * 4, len(unknown)
    # Each one counted is one attempt more; none of the rest is.
    assert s["attempts"] == n + len(unknown), (s, len(unknown))
    twice = {a for a, k in got.items() if k > 1}
    assert twice <= set(unknown), sorted(twice - set(unknown))[:10]


def test_a_throttled_half_of_a_split_provider_request_costs_no_attempt(tmp_path: Path) -> None:
    """Mailgun refuses 50 identical recipients (one request) whole for one bad
    address; the first half sent again, without that one, is throttled (429):
    those recipients wait in the lane, no attempt, and are delivered once
    each; only the refused one bounces. Before, the throttled half was
    answered deferred (an attempt each: ``deferrals`` 25)."""
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    group = [f"g{i}@example.net" for i in range(49)]
    rcpts = write_recipients(tmp_path, [*group[:40], "reject-9@example.net", *group[40:]])
    rec = Recorder(throttle_first=1)
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "10", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert rec.throttled == 1
    assert s["delivered"] == 49 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert s["deferrals"] == 0 and s["attempts"] == 50, s
    assert dict(rec.recipients) == {r: 1 for r in group}
    assert not [e for e in events(tmp_path) if e["event"] == "deferred"]


def test_a_settle_on_a_node_without_workers_is_not_told_again_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A message whose Mailgun request went unanswered is deferred (unknown
    outcome); serve is restarted ``--no-workers`` and Mailgun's "accepted"
    event settles it delivered there (one "delivered" event); serve started
    again with workers tells no second "delivered" event of it. Before: a
    second one, ``"resumed": true``, from the spool's untold note."""
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=600.0)) as mg:
        extra = mailgun_serve_config(tmp_path, mg.url, answer_timeout=2, backoff=600)
        srv = Served(tmp_path, "mg", extra=extra)
        try:
            (mid,) = submit_hello(srv, ["w@example.net"])

            def state() -> str:
                return str(srv.req("GET", f"/v1/messages/{mid}", tenant="acme")[1]["state"])

            until("the unanswered request deferred", lambda: state() == "deferred")
            ((_rcpts, _data, token),) = rec.accepted
            srv.stop()
            srv.serve_args = ("--no-workers",)
            srv.start()
            ev = {"event": "accepted", "recipient": "w@example.net",
                  "user-variables": {"fastsend": token},
                  "message": {"headers": {"message-id": "x@mg.sender.example.com"}}}  # fmt: skip
            st, _ = http("POST", srv.base + "/webhooks/mailgun",
                         raw=_mailgun_post(MAILGUN_SIGNING, ev, "t" * 50))  # fmt: skip
            assert st == 200
            until("settled delivered", lambda: state() == "delivered")
            srv.stop()
            srv.serve_args = ()
            srv.start()
        finally:
            srv.stop()
    delivered = [e for e in events(tmp_path) if e["event"] == "delivered" and e.get("id") == mid]
    assert len(delivered) == 1 and delivered[0].get("settled"), delivered
