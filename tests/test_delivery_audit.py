"""Delivery semantics checked from the outside: the real ``fastsend`` commands,
real receivers on loopback (``fastsend sink``), a real redis-server for the
shared spool. Each test is a defect found by the session-12 audit (it failed on
the code before its fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import received_counts, run_fastsend, summary, write_campaign

from fastsend.sink import SinkProcess

# (8 s: the first send, --max-wait 0, must end before the deferred mail is due again;
# 3 s was less than a loaded host's wind-down, and the retry could go in that send)
FAST_RETRY = "[retry]\nmin_backoff = 8.0\nmax_backoff = 8.0\njitter = 0.0\n"


def _list(tmp: Path, rcpts: list[str], name: str = "list.csv") -> Path:
    p = tmp / name
    p.write_text("email,name\n" + "".join(f"{r},n{i}\n" for i, r in enumerate(rcpts)))
    return p


def test_redis_send_and_resume_use_the_shared_suppression_list(
    redis_server: Any, tmp_path: Path
) -> None:
    """On a Redis spool the suppression list is Redis's (every node's, where
    ``fastsend suppress --spool redis://`` writes it): an address suppressed there
    while its mail waits for a retry is not mailed by ``resume``, and a hard
    bounce met by ``send`` is written there, not to a file only this machine reads.
    Before: send/resume screened and learned against ``<dir>/suppression.db``."""
    url = redis_server.url(node="n1", dir=str(tmp_path / "local"))
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(FAST_RETRY)
    camp = write_campaign(tmp_path)
    rcpts = ["defer1-a@example.com", "defer1-b@example.com", "permfail-c@example.com",
             "d@example.com"]  # fmt: skip
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        route = f"*={sink.host}:{sink.port}"
        common = ["-c", str(cfg), "--spool", url, "--route", route, "--workers", "1",
                  "--source-ip", "127.0.0.2", "--json", "--no-progress"]  # fmt: skip
        first = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "--max-wait", "0",
                             *common)  # fmt: skip
        s = summary(first)
        assert s["delivered"] == 1 and s["bounced"] == 1 and s["deferred"] == 2, s
        # The hard bounce is in the shared list (where every node and serve read it).
        listed = run_fastsend("suppress", "list", "--spool", url)
        assert listed.returncode == 0, listed.stderr
        assert "permfail-c@example.com" in listed.stdout and "bounce-delivery" in listed.stdout
        # Suppressed while it waits for its retry: resume must not mail it.
        add = run_fastsend("suppress", "add", "defer1-a@example.com", "--spool", url)
        assert add.returncode == 0, add.stderr
        second = run_fastsend("resume", "--max-wait", "30", *common)
        s2 = summary(second)
        assert s2["deferred"] == 0, (s2, second.stderr)
    got = received_counts(log)
    assert got == {"d@example.com": 1, "defer1-b@example.com": 1}, got
    assert s2["suppressed"] == 1, s2


def test_rate_held_mail_is_screened_again_before_it_goes(tmp_path: Path) -> None:
    """A campaign under a dispatch rate is claimed faster than it may go: the
    rest waits in the supervisor (rate-held). An address suppressed while its
    message waits there is not mailed; it ends ``suppressed``. Before: held mail
    was screened only at its claim, and went out to the suppressed address."""
    import subprocess
    import time

    from tests._engine_helpers import fastsend_cmd

    spool = tmp_path / "spool"
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text("[shaping.dispatch]\ncampaign_rate = 2.0\n")
    camp = write_campaign(tmp_path)
    rcpts = [f"h{i}@example.com" for i in range(20)]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                         "--workers", "1", "--source-ip", "127.0.0.2", "--json",
                         "--no-progress", "--max-wait", "60"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            events = spool / "events.jsonl"
            deadline = time.monotonic() + 60
            while b'"delivered"' not in (events.read_bytes() if events.exists() else b""):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            # The whole list is claimed (held) by now; the last ones go ~9 s later.
            add = run_fastsend("suppress", "add", "h18@example.com", "h19@example.com",
                               "--spool", str(spool))  # fmt: skip
            assert add.returncode == 0, add.stderr
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    s = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    got = received_counts(log)
    assert got == {r: 1 for r in rcpts[:18]}, got
    assert s["suppressed"] == 2 and s["delivered"] == 18, s


def test_a_provider_404_is_our_configuration_never_a_bounce(tmp_path: Path) -> None:
    """Mailgun answers a sending domain it does not know (a typo, the wrong
    region) with 404 ``Domain not found: DOMAIN``. That is the sender's
    configuration, like a 401: the mail is deferred, and no recipient is
    suppressed. Before: every message bounced as ``hostunknown`` (hard), and
    every recipient of the campaign was put on the suppression list forever."""
    import os
    import subprocess

    from tests._engine_helpers import fastsend_cmd
    from tests._provider_servers import Recorder, ThreadedApp, mailgun_app

    camp = write_campaign(tmp_path)
    rcpts = ["a@example.net", "b@example.org"]
    lst = _list(tmp_path, rcpts)
    spool = tmp_path / "spool"
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            'domain = "mg.sender.example.co"\n[routes]\n"*" = "mg"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        env["FASTSEND_MG_API_KEY"] = "mg-key"
        proc = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(spool), "--workers", "1", "--json", "--no-progress",
                         "--max-wait", "1"),
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    s = summary(proc)
    assert rec.requests >= 2 and not rec.accepted
    assert s["bounced"] == 0 and s["deferred"] == 2, (s, proc.stderr[-2000:])
    listed = run_fastsend("suppress", "list", "--spool", str(spool))
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout


class _RefuseDataHandler:
    """aiosmtpd: refuses the message at end of data with a "user unknown" when
    one of its recipients is gone-*, whatever the others are."""

    def __init__(self) -> None:
        self.transactions: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.transactions.append(list(envelope.rcpt_tos))
        if any(r.startswith("gone") for r in envelope.rcpt_tos):
            return "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
        return "250 2.0.0 Ok"


def test_a_refusal_after_data_suppresses_no_recipient_of_a_shared_transaction(
    tmp_path: Path,
) -> None:
    """Identical mail shares one transaction (three RCPTs). A 550 5.1.1 at end
    of data refuses the message for all three, and it names none of them: all
    three bounce, none is suppressed (the valid ones would never be mailed
    again). Before: all three were put on the suppression list as userunknown."""
    from aiosmtpd.controller import Controller
    from tests.conftest import free_port

    handler = _RefuseDataHandler()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        camp = write_campaign(
            tmp_path,
            'from = "News <news@sender.example.com>"\nsubject = "Same for all"\ntext = "Hello.\\n"\n',
        )
        rcpts = ["gone@example.com", "alice@example.com", "bob@example.com"]
        lst = _list(tmp_path, rcpts)
        spool = tmp_path / "spool"
        proc = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", str(spool),
                            "--route", f"*=127.0.0.1:{port}", "--workers", "1", "--json",
                            "--no-progress", "--max-wait", "5")  # fmt: skip
    finally:
        ctl.stop()
    s = summary(proc)
    assert handler.transactions == [rcpts], handler.transactions  # one shared transaction
    assert s["bounced"] == 3, s
    listed = run_fastsend("suppress", "list", "--spool", str(spool))
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_mail_waiting_in_a_worker_is_withdrawn_when_its_address_is_suppressed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A site that takes 2 messages/s: a worker keeps the next ~10 s of them on
    its ready queue (``[delivery] ready_horizon``) and hands the rest back. An
    address suppressed with the CLI while its message waits on that queue is
    not mailed: the supervisor sees the list change (SQLite: its version;
    Redis, shared by every node: checked every second), the worker hands the
    message back unsent (wire.Withdraw), and it ends ``suppressed``. Before:
    only what went back to the spool was screened again; the worker's queue
    was sent as it stood."""
    import subprocess
    import time

    from tests._engine_helpers import fastsend_cmd

    local = tmp_path / "spool"
    spool: Any = local
    if kind == "redis":
        spool = request.getfixturevalue("redis_server").url(node="n1", dir=str(local))
    cfg = tmp_path / "fastsend.toml"
    # ready_horizon 30 s: all 30 messages (15 s at 2/s) wait on the worker's queue;
    # the two suppressed ones are due 11 and 14 s after the first delivery, time for
    # the CLI to start and the change to reach the worker on a loaded machine.
    cfg.write_text("[shaping.default]\nmessages_per_second = 2.0\nburst = 1\n"
                   "[delivery]\nready_horizon = 30.0\n")  # fmt: skip
    camp = write_campaign(tmp_path)
    rcpts = [f"w{i}@example.com" for i in range(30)]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    gone = ["w22@example.com", "w28@example.com"]  # on the worker's queue; handed back
    with SinkProcess("--log", str(log)) as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                         "--workers", "1", "--source-ip", "127.0.0.2", "--json",
                         "--no-progress", "--max-wait", "60"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            events = local / "events.jsonl"
            deadline = time.monotonic() + 60
            while b'"delivered"' not in (events.read_bytes() if events.exists() else b""):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            add = run_fastsend("suppress", "add", *gone, "--spool", str(spool))
            assert add.returncode == 0, add.stderr
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    s = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    got = received_counts(log)
    assert got == {r: 1 for r in rcpts if r not in gone}, got
    assert s["suppressed"] == 2 and s["delivered"] == 28, s


