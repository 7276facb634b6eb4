"""The small promises of the ``fastsend`` command line, audited from outside as a
new user meets them (session 19): usage errors, exit statuses, what a command
says when there is nothing for it to do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests._engine_helpers import send_via, summary, write_campaign, write_recipients
from tests.test_bounce_parse import DSN

from fastsend.delivery.mx import Site
from fastsend.outcome import Outcome
from fastsend.sink import SinkProcess
from fastsend.testing.dnsserver import DNSServer


def fastsend(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args], input=stdin, capture_output=True, timeout=60
    )


def test_no_command_is_a_usage_error() -> None:
    """`fastsend` alone printed the help on stdout and exited 0: a script that lost
    its command passed as done. Now: the usage on stderr, exit 2, as argparse does
    for every other usage error."""
    r = fastsend()
    assert r.returncode == 2
    assert r.stdout == b""
    assert b"usage: fastsend" in r.stderr and b"a command is required" in r.stderr
    assert fastsend("--help").returncode == 0  # asked for: not an error


def test_bounce_classify_says_not_a_bounce(tmp_path: Path) -> None:
    """A message that is no bounce printed nothing and exited 0, as a bounce whose
    lines were lost would: now it is said on stderr and the status is 1; the
    other files are still classified."""
    plain = tmp_path / "plain.eml"
    plain.write_bytes(b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hi\r\n\r\nhello\r\n")
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(DSN)
    r = fastsend("bounce", "classify", str(plain))
    assert r.returncode == 1 and r.stdout == b""
    assert f"{plain}: not a bounce".encode() in r.stderr
    r = fastsend("bounce", "classify", str(plain), str(dsn))
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and {row["file"] for row in rows} == {str(dsn)}
    r = fastsend("bounce", "classify", "-", stdin=b"")
    assert r.returncode == 1 and b"-: not a bounce" in r.stderr
    assert fastsend("bounce", "classify", str(dsn)).returncode == 0


def test_fail_deferred_exits_75_while_mail_is_still_deferred(tmp_path: Path) -> None:
    """`send` exits 0 with mail still deferred (documented: it stays queued); a job
    that must know gets `--fail-deferred`: exit 75 (try again later), the count
    and the resume command on stderr; `resume` the same. With nothing deferred the
    flag changes nothing."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["ok@example.net", "tempfail-x@example.net"])
    with SinkProcess() as sink:
        addr = sink.addresses[0]
        engine = ("--workers", "1", "--max-wait", "0")
        common = ("--no-dkim", *engine)
        plain = send_via(camp, rcpts, addr, tmp_path / "s1", *common)
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert summary(plain)["deferred"] == 1
        strict = send_via(camp, rcpts, addr, tmp_path / "s2", *common, "--fail-deferred")
        assert strict.returncode == 75, strict.stderr[-2000:]
        s = summary(strict)
        assert (s["delivered"], s["deferred"]) == (1, 1)
        assert "1 recipient(s) still deferred" in strict.stderr
        assert "fastsend resume" in strict.stderr and "--fail-deferred" in strict.stderr
        again = subprocess.run(
            [sys.executable, "-m", "fastsend", "resume", "--spool", str(tmp_path / "s2"),
             "--route", f"*={addr[0]}:{addr[1]}", "--json", "--no-progress",
             *engine, "--fail-deferred"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 75, again.stderr[-2000:]
        clean = write_recipients(tmp_path, ["ok2@example.net"], name="clean.csv")
        done = send_via(camp, clean, addr, tmp_path / "s3", *common, "--fail-deferred")
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary(done)["deferred"] == 0


def test_an_mx_naming_an_ip_address_is_not_connected_to(dns_server: DNSServer) -> None:
    """RFC 5321 5.1 / RFC 1035 3.3.9: an MX names a host, never an address. A
    domain whose MX reads "10 192.0.2.1." is misconfigured (Postfix: "numeric
    domain name in resource data of MX record", not used); it was connected to as
    if it were an A record. Now such records are skipped: with no other MX the
    domain's mail fails 5.4.4 naming the reason, with another MX that one is used."""
    from tests.test_engine_routing import _resolver

    dns_server.set_zones(
        {
            "numeric.test": [("MX", "10 127.0.0.9.")],
            "numeric6.test": [("MX", "10 ::1.")],
            "mixed.test": [("MX", "5 127.0.0.9."), ("MX", "10 mx.mixed.test.")],
            "mx.mixed.test": [("A", "127.0.0.7")],
        }
    )
    r = _resolver(dns_server)

    async def go() -> list[Any]:
        return [await r.site_for(d) for d in ("numeric.test", "numeric6.test", "mixed.test")]

    numeric, numeric6, mixed = asyncio.run(go())
    for bad in (numeric, numeric6):
        assert isinstance(bad, Outcome), bad
        assert (bad.kind, bad.code, bad.enhanced) == ("failed", 550, "5.4.4")
        assert "IP address" in bad.text and "host name" in bad.text
    assert "127.0.0.9" in numeric.text  # type: ignore[union-attr]
    assert isinstance(mixed, Site)
    assert [(h.name, h.address) for h in mixed.hosts] == [("mx.mixed.test", "127.0.0.7")]
    assert "127.0.0.9" not in mixed.key


QUEUE_IDS = [
    ("Ok: queued as 4F1ABC123", "4F1ABC123"),  # Postfix
    ("OK id=1tAbCd-000XyZ-AB", "1tAbCd-000XyZ-AB"),  # Exim
    ("1234 byte chunk, total 1234\nOK id=10HmaX-000000005vi-0000", "10HmaX-000000005vi-0000"),
    ("OK  1700000000 a640c23a62f3a-a9e5b8c7d2si1234567ejc.123 - gsmtp",
     "a640c23a62f3a-a9e5b8c7d2si1234567ejc.123"),  # Gmail
    ("x8GJ3kVl012345 Message accepted for delivery", "x8GJ3kVl012345"),  # Sendmail
    ("Ok (queued as 7D2E1C)", "7D2E1C"),
    # no id a known format names: the text, as before
    ("Ok", "Ok"),
    ("2.6.0 <a@b> [InternalId=123, Hostname=x.prod.outlook.com] Queued mail for delivery",
     "2.6.0 <a@b> [InternalId=123, Hostname=x.prod.outlook.com] Queued mail for delivery"),
]  # fmt: skip


def test_the_receivers_queue_id_is_parsed_from_its_reply(impl: str) -> None:
    """The delivery record's ``queue_id`` held Exim's whole reply ("OK id=1tAbCd-...")
    and any other but Postfix's: now the id itself, in each documented format."""
    from fastsend import _accel
    from fastsend.smtp import replies

    parse = replies.py_queue_id if impl == "py" else _accel.compiled("queue_id")
    for text, want in QUEUE_IDS:
        assert parse(text) == want, text


def test_a_cap_of_0_is_no_cap(tmp_path: Path) -> None:
    """`[api] max_campaign_recipients = 0` refused every campaign (413) and
    `max_spooled_bytes = 0` every message, where 0 is "no cap" for every other cap
    (max_campaigns_per_day, the tenant quotas, link_events_per_hour...)."""
    from tests._serve_helpers import Served

    from fastsend.sink import SinkThread

    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}",
                   api="max_campaign_recipients = 0\nmax_spooled_bytes = 0\n")  # fmt: skip
        try:
            template = {"from": "News <news@evil.example>", "subject": "hi", "text": "hello"}
            many = [{"email": f"c{i}@example.org"} for i in range(3)]
            st, out = s.req("POST", "/v1/campaigns",
                            {"template": template, "recipients": many, "paused": True})  # fmt: skip
            assert st == 201, out
            st, out = s.req("POST", f"/v1/campaigns/{out['id']}/recipients",
                            {"recipients": [{"email": "more@example.org"}]})  # fmt: skip
            assert st in (200, 202), out
            msg = {"from": "x@evil.example", "subject": "s", "text": "y" * 5000,
                   "to": ["a@example.org", "b@example.org"]}  # fmt: skip
            st, out = s.req("POST", "/v1/messages", msg)
            assert st == 202, out
        finally:
            s.stop()


