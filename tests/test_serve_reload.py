"""SIGHUP of a real ``fastsend serve``: the new config's warnings are printed
(as at start), and a config with an error is refused with the error naming
the key while the running config stays in force."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from tests._serve_helpers import Served, http
from tests.test_multinode import TPL

from fastsend.sink import SinkThread

RULE = '[[shaping.rule]]\nname = "typo"\naction = "rest"\nmatch = "x"\nprovider = "gogle"\n'


def hup(s: Served, want: str, timeout: float = 60.0) -> str:
    n = len(s.lines)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while not any(want in ln for ln in s.lines[n:]):
        assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
        time.sleep(0.05)
    return "".join(s.lines[n:])


def test_sighup_prints_warnings_and_refuses_a_config_with_errors(tmp_path: Path) -> None:
    s = Served(tmp_path, None, serve_args=("--no-workers",))
    try:
        s.extra = RULE
        s.write_config()
        out = hup(s, "configuration reloaded")
        assert ("SIGHUP: warning: [[shaping.rule]] \"typo\": provider 'gogle' is not a"
                " provider") in out, out
        # An error (a TLS key that does not exist): refused, naming the key.
        s.extra = (f'[submission]\nlisten = "127.0.0.1:0"\ntls_cert = "{tmp_path}/c.pem"\n'
                   f'tls_key = "{tmp_path}/k.pem"\n')  # fmt: skip
        s.write_config()
        out = hup(s, "config not reloaded")
        assert f"[submission] tls_cert: cannot read {tmp_path}/c.pem" in out, out
        assert "configuration reloaded" not in out
        assert s.req("GET", "/v1/campaigns")[0] == 200  # still serving, on the old config
    finally:
        assert s.stop() == 0


def test_sighup_reads_a_renewed_tls_certificate_for_new_submission_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The submission listener's certificate is renewed at the same paths (certbot's
    deploy hook: ``systemctl reload fastsend``): after SIGHUP a new STARTTLS session
    is served the new certificate. Before, the one read at start was served until a
    restart: once it expired every client's TLS failed. A changed listen address is
    a warning (the next start), not silently ignored."""
    import asyncio
    import contextlib
    import ssl

    import aiosmtplib
    import trustme

    from conftest import free_port
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.listeners import start_listeners

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue() -> ssl.SSLContext:
        ca = trustme.CA()
        c = ca.issue_cert("localhost", "127.0.0.1")
        c.cert_chain_pems[0].write_to_path(str(cert))
        c.private_key_pem.write_to_path(str(key))
        client = ssl.create_default_context()
        ca.configure_trust(client)
        return client

    old_ca = issue()
    tables = {"spool": {"dir": str(tmp_path / "spool")},
              "submission": {"listen": f"127.0.0.1:{free_port()}", "tls_cert": str(cert),
                             "tls_key": str(key)}}  # fmt: skip
    ctx = open_context(from_dict(tables))

    async def starttls(port: int, trust: ssl.SSLContext) -> bool:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=trust,
                               start_tls=True, timeout=10)  # fmt: skip
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError):
            return False
        with contextlib.suppress(Exception):
            await smtp.quit()
        return True

    async def main() -> None:
        servers = await start_listeners(ctx)
        port = int(servers[0].sockets[0].getsockname()[1])
        try:
            assert await starttls(port, old_ca)
            new_ca = issue()  # renewed at the same paths
            moved = {**tables, "submission": {**tables["submission"],
                                              "listen": f"127.0.0.1:{free_port()}"}}  # fmt: skip
            servers.reload(from_dict(moved))
            assert await starttls(port, new_ca)  # the new certificate, same listener
            assert not await starttls(port, old_ca)
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()
            servers.shutdown()

    asyncio.run(main())
    ctx.close()
    assert "[submission] listen changed; it takes effect at the next start" in caplog.text