def test_a_hard_bounce_withdraws_other_mail_to_the_address_from_the_worker(
    tmp_path: Path,
) -> None:
    """The same address twice in a list, its second message waiting on the
    worker's queue (a 2 msg/s site) when the first is refused 550 5.1.1 at
    RCPT: the address is suppressed at once and its other message is handed
    back unsent and ends ``suppressed``, not refused a second time. Before: it
    was sent (and bounced) again."""
    spool = tmp_path / "spool"
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text("[shaping.default]\nmessages_per_second = 2.0\nburst = 1\n")
    camp = write_campaign(tmp_path)
    rcpts = ["permfail-x@example.com", *(f"h{i}@example.com" for i in range(8)),
             "permfail-x@example.com", "h8@example.com"]  # fmt: skip
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        proc = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                            "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                            "--workers", "1", "--source-ip", "127.0.0.2", "--json",
                            "--no-progress", "--max-wait", "60",
                            "--keep-duplicates")  # (the list's address twice: both sent)  # fmt: skip
    s = summary(proc)
    assert s["bounced"] == 1 and s["suppressed"] == 1 and s["delivered"] == 9, s
    assert received_counts(log) == {f"h{i}@example.com": 1 for i in range(9)}


def test_sendgrid_refusing_one_recipient_of_a_batch_bounces_only_that_one(
    tmp_path: Path,
) -> None:
    """Identical mail to SendGrid goes as one request of several
    personalizations (one recipient each: none sees another). SendGrid refuses
    such a request whole (400) for one recipient it does not take, naming its
    personalization: only that recipient bounces, the others are delivered
    once each. Before: every recipient of the request bounced."""
    import os
    import subprocess

    from tests._engine_helpers import fastsend_cmd
    from tests._provider_servers import Recorder, ThreadedApp, sendgrid_app

    camp = write_campaign(
        tmp_path,
        'from = "News <news@sender.example.com>"\nsubject = "Same for all"\ntext = "Hello.\\n"\n',
    )
    good = [f"u{i}@example.net" for i in range(6)]
    lst = _list(tmp_path, [*good[:3], "reject-1@example.net", *good[3:]])
    rec = Recorder()
    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\n[routes]\n"*" = "sg"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        env["FASTSEND_SG_API_KEY"] = "sg-key"
        proc = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(tmp_path / "spool"), "--workers", "1", "--json",
                         "--no-progress", "--max-wait", "5"),
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    s = summary(proc)
    assert rec.rejected >= 1
    assert s["delivered"] == 6 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {r: 1 for r in good}
    for body in rec.accepted:  # one recipient per personalization, never two
        assert all(len(p["to"]) == 1 for p in body["personalizations"])


