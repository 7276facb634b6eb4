"""DKIM signatures verified by two independent verifiers: dkimpy and OpenDKIM."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _message_helpers import drop_first_signature, opendkim_verify, use_impl
from conftest import require_program
from fastsend.message import Campaign
from fastsend.message import dkim as dkim_mod
from fastsend.message.keys import generate, load_private_key, public_txt, write_key

KEYS = {"rsa1024": ("rsa", 1024), "rsa2048": ("rsa", 2048), "rsa4096": ("rsa", 4096),
        "ed": ("ed25519", 0)}  # fmt: skip

MESSAGES: dict[str, dict[str, Any]] = {
    "unicode": {
        "subject": "Grüße, {{ name }} — ✓ 日本語",
        "text": "Hallo {{ name }}, ça va?\nZeile 2 mit Ümlaut\n",
        "html": "<p>Hallo <b>{{ name }}</b> 🎉</p>",
    },
    "long-lines": {
        "subject": "x " * 120 + "{{ name }}",
        "text": ("long " * 400) + "{{ name }}\n" + "y" * 3000 + "\n",
    },
    "whitespace": {
        "subject": "  spaced \t out  {{ name }}",
        "text": "trailing   \n\ttabs\t\tinside\n\n\n\n",
        "headers": {"X-Folded": "a " * 80 + "{{ name }}"},
    },
    "empty-body": {"subject": "empty", "text": ""},
    "attachment": {
        "subject": "with file",
        "text": "see attached",
        "html": "<p>see attached</p>",
        "attachments": [
            {"filename": "data.bin", "data_b64": base64.b64encode(bytes(range(256)) * 20).decode()},
            {"filename": "naïve résumé.txt", "data_b64": base64.b64encode(b"hello").decode()},
        ],
    },
    "base64-unsub": {
        "subject": "b64",
        "text": "Hi {{ name }}",
        "transfer_encoding": "base64",
        "list_unsubscribe": {"mailto": "u@example.com", "url": "https://example.com/u/{{ email }}"},
        "feedback_id": "a:b:c:fastsend",
    },
}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dkimkeys")
    for name, (alg, bits) in KEYS.items():
        write_key(generate(alg, bits or 2048), d / f"{name}.pem")
    return d


def txt_records(keydir: Path) -> dict[str, str]:
    return {
        f"{name}._domainkey.example.com": public_txt(load_private_key(str(keydir / f"{name}.pem")))
        for name in KEYS
    }


def campaign(keydir: Path, msg: str, sel: list[str], canon: str) -> Campaign:
    d: dict[str, Any] = {"from": "Sender Näme <news@example.com>", **MESSAGES[msg]}
    d["dkim"] = [
        {"domain": "example.com", "selector": s, "key": str(keydir / f"{s}.pem"),
         "canonicalization": canon}
        for s in sel
    ]  # fmt: skip
    return Campaign.from_dict(d)


def dkimpy_verify(data: bytes, records: dict[str, str]) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    return bool(dkimpy.verify(data, dnsfunc=dnsfunc))


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("msg", sorted(MESSAGES))
def test_rsa_verifies_with_dkimpy_and_opendkim(
    impl: str, monkeypatch: pytest.MonkeyPatch, keydir: Path, tmp_path: Path, msg: str, canon: str
) -> None:
    exe = require_program("opendkim")
    use_impl(monkeypatch, impl)
    records = txt_records(keydir)
    r = campaign(keydir, msg, ["rsa2048"], canon).compile()
    data = r.render("rcpt@example.org", {"name": "Zoë"}, "m-1")
    assert dkimpy_verify(data, records)
    verdict = opendkim_verify(exe, tmp_path, data, records)
    assert "succeeded" in verdict, verdict
    # tampering is noticed (the verifiers are really checking)
    bad = data.replace(b"\r\nFrom: ", b"\r\nFrom: X", 1)
    assert not dkimpy_verify(bad, records)


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("msg", sorted(MESSAGES))
def test_dual_rsa_ed25519_verifies_with_opendkim(
    impl: str, monkeypatch: pytest.MonkeyPatch, keydir: Path, tmp_path: Path, msg: str, canon: str
) -> None:
    exe = require_program("opendkim")
    use_impl(monkeypatch, impl)
    records = txt_records(keydir)
    r = campaign(keydir, msg, ["ed", "rsa2048"], canon).compile()
    data = r.render("rcpt@example.org", {"name": "Zoë"}, "m-2")
    assert data.count(b"DKIM-Signature:") == 2
    v1 = opendkim_verify(exe, tmp_path, data, records)
    assert "s=ed," in v1 and "succeeded" in v1, v1
    v2 = opendkim_verify(exe, tmp_path, drop_first_signature(data), records)
    assert "s=rsa2048," in v2 and "succeeded" in v2, v2
    assert dkimpy_verify(drop_first_signature(data), records)
    tampered = data.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
    assert "failed" in opendkim_verify(exe, tmp_path, tampered, records)


@pytest.mark.parametrize("sel", ["rsa1024", "rsa4096"])
def test_key_sizes(impl: str, monkeypatch: pytest.MonkeyPatch, keydir: Path, sel: str) -> None:
    use_impl(monkeypatch, impl)
    r = campaign(keydir, "unicode", [sel], "relaxed/relaxed").compile()
    assert dkimpy_verify(r.render("a@example.org", {"name": "n"}, "m"), txt_records(keydir))


def test_body_hash_cached_and_changes(keydir: Path) -> None:
    signer = dkim_mod.Signer.from_settings(
        {"domain": "example.com", "selector": "ed", "key": str(keydir / "ed.pem")}
    )
    body = b"same body\r\n"
    h1 = signer.body_hash(body)
    assert signer.body_hash(bytes(body)) is h1
    assert signer.body_hash(b"other\r\n") != h1


def test_canonicalization_twins_agree_on_rfc_examples(impl: str) -> None:
    from fastsend import _accel

    f = dkim_mod.PURE if impl == "py" else {n: _accel.compiled(n) for n in dkim_mod.PURE}
    # RFC 6376 3.4.5 example
    assert f["header_relaxed"](b"A: X\r\n") == b"a:X\r\n"
    assert f["header_relaxed"](b"B : Y\t\r\n\tZ  \r\n") == b"b:Y Z\r\n"
    assert f["body_relaxed"](b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert f["body_simple"](b" C \r\nD \t E\r\n\r\n\r\n") == b" C \r\nD \t E\r\n"
    assert f["body_relaxed"](b"") == b""
    assert f["body_simple"](b"") == b"\r\n"
    assert f["body_relaxed"](b"\r\n\r\n") == b""
    assert f["body_relaxed"](b"x") == b"x\r\n"
    assert f["body_simple"](b"x") == b"x\r\n"


WSP_BYTES = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b":", b"\xc3"]))


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), WSP_BYTES.map(b"".join)),
       lines=st.lists(WSP_BYTES.map(b"".join), max_size=5))  # fmt: skip
def test_canonicalization_twins_agree_on_random_input(body: bytes, lines: list[bytes]) -> None:
    from fastsend import _accel

    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    for name in ("body_relaxed", "body_simple"):
        assert _accel.compiled(name)(body) == dkim_mod.PURE[name](body)
    got = _accel.compiled("relaxed_headers")(tuple(lines))
    assert got == dkim_mod.PURE["relaxed_headers"](tuple(lines))


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(WSP_BYTES.map(lambda b: b"X-A:" + b"".join(b) + b"\r\n"), max_size=5),
       relaxed=st.booleans())  # fmt: skip
def test_ed25519_sign_lines_twins_agree(keydir: Path, lines: list[bytes], relaxed: bool) -> None:
    from fastsend import _accel

    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    signer = dkim_mod.Signer.from_settings(
        {"domain": "example.com", "selector": "ed", "key": str(keydir / "ed.pem")}
    )
    if signer._sodium_key is None:
        pytest.skip("PyNaCl not installed")
    head = b"DKIM-Signature: v=1; a=ed25519-sha256;\r\n b="
    c14n = dkim_mod.PURE["header_relaxed"](head)[:-2] if relaxed else head
    args = (tuple(lines), head, c14n, signer._sodium_key, relaxed)
    got = _accel.compiled("ed25519_sign_lines")(*args)
    assert got == dkim_mod.PURE["ed25519_sign_lines"](*args)


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
def test_ed25519_libsodium_and_openssl_sign_alike(keydir: Path, canon: str) -> None:
    """Ed25519 is deterministic: libsodium (PyNaCl) and OpenSSL give the same line."""
    s = {"domain": "example.com", "selector": "ed", "key": str(keydir / "ed.pem"),
         "canonicalization": canon}  # fmt: skip
    sodium, openssl = dkim_mod.Signer.from_settings(s), dkim_mod.Signer.from_settings(s)
    openssl._sodium_key = None
    headers = [("from", b"From: a@example.com\r\n"), ("subject", b"Subject:  x \r\n y\r\n")]
    body = b"hello \r\n\r\n"
    assert sodium.sign(headers, body) == openssl.sign(headers, body)


# Raw messages (as ConfigDKIM.sign_raw signs them): header lines with odd white
# space and folds, bodies with and without a final CRLF, white-space-only lines,
# long lines.
ODD_HEADERS = [
    ("from", b"From: Sender\t Name  <news@example.com> \t\r\n"),
    ("to", b"To: a@example.org,\r\n\t  b@example.org \r\n"),
    ("subject", b"Subject: two  spaces,\ttab \r\n   and a fold\t\r\n"),
    ("date", b"Date: Sat, 05 Dec 2026 06:30:00 +0000\r\n"),
    ("message-id", b"Message-ID: <odd-1@example.com>\r\n"),
    ("x-long", b"X-Long: " + b"v" * 900 + b"\r\n"),
]
# White space right after the colon other than one SP: OpenDKIM rebuilds a
# header as "Name: value" (as from a milter), so it can check these only under
# relaxed header canonicalization: they are signed with that only.
COLON_WSP = [
    ("from", b"From:\t  Sender Name <news@example.com>\r\n"),
    ("subject", b"Subject:two\t\r\n spaces\r\n"),
]
RAW_BODIES = {
    "no-final-crlf": b"first line\r\nthe last line has no CRLF",
    "no-final-crlf-wsp": b"text \t\r\nends in white space \t ",
    "final-crlfs": b"inner   white\t\tspace \r\n\r\n\r\n\r\n",
    "wsp-lines": b"a \t\r\n \t \r\n\t\r\n",
    "long-lines": (b"word " * 190).rstrip() + b"\r\n" + b"z" * 990 + b"\r\n",
    "empty": b"",
    "crlf-only": b"\r\n",
}
CANONS = ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("sel", ["rsa2048", "ed"])
def test_raw_messages_verify_with_dkimpy_and_opendkim(
    impl: str, monkeypatch: pytest.MonkeyPatch, keydir: Path, tmp_path: Path, sel: str, canon: str
) -> None:
    """Every signature verifies with both verifiers, for rsa-sha256 and
    ed25519-sha256, each canonicalization pair, the compiled and pure twins."""
    exe = require_program("opendkim")
    use_impl(monkeypatch, impl)
    records = txt_records(keydir)
    signer = dkim_mod.Signer.from_settings(
        {"domain": "example.com", "selector": sel, "key": str(keydir / f"{sel}.pem"),
         "canonicalization": canon, "headers": [*dkim_mod.DEFAULT_HEADERS, "x-long"]}
    )  # fmt: skip
    headers = ODD_HEADERS
    if canon.startswith("relaxed/"):
        odd = dict(COLON_WSP)
        headers = [(n, odd.get(n, ln)) for n, ln in ODD_HEADERS]
    head = b"".join(ln for _, ln in headers)
    for name, body in RAW_BODIES.items():
        data = signer.sign(headers, body) + head + b"\r\n" + body
        # Verified as receivers see it: DATA ends a body with CRLF
        # (smtp.replies.dot_stuff), and both canonicalizations sign a body
        # without one as if it had it (RFC 6376 3.4.3, 3.4.4).
        wire = data if data.endswith(b"\r\n") else data + b"\r\n"
        assert dkimpy_verify(wire, records), name
        verdict = opendkim_verify(exe, tmp_path, wire, records)
        assert f"s={sel}," in verdict and "succeeded" in verdict, (name, verdict)
        bad = wire[:-3] + b"!\r\n" if body.strip() else wire + b"x\r\n"
        assert not dkimpy_verify(bad, records), name
        assert "failed" in opendkim_verify(exe, tmp_path, bad, records), name


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(WSP_BYTES.map(lambda b: b"X-A:" + b"".join(b) + b"\r\n"), max_size=5),
       relaxed=st.booleans())  # fmt: skip
def test_rsa_signer_twins_agree(keydir: Path, lines: list[bytes], relaxed: bool) -> None:
    """The compiled RsaSigner (libcrypto, one context per key) and the pure one
    (cryptography) make the same line: PKCS#1 v1.5 signatures are deterministic."""
    from fastsend import _accel

    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    key = load_private_key(str(keydir / "rsa1024.pem"))
    head = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n b="
    c14n = dkim_mod.PURE["header_relaxed"](head)[:-2] if relaxed else head
    args = (tuple(lines), head, c14n, relaxed)
    got = _accel.compiled("RsaSigner")(key).sign_lines(*args)
    assert got == dkim_mod.PyRsaSigner(key).sign_lines(*args)