def test_a_dkim_key_rotated_at_the_same_path_is_read_again(tmp_path: Path) -> None:
    """A DKIM key replaced at its path (a rotation under the same selector, then
    SIGHUP): the next load, as a reload's new workers' (delivery.worker.prepare,
    Signer.from_settings), gives the new key, in place or by rename. Before, the
    first key read was cached for the life of the process: a reloaded serve kept
    signing with the old key until a restart (its DNS record already replaced:
    every signature failed)."""
    import os

    from fastsend.message.keys import generate, load_private_key, public_p, write_key

    path = tmp_path / "s1.pem"
    first, second, third = (generate("ed25519") for _ in range(3))
    write_key(first, path)
    assert public_p(load_private_key(str(path))) == public_p(first)
    assert load_private_key(str(path)) is load_private_key(str(path))  # still cached
    write_key(second, path, overwrite=True)  # in place
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))
    assert public_p(load_private_key(str(path))) == public_p(second)
    write_key(third, tmp_path / "new.pem")
    os.replace(tmp_path / "new.pem", path)  # by rename
    assert public_p(load_private_key(str(path))) == public_p(third)


def test_sighup_says_which_changes_wait_for_the_next_start(tmp_path: Path) -> None:
    """A changed [workers] count or [events] log path cannot take effect on SIGHUP:
    it is said (a warning naming the section), not silently ignored while serve
    answers "configuration reloaded"."""
    s = Served(tmp_path, None, serve_args=("--no-workers",))
    try:
        s.extra = f'[events]\nlog = "{tmp_path}/elsewhere.jsonl"\n'
        s.write_config()
        text = s.cfg.read_text()
        assert "[workers]\ncount = 1\n" in text
        s.cfg.write_text(text.replace("[workers]\ncount = 1\n", "[workers]\ncount = 3\n"))
        out = hup(s, "configuration reloaded")
        assert "SIGHUP: [workers] count changed; it takes effect at the next start" in out, out
        assert "SIGHUP: [events] log changed; it takes effect at the next start" in out, out
    finally:
        assert s.stop() == 0


def _shaping(s: Served, action: str, site: str = "") -> list[dict[str, Any]]:
    path = s.tmp / "spool" / "shaping.jsonl"
    if not path.exists():
        return []
    evs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [e for e in evs if e.get("action") == action and site in e.get("site", "")]


def test_a_reload_gives_no_site_a_second_burst_and_keeps_its_aimd_cut(tmp_path: Path) -> None:
    """A SIGHUP's new worker starts each (source IP, site) where the old one
    left it (wire.Lanes): a site whose burst was spent gets no second one
    (rl.example: 4 an hour, burst 4, all 4 sent before the reload: none of the
    4 posted after it goes), and a site slowed down by its deferrals stays
    slowed down, raised from the cut (slow.example: its configured 40/s cut
    by a 451, then successes after the reload raise it from the cut rate: an
    aimd_increase below 40). Before, the new worker had full buckets and the
    configured rate: 4 more to rl.example at once, slow.example at 40/s."""
    # (A static route's site takes the limits of its host's name: two addresses.)
    with SinkThread(listen=[("127.0.0.2", 0)]) as limited, \
            SinkThread(listen=[("127.0.0.3", 0)]) as other:  # fmt: skip
        s = Served(tmp_path, f"{other.host}:{other.port}",
                   routes=f'"rl.example" = "{limited.host}:{limited.port}"',
                   extra='[shaping.domain."127.0.0.2"]\nmessages_per_hour = 4\nburst = 4\n'
                         '[shaping.domain."127.0.0.3"]\nmessages_per_second = 40\n')  # fmt: skip
        try:
            rows = [{"email": f"u{i}@rl.example", "name": "x"} for i in range(4)]
            rows.append({"email": "tempfail-a@slow.example", "name": "x"})
            st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
            assert st == 201, out
            deadline = time.monotonic() + 60
            while len(limited.messages) < 4 or not _shaping(s, "aimd_decrease", "127.0.0.3"):
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            cut = _shaping(s, "aimd_decrease", "127.0.0.3")[-1]["rate"]
            assert cut < 40
            hup(s, "configuration reloaded")
            rows = [{"email": f"v{i}@rl.example", "name": "x"} for i in range(4)]
            rows += [{"email": f"w{i}@slow.example", "name": "x"} for i in range(3)]
            st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
            assert st == 201, out
            deadline = time.monotonic() + 60
            while len([m for m in other.messages if "@slow.example" in m.recipients[0]]) < 3:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            # The new worker raised slow.example's rate from the old worker's cut.
            while not _shaping(s, "aimd_increase", "127.0.0.3"):
                assert time.monotonic() < deadline and s.proc.poll() is None, (
                    "slow.example's AIMD cut was reset by the reload",
                    _shaping(s, "aimd_decrease"),
                )
                time.sleep(0.05)
            assert cut < _shaping(s, "aimd_increase", "127.0.0.3")[0]["rate"] < 40
            # rl.example's mail was in the same claim as slow.example's, which went:
            # the burst spent before the reload holds it (a second would have sent it).
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                assert len(limited.messages) == 4, [m.recipients for m in limited.messages]
                time.sleep(0.1)
        finally:
            s.stop()