# ---------------------------------------------------------------- session 13


def test_the_redis_suppression_list_tells_every_node_when_it_changed(
    redis_server: Any, tmp_path: Path
) -> None:
    """The shared list has a change counter (``version()``), like SQLite's
    data_version: a node's supervisor reads one number and screens the mail its
    workers hold again only when any node (here the real CLI, and another
    client) added or removed an entry. Before: ``version()`` was None, and
    every node screened its whole window against Redis every second."""
    import redis

    from fastsend.serve.shared_state import RedisSuppressionList

    prefix = "v" + tmp_path.name[-8:]
    url = redis_server.url(node="n1", dir=str(tmp_path / "local"), prefix=prefix)
    node_a = RedisSuppressionList(redis.Redis(port=redis_server.port), prefix)
    node_b = RedisSuppressionList(redis.Redis(port=redis_server.port), prefix)
    v0 = node_a.version()
    assert v0 is not None
    assert node_a.contains("x@example.com") is False and node_a.version() == v0  # reads: no change
    add = run_fastsend("suppress", "add", "x@example.com", "--spool", url)
    assert add.returncode == 0, add.stderr
    v1 = node_a.version()
    assert v1 is not None and v1 != v0
    assert node_b.remove("x@example.com") is True
    v2 = node_a.version()
    assert v2 not in (v0, v1)
    node_b.add("y@example.com", expires_in=0.01)
    v3 = node_a.version()
    import time

    time.sleep(0.05)
    assert node_b.purge_expired() == 1
    assert node_a.version() not in (v0, v1, v2, v3)