def test_a_timeout_of_0_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    """`[delivery] command_timeout = 0` (or connect_timeout) was taken and timed every
    attempt out at once: all mail deferred "no reply to greeting after 0 s". A
    timeout must exist: refused with the key named, exit 2."""
    for key in ("command_timeout", "connect_timeout"):
        conf = tmp_path / f"{key}.toml"
        conf.write_text(f"[delivery]\n{key} = 0\n")
        r = fastsend("check-config", str(conf))
        assert r.returncode == 2, r
        assert key.encode() in r.stderr


def test_campaign_list_with_an_id_shows_that_campaign(tmp_path: Path) -> None:
    """`fastsend campaign list 7` listed every campaign, the ID silently ignored; now
    that campaign only, and a missing one is an error (exit 2) as for pause."""
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path / "spool"))
    first = spool.create_campaign({"n": 1}, name="first")
    second = spool.create_campaign({"n": 2}, name="second")
    spool.close()
    r = fastsend("campaign", "--spool", str(tmp_path / "spool"), "--json", "list", str(second))
    assert r.returncode == 0, r.stderr
    assert [c["name"] for c in json.loads(r.stdout)] == ["second"]
    r = fastsend("campaign", "--spool", str(tmp_path / "spool"), "--json", "list")
    assert {c["id"] for c in json.loads(r.stdout)} == {first, second}
    r = fastsend("campaign", "--spool", str(tmp_path / "spool"), "list", "99")
    assert r.returncode == 2 and b"no campaign 99" in r.stderr