def _metric(s: Served, name: str) -> float:
    st, body = http("GET", s.base + "/metrics", key=s.keys["acme"])
    assert st == 200, body
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
               if ln.startswith(name + "{") or ln.startswith(name + " "))  # fmt: skip


def test_worker_counters_in_metrics_keep_what_a_reloaded_worker_counted(tmp_path: Path) -> None:
    """/metrics' worker counters are totals over the slot's workers: after a
    SIGHUP they go on from what the replaced worker counted (its work before
    the reload and during the overlap included), never back. Before, a slot's
    counters were its current worker's: a scrape after the reload showed what
    the new worker had done, and what the old one did since the last scrape
    was lost (connections_opened_total: 1, not 2)."""
    with SinkThread() as sink:
        _reload_keeps_counters(tmp_path, sink)


def _reload_keeps_counters(tmp_path: Path, sink: SinkThread) -> None:
    s = Served(tmp_path, f"{sink.host}:{sink.port}", '[dashboard]\nadmin_tenants = ["acme"]\n')
    try:
        opened = "fastsend_worker_connections_opened_total"
        st, out = s.req("POST", "/v1/campaigns",
                        {"template": TPL, "recipients": [{"email": "a@x.example", "name": "x"}]})
        assert st == 201, out
        deadline = time.monotonic() + 60
        while not sink.messages:
            assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
            time.sleep(0.05)
        hup(s, "configuration reloaded")
        st, out = s.req("POST", "/v1/campaigns",
                        {"template": TPL, "recipients": [{"email": "b@x.example", "name": "x"}]})
        assert st == 201, out
        seen = [_metric(s, opened)]  # the new worker opens its own connection
        while seen[-1] < 2:
            assert time.monotonic() < deadline and s.proc.poll() is None, seen
            time.sleep(0.2)
            seen.append(_metric(s, opened))
        assert seen == sorted(seen), seen  # never backwards
        assert len(sink.messages) == 2
    finally:
        s.stop()


def test_a_sighup_checks_the_source_ips_again(tmp_path: Path) -> None:
    """A SIGHUP's [ips] source is checked as at start: an address the new
    config dropped is used no more, one that is no address of this machine
    (192.0.2.77) is said in a warning and rested (no mail is attempted from
    it: its mail goes from the pool's other address, or, with none, waits
    unattempted). Before, the reload took it silently and the worker tried it:
    each attempt from it deferred ("Cannot assign requested address")."""
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", '[ips]\nsource = ["127.0.0.2"]\n')
        try:
            _reload_checks_ips(s, sink)
        finally:
            s.stop()


