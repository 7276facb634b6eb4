"""Session 17's outside audit of messages, lists and addresses: each test on a
defect it found, through the real ``fastsend send`` (and the HTTP API's list
upload) against a real receiver (aiosmtpd).

- a ``--route`` key on the command line, and the domain keys of ``[shaping]``
  (``[shaping.domain."NAME"]``, a provider's ``domains`` and ``mx_suffixes``),
  were only lower-cased, where ``[routes]`` keys are put in A-labels as
  recipients' domains are: a Unicode key (or one with a trailing dot) never
  matched, the mail went by MX, the limits were the defaults;
- a domain key that can match nothing (``*.example.org``, ``.example.org``,
  other MTAs' forms for subdomains) was taken silently;
- ``Route.parse("[::1]")`` said "bad port", and a bare ``::1`` was read as
  host ``::`` port 1 (so was ``2001:db8::25``: host ``2001:db8:``, port 25);
- a JSON-lines row giving no value (or null) for a variable the template uses
  without a default was spooled, then bounced 550 5.6.0 at render: README says
  such a variable is an error before anything is sent; ``--strict`` let it
  through, and so did the API's ``?strict=1`` (and both let through a row
  whose header-bound variable holds a line break, refused later at ingest);
  the API's JSON recipients the same when the value was null;
- a CSV field whose quote is left open and closed by a quote some lines
  later swallowed the rows in between into one field, silently: the row that
  opened it was sent with them in its variables, the others never;
- two spools under one ``[tracking] secret`` gave their first messages the
  same Message-ID (``<1-MAC@sender.example>``): a second campaign's message to
  a recipient carried the id of the first one's (receivers drop such mail);
- a campaign written with another template language's tags (``{% if vip %}``,
  ``{# note #}``, Mailchimp's ``*|FNAME|*``) was accepted and the tags sent as text to every recipient;
- an attachment named ``=?utf-8?q?invoice?=.pdf`` was written as a quoted
  filename, which mail clients decode (it showed as ``invoice.pdf``);
- only a JSON-lines list's first row told its variables: a first row lacking
  one, or no JSON object, refused the whole list instead of being one bad row;
- a JSON line's ``19.90`` was sent as "19.9", ``1e3`` as "1000.0", a 23-digit
  number as "1.2345678901234568e+22";
- a spreadsheet's CSV ("email,name,," and empty rows ",,,") was refused whole
  (the unnamed column "named twice"), its empty rows bad rows;
- a recipient at an address literal (``u@[192.0.2.1]``, which the list
  accepts) was looked up as a name: NXDOMAIN, a hard bounce, suppressed;
- a CSV whose address column is named as exports name it ("Email", "Email
  Address") was refused: "no 'email' column".
"""

from __future__ import annotations

import argparse
import email
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _smtp_helpers import RecordingHandler
from fastsend import recipients
from fastsend.config import ConfigError, Route, from_dict
from fastsend.shaping.policy import load_policy
from test_message_audit import receiver
from test_serve_api import Client, arun

__all__ = ["receiver"]  # (a fixture, used by name)