def test_a_refused_connection_is_a_network_error_not_a_block(tmp_path: Path) -> None:
    """Nothing listens on the MX's port: every connection is refused
    (ECONNREFUSED), no server said a word. The deferral's reason in the event
    log is ``networkerror``; "blocked" is what a server's refusal says (a 554
    greeting), and it drives IP-block views and alerts. Before: ``blocked``."""
    import json

    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    camp = write_campaign(tmp_path)
    lst = _list(tmp_path, ["a@example.com", "b@example.com"])
    spool = tmp_path / "spool"
    proc = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", str(spool),
                        "--route", f"*=127.0.0.1:{port}", "--workers", "1",
                        "--source-ip", "127.0.0.2", "--json", "--no-progress",
                        "--max-wait", "0")  # fmt: skip
    s = summary(proc)
    assert s["deferred"] == 2, (s, proc.stderr[-2000:])
    events = [json.loads(x) for x in (spool / "events.jsonl").read_text().splitlines()]
    deferred = [e for e in events if e.get("event") == "deferred"]
    assert len(deferred) == 2, events
    for e in deferred:
        assert "refused" in e["text"].lower(), e
        assert e["reason"] == "networkerror", e


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_line_break_in_a_header_variable_is_a_refused_row_at_intake(
    fmt: str, tmp_path: Path
) -> None:
    """A list whose ``name`` (used in the Subject) holds a line break in one
    row (a quoted CSV field spanning two lines; a JSON string with \\n): that
    row is refused as the list is read, with its line and the variable named,
    and never spooled; every other row is accepted and delivered, the send
    exits 1 (bad rows skipped). A line break in a variable used only in the
    body is text, and that row is delivered. Before: the row was spooled and
    bounced at render (550 5.6.0), counted as a bounce of the campaign."""
    import json

    camp = write_campaign(
        tmp_path,
        'from = "T <news@sender.example.com>"\nsubject = "Hello {{ name }}"\n'
        'text = "Hi {{ name }}.\\n{{ addr }}\\n"\n',
    )
    if fmt == "csv":
        lst = tmp_path / "list.csv"
        lst.write_text(
            "email,addr,name\n"
            "a@example.com,x,Ann\n"
            'b@example.com,x,"Bob\nBcc: victim@example.org"\n'
            'c@example.com,"1 Main St\nSpringfield",Cy\n'
            "d@example.com,x,Di\n"
        )
        bad_line = 4  # the record's last line (the csv module's count)
    else:
        lst = tmp_path / "list.jsonl"
        rows = [
            {"email": "a@example.com", "addr": "x", "name": "Ann"},
            {"email": "b@example.com", "addr": "x", "name": "Bob\r\nBcc: victim@example.org"},
            {"email": "c@example.com", "addr": "1 Main St\nSpringfield", "name": "Cy"},
            {"email": "d@example.com", "addr": "x", "name": "Di"},
        ]
        lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
        bad_line = 2
    log = tmp_path / "sink.jsonl"
    spool = tmp_path / "spool"
    with SinkProcess("--log", str(log)) as sink:
        proc = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", str(spool),
                            "--route", f"*={sink.host}:{sink.port}", "--workers", "1",
                            "--source-ip", "127.0.0.2", "--json", "--no-progress",
                            "--max-wait", "5")  # fmt: skip
    s = summary(proc)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"line {bad_line}: variable 'name'" in proc.stderr, proc.stderr[-2000:]
    assert s["delivered"] == 3 and s["bounced"] == 0 and s["rejected_rows"] == 1, s
    assert received_counts(log) == {"a@example.com": 1, "c@example.com": 1, "d@example.com": 1}