def _reload_checks_ips(s: Served, sink: SinkThread) -> None:
    def send(n: int, tag: str) -> list[str]:
        rows = [{"email": f"{tag}{i}@x.example", "name": "x"} for i in range(n)]
        st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
        assert st == 201, out
        deadline = time.monotonic() + 60
        while len(got := [m for m in sink.messages if m.recipients[0].startswith(tag)]) < n:
            assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
            time.sleep(0.05)
        return sorted({m.peer for m in got})

    assert send(2, "a") == ["127.0.0.2"]
    s.extra = '[ips]\nsource = ["127.0.0.3", "192.0.2.77"]\n'
    s.write_config()
    out = hup(s, "configuration reloaded")
    assert "SIGHUP: source IP 192.0.2.77 is not an address of this machine" in out, out
    assert send(8, "b") == ["127.0.0.3"]
    # Its only address not on this machine: the mail waits, unattempted (before:
    # an attempt deferred, "Cannot assign requested address", then the backoff).
    s.extra = '[ips]\nsource = ["192.0.2.77"]\n'
    s.write_config()
    hup(s, "configuration reloaded")
    st, out = s.req("POST", "/v1/messages", {"from": "a@example.com", "subject": "s",
                                             "text": "t", "to": ["c@x.example"]})  # fmt: skip
    assert st == 202, out
    mid = out["messages"][0]["ids"][0]
    deadline = time.monotonic() + 60
    while True:  # until it was tried, or handed back for later (the rest)
        st, msg = s.req("GET", f"/v1/messages/{mid}")
        assert st == 200, msg
        if msg["attempts"] or (msg["next_attempt"] or 0) > msg["created"] + 5:
            break
        assert time.monotonic() < deadline and s.proc.poll() is None, msg
        time.sleep(0.1)
    assert msg["attempts"] == 0 and msg["state"] == "queued", msg
    events = (s.tmp / "spool" / "events.jsonl").read_text()
    assert "192.0.2.77" not in "".join(
        ln for ln in events.splitlines() if '"deferred"' in ln
    ), "mail was attempted from an address of no interface"
    # Dropped from [ips]: its rest ends without a word (it is not "back").
    s.extra = '[ips]\nsource = ["127.0.0.3"]\n'
    s.write_config()
    out = hup(s, "configuration reloaded")
    assert "192.0.2.77" not in out, out


