"""Session 20's outside audit of messages and addresses: each test on a defect
it found, failing before its fix.

- ``u@1.2.3.4`` (a dotted quad where a domain name goes) was accepted by every
  accept path, looked up as a name and bounced 5.1.2 later (with ``--route``
  it was even delivered); ``u@example.123`` alike. A top-level domain is never
  numeric (RFC 1123 2.1, RFC 3696 2): refused at accept, the error naming the
  address literal form ``u@[1.2.3.4]``, which is accepted and delivered to that
  address (RFC 5321 4.1.3);
- an IPv6 literal without its ``IPv6:`` tag (``u@[::1]``) and an IPv4 address
  with it were accepted; one literal written two ways (``[IPv6:2001:DB8:0::1]``,
  ``[ipv6:2001:db8::1]``) was two recipients;
- the suppression list refused address literals: a recipient ``u@[192.0.2.1]``
  who unsubscribed or hard-bounced was not suppressed (``add_entries`` skips
  what it cannot key), and the mail went on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _smtp_helpers import RecordingHandler
from fastsend import _accel, suppression
from fastsend.address import AddressError, py_normalize
from test_message_audit import receiver
from test_serve_api import MSG, Client, arun

__all__ = ["receiver"]  # (a fixture, used by name)

CAMPAIGN = 'from = "news@sender.example"\nsubject = "Hi {{ name }}"\ntext = "Hello {{ name }}\\n"\n'


def _twins() -> list[Any]:
    out: list[Any] = [py_normalize]
    if _accel.HAVE_EXTENSIONS:
        out.append(_accel.compiled("normalize"))
    return out


# ---------------------------------------------------------------- numeric domains, literals


@pytest.mark.parametrize(
    "addr", ["u@1.2.3.4", "U@1.2.3.4.", "u@192.0.2.1", "u@10.0.0.1", "u@example.123", "u@x.1abc"]
)
def test_a_numeric_top_level_domain_is_refused(addr: str) -> None:
    for normalize in _twins():
        with pytest.raises(AddressError) as err:
            normalize(addr)
        assert repr(addr) in str(err.value), err.value
        if addr.count(".") >= 3 and addr.rstrip(".").split("@")[1].replace(".", "").isdigit():
            ip = addr.split("@")[1].rstrip(".")
            assert f"[{ip}]" in str(err.value), err.value  # says how to write it


@pytest.mark.parametrize(
    "addr,want",
    [
        ("u@[192.0.2.1]", "u@[192.0.2.1]"),
        ("u@[IPv6:2001:DB8::1]", "u@[ipv6:2001:db8::1]"),
        ("u@[IPv6:2001:db8:0:0::1]", "u@[ipv6:2001:db8::1]"),
        ("u@[ipv6:2001:0db8::0001]", "u@[ipv6:2001:db8::1]"),
    ],
)
def test_an_address_literal_is_accepted_in_one_form(addr: str, want: str) -> None:
    for normalize in _twins():
        assert normalize(addr) == (want, want.split("@")[1])


@pytest.mark.parametrize("addr", ["u@[::1]", "u@[2001:db8::1]", "u@[IPv6:192.0.2.1]", "u@[1.2.3]",
                                  "u@[01.2.3.4]", "u@[example.org]", "u@[]"])  # fmt: skip
def test_a_malformed_address_literal_is_refused(addr: str) -> None:
    """RFC 5321 4.1.3: an IPv6 address only after the ``IPv6:`` tag."""
    for normalize in _twins():
        with pytest.raises(AddressError, match="address literal"):
            normalize(addr)


def test_send_refuses_a_dotted_quad_recipient_and_sends_the_rest(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """``fastsend send`` with ``--route``: ``u@1.2.3.4`` had been delivered (to
    the route) and, by MX, bounced 5.1.2; it is a bad row naming the literal."""
    port, handler = receiver
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    (tmp_path / "r.csv").write_text("email,name\nu@1.2.3.4,U\nok@x.example,O\nv@[127.0.0.1],V\n")
    p = subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp_path / "c.toml"), "-r",
         str(tmp_path / "r.csv"), "--route", f"*=127.0.0.1:{port}", "--spool",
         str(tmp_path / "spool"), "--json", "--no-progress", "--workers", "1", "--max-wait", "3",
         "--no-dkim"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = json.loads(p.stdout)
    assert out["delivered"] == 2 and out["rejected_rows"] == 1, (p.stdout, p.stderr)
    assert "line 2" in p.stderr and "[1.2.3.4]" in p.stderr, p.stderr
    assert sorted(r for m in handler.messages for r in m["rcpts"]) == [
        "ok@x.example",
        "v@[127.0.0.1]",
    ]


def test_api_refuses_a_dotted_quad_recipient(tmp_path: Path) -> None:
    async def go(c: Client) -> None:
        status, body = await c.req("POST", "/v1/messages", {**MSG, "to": "u@1.2.3.4"})
        assert status == 400, (status, body)
        assert "[1.2.3.4]" in json.dumps(body), body
        status, body = await c.req("POST", "/v1/messages", {**MSG, "to": "u@[192.0.2.1]"})
        assert status == 202, (status, body)

    arun(tmp_path, go)


# ---------------------------------------------------------------- suppression of literals


def test_a_recipient_at_an_address_literal_can_be_suppressed(tmp_path: Path) -> None:
    """An unsubscribe or a hard bounce of ``u@[192.0.2.1]`` was dropped: the
    suppression list refused the address (``add_entries`` skips it silently)."""
    s = suppression.SuppressionList(str(tmp_path / "s.db"))
    try:
        got = s.add_entries([("default", "u@[192.0.2.1]", suppression.UNSUBSCRIBE, "unsubscribe", None),
                             ("default", "V@[IPv6:2001:DB8:0::1]", "hard-bounce", "bounce-delivery", 7)])  # fmt: skip
        assert [e.address for e in got] == ["u@[192.0.2.1]", "V@[ipv6:2001:db8::1]"]
        # looked up as the spool holds them (address.normalize's form)
        assert s.contains_many(["u@[192.0.2.1]", "v@[ipv6:2001:db8::1]", "w@[192.0.2.1]"]) == {
            "u@[192.0.2.1]",
            "v@[ipv6:2001:db8::1]",
        }
        assert s.contains("V@[ipv6:2001:db8:0:0:0:0:0:1]")
        with pytest.raises(suppression.SuppressionError):
            s.add("u@[::1]")
    finally:
        s.close()