def test_mail_waiting_for_its_mx_lookup_is_withdrawn_when_its_address_is_suppressed(
    tmp_path: Path,
) -> None:
    """The MX lookup of a domain hangs (a slow DNS server; it answers once the
    test says so, or after 20 s). An address of that domain suppressed with the
    CLI while its batch waits for the answer is not mailed: the worker takes it
    out of the waiting batch and hands it back, and it ends ``suppressed``; the
    others are delivered once the answer comes. Before: a withdrawal reached
    only the ready queues, and the batch was placed and sent whole."""
    import json
    import subprocess
    import threading
    import time

    from tests._engine_helpers import fastsend_cmd

    from fastsend.testing.dnsserver import DNSServer

    answer = threading.Event()
    asked = threading.Event()
    dns = DNSServer(
        {"slow.test": [("MX", "10 mx.slow.test.")], "mx.slow.test": [("A", "127.0.0.1")]}
    )
    plain = dns.resolver.resolve

    def slow(request: Any, handler: Any) -> Any:
        if str(request.q.qname).rstrip(".").lower() == "slow.test":
            asked.set()
            answer.wait(20)
        return plain(request, handler)

    dns.resolver.resolve = slow
    camp = write_campaign(tmp_path)
    rcpts = ["a@slow.test", "b@slow.test", "c@slow.test"]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    spool = tmp_path / "spool"
    with dns, SinkProcess("--log", str(log)) as sink:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\nmx_port = {sink.port}\ntimeout = 40\n'
            '[delivery]\nallow_private_mx = true\n'
        )
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(spool), "--workers", "1", "--source-ip", "127.0.0.2",
                         "--json", "--no-progress", "--max-wait", "60"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not asked.is_set():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            add = run_fastsend("suppress", "add", "b@slow.test", "--spool", str(spool))
            assert add.returncode == 0, add.stderr
            events = spool / "events.jsonl"
            until = time.monotonic() + 60  # the withdrawal ends it suppressed, then DNS answers
            while time.monotonic() < until:
                text = events.read_text() if events.exists() else ""
                if any(json.loads(x).get("event") == "suppressed" for x in text.splitlines()):
                    break
                time.sleep(0.05)
            answer.set()
            out, err = proc.communicate(timeout=120)
        finally:
            answer.set()
            if proc.poll() is None:
                proc.kill()
    s = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert received_counts(log) == {"a@slow.test": 1, "c@slow.test": 1}
    assert s["suppressed"] == 1 and s["delivered"] == 2, s


@pytest.mark.parametrize("action", ["pause", "cancel"])
def test_a_paused_or_cancelled_campaign_stops_what_waits_in_the_workers(
    action: str, tmp_path: Path
) -> None:
    """A site that takes 2 messages/s: the worker's ready queue holds the next
    ~10 s of the campaign. Paused (or cancelled) with the CLI after its first
    delivery, the campaign stops: what waits in the worker goes back unsent
    (paused: queued for a resume; cancelled: cancelled), and at most the few
    messages sent while the command reached the worker are delivered (2/s).
    Before: the worker sent its whole ready queue (~20 messages) after the
    pause; only mail not yet handed to a worker stopped."""
    import json
    import subprocess
    import time

    from tests._engine_helpers import fastsend_cmd

    spool = tmp_path / "spool"
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text("[shaping.default]\nmessages_per_second = 2.0\nburst = 1\n")
    camp = write_campaign(tmp_path)
    rcpts = [f"p{i}@example.com" for i in range(40)]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                         "--workers", "1", "--source-ip", "127.0.0.2", "--json",
                         "--no-progress", "--max-wait", "5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            events = spool / "events.jsonl"
            deadline = time.monotonic() + 60
            while b'"delivered"' not in (events.read_bytes() if events.exists() else b""):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            act = run_fastsend("campaign", action, "1", "--spool", str(spool))
            assert act.returncode == 0, act.stderr
            acted = sum(
                1 for x in events.read_text().splitlines() if json.loads(x)["event"] == "delivered"
            )
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    s = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    got = received_counts(log)
    assert all(n == 1 for n in got.values()), got
    assert len(got) <= acted + 8, (len(got), acted, s)  # 8: 4 s at the site's 2/s
    assert s["delivered"] == len(got), (s, got)
    # Paused: the rest waits for a resume; cancelled: nothing is left pending.
    assert s["deferred"] == (40 - len(got) if action == "pause" else 0), s