def test_nameservers_are_checked_at_load_and_each_asked_on_its_own_port(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """`[dns] nameservers = ["ns1.example"]` (or `--nameserver xyz`) passed
    check-config, then every message was deferred "local error: ValueError" with a
    traceback; now refused when the config loads (exit 2). And the servers were
    all asked on the port of the last one written ("127.0.0.1:5353" beside
    "10.0.0.1": both on 5353): now each on its own. `--max-wait -5` and `nan`, and
    a `--retry` whose first retry is after its cap, were taken too."""
    from tests._engine_helpers import write_campaign, write_recipients
    from tests.conftest import free_port

    from fastsend.config import loader

    conf = tmp_path / "ns.toml"
    conf.write_text('[dns]\nnameservers = ["ns1.example"]\n')
    r = fastsend("check-config", str(conf))
    assert r.returncode == 2 and b"nameservers" in r.stderr and b"ns1.example" in r.stderr
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    base = ("send", str(camp), "-r", str(rcpts), "--spool", str(tmp_path / "s"), "--no-dkim")
    for bad in (("--nameserver", "xyz"), ("--max-wait", "-5"), ("--max-wait", "nan"),
                ("--retry", "500,100,1000")):  # fmt: skip
        r = fastsend(*base, *bad)
        assert r.returncode == 2 and bad[0].encode() in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "s").exists()  # refused before anything was spooled

    dns_server.set_zones({"d.test": [("MX", "10 mx.d.test.")], "mx.d.test": [("A", "127.0.0.7")]})
    cfg = loader.from_dict(
        {"dns": {"nameservers": [dns_server.nameserver, f"127.0.0.1:{free_port()}"],
                 "timeout": 3},
         "delivery": {"allow_private_mx": True}},
        base_dir=".", files=False,
    )  # fmt: skip
    from fastsend.delivery.mx import MXResolver

    site = asyncio.run(MXResolver(cfg).site_for("d.test"))
    assert isinstance(site, Site) and site.hosts[0].address == "127.0.0.7", site


def test_a_redis_spool_that_does_not_answer_is_try_again_later(tmp_path: Path) -> None:
    """A Redis spool that refuses connections (down, restarting) made every command
    exit 2, "a usage or config error, nothing done": a job runner gave up as for a
    typo. It is "not now, try again later" (75), as a spool in use is; a spool URL
    that is wrong stays 2."""
    from tests._engine_helpers import write_campaign, write_recipients
    from tests.conftest import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    for args in (("queue",), ("campaign", "list"), ("suppress", "list"), ("top", "--once"),
                 ("resume",), ("send", str(camp), "-r", str(rcpts), "--no-dkim")):  # fmt: skip
        r = fastsend(*args, "--spool", down)
        assert r.returncode == 75, (args, r.returncode, r.stderr)
        assert b"cannot reach Redis" in r.stderr, (args, r.stderr)
    r = fastsend("queue", "--spool", f"{down}?lease=-1")
    assert r.returncode == 2, r.stderr