def _send(
    tmp: Path, campaign: str, name: str, body: str, port: int, *extra: str, host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    (tmp / "c.toml").write_text(campaign)
    (tmp / name).write_text(body, encoding="utf-8")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp / "c.toml"), "-r", str(tmp / name),
         "--route", f"*={target}", "--spool", str(tmp / "spool"), "--json", "--no-progress",
         "--workers", "1", "--max-wait", "3", "--no-dkim", *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _events(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "spool" / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rcpts(handler: RecordingHandler) -> list[str]:
    return sorted(r for m in handler.messages for r in m["rcpts"])


CAMPAIGN = 'from = "news@sender.example"\nsubject = "Hi {{ name }}"\ntext = "Hello {{ name }}\\n"\n'


# ---------------------------------------------------------------- route and shaping keys


def _args(*routes: str) -> argparse.Namespace:
    return argparse.Namespace(
        config=None, spool=None, route=list(routes), source_ip=None, workers=None, helo=None,
        nameserver=[], retry=None,
    )  # fmt: skip


@pytest.mark.parametrize("key", ["bücher.example", "BÜCHER.example", "bücher.example.",
                                 "Example.ORG."])  # fmt: skip
def test_route_option_keys_are_a_labels_as_routes_keys_are(key: str) -> None:
    """``--route 'bücher.example=HOST:PORT'`` routes u@bücher.example (held as
    u@xn--bcher-kva.example) as the same key in ``[routes]`` does."""
    from fastsend.commands.common import build_config

    cfg = build_config(_args(f"{key}=127.0.0.1:2525"))
    want = "example.org" if "ORG" in key else "xn--bcher-kva.example"
    route = cfg.route_for(want)
    assert route is not None and (route.host, route.port) == ("127.0.0.1", 2525), cfg.routes
    assert cfg.route_for(f"sub.{want}") is route
    cfg2 = from_dict({"routes": {key: "127.0.0.1:2525"}})
    assert list(cfg2.routes) == list(cfg.routes)


def test_shaping_domain_keys_are_a_labels() -> None:
    """``[shaping.domain."bücher.example"]``, a provider's Unicode ``domains`` and
    ``mx_suffixes`` apply to the domain and MX names as DNS and the spool hold
    them (A-labels); before, only lower-cased, they never matched."""
    cfg = from_dict({"shaping": {
        "domain": {"Bücher.example.": {"max_connections": 3}},
        "provider": {"umlaut": {"domains": ["Grüße.example"], "max_connections": 5},
                     "mxhost": {"mx_suffixes": [".MX.straße.example"], "max_connections": 7}},
    }})  # fmt: skip
    p = load_policy(cfg)
    assert p.resolve(("mx.other.example",), "xn--bcher-kva.example").max_connections == 3
    assert p.resolve(("mx.other.example",), "news.xn--bcher-kva.example").max_connections == 3
    got = p.resolve(("mx.other.example",), "xn--gre-6ka8l.example")
    assert (got.provider, got.max_connections) == ("umlaut", 5)
    got = p.resolve(("a.mx.xn--strae-oqa.example",), "any.example")
    assert (got.provider, got.max_connections) == ("mxhost", 7)


def test_routes_vs_shaping_warning_compares_a_labels() -> None:
    """A ``[shaping.domain]`` entry for the route's own host, written in Unicode,
    is the route's site: no "does not apply" warning."""
    cfg = from_dict({"routes": {"bücher.example": "bücher.example:2525"},
                     "shaping": {"domain": {"bücher.example": {"max_connections": 2}}}})  # fmt: skip
    assert not [w for w in cfg.warnings if "does not apply" in w], cfg.warnings


@pytest.mark.parametrize("key", ["*.example.org", ".example.org", "a@example.org", "exa mple.org"])
def test_a_domain_key_that_matches_nothing_is_said(key: str) -> None:
    """``*.example.org`` / ``.example.org`` (other MTAs' forms for subdomains) or a
    key that is no domain were taken and matched no recipient: the mail went by
    MX, the limits were the defaults, silently. A warning in the config (check-config
    --strict fails), an error on the command line."""
    from fastsend.commands.common import build_config

    cfg = from_dict({"routes": {key: "127.0.0.1:2525"},
                     "shaping": {"domain": {key: {"max_connections": 2}},
                                 "provider": {"p": {"domains": [key]}}}})  # fmt: skip
    said = [w for w in cfg.warnings if repr(key) in w]
    assert [w.split(" ", 1)[0] for w in said] == ["[routes]", "[shaping]", "[shaping]"], said
    with pytest.raises(ConfigError, match="matches no"):
        build_config(_args(f"{key}=127.0.0.1:2525"))


def test_domain_keys_that_match_say_nothing() -> None:
    cfg = from_dict({"routes": {"example.org": "127.0.0.1:2525", "tenant:acme": "127.0.0.1:2527",
                                "bücher.example": "[::1]"},
                     "shaping": {"domain": {"gmail.com": {"max_connections": 2}}}})  # fmt: skip
    assert cfg.warnings == []


# ---------------------------------------------------------------- Route.parse


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("[::1]", "::1", 25), ("[::1]:2525", "::1", 2525), ("[2001:db8::25]", "2001:db8::25", 25),
     ("127.0.0.1", "127.0.0.1", 25), ("127.0.0.1:26", "127.0.0.1", 26),
     ("[127.0.0.1]:26", "127.0.0.1", 26), ("[relay.example]:587", "relay.example", 587),
     ("bücher.example:2525", "xn--bcher-kva.example", 2525)],
)  # fmt: skip
def test_route_parse_takes_bracketed_ipv6_with_or_without_port(
    text: str, host: str, port: int
) -> None:
    r = Route.parse(text, where="--route")
    assert (r.host, r.port) == (host, port)
    assert Route.parse(str(r), where="x") == r  # what check-config shows reads back