# -- session 14 (aud14d) ---------------------------------------------------------


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def test_a_killed_workers_window_counts_as_an_attempt_of_unknown_outcome(
    tmp_path: Path,
) -> None:
    """A worker killed (SIGKILL) while its window is on slow connections: what it
    had been handed may have reached the receiver, and is sent again. Each such
    message counts one attempt of unknown outcome: a deferred event saying so
    (due again at once), its later delivery is its next attempt, and the run's
    ``attempts`` is every outcome in the event log, never fewer than the
    messages the receiver got. Before: the window went back to the queue with
    no attempt, no event, and the summary's attempts counted each message once
    (the receiver's duplicates were nowhere)."""
    import json
    import os
    import signal
    import subprocess
    import time

    from tests._engine_helpers import fastsend_cmd

    spool = tmp_path / "spool"
    camp = write_campaign(tmp_path)
    # slow-*: their replies come after 0.5 s, so some mail is surely in the window
    # when the worker is killed, however late this test gets the CPU.
    rcpts = [f"slow-k{i}@d{i % 4}.example" for i in range(4)]
    rcpts += [f"k{i}@d{i % 4}.example" for i in range(296)]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "30", "--slow-ms", "500") as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim",
                         "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                         "--workers", "1", "--source-ip", "127.0.0.2", "--json",
                         "--no-progress", "--max-wait", "5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(received_counts(log)) < 30:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            workers = _children(proc.pid)
            assert workers
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    s = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert "exited with status -9" in err, err[-2000:]
    assert s["delivered"] == 300 and s["worker_restarts"] >= 1, (s, err[-2000:])
    events = [json.loads(x) for x in (spool / "events.jsonl").read_text().splitlines()]
    outcomes = [e for e in events if e["event"] in ("delivered", "deferred", "bounced", "expired")]
    unknown = [e for e in outcomes if e["event"] == "deferred" and "outcome unknown" in e["text"]]
    assert unknown, err[-2000:]
    assert all(e["next_attempt"] <= e["time"] + 1 and e["stage"] == "worker" for e in unknown)
    assert s["attempts"] == len(outcomes), (s, len(outcomes))
    got = received_counts(log)
    assert set(got) == set(rcpts)
    assert s["attempts"] >= sum(got.values()), (s, sum(got.values()))
    # Each message's delivery is its attempt after the unknown one(s).
    delivered = {e["rcpt"]: e["attempt"] for e in outcomes if e["event"] == "delivered"}
    for e in unknown:
        assert delivered[e["rcpt"]] >= e["attempt"] + 1, e
    for rcpt, n in got.items():
        assert delivered[rcpt] >= n, (rcpt, n, delivered[rcpt])