def test_demo_refuses_counts_it_cannot_run() -> None:
    """`fastsend demo --recipients 0` (or -5) ran a demo of nothing and exited 1;
    `--size -1` and `--workers -1` were taken. Usage errors now: exit 2, said."""
    for flag, value in (("--recipients", "0"), ("--recipients", "-5"), ("--size", "-1"),
                        ("--workers", "-1")):  # fmt: skip
        r = fastsend("demo", flag, value)
        assert r.returncode == 2 and flag.encode() in r.stderr, (flag, value, r.stderr)


def test_a_campaign_file_error_names_the_file_once(tmp_path: Path) -> None:
    """"bad.toml: bad.toml: not valid TOML", "nofile.toml: cannot read campaign
    nofile.toml": the file was named twice. Once now, exit 2 as before."""
    from tests._engine_helpers import write_recipients

    bad = tmp_path / "bad.toml"
    bad.write_text('subject = "x"\ntext = "{{ name\n')
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    for camp in (str(bad), str(tmp_path / "nofile.toml")):
        r = fastsend("send", camp, "-r", str(rcpts), "--spool", str(tmp_path / "s"), "--no-dkim")
        assert r.returncode == 2 and r.stderr.count(camp.encode()) == 1, r.stderr


def test_send_takes_a_tenant_and_a_name_only_as_the_api_does(tmp_path: Path) -> None:
    """`send --tenant ''` (or "a b") made a campaign of a tenant no API key,
    suppression list or `suppress --tenant` can name, and `--name` with a line feed
    or an escape sequence forged lines of `fastsend campaign list` on the operator's
    terminal; the API refuses both. So does `send` now (exit 2, nothing spooled)."""
    from tests._engine_helpers import write_campaign, write_recipients

    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    spool = tmp_path / "s"
    base = ("send", str(camp), "-r", str(rcpts), "--spool", str(spool), "--no-dkim")
    for flag, value in (("--tenant", ""), ("--tenant", "a b"), ("--tenant", "-x"),
                        ("--name", "fine\nforged line"), ("--name", "x\x1b[2Jy"),
                        ("--name", "n" * 300)):  # fmt: skip
        r = fastsend(*base, flag, value)
        assert r.returncode == 2 and flag.encode() in r.stderr, (flag, value, r.stderr)
    assert not spool.exists()


def test_a_list_on_stdin_is_refused_saying_why(tmp_path: Path) -> None:
    """`send -r -` said "recipient file '-' not found": the list must be a file (its
    position is durable for `resume`), and the error now says so (exit 2)."""
    from tests._engine_helpers import write_campaign

    camp = write_campaign(tmp_path)
    r = fastsend("send", str(camp), "-r", "-", "--spool", str(tmp_path / "s"), "--no-dkim",
                 stdin=b"email\na@example.net\n")  # fmt: skip
    assert r.returncode == 2 and b"not stdin" in r.stderr and b"not found" not in r.stderr


def test_queue_top_must_be_a_count(tmp_path: Path) -> None:
    """`fastsend queue --top -1` printed the queue with no domain and said nothing."""
    r = fastsend("queue", "--spool", str(tmp_path / "none"), "--top", "-1")
    assert r.returncode == 2 and b"--top" in r.stderr


def test_suppress_and_apikey_take_names_as_the_api_does(tmp_path: Path) -> None:
    """`suppress add --tenant "a b"` filed entries under a tenant no key can name, and
    `apikey create --note` with a line feed forged a line of `apikey list`: both
    refused now (exit 2), as send and the API refuse them."""
    spool = tmp_path / "spool"
    r = fastsend("suppress", "add", "--spool", str(spool), "--tenant", "a b", "x@example.org")
    assert r.returncode == 2 and b"--tenant" in r.stderr, r.stderr
    r = fastsend("suppress", "add", "--spool", str(spool), "--tenant", "acme", "x@example.org")
    assert r.returncode == 0, r.stderr
    r = fastsend("apikey", "create", "--spool", str(spool), "--tenant", "acme",
                 "--note", "ops\nforged\tline")  # fmt: skip
    assert r.returncode == 2 and b"--note" in r.stderr and r.stdout == b"", r.stderr