@pytest.mark.parametrize("text", ["::1", "2001:db8::25", "[::1", "[::1]x", "[::1]:", "[a:b]:25"])
def test_route_parse_refuses_what_it_would_misread(text: str) -> None:
    """A bare IPv6 address was split at its last colon (``::1``: host ``::``,
    port 1): refused, naming the bracketed form."""
    with pytest.raises(ConfigError):
        Route.parse(text, where="--route")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def receiver6() -> Iterator[tuple[int, RecordingHandler]]:
    from aiosmtpd.controller import Controller

    from conftest import free_port

    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    handler = RecordingHandler()
    port = free_port()
    ctl = Controller(handler, hostname="::1", port=port)
    ctl.start()
    try:
        yield port, handler
    finally:
        ctl.stop()


def test_route_to_a_bracketed_ipv6_address_delivers(
    tmp_path: Path, receiver6: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver6
    p = _send(tmp_path, CAMPAIGN, "r.csv", "email,name\nu@x.example,U\n", port, host="::1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["delivered"] == 1
    assert _rcpts(handler) == ["u@x.example"]


# ---------------------------------------------------------------- JSON lines: missing variables


JSONL = (
    '{"email": "a@x.example", "name": "A"}\n'
    '{"email": "b@x.example"}\n'  # no name
    '{"email": "c@x.example", "name": null}\n'  # null is no value
    '{"email": "d@x.example", "name": ""}\n'  # an empty value is a value
)


def test_jsonl_row_missing_a_variable_is_a_bad_row_not_a_bounce(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    p = _send(tmp_path, CAMPAIGN, "r.jsonl", JSONL, port)
    assert p.returncode == 1, p.stderr  # bad rows: reported, the good ones sent
    assert "line 2:" in p.stderr and "line 3:" in p.stderr and "'name'" in p.stderr, p.stderr
    s = json.loads(p.stdout)
    assert (s["delivered"], s["bounced"], s["rejected_rows"]) == (2, 0, 2), s
    assert _rcpts(handler) == ["a@x.example", "d@x.example"]
    assert not [e for e in _events(tmp_path) if e["event"] == "bounced"]


def test_jsonl_row_missing_a_variable_fails_strict_before_anything_is_sent(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    p = _send(tmp_path, CAMPAIGN, "r.jsonl", JSONL, port, "--strict")
    assert p.returncode == 1 and "nothing was sent (--strict)" in p.stderr, p.stderr
    assert handler.messages == []


def test_strict_refuses_a_header_variable_with_a_line_break(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """The ingest refuses such a row (header injection): ``--strict`` must refuse
    the list for it before anything is sent, not send the other rows."""
    port, handler = receiver
    p = _send(tmp_path, CAMPAIGN, "r.csv", 'email,name\na@x.example,A\nb@x.example,"B\nBcc: x"\n',
              port, "--strict")  # fmt: skip
    assert p.returncode == 1 and "nothing was sent (--strict)" in p.stderr, p.stderr
    assert handler.messages == []


def test_a_default_or_builtin_needs_no_value(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    camp = ('from = "news@sender.example"\nsubject = "Hi {{ name | default(\\"you\\") }}"\n'
            'text = "To {{ email }}\\n"\n')  # fmt: skip
    p = _send(tmp_path, camp, "r.jsonl", '{"email": "a@x.example"}\n', port, "--strict")
    assert p.returncode == 0, p.stderr
    assert _rcpts(handler) == ["a@x.example"]


def test_read_checks_need_per_row(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text(JSONL)
    got = list(recipients.read(str(f), need=frozenset({"name"})))
    assert [r.line for r in got if isinstance(r, recipients.BadRow)] == [2, 3]
    assert [r[1] for r in got if not isinstance(r, recipients.BadRow)] == ["a@x.example",
                                                                          "d@x.example"]  # fmt: skip


def test_api_jsonl_upload_refuses_rows_missing_a_variable(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {
            "template": {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "x"},
            "recipients": [],
        })  # fmt: skip
        assert st == 201, body
        cid = body["id"]
        raw = JSONL.replace("x.example", "example.org").encode()
        st, up = await c.req("POST", f"/v1/campaigns/{cid}/recipients?strict=1", raw=raw,
                             headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert st == 400 and up["error"]["field"] == "recipients[1]", up
        assert sum(c.ctx.spool.counts(cid).values()) == 0
        st, up = await c.req("POST", f"/v1/campaigns/{cid}/recipients", raw=raw,
                             headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert st == 202 and (up["accepted"], up["rejected"]) == (2, 2), up
        assert sum(c.ctx.spool.counts(cid).values()) == 2

    arun(tmp_path, t)


def test_api_json_recipients_with_a_null_for_a_needed_variable_are_refused(tmp_path: Any) -> None:
    """A JSON recipient giving null for a variable the template needs was
    spooled (the key was there), then bounced 550 5.6.0 at render."""

    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {
            "template": {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "x"},
            "recipients": [{"email": "a@example.org", "name": "A"},
                           {"email": "b@example.org", "name": None},
                           {"email": "c@example.org", "name": ""}],
        })  # fmt: skip
        assert st == 201, body
        assert (body["accepted"], body["rejected"]) == (2, 1), body
        assert [e["row"] for e in body["errors"]] == [2]

    arun(tmp_path, t)


# ---------------------------------------------------------------- CSV: a quote left open


SWALLOWED = (
    "email,name\n"
    'a@x.example,"Alice\n'  # the quote is left open here ...
    "b@x.example,Bob\n"
    'c@x.example,Carol"\n'  # ... and a stray quote closes it
    "d@x.example,Dan\n"
    'e@x.example,"12 Main St\nSpringfield, IL"\n'  # a real multi-line value
)


def test_csv_rows_swallowed_by_a_quote_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text(SWALLOWED)
    got = list(recipients.read(str(f)))
    bad = [r for r in got if isinstance(r, recipients.BadRow)]
    assert len(bad) == 1 and bad[0].line == 2 and "lines 2-4" in bad[0].error, bad
    assert [r[1] for r in got if not isinstance(r, recipients.BadRow)] == ["d@x.example",
                                                                          "e@x.example"]  # fmt: skip


def test_csv_quote_open_to_the_end_with_the_right_width_is_reported(tmp_path: Path) -> None:
    """A quote never closed: the csv module reads to the end of the file into
    one field; with the right number of columns that was a good row."""
    f = tmp_path / "r.csv"
    f.write_text('email,name\na@x.example,"Alice\nb@x.example,Bob\nc@x.example,Carol\n')
    got = list(recipients.read(str(f)))
    assert len(got) == 1 and isinstance(got[0], recipients.BadRow) and got[0].line == 2, got


def test_send_reports_csv_rows_swallowed_by_a_quote(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    camp = 'from = "news@sender.example"\nsubject = "Hi"\ntext = "Hello {{ name }}\\n"\n'
    p = _send(tmp_path, camp, "r.csv", SWALLOWED, port)
    assert p.returncode == 1 and "line 2: lines 2-4" in p.stderr, p.stderr
    assert _rcpts(handler) == ["d@x.example", "e@x.example"]
    for m in handler.messages:  # nobody got another row in their message
        assert b"b@x.example" not in m["data"]
    (tmp_path / "strict").mkdir()
    p = _send(tmp_path / "strict", camp, "r.csv", SWALLOWED, port, "--strict")
    assert p.returncode == 1 and "nothing was sent (--strict)" in p.stderr, p.stderr


# ---------------------------------------------------------------- Message-ID unique across spools


def _message_ids(handler: RecordingHandler) -> dict[str, list[str]]:
    got: dict[str, list[str]] = {}
    for m in handler.messages:
        mid = email.message_from_bytes(m["data"])["Message-ID"]
        for r in m["rcpts"]:
            got.setdefault(r, []).append(mid)
    return got


def test_message_ids_differ_between_spools_sharing_a_secret(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """Two spools under one ``[tracking] secret`` (a fleet of nodes with their own
    spools, a fresh spool per campaign) made the same Message-ID for their
    first messages, ``<1-MAC@sender.example>``: the second campaign's message
    to the same recipient carried the first one's id (RFC 5322 3.6.4: unique;
    receivers drop a message whose id they hold). Each spool's ids now carry
    its own label; one spool keeps its label from run to run."""
    port, handler = receiver
    (tmp_path / "f.toml").write_text('[tracking]\nsecret = "one secret for the whole fleet"\n')
    rows = "email,name\na@x.example,A\nb@x.example,B\n"
    for spool in ("one", "two", "one"):
        d = tmp_path / spool
        d.mkdir(exist_ok=True)
        p = _send(d, CAMPAIGN, "r.csv", rows, port, "-c", str(tmp_path / "f.toml"),
                  "--spool", str(tmp_path / f"spool-{spool}"))  # fmt: skip
        assert p.returncode == 0, p.stderr
    ids = _message_ids(handler)
    assert sorted(ids) == ["a@x.example", "b@x.example"]
    for rcpt, mids in ids.items():
        assert len(mids) == 3 and len(set(mids)) == 3, (rcpt, mids)
        rights = [m.strip("<>").partition("@")[2] for m in mids]
        assert all(r.endswith(".sender.example") for r in rights), rights
        assert rights[0] == rights[2] != rights[1]  # one label per spool


# ---------------------------------------------------------------- another language's tags


@pytest.mark.parametrize("text", [
    "{% if vip %}Dear VIP{% endif %}", "Hi {{ name }}{%- for x in y -%}", "a {# note #} b",
    "{% endif %}", "Hi *|FNAME|*,", "*|UNSUB|*",
])  # fmt: skip
@pytest.mark.parametrize("part", ["text", "html", "subject"])
def test_a_foreign_template_tag_is_refused_not_sent_as_text(part: str, text: str) -> None:
    """``{% if vip %}`` (Jinja, Django, Twig ...) was taken as literal text: every
    recipient got the tag itself. Refused when the campaign arrives, naming it."""
    from fastsend.accept import AcceptError, check_campaign
    from fastsend.message import Campaign

    spec = {"from": "a@sender.example", "subject": "Hi", "text": "x", part: text}
    with pytest.raises(AcceptError, match=r"\{[%#]|\*\|") as e:
        check_campaign(Campaign.from_dict(spec))
    assert e.value.key == part


@pytest.mark.parametrize("text", [
    'a {{ "{%" }} if %} b', "100% {color: red}", "{#fff}", "50%} off", "<style>p{#x}</style>",
    "a *| b |* c", "x*|y",
])  # fmt: skip
def test_text_that_only_looks_like_a_tag_stays_text(text: str) -> None:
    from fastsend.accept import check_campaign
    from fastsend.message import Campaign

    check_campaign(Campaign.from_dict({"from": "a@sender.example", "subject": "Hi", "html": text}))


def test_send_refuses_a_foreign_tag_before_anything_is_spooled(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    camp = CAMPAIGN.replace("Hello {{ name }}", "{% if name %}Hello {{ name }}{% endif %}")
    p = _send(tmp_path, camp, "r.csv", "email,name\na@x.example,A\n", port)
    assert p.returncode == 2 and "'{% if name %}'" in p.stderr, p.stderr
    assert not (tmp_path / "spool" / "spool.db").exists()
    assert handler.messages == []


def test_api_refuses_a_foreign_tag_in_a_template_but_sends_a_literal_message_as_written(
    tmp_path: Any,
) -> None:
    """A template campaign with ``{% ... %}`` is a 400 naming the key; a message
    whose text is sent as written (no template) keeps it as text."""

    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {
            "template": {"from": "a@example.com", "subject": "Hi", "text": "{% if x %}y{% endif %}"},
            "recipients": [{"email": "u@example.org"}],
        })  # fmt: skip
        assert st == 400 and body["error"]["field"] == "template.text", body
        assert c.ctx.spool.list_campaigns() == []
        st, body = await c.req("POST", "/v1/messages", {
            "from": "a@example.com", "to": "u@example.org", "subject": "{% raw %}",
            "text": "Jinja: {% if x %}y{% endif %}",
        })  # fmt: skip
        assert st == 202, body

    arun(tmp_path, t)


@pytest.mark.parametrize("name", ["=?utf-8?q?invoice?=.pdf", "a =?utf-8?b?eC5leGU=?= b.txt",
                                  "report.pdf", "résumé.pdf"])  # fmt: skip
def test_an_attachment_name_reads_back_as_given(name: str) -> None:
    """A quoted filename holding an encoded word was written as it is, and
    read back decoded (``=?utf-8?q?invoice?=.pdf`` as ``invoice.pdf``)."""
    import base64
    import email.policy

    from fastsend.message import Campaign

    spec = {"from": "a@sender.example", "subject": "s", "text": "t",
            "attachments": [{"data_b64": base64.b64encode(b"%PDF").decode(), "filename": name}]}  # fmt: skip
    data = Campaign.from_dict(spec).compile().render("u@x.example", {}, "1-abc")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert [a.get_filename() for a in msg.iter_attachments()] == [name]


@pytest.mark.parametrize("first", ['{"email": "a@x.example"}', "not json at all", "[1, 2]"])
def test_a_bad_first_json_line_is_a_bad_row_not_a_refused_list(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], first: str
) -> None:
    """Only the first JSON line told which variables a list gives: one lacking a
    variable, or no JSON object at all, refused the whole list ("lacks columns")
    where it is one bad row. A variable no row gives (a typo) is still refused
    before anything is sent."""
    port, handler = receiver
    body = first + '\n{"email": "b@x.example", "name": "B"}\n'
    p = _send(tmp_path, CAMPAIGN, "r.jsonl", body, port)
    assert p.returncode == 1 and "line 1:" in p.stderr, p.stderr
    assert _rcpts(handler) == ["b@x.example"]
    typo = CAMPAIGN.replace("{{ name }}", "{{ nmae }}")
    (tmp_path / "t").mkdir()
    p = _send(tmp_path / "t", typo, "r.jsonl", body, port)
    assert p.returncode == 2 and "nmae" in p.stderr, p.stderr
    assert _rcpts(handler) == ["b@x.example"]


def test_json_numbers_are_the_text_the_line_writes(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """A JSON line's number with a fraction or exponent, or too large for 64 bits,
    was read as a float: ``19.90`` became "19.9", ``1e3`` "1000.0", a 23-digit
    account number "1.2345678901234568e+22"."""
    port, handler = receiver
    camp = ('from = "news@sender.example"\nsubject = "Order"\n'
            'text = "price={{ price }} qty={{ qty }} acct={{ acct }} n={{ n }}\\n"\n')  # fmt: skip
    row = '{"email": "a@x.example", "price": 19.90, "qty": 1e3, "acct": 12345678901234567890123, "n": 7}\n'
    p = _send(tmp_path, camp, "r.jsonl", row, port)
    assert p.returncode == 0, p.stderr
    (m,) = handler.messages
    body = email.message_from_bytes(m["data"]).get_payload(decode=True)
    assert b"price=19.90 qty=1e3 acct=12345678901234567890123 n=7" in body, body


def test_a_shared_spools_nodes_share_its_message_id_label(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], redis_server: Any
) -> None:
    """Every node of a Redis spool writes the same label (the spool's, in Redis);
    another spool under the same secret its own."""
    port, handler = receiver
    (tmp_path / "f.toml").write_text('[tracking]\nsecret = "one secret for the whole fleet"\n')
    one, two = redis_server.url(), redis_server.url()
    for i, url in enumerate((one, one, two)):
        d = tmp_path / f"n{i}"
        d.mkdir()
        p = _send(d, CAMPAIGN, "r.csv", f"email,name\nu{i}@x.example,U\n", port, "-c",
                  str(tmp_path / "f.toml"), "--spool", f"{url}&dir={d / 'local'}")  # fmt: skip
        assert p.returncode == 0, p.stderr
    ids = _message_ids(handler)
    rights = [ids[f"u{i}@x.example"][0].strip("<>").partition("@")[2] for i in range(3)]
    assert rights[0] == rights[1] != rights[2], rights


# ---------------------------------------------------------------- a spreadsheet's CSV


SHEET = (  # as Excel or Sheets exports a sheet whose columns and rows were once touched
    "email,name,,\r\n"
    "a@x.example,A,,\r\n"
    "b@x.example,\"B, Jr.\",,\r\n"
    ",,,\r\n"
    " , ,,\r\n"
    ",,,\r\n"
)


def test_a_spreadsheets_empty_columns_and_rows_are_no_columns_and_no_rows(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """Two unnamed columns made the whole list "name the column '' twice" (refused);
    empty rows written as ",,," were bad rows (exit 1; --strict refused the list)."""
    port, handler = receiver
    p = _send(tmp_path, CAMPAIGN, "r.csv", SHEET, port, "--strict")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["delivered"], s["rejected_rows"], s["ingest"]["rows"]) == (2, 0, 2), s
    assert _rcpts(handler) == ["a@x.example", "b@x.example"]
    f = tmp_path / "r.csv"
    got = list(recipients.read(str(f)))
    assert [r[3] for r in got] == [b'{"name":"A"}', b'{"name":"B, Jr."}']  # no "" variable
    assert recipients.survey(str(f))[1] == 2


def test_the_twins_skip_a_row_of_empty_fields_alike() -> None:
    from fastsend import _accel

    pure, comp = recipients.py_csv_plain_rows, _accel.compiled("csv_plain_rows")
    keys = [b'"a":', b'"b":']
    chunk = ["u@x.example,1,2\n", ",,\n", " , ,\t\r\n", ",,,\n", ",x,\n", "v@x.example,,\n"]
    outs = []
    for fn in (pure, comp):
        rows: list[Any] = []
        lines: list[int] = []
        bad: list[Any] = []
        res = fn(chunk, 0, 1, 0, 3, 0, keys, 1000, 100, rows, lines, bad, 0)
        outs.append((res, rows, lines, bad))
    assert outs[0] == outs[1]
    assert outs[0][2] == [2, 7] and [b.line for b in outs[0][3]] == [6], outs[0]


# ---------------------------------------------------------------- address literals


def _send_by_mx(tmp: Path, rows: str, port: int, allow_private: bool) -> subprocess.CompletedProcess[str]:
    (tmp / "c.toml").write_text(CAMPAIGN)
    (tmp / "r.csv").write_text(rows)
    (tmp / "f.toml").write_text(
        f"[dns]\nmx_port = {port}\ntimeout = 1\n"
        f"[delivery]\nallow_private_mx = {'true' if allow_private else 'false'}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp / "c.toml"), "-r", str(tmp / "r.csv"),
         "-c", str(tmp / "f.toml"), "--spool", str(tmp / "spool"), "--json", "--no-progress",
         "--workers", "1", "--max-wait", "3", "--no-dkim"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_recipient_at_an_address_literal_goes_to_that_address(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """``u@[127.0.0.1]`` was looked up as the name "[127.0.0.1]": NXDOMAIN, a hard
    bounce 5.1.2 that suppressed it. It goes to the address (RFC 5321 4.1.3), a
    non-public one only with allow_private_mx, as an MX address."""
    port, handler = receiver
    p = _send_by_mx(tmp_path, "email,name\nu@[127.0.0.1],U\n", port, True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["delivered"] == 1, p.stdout
    assert _rcpts(handler) == ["u@[127.0.0.1]"]
    (tmp_path / "private").mkdir()
    p = _send_by_mx(tmp_path / "private", "email,name\nv@[127.0.0.1],V\n", port, False)
    bounced = [e for e in _events(tmp_path / "private") if e["event"] == "bounced"]
    assert [e["enhanced"] for e in bounced] == ["5.4.4"], bounced
    assert _rcpts(handler) == ["u@[127.0.0.1]"]


@pytest.mark.parametrize("name", ["Email", "EMAIL", "E-mail", "Email Address"])
def test_an_exports_address_column_is_the_email_column(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], name: str
) -> None:
    """Exports name the address column "Email" (HubSpot, Excel), "Email Address"
    (Mailchimp), "E-mail": the list was refused, "no 'email' column"."""
    port, handler = receiver
    p = _send(tmp_path, CAMPAIGN, "r.csv", f"{name},name\na@x.example,A\n", port)
    assert p.returncode == 0, p.stderr
    assert _rcpts(handler) == ["a@x.example"]
