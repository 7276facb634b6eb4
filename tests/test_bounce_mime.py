"""The lean MIME reader gives the tree the standard parser gives, in linear time."""

from __future__ import annotations

import email
import time
from email import policy

import pytest

from fastsend.bounce import mime

NESTED = b"""From MAILER-DAEMON Fri Dec  4 10:00:00 2026
Return-Path: <>
Subject: Undelivered
 Mail Returned
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="outer=_1"
MIME-Version: 1.0

preamble text
--outer=_1
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Caf=E9 <a@example.org>: 550 5.1.1 unknown
--inner
Content-Type: text/html

<p>html</p>
--inner--
--outer=_1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; a@example.org
Action: failed
Status: 5.1.1
--outer=_1
Content-Type: text/rfc822-headers

To: a@example.org
Message-ID: <x@y>

--outer=_1--
epilogue
"""

DIGEST = b"""Content-Type: multipart/digest; boundary=d

--d

Subject: one

body one
--d
Content-Type: text/plain

two
--d--
"""

NO_CLOSE = b"""Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

last part runs to the end
"""

NO_DELIM = b"""Content-Type: multipart/mixed; boundary=never

just text, the boundary never appears
"""

NO_SEPARATOR = b"""Subject: x
this line is not a header, so the body starts here
more body
"""


def _shape(m: email.message.Message) -> list:
    out = [(m.get_content_type(), m.items(), m.get_unixfrom())]
    payload = m.get_payload()
    if isinstance(payload, list) and not m.get_content_type().startswith("message/"):
        for p in payload:
            out += _shape(p)
    elif not m.get_content_type().startswith("message/"):
        out.append(m.get_payload(decode=True).rstrip(b"\n"))
    return out


@pytest.mark.parametrize("raw", [NESTED, DIGEST, NO_CLOSE, NO_DELIM, NO_SEPARATOR])
def test_same_tree_as_stdlib(raw: bytes) -> None:
    ours = mime.message_from_bytes(raw)
    theirs = email.message_from_bytes(raw, policy=policy.compat32)
    assert _shape(ours) == _shape(theirs)


def test_message_parts_kept_as_text() -> None:
    m = mime.message_from_bytes(NESTED)
    dsn = m.get_payload()[1]
    assert dsn.get_content_type() == "message/delivery-status"
    text = dsn.get_payload(decode=True).decode()
    assert "Final-Recipient: rfc822; a@example.org" in text
    assert (
        m.get_payload()[0]
        .get_payload()[0]
        .get_payload(decode=True)
        .decode("latin-1")
        .startswith("Caf\xe9")
    )


def test_boundary_lookalikes_are_linear() -> None:
    # Lines that start like the delimiter but are not one, and a huge folded
    # header: every scan must move forward (bounded time, generous).
    body = b"--bb-not-a-delimiter\n" * 200_000
    raw = (
        b"Subject: x" + b"\n y" * 100_000 + b"\nContent-Type: multipart/mixed; boundary=bb\n\n"
        b"--bb\n\n" + body + b"--bb--\n"
    )
    t0 = time.process_time()
    m = mime.message_from_bytes(raw)
    assert time.process_time() - t0 < 5.0
    assert len(m.get_payload()) == 1
    assert m.get_payload()[0].get_payload().count("\n") == 200_000 - 1


# Apache James (JavaMail) writes a multipart part's parameter on the next line
# without the blank a fold needs. The standard parser ends the head there and
# loses the boundary; the reader takes the line as the field's parameter.
LOST_FOLD = b"""From: postmaster@example.org
Subject: Re: News
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="----=_Part_0_1.2"

------=_Part_0_1.2
Content-Type: multipart/alternative;
boundary="----=_Part_1_3.4"

------=_Part_1_3.4
Content-Type: text/plain; charset=us-ascii

Error: Invalid user address
------=_Part_1_3.4--

------=_Part_0_1.2--
"""


def test_a_parameter_whose_fold_lost_its_blank_is_the_fields() -> None:
    m = mime.message_from_bytes(LOST_FOLD)
    (alt,) = m.get_payload()
    assert alt.get_boundary() == "----=_Part_1_3.4"
    (text,) = alt.get_payload()
    assert text.get_content_type() == "text/plain"
    assert text.get_payload() == "Error: Invalid user address"
    # Only after a field ending in ";": any other line without a colon still
    # starts the body, as the standard parser reads it.
    raw = b"Subject: x\nContent-Type: text/plain\ncharset=us-ascii\n\nbody\n"
    ours = mime.message_from_bytes(raw)
    theirs = email.message_from_bytes(raw, policy=policy.compat32)
    assert _shape(ours) == _shape(theirs)


def test_lost_folds_are_bounded() -> None:
    # Each taken line copies the field's value: a head of endless "x=y;"
    # lines must not cost quadratic time; past a few they are the body.
    raw = b"Subject: x\nContent-Type: text/plain;\n" + b"a=b;\n" * 200_000 + b"\nend\n"
    t0 = time.process_time()
    m = mime.message_from_bytes(raw)
    assert time.process_time() - t0 < 5.0
    assert m["Content-Type"].count("a=b;") == 8
    assert m.get_payload().startswith("a=b;\n")


def test_field_lookups_agree_with_the_standard_get_after_changes() -> None:
    """The reader's parts answer ``get`` from an index of the head: every
    lookup (any case, a repeated field's first value, an 8-bit value, a
    missing one) is what the standard Message gives, and so is every lookup
    after the head is changed in each way the Message API allows."""
    raw = (
        b"Subject: one\nsubject: two\nX-Eight: caf\xc3\xa9\n"
        b"Content-Type: text/plain; charset=utf-8\n\nbody\n"
    )
    ours = mime.message_from_bytes(raw)
    theirs = email.message_from_bytes(raw, policy=policy.compat32)
    names = ["SUBJECT", "subject", "x-eight", "Content-Type", "missing"]

    def same() -> None:
        for name in names:
            a, b = ours.get(name, "<none>"), theirs.get(name, "<none>")
            assert type(a) is type(b) and str(a) == str(b), name
        assert ours.get_content_type() == theirs.get_content_type()
        assert ours.get_param("charset") == theirs.get_param("charset")

    same()
    for change in (
        lambda m: m.replace_header("subject", "three"),
        lambda m: m.__delitem__("subject"),
        lambda m: m.__setitem__("Missing", "now here"),
        lambda m: m.set_param("charset", "us-ascii"),
        lambda m: m.set_type("text/html"),
        lambda m: m.add_header("X-Added", "x"),
    ):
        change(ours)
        change(theirs)
        same()