def test_a_tenant_under_a_low_rate_does_not_hold_back_other_tenants(tmp_path: Path) -> None:
    """``fastsend serve`` with one worker whose window takes 200 messages, and a
    tenant limited to 5 messages/s (``[shaping.dispatch] tenants``): that
    tenant's 1,000-recipient campaign, then another tenant's 20 recipients.
    The second tenant's mail goes at once (the first one's rate-held mail keeps
    only 10 s of its rate in the window, the rest waits in the queue, due at
    its rate), while most of the first campaign is still to send. Before: the
    held mail filled the window and the other tenant waited until the slow
    campaign's last message was claimed (200 s here; 20,000 recipients: an
    hour)."""
    import json
    import subprocess
    import time
    import urllib.request

    from tests._engine_helpers import fastsend_cmd, sink_log

    from conftest import free_port

    spool = tmp_path / "spool"
    keys = {}
    for tenant in ("slow", "acme"):
        r = run_fastsend("apikey", "create", "--tenant", tenant, "--spool", str(spool))
        assert r.returncode == 0, r.stderr
        keys[tenant] = r.stdout.strip()
    log = tmp_path / "sink.jsonl"
    port = free_port()
    with SinkProcess("--log", str(log)) as sink:
        cfg = tmp_path / "serve.toml"
        cfg.write_text(
            f'[spool]\ndir = "{spool}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
            f'[workers]\ncount = 1\n[delivery]\ntls = "off"\nwindow = 200\n'
            f'[routes]\n"*" = "{sink.host}:{sink.port}"\n'
            "[shaping.dispatch]\ntenants = { slow = 5 }\n"
        )
        proc = subprocess.Popen(fastsend_cmd("serve", "-c", str(cfg)), stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert proc.stderr is not None
            while "ready in" not in (line := proc.stderr.readline()):
                assert line, "serve exited"

            def post(tenant: str, rcpts: list[str]) -> None:
                body = {"name": tenant, "template": {"from": "a@example.com", "subject": "Hi",
                                                     "text": "Dear {{ email }}"},
                        "recipients": [{"email": r} for r in rcpts]}  # fmt: skip
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/campaigns", data=json.dumps(body).encode(),
                    headers={"Authorization": "Bearer " + keys[tenant],
                             "Content-Type": "application/json"},
                )  # fmt: skip
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status == 201

            post("slow", [f"b{i}@d{i % 7}.example" for i in range(1000)])
            time.sleep(1.0)  # the slow tenant's mail fills the window
            small = {f"s{i}@x{i % 3}.example" for i in range(20)}
            post("acme", sorted(small))
            deadline = time.monotonic() + 60  # the counterfactual: 200 s
            while True:
                got = {r for m in sink_log(log) for r in m["recipients"]}
                if small <= got:
                    break
                assert time.monotonic() < deadline, f"{len(small & got)} of 20 delivered"
                time.sleep(0.2)
            assert len(got - small) < 500, len(got - small)  # the slow campaign goes on at 5/s
        finally:
            proc.terminate()
            proc.wait(60)


def test_a_redis_password_is_never_printed_by_send_or_its_resume_hint(tmp_path: Path) -> None:
    """``fastsend send --spool redis://:PASSWORD@...`` (a Redis with
    ``requirepass``): the summary names the spool without the password, and
    so does the ``fastsend resume`` command printed when a signal stops it
    (``****`` where the password was: logs and CI output are no place for
    it). Before: the JSON summary carried the URL as given, password and all."""
    import argparse

    from tests._redis_helpers import start_redis

    from fastsend.commands.common import resume_command

    secret = "s3cret-" + tmp_path.name[-6:]
    with start_redis("--requirepass", secret) as rs, SinkProcess() as sink:
        url = f"redis://:{secret}@127.0.0.1:{rs.port}/0?node=a&dir={tmp_path / 'local'}"
        camp = write_campaign(tmp_path)
        lst = _list(tmp_path, ["a@example.com", "b@example.com"])
        r = run_fastsend("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", url,
                         "--route", f"*={sink.host}:{sink.port}", "--workers", "1", "--json",
                         "--no-progress", "--max-wait", "0")  # fmt: skip
        s = summary(r)
        assert s["delivered"] == 2, (s, r.stderr[-2000:])
        assert secret not in r.stdout + r.stderr
        assert s["spool"].startswith("redis://:****@127.0.0.1:")
    args = argparse.Namespace(config=None, spool=url, route=["*=127.0.0.1:25"], source_ip=None,
                              helo=None, retry=None, workers=None, nameserver=[],
                              max_wait=300.0)  # fmt: skip
    hint = resume_command(args)
    assert secret not in hint and "redis://:****@127.0.0.1:" in hint, hint