def test_rsa_signer_refuses_other_keys(impl: str, keydir: Path) -> None:
    from fastsend import _accel

    cls = dkim_mod.PyRsaSigner if impl == "py" else _accel.compiled("RsaSigner")
    with pytest.raises(ValueError, match="RSA private key"):
        cls(load_private_key(str(keydir / "ed.pem")))
    signer = cls(load_private_key(str(keydir / "rsa4096.pem")))
    assert signer.size == 512
    line = signer.sign_lines((b"From: a@example.com\r\n",), b"h b=", b"h b=", True)
    assert line.startswith(b"h b=") and line.endswith(b"\r\n") and line.count(b"\r\n  ") == 9


# Whole messages (MessageSigner): the DKIM-Signature line, the header lines, the
# empty line and the body in one bytes object; the compiled twin writes it in
# one buffer and hashes the body where it lies.
MS_LINES = [
    b"From: Sender <news@example.com>\r\n",
    b"To: a@example.org\r\n",
    b"Subject: two  spaces\t\r\n and a fold \r\n",
    b"Date: Sat, 05 Dec 2026 06:30:00 +0000\r\n",
    b"Message-ID: <m-1@example.com>\r\n",
    b"X-Not-Signed: x\r\n",
]
MS_NAMES = ["from", "to", "subject", "date", "message-id", "x-not-signed"]
SHARED = b"static text shared by every body, long enough to keep a state for\r\n" * 8


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("sel", ["rsa2048", "ed"])
def test_message_signer_twins_agree_and_verify(
    monkeypatch: pytest.MonkeyPatch, keydir: Path, tmp_path: Path, sel: str, canon: str
) -> None:
    """The compiled MessageSigner makes the pure one's bytes (the same signature
    line, the lines, the empty line, the body) for bodies clean and not
    (white space to canonicalize, no final CRLF, empty), a body repeated and
    bodies sharing a long prefix (the BodyHasher's cache and kept state);
    each verifies with dkimpy and OpenDKIM."""
    from fastsend import _accel

    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    exe = require_program("opendkim")
    import time

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    records = txt_records(keydir)
    bodies = [*RAW_BODIES.values(), b"same\r\n", b"same\r\n", SHARED + b"one\r\n",
              SHARED + b"two\r\n", SHARED + b"two \t\r\n\r\n"]  # fmt: skip
    made: dict[str, list[bytes]] = {}
    for which in ("py", "c"):
        use_impl(monkeypatch, which)
        signer = dkim_mod.Signer.from_settings(
            {"domain": "example.com", "selector": sel, "key": str(keydir / f"{sel}.pem"),
             "canonicalization": canon}
        )  # fmt: skip
        ms = signer.message_signer(signer.plan(MS_NAMES))
        if which == "c":
            assert type(ms) is _accel.compiled("MessageSigner") and ms.mode in (1, 2)
        made[which] = [ms.message(MS_LINES, body) for body in bodies]
    assert made["c"] == made["py"]
    for body, data in zip(bodies, made["c"], strict=True):
        assert data.endswith(b"\r\n".join([b"", MS_LINES[-1][:-2], b"", b""]) + body)
        wire = data if data.endswith(b"\r\n") else data + b"\r\n"
        assert dkimpy_verify(wire, records), body
        verdict = opendkim_verify(exe, tmp_path, wire, records)
        assert f"s={sel}," in verdict and "succeeded" in verdict, (body, verdict)


@pytest.mark.parametrize("msg", sorted(MESSAGES))
def test_assembly_signed_is_the_signed_message(
    impl: str, monkeypatch: pytest.MonkeyPatch, keydir: Path, msg: str
) -> None:
    """Assembly.signed (what a signed DeferredMessage makes) is the message
    personal() makes with its MessageSigner's line first: render()'s bytes."""
    import time

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    use_impl(monkeypatch, impl)
    r = campaign(keydir, msg, ["ed"], "relaxed/relaxed").compile()
    a = r._assembly
    date = b"Date: Sat, 05 Dec 2026 06:30:00 +0000\r\n"
    got = a.signed({"name": "Zoë"}, "rcpt@example.org", "m-1", date)
    lines, body = a.personal({"name": "Zoë"}, "rcpt@example.org", "m-1", date, True)
    assert got == r._signer.message(lines, body)
    assert got.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")
    assert dkimpy_verify(got, txt_records(keydir))
    if "{{ name }}" in repr(MESSAGES[msg]):  # a value missing: raised, as personal() does
        with pytest.raises(KeyError):
            a.signed({}, "rcpt@example.org", "m-1", date)