class _HeldAPI:
    """A SendGrid v3 stand-in (POST /v3/mail/send) that answers a request for a
    ``hold*`` recipient only once ``release`` is called: a request in flight
    across the reload; it counts the requests in flight at once."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.open = self.peak = 0
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def app(self) -> Any:
        from aiohttp import web

        async def send(request: web.Request) -> web.Response:
            if self.gate is None:
                self.gate, self.loop = asyncio.Event(), asyncio.get_running_loop()
            body = await request.json()
            rcpts = [t["email"] for p in body["personalizations"] for t in p["to"]]
            self.open += 1
            self.peak = max(self.peak, self.open)
            try:
                self.rcpts += rcpts
                if any(r.startswith("hold") for r in rcpts):
                    await self.gate.wait()
            finally:
                self.open -= 1
            return web.Response(status=202, headers={"X-Message-Id": "m" + rcpts[0]})

        app = web.Application()
        app.router.add_post("/v3/mail/send", send)
        return app

    def release(self) -> None:
        gate, loop = self.gate, self.loop
        assert gate is not None and loop is not None
        loop.call_soon_threadsafe(gate.set)


def test_a_reload_keeps_a_providers_request_cap_with_the_old_workers_requests(
    tmp_path: Path,
) -> None:
    """An HTTP provider transport (SendGrid, ``max_connections = 1``: one request
    in flight) with a request held across a SIGHUP: the new worker sends its
    mail only once the old worker's request is answered (wire.Conns names the
    provider's requests too), never two requests at once. Before, the
    provider's cap was not lent: the new worker sent beside the old one's."""
    from tests._provider_servers import ThreadedApp

    api = _HeldAPI()
    cred = tmp_path / "sg.secret"
    cred.write_text("api_key=sg-key\n")
    cred.chmod(0o600)
    with ThreadedApp(api.app()) as app:
        s = Served(tmp_path, "sg", f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\n'
                                   f'max_connections = 1\ncredentials_file = "{cred}"\n')  # fmt: skip
        try:

            def post(rcpt: str) -> None:
                st, out = s.req("POST", "/v1/messages", {"from": "a@example.com",
                                "subject": "s", "text": "t", "to": [rcpt]})  # fmt: skip
                assert st == 202, out

            post("hold@x.example")
            deadline = time.monotonic() + 60
            while not api.rcpts:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            hup(s, "configuration reloaded")
            post("next@x.example")
            # The new worker has the message (its request would go at once): it
            # waits for the old worker's request, the only one the cap allows.
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                assert api.peak == 1 and api.rcpts == ["hold@x.example"], api.rcpts
                time.sleep(0.05)
            api.release()
            while "next@x.example" not in api.rcpts:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            assert api.peak == 1
        finally:
            s.stop()


class _BlocksAfterTheDot:
    """An aiosmtpd handler: the first message's final dot is answered only once
    ``release`` is called, then with a block reply naming the client's address
    (a DNSBL listing: the classifier's ip_blocked); later ones are taken."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.gate is None:
            self.gate, self.loop = asyncio.Event(), asyncio.get_running_loop()
        first = not self.rcpts
        self.rcpts.extend(envelope.rcpt_tos)
        if first:
            await self.gate.wait()
            return ("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using"
                    " zen.spamhaus.org")  # fmt: skip
        return "250 2.0.0 taken"

    def release(self) -> None:
        gate, loop = self.gate, self.loop
        assert gate is not None and loop is not None
        loop.call_soon_threadsafe(gate.set)


def test_a_rest_the_retiring_worker_meets_reaches_its_slots_new_worker(tmp_path: Path) -> None:
    """A block reply to the old worker's last transaction, after a SIGHUP,
    rests the address for that site in the new worker too (it sends from the
    same addresses): the mail waiting for the site is handed back, not sent to
    the site that just refused the address. Before, rests were shared with the
    other workers of an address but the origin's slot was skipped, and the new
    worker has the old one's slot: it sent there at once."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    handler = _BlocksAfterTheDot()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        s = Served(tmp_path, f"127.0.0.1:{ctl.port}", delivery="max_connections = 1")
        try:

            def post(rcpt: str) -> int:
                st, out = s.req("POST", "/v1/messages", {"from": "a@example.com",
                                "subject": "s", "text": "t", "to": [rcpt]})  # fmt: skip
                assert st == 202, out
                return int(out["messages"][0]["ids"][0])

            post("first@x.example")
            deadline = time.monotonic() + 60
            while not handler.rcpts:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            hup(s, "configuration reloaded")
            mid = post("next@x.example")  # waits: the old worker holds the one connection
            handler.release()
            while True:  # until sent (to the site that refused us), or handed back
                st, msg = s.req("GET", f"/v1/messages/{mid}")
                assert st == 200, msg
                if "next@x.example" in handler.rcpts or msg["attempts"] or \
                        (msg["next_attempt"] or 0) > msg["created"] + 60:  # fmt: skip
                    break
                assert time.monotonic() < deadline and s.proc.poll() is None, msg
                time.sleep(0.1)
            assert handler.rcpts == ["first@x.example"], handler.rcpts
            assert msg["attempts"] == 0, msg
        finally:
            s.stop()
    finally:
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()


class _HoldsPerAddress:
    """An aiosmtpd handler that holds every message's final dot until
    ``release`` (then 250), counting the transactions held at once per client
    address."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.open: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.gate is None:
            self.gate, self.loop = asyncio.Event(), asyncio.get_running_loop()
        ip = session.peer[0]
        self.rcpts.extend(envelope.rcpt_tos)
        self.open[ip] = self.open.get(ip, 0) + 1
        self.peak[ip] = max(self.peak.get(ip, 0), self.open[ip])
        try:
            await self.gate.wait()
        finally:
            self.open[ip] -= 1
        return "250 2.0.0 taken"

    def release(self) -> None:
        gate, loop = self.gate, self.loop
        assert gate is not None and loop is not None
        loop.call_soon_threadsafe(gate.set)


def test_a_reload_that_moves_an_address_to_another_worker_lends_its_connections(
    tmp_path: Path,
) -> None:
    """Two workers, one address each; a SIGHUP's [ips] in another order moves
    each address to the other worker (as adding an address to [ips] moves
    others: the split is round-robin). The new worker sending from 127.0.0.2
    counts the connection the old worker of the other slot still holds from
    it (max_connections = 1): no second connection from that address to the
    site while the old one's transaction is on the wire. Before, a new worker
    was told only its own slot's predecessor's connections."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    handler = _HoldsPerAddress()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        s = Served(tmp_path, f"127.0.0.1:{ctl.port}", '[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\n',
                   delivery="max_connections = 1\nbatch_size = 1", workers=2)  # fmt: skip
        try:

            def post(rcpts: list[str]) -> None:
                rows = [{"email": r, "name": "x"} for r in rcpts]
                st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
                assert st == 201, out

            post([f"a{i}@x{i}.example" for i in range(4)])
            deadline = time.monotonic() + 60
            while sorted(handler.open) != ["127.0.0.2", "127.0.0.3"]:  # both hold one
                assert time.monotonic() < deadline and s.proc.poll() is None, handler.open
                time.sleep(0.05)
            s.extra = '[ips]\nsource = ["127.0.0.3", "127.0.0.2"]\n'
            s.write_config()
            hup(s, "configuration reloaded")
            post([f"b{i}@x{i}.example" for i in range(6)])
            end = time.monotonic() + 2.0  # (a second connection would open at once)
            while time.monotonic() < end:
                assert max(handler.peak.values()) == 1, handler.peak
                time.sleep(0.05)
            handler.release()
            while len(handler.rcpts) < 10:
                assert time.monotonic() < deadline and s.proc.poll() is None, handler.rcpts
                time.sleep(0.05)
            assert max(handler.peak.values()) == 1, handler.peak
        finally:
            s.stop()
    finally:
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()


class _SlowsDownAfterTheDot(_BlocksAfterTheDot):
    """As _BlocksAfterTheDot, the held first message answered "slow down" (451)."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        return "451 4.7.1 Rate limited, slow down" if reply.startswith("554") else reply


def test_a_slow_down_the_retiring_worker_meets_slows_its_successor(tmp_path: Path) -> None:
    """The reply to the old worker's last transaction, after a SIGHUP, is a
    "slow down" (451): the AIMD cut it makes there reaches the new worker
    (wire.Lanes again, with the old one's stats), whose deliveries then raise
    the rate from the cut (an aimd_increase below the configured 40/s). Before,
    the new worker had the lane as it was at the reload: at full speed."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    handler = _SlowsDownAfterTheDot()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        s = Served(tmp_path, f"127.0.0.1:{ctl.port}", delivery="max_connections = 1",
                   extra='[shaping.domain."127.0.0.1"]\nmessages_per_second = 40\n')  # fmt: skip
        try:

            def post(rcpts: list[str]) -> None:
                rows = [{"email": r, "name": "x"} for r in rcpts]
                st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
                assert st == 201, out

            post(["first@x.example"])
            deadline = time.monotonic() + 60
            while not handler.rcpts:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            hup(s, "configuration reloaded")
            post([f"n{i}@x.example" for i in range(3)])  # (wait: the one connection is held)
            handler.release()
            while len(handler.rcpts) < 4 or not _shaping(s, "aimd_increase"):
                assert time.monotonic() < deadline and s.proc.poll() is None, (
                    handler.rcpts, _shaping(s, "aimd_decrease"))  # fmt: skip
                time.sleep(0.05)
            cut = _shaping(s, "aimd_decrease")[0]["rate"]
            assert cut <= _shaping(s, "aimd_increase")[0]["rate"] < 40
        finally:
            s.stop()
    finally:
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()


class _HoldsTheFirst(_BlocksAfterTheDot):
    """As _BlocksAfterTheDot, the held first message answered 250."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        return "250 2.0.0 taken" if reply.startswith("554") else reply


def test_a_reload_keeps_the_warm_up_cap_with_the_old_workers_last_sends(tmp_path: Path) -> None:
    """An address on warm-up (3 a day here): the old worker has sent one (its
    transaction still on the wire) when a SIGHUP comes; the new worker sends
    only 2 more today. The old worker tells its warm-up counts with its answer
    to wire.Retire; before, with its next second's stats, after the new worker
    had started from totals without them: 3 more went (4 in the day)."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    handler = _HoldsTheFirst()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        s = Served(tmp_path, f"127.0.0.1:{ctl.port}",
                   '[pools]\ndefault = "main"\n[pools.warmup]\nschedule = [3, 6]\n'
                   '[pools.main]\nips = [{ ip = "127.0.0.2", warmup_day = 1 }]\n',
                   delivery="max_connections = 1")  # fmt: skip
        try:

            def post(rcpts: list[str]) -> list[int]:
                st, out = s.req("POST", "/v1/messages", {"from": "a@example.com",
                                "subject": "s", "text": "t", "to": rcpts})  # fmt: skip
                assert st == 202, out
                return [i for m in out["messages"] for i in m["ids"]]

            post(["first@x.example"])
            deadline = time.monotonic() + 60
            while not handler.rcpts:
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.01)
            hup(s, "configuration reloaded")
            ids = post([f"n{i}@x.example" for i in range(3)])
            handler.release()
            # Until each of the 3 is sent or handed back for the cap (the next day).
            while True:
                msgs = [s.req("GET", f"/v1/messages/{i}")[1] for i in ids]
                if all(m["state"] == "delivered" or (m["next_attempt"] or 0) > m["created"] + 60
                       for m in msgs):  # fmt: skip
                    break
                assert time.monotonic() < deadline and s.proc.poll() is None, msgs
                time.sleep(0.1)
            assert len(handler.rcpts) == 3, handler.rcpts
        finally:
            s.stop()
    finally:
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()


class _ThrottlingAPI(_HeldAPI):
    """A SendGrid v3 stand-in whose first request is answered 429 with
    Retry-After: 300 (the account over its rate), the others 202."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def app(self) -> Any:
        from aiohttp import web

        async def send(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests += 1
            if self.requests == 1:
                return web.json_response({"errors": [{"message": "too many requests"}]},
                                         status=429, headers={"Retry-After": "300"})  # fmt: skip
            self.rcpts += [t["email"] for p in body["personalizations"] for t in p["to"]]
            return web.Response(status=202, headers={"X-Message-Id": "m"})

        app = web.Application()
        app.router.add_post("/v3/mail/send", send)
        return app


def test_a_reload_keeps_a_providers_retry_after(tmp_path: Path) -> None:
    """A provider transport answered 429 with Retry-After: 300: its queue waits.
    After a SIGHUP the new worker takes over that pause (wire.Lanes providers):
    mail for the provider waits too, handed back, no request sent. Before,
    the new worker's queue was fresh and sent at once, into the pause."""
    from tests._provider_servers import ThreadedApp

    api = _ThrottlingAPI()
    cred = tmp_path / "sg.secret"
    cred.write_text("api_key=sg-key\n")
    cred.chmod(0o600)
    with ThreadedApp(api.app()) as app:
        s = Served(tmp_path, "sg", f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\n'
                                   f'credentials_file = "{cred}"\n')  # fmt: skip
        try:

            def post(rcpt: str) -> int:
                st, out = s.req("POST", "/v1/messages", {"from": "a@example.com",
                                "subject": "s", "text": "t", "to": [rcpt]})  # fmt: skip
                assert st == 202, out
                return int(out["messages"][0]["ids"][0])

            def waits(mid: int) -> bool:
                st, msg = s.req("GET", f"/v1/messages/{mid}")
                assert st == 200, msg
                return bool((msg["next_attempt"] or 0) > msg["created"] + 60)

            first = post("a@x.example")
            deadline = time.monotonic() + 60
            while not waits(first):  # throttled: handed back for the pause
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            hup(s, "configuration reloaded")
            mid = post("b@x.example")
            while not (api.requests > 1 or waits(mid)):
                assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
                time.sleep(0.05)
            assert api.requests == 1 and not api.rcpts, api.rcpts
        finally:
            s.stop()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): /proc's state letter."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def test_a_sighup_during_a_reload_is_read_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator saves the config, SIGHUPs, saves again and SIGHUPs while the
    first reload is still replacing workers: the second edit takes effect (the
    file is read again once the first reload is done). It was ignored with a
    warning: the first version stayed in force until yet another SIGHUP. The
    server is frozen (SIGSTOP, a fault point) right after the first reload read
    the file, so the second SIGHUP surely lands during it."""
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "serve-reload-read:1")
    s = Served(tmp_path, None)
    try:
        n = len(s.lines)
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not _stopped(s.proc.pid):
            assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
            time.sleep(0.02)
        s.extra = RULE  # the second edit: its warning says it was read
        s.write_config()
        s.proc.send_signal(signal.SIGHUP)
        s.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while True:
            out = "".join(s.lines[n:])
            if out.count("configuration reloaded") >= 2 or "ignored" in out:
                break
            assert time.monotonic() < deadline and s.proc.poll() is None, out
            time.sleep(0.05)
        assert "ignored" not in out, out
        assert "SIGHUP: a reload is in progress; the config is read again after it" in out, out
        assert "provider 'gogle' is not a provider" in out.rpartition("configuration reloaded")[0]
        assert out.count("configuration reloaded") == 2, out
        # one more SIGHUP later: a reload of its own, as ever
        out = hup(s, "configuration reloaded")
        assert "read again" not in out, out
    finally:
        assert s.stop() == 0