# -- session 15 (aud15d) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis-same-name", "redis-other-node"])
def test_a_killed_nodes_window_counts_as_an_attempt_of_unknown_outcome(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A whole node killed (kill -9 of ``fastsend send``: supervisor and workers)
    while its window is on slow connections. What it had claimed may have reached
    the receiver; whoever takes it back (``resume`` on the SQLite spool; on Redis
    the same node name restarted, or another node once the dead one's lease
    lapsed) counts one attempt of unknown outcome per message: a deferred event
    saying so, due again at once, and the delivery after it is the next attempt,
    so no recipient got more copies than the attempts its message counts. Before:
    the window went back to the queue with no attempt and no event (only a
    killed worker's window was counted)."""
    import json
    import os
    import signal
    import subprocess
    import time

    import psutil
    from tests._engine_helpers import fastsend_cmd

    local = tmp_path / "spool"
    first: Any = local
    again: Any = local
    if kind != "sqlite":
        server = request.getfixturevalue("redis_server")
        prefix = "dead" + os.urandom(3).hex()
        first = server.url(prefix=prefix, node="a", lease="1", dir=str(local))
        again = first if kind == "redis-same-name" else server.url(
            prefix=prefix, node="b", lease="1", dir=str(local)
        )
    camp = write_campaign(tmp_path)
    # slow-*: their replies come after 0.5 s, so some mail is surely in flight when
    # the node is killed, however late this test gets the CPU.
    rcpts = [f"slow-x{i}@d{i % 4}.example" for i in range(4)]
    rcpts += [f"x{i}@d{i % 4}.example" for i in range(196)]
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "30", "--slow-ms", "500") as sink:
        args = ["--route", f"*={sink.host}:{sink.port}", "--workers", "1",
                "--source-ip", "127.0.0.2", "--json", "--no-progress", "--max-wait", "5"]  # fmt: skip
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", str(first),
                         *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(received_counts(log)) < 30:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]
            for pid in family:
                os.kill(pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        before = len((local / "events.jsonl").read_text().splitlines())
        res = subprocess.run(
            fastsend_cmd("resume", "--spool", str(again), *args),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    s = summary(res)
    got = received_counts(log)
    assert set(got) == set(rcpts), len(got)
    lines = (local / "events.jsonl").read_text().splitlines()[before:]
    events = [json.loads(x) for x in lines]
    outcomes = [e for e in events if e["event"] in ("delivered", "deferred", "bounced", "expired")]
    unknown = [e for e in outcomes if e["event"] == "deferred" and "outcome unknown" in e["text"]]
    assert unknown, res.stderr[-2000:]
    assert all(e["next_attempt"] <= e["time"] + 1 for e in unknown), unknown[:3]
    assert s["attempts"] == len(outcomes), (s, len(outcomes))
    every = [json.loads(x) for x in (local / "events.jsonl").read_text().splitlines()]
    delivered = {e["rcpt"]: e["attempt"] for e in every if e["event"] == "delivered"}
    assert set(delivered) == set(rcpts)
    # No recipient got more copies than the attempts its message counts.
    over = {r: (n, delivered[r]) for r, n in got.items() if n > delivered[r]}
    assert not over, over
    for e in unknown:
        assert delivered[e["rcpt"]] == e["attempt"] + 1, e


def test_a_second_live_process_under_a_nodes_name_is_refused(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two processes started under one node name (the same ``node=`` in the spool
    URL, a config copied to a second machine) would share one lease and one
    in-flight set: the second one's start takes the first one's window back
    while the first still sends it (duplicates), and each renews the other's
    claims. A second live process with that name is refused (exit 75, naming the
    holder) before it touches the queue; the first one's mail is delivered once
    each. Before: the second one ran."""
    import os
    import signal
    import subprocess
    import time

    from tests._engine_helpers import fastsend_cmd

    local = tmp_path / "spool"
    server = request.getfixturevalue("redis_server")
    url = server.url(node="mx1", dir=str(local))
    camp = write_campaign(tmp_path)
    rcpts = [f"y{i}@d{i % 4}.example" for i in range(20)]
    cfg = tmp_path / "fastsend.toml"  # 10 a second: the first one runs ~2 s
    cfg.write_text("[shaping.default]\nmessages_per_second = 10.0\nburst = 1\n")
    lst = _list(tmp_path, rcpts)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        args = ["-c", str(cfg), "--route", f"*={sink.host}:{sink.port}", "--workers", "1",
                "--source-ip", "127.0.0.2", "--json", "--no-progress", "--max-wait", "5"]  # fmt: skip
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", url, *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(received_counts(log)) < 3:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            # Held still (alive, its name held) while the second one starts, however
            # long that takes on a busy machine.
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                second = subprocess.run(
                    fastsend_cmd("resume", "--spool", url, *args),
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            _out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert second.returncode == 75, second.stderr[-2000:]
    assert "node name 'mx1'" in second.stderr and f"pid {proc.pid}" in second.stderr, second.stderr
    assert proc.returncode == 0, err[-2000:]
    got = received_counts(log)
    assert got == dict.fromkeys(rcpts, 1), {r: n for r, n in got.items() if n != 1}
