"""Never a 500 for bad input: a real ``fastsend serve`` fuzzed against its own OpenAPI document.

One server process for the module (one worker, a route to a port where
nothing listens, so accepted mail stays queued). Two parts:

- schemathesis (the real CLI, in a subprocess) generates a few hundred
  requests from /v1/openapi.json, valid and invalid, follows the document's
  links (POST /v1/messages -> GET /v1/messages/{id}, ...), and checks every
  answer: no 5xx, a documented status, a documented content type, a body
  that conforms to the documented schema, schema-invalid input rejected,
  405 with Allow for undeclared methods, 401 without a key. The check that
  "schema-valid input is accepted" is left out: addresses, templates and
  "from or template" are checked beyond what JSON Schema can say, and the
  server rightly answers 400 for them.
- a hand-written table of hostile requests sent over a raw socket (so CR/LF
  and NUL reach the server as written): bad JSON, wrong types, huge numbers,
  NUL/unicode in every string field, malformed addresses, oversized bodies,
  missing/extra fields, content types, keys, other tenants' ids, path
  traversal, pagination. Every answer is a 4xx with a JSON error naming the
  field, or a 2xx whose messages can then be read back.

Mail accepted before the fuzzing (by another tenant) is checked afterwards:
every message still there, its campaign untouched; the server log must hold
no traceback of an API handler.

FASTSEND_FUZZ_EXAMPLES and FASTSEND_FUZZ_SEED change the schemathesis pass
(defaults: 25 examples per operation, a fixed seed, so CI is repeatable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import ServeProcess, create_api_key, free_port

pytest.importorskip("schemathesis")

MAX_BODY = 65536
MAX_BATCH = 50


class Server:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "fastsend.toml"
        self.cfg.write_text(
            f"""
[spool]
dir = "spool"
[workers]
count = 1
[routes]
"*" = "127.0.0.1:{free_port()}"
[delivery]
tls = "off"
[api]
listen = "127.0.0.1:{self.port}"
max_batch = {MAX_BATCH}
max_body_bytes = {MAX_BODY}
rate_limit = 100000.0
"""
        )
        self.key = create_api_key(self.cfg, "acme")
        self.other_key = create_api_key(self.cfg, "keeper")
        self.serve = ServeProcess(self.cfg, self.port)
        self.base = self.serve.base
        self.log = self.serve.log
        self.proc = self.serve.proc

    def stop(self) -> int:
        return self.serve.stop()


def raw_request(
    port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
    body: bytes = b"", *, head: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One HTTP/1.1 request as written (no client-side checks), and its answer."""
    if head is None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers or []]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before reading it all
        # Read the answer only: the server may linger for the rest of a body it refused.
        while True:
            top, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", top)
                if m is not None and len(rest) >= int(m.group(1)):
                    break
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            data += c
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *hdr_lines = top.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    hdrs = {}
    for ln in hdr_lines:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def api(
    srv: Server, method: str, path: str, body: Any = None, *, key: str | None = "acme",
    raw: bytes | None = None, headers: list[tuple[str, str]] | None = None,
) -> tuple[int, Any]:  # fmt: skip
    h = list(headers or [])
    if key is not None:
        h.append(("Authorization", f"Bearer {srv.key if key == 'acme' else srv.other_key}"))
    # The standard encoder: it writes what orjson refuses (huge ints, deep nesting).
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    if data and not any(k.lower() == "content-type" for k, _ in h):
        h.append(("Content-Type", "application/json"))
    st, hdrs, out = raw_request(srv.port, method, path, h, data)
    if "json" in hdrs.get("content-type", ""):
        return st, orjson.loads(out)
    return st, out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("fuzz"))
    try:
        # Accepted before anything hostile arrives; checked by the last test.
        msgs = {"messages": [{**MSG, "to": [f"k{i}@example.org", f"l{i}@example.net"]}
                             for i in range(5)]}  # fmt: skip
        st, body = api(srv, "POST", "/v1/messages", msgs, key="keeper")
        assert st == 202, body
        srv.kept = [i for m in body["messages"] for i in m["ids"]]  # type: ignore[attr-defined]
        st, body = api(srv, "POST", "/v1/campaigns", CAMPAIGN, key="keeper")
        assert st == 201 and body["accepted"] == 2, body
        srv.kept_campaign = body["id"]  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.stop()


MSG = {"from": "News <news@example.com>", "to": "a@example.org", "subject": "Hi", "text": "Hello"}
CAMPAIGN = {
    "name": "kept",
    "template": {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"},
    "recipients": [{"email": "c1@example.org", "name": "A"}, {"email": "c2@example.org",
                                                               "name": "B"}],
}  # fmt: skip


# ------------------------------------------------------------ schemathesis
def test_schemathesis_against_openapi(server: Server) -> None:
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe] if exe else [sys.executable, "-c", "from schemathesis.cli import schemathesis as s; s()"]  # fmt: skip
    checks = ",".join([
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_schema_conformance", "response_headers_conformance",
        "negative_data_rejection", "unsupported_method", "ignored_auth",
        "use_after_free", "ensure_resource_availability",
    ])  # fmt: skip
    proc = subprocess.run(
        [*cmd, "run", f"{server.base}/v1/openapi.json",
         "-H", f"Authorization: Bearer {server.key}",
         "--checks", checks,
         "--max-examples", os.environ.get("FASTSEND_FUZZ_EXAMPLES", "25"),
         "--seed", os.environ.get("FASTSEND_FUZZ_SEED", "20261128"),
         "--workers", "2", "--continue-on-failure", "--no-color",
         "--generation-database", "none"],
        capture_output=True, text=True, cwd=server.tmp, timeout=120,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) generated", out)
    assert proc.returncode == 0, out[-20000:]
    assert m is not None and int(m.group(1)) >= 200, out[-3000:]


# ------------------------------------------------------------ hostile table
def _err(st: int, body: Any, field: str | None) -> None:
    assert isinstance(body, dict) and "error" in body, (st, body)
    err = body["error"]
    assert err["status"] == st and err["message"], body
    if field is not None:
        assert err.get("field") == field, body


BIG = 10**30
NASTY = ["\x00", "a\x00b", "\u202egnp.exe", "💥", "ｆｕｌｌ", "\ufeff", "\r\n", "x" * 5000]


def _string_field_cases() -> list[tuple[str, dict[str, Any]]]:
    """NUL, bidi, emoji, BOM, CR/LF and long strings in every string field."""
    cases = []
    for i, s in enumerate(NASTY):
        for name, msg in [
            ("from", {**MSG, "from": s}),
            ("from_name", {**MSG, "from": f'"{s}" <news@example.com>'}),
            ("to", {**MSG, "to": s}),
            ("to_local", {**MSG, "to": f"{s}@example.org"}),
            ("to_domain", {**MSG, "to": f"a@{s}.example"}),
            ("reply_to", {**MSG, "reply_to": s}),
            ("subject", {**MSG, "subject": s}),
            ("text", {**MSG, "text": s}),
            ("html", {**MSG, "html": s}),
            ("raw", {"from": MSG["from"], "to": MSG["to"], "raw": f"Subject: {s}\r\n\r\n{s}"}),
            ("header_name", {**MSG, "headers": {f"X-{s}": "v"}}),
            ("header_value", {**MSG, "headers": {"X-A": s}}),
            ("tags", {**MSG, "tags": [s]}),
            ("metadata_key", {**MSG, "metadata": {s: s}}),
            ("template_var", {"to": MSG["to"], "template": {**{k: MSG[k] for k in ("from",
                              "subject")}, "text": "{{ v }}"}, "variables": {"v": s}}),
        ]:  # fmt: skip
            cases.append((f"{name}-{i}", msg))
    return cases


@pytest.mark.parametrize(("name", "msg"), _string_field_cases())
def test_nasty_strings_in_every_field(server: Server, name: str, msg: dict[str, Any]) -> None:
    st, body = api(server, "POST", "/v1/messages", msg)
    assert st in (202, 400, 413), (st, body)
    if st == 202:
        for mid in body["messages"][0]["ids"]:
            st2, m = api(server, "GET", f"/v1/messages/{mid}")
            assert st2 == 200 and m["id"] == mid and m["events"], m  # really there
    else:
        _err(st, body, None)
        assert body["error"].get("field"), body  # names the field


# (method, path, body-or-raw, headers, key, status, field)
HOSTILE: list[tuple[str, str, str, Any, list[tuple[str, str]], str | None, int, str | None]] = [
    # bad JSON and wrong types
    ("truncated", "POST", "/v1/messages", b'{"to": "a@', [], "acme", 400, None),
    ("not-utf8", "POST", "/v1/messages", b"\xff\xfe{}", [], "acme", 400, None),
    ("lone-surrogate", "POST", "/v1/messages", b'{"to": "\\ud800"}', [], "acme", 400, None),
    ("array", "POST", "/v1/messages", b"[]", [], "acme", 400, None),
    ("string", "POST", "/v1/messages", b'"x"', [], "acme", 400, None),
    ("deep", "POST", "/v1/messages", b"[" * 20000 + b"]" * 20000, [], "acme", 400, None),
    ("deep-metadata", "POST", "/v1/messages",
     {**MSG, "metadata": {"a": json.loads("[" * 300 + "]" * 300)}}, [], "acme", 400,
     "metadata.a[0]"),
    ("to-number", "POST", "/v1/messages", {**MSG, "to": 5}, [], "acme", 400, "to"),
    ("to-object", "POST", "/v1/messages", {**MSG, "to": {"a": 1}}, [], "acme", 400, "to"),
    ("subject-list", "POST", "/v1/messages", {**MSG, "subject": ["x"]}, [], "acme", 400,
     "subject"),
    ("headers-list", "POST", "/v1/messages", {**MSG, "headers": ["a"]}, [], "acme", 400,
     "headers"),
    ("header-int", "POST", "/v1/messages", {**MSG, "headers": {"X-A": 1}}, [], "acme", 400,
     "headers"),
    ("tags-nested", "POST", "/v1/messages", {**MSG, "tags": [["x"]]}, [], "acme", 400, "tags[0]"),
    ("messages-null", "POST", "/v1/messages", {"messages": None}, [], "acme", 400, "messages"),
    ("messages-item-str", "POST", "/v1/messages", {"messages": ["x"]}, [], "acme", 400,
     "messages[0]"),
    # huge numbers
    ("metadata-bigint", "POST", "/v1/messages", {**MSG, "metadata": {"n": BIG}}, [], "acme", 400,
     "metadata.n"),
    ("metadata-negbigint", "POST", "/v1/messages", {**MSG, "metadata": {"n": [-BIG]}}, [], "acme",
     400, "metadata.n[0]"),
    ("variables-bigint", "POST", "/v1/messages",
     {"to": "a@example.org", "template": {"from": "a@example.com", "subject": "s",
      "text": "{{ n }}"}, "variables": {"n": BIG}}, [], "acme", 400, "variables.n"),
    ("template-bigint", "POST", "/v1/messages", {"to": "a@example.org", "template": BIG}, [],
     "acme", 400, "template"),
    ("template-int64", "POST", "/v1/messages", {"to": "a@example.org", "template": 2**63}, [],
     "acme", 400, "message.template"),
    ("template-negative", "POST", "/v1/messages", {"to": "a@example.org", "template": -1}, [],
     "acme", 400, "message.template"),
    ("template-bool", "POST", "/v1/messages", {"to": "a@example.org", "template": True}, [],
     "acme", 400, "template"),
    ("expires-huge", "POST", "/v1/suppressions", b'{"addresses": ["a@example.org"],'
     b' "expires_in": 1e999}', [], "acme", 400, "expires_in"),
    ("expires-negative", "POST", "/v1/suppressions",
     {"addresses": ["z@example.org"], "expires_in": -5}, [], "acme", 400, "expires_in"),
    ("campaign-recipient-bigint", "POST", "/v1/campaigns",
     {**CAMPAIGN, "recipients": [{"email": "a@example.org", "name": BIG}]}, [], "acme", 400,
     "recipients[0].name"),
    # malformed addresses
    ("to-no-at", "POST", "/v1/messages", {**MSG, "to": "nobody"}, [], "acme", 400,
     "message.to[0]"),
    ("to-two-ats", "POST", "/v1/messages", {**MSG, "to": "a@b@example.org"}, [], "acme", 400,
     "message.to[0]"),
    ("to-crlf", "POST", "/v1/messages", {**MSG, "to": "a@example.org\r\nRCPT TO:<x@y.z>"}, [],
     "acme", 400, "message.to[0]"),
    ("to-angle", "POST", "/v1/messages", {**MSG, "to": "<a@example.org>"}, [], "acme", 400,
     "message.to[0]"),
    ("to-long", "POST", "/v1/messages", {**MSG, "to": "a" * 300 + "@example.org"}, [], "acme",
     400, "message.to[0]"),
    ("suppress-bad", "POST", "/v1/suppressions", {"addresses": ["ok@example.org", "@@"]}, [],
     "acme", 400, "addresses[1]"),
    ("suppress-nul", "POST", "/v1/suppressions", {"addresses": ["a\x00@example.org"]}, [],
     "acme", 400, "addresses[0]"),
    ("suppress-reason-nul", "POST", "/v1/suppressions",
     {"addresses": ["r@example.org"], "reason": "x\x00"}, [], "acme", 400, "reason"),
    # CR/LF in header names and values (JSON)
    ("hdr-name-crlf", "POST", "/v1/messages", {**MSG, "headers": {"X-A\r\nBcc": "v"}}, [],
     "acme", 400, "message.headers"),
    ("hdr-value-lf", "POST", "/v1/messages", {**MSG, "headers": {"X-A": "v\nBcc: x@y.z"}}, [],
     "acme", 400, "message.headers.X-A"),
    ("hdr-value-nul", "POST", "/v1/messages", {**MSG, "headers": {"X-A": "v\x00"}}, [], "acme",
     400, "message.headers.X-A"),
    ("reply-to-cr", "POST", "/v1/messages", {**MSG, "reply_to": "a@example.com\rBcc: b@c.d"},
     [], "acme", 400, "message.reply_to"),
    ("from-lf", "POST", "/v1/messages", {**MSG, "from": "a@example.com\nBcc: b@c.d"}, [], "acme",
     400, "message.from"),
    ("hdr-override-from", "POST", "/v1/messages", {**MSG, "headers": {"From": "x@evil.example"}},
     [], "acme", 400, "message.headers"),
    # oversized
    ("body-too-big", "POST", "/v1/messages", {**MSG, "text": "x" * (MAX_BODY + 1)}, [], "acme",
     413, None),
    ("batch-too-big", "POST", "/v1/messages", {"messages": [MSG] * (MAX_BATCH + 1)}, [], "acme",
     413, None),
    ("rcpts-too-many", "POST", "/v1/messages",
     {**MSG, "to": [f"u{i}@example.org" for i in range(MAX_BATCH + 1)]}, [], "acme", 413,
     "message.to"),
    ("suppress-too-many", "POST", "/v1/suppressions",
     {"addresses": [f"u{i}@example.org" for i in range(MAX_BATCH + 1)]}, [], "acme", 413, None),
    ("metadata-too-big", "POST", "/v1/messages", {**MSG, "metadata": {"a": "x" * 5000}}, [],
     "acme", 400, "message.metadata"),
    ("tags-too-many", "POST", "/v1/messages", {**MSG, "tags": ["t"] * 21}, [], "acme", 400,
     "message.tags"),
    # missing / extra fields
    ("empty-body", "POST", "/v1/messages", b"", [], "acme", 400, None),
    ("empty-object", "POST", "/v1/messages", {}, [], "acme", 400, "to"),
    ("no-subject", "POST", "/v1/messages", {k: v for k, v in MSG.items() if k != "subject"}, [],
     "acme", 400, "message.subject"),
    ("extra-field", "POST", "/v1/messages", {**MSG, "cc": "b@example.org"}, [], "acme", 400,
     "cc"),
    ("extra-batch-field", "POST", "/v1/messages", {"messages": [MSG], "x": 1}, [], "acme", 400,
     "x"),
    ("campaign-no-template", "POST", "/v1/campaigns", {"name": "x"}, [], "acme", 400,
     "template"),
    ("campaign-empty-template", "POST", "/v1/campaigns", {"template": {}}, [], "acme", 400,
     "template"),
    ("suppress-empty", "POST", "/v1/suppressions", {"addresses": []}, [], "acme", 400,
     "addresses"),
    ("suppress-extra", "POST", "/v1/suppressions", {"addresses": ["a@example.org"], "x": 1}, [],
     "acme", 400, "x"),
    # content types
    ("form-urlencoded", "POST", "/v1/messages", b"to=a%40example.org",
     [("Content-Type", "application/x-www-form-urlencoded")], "acme", 400, None),
    ("multipart", "POST", "/v1/messages", b"--b\r\n\r\nx\r\n--b--\r\n",
     [("Content-Type", "multipart/form-data; boundary=b")], "acme", 415, None),
    ("xml", "POST", "/v1/messages", b"<message/>", [("Content-Type", "application/xml")], "acme",
     415, None),
    ("csv-to-messages", "POST", "/v1/messages", b"email\na@example.org\n",
     [("Content-Type", "text/csv")], "acme", 415, None),
    ("json-as-text", "POST", "/v1/messages", orjson.dumps(MSG),
     [("Content-Type", "text/plain")], "acme", 415, None),
    ("bad-charset", "POST", "/v1/messages", orjson.dumps(MSG),
     [("Content-Type", "application/json; charset=klingon")], "acme", 202, None),
    # API keys
    ("no-key", "GET", "/v1/campaigns", None, [], None, 401, None),
    ("empty-bearer", "GET", "/v1/campaigns", None, [("Authorization", "Bearer ")], None, 401,
     None),
    ("basic-auth", "GET", "/v1/campaigns", None, [("Authorization", "Basic YTpi")], None, 401,
     None),
    ("wrong-key", "GET", "/v1/campaigns", None,
     [("X-API-Key", "fs_aaaaaaaa_" + "A" * 43)], None, 401, None),
    ("unicode-key", "GET", "/v1/campaigns", None, [("X-API-Key", "fs_ä€💥")], None, 401, None),
    ("huge-key", "GET", "/v1/campaigns", None, [("X-API-Key", "k" * 7000)], None, 401, None),
    ("no-key-post", "POST", "/v1/messages", MSG, [], None, 401, None),
    # path traversal and odd ids
    ("id-traversal", "GET", "/v1/messages/..%2F..%2Fetc%2Fpasswd", None, [], "acme", 400, "id"),
    ("id-dots", "GET", "/v1/messages/..", None, [], "acme", 400, "id"),
    ("id-negative", "GET", "/v1/messages/-1", None, [], "acme", 400, "id"),
    ("id-zero", "GET", "/v1/campaigns/0", None, [], "acme", 400, "id"),
    ("id-huge", "GET", "/v1/messages/" + "9" * 40, None, [], "acme", 400, "id"),
    ("id-int64", "GET", f"/v1/campaigns/{2**63}", None, [], "acme", 400, "id"),
    ("id-max", "GET", f"/v1/campaigns/{2**63 - 1}", None, [], "acme", 404, None),
    ("id-plus", "GET", "/v1/messages/+1", None, [], "acme", 400, "id"),
    ("id-underscore", "GET", "/v1/messages/1_0", None, [], "acme", 400, "id"),
    ("id-arabic-digit", "GET", "/v1/messages/%D9%A1", None, [], "acme", 400, "id"),
    ("id-float", "POST", "/v1/campaigns/1.5/pause", None, [], "acme", 400, "id"),
    ("id-nul", "GET", "/v1/campaigns/1%00", None, [], "acme", 400, "id"),
    ("id-huge-action", "POST", f"/v1/campaigns/{10**25}/resume", None, [], "acme", 400, "id"),
    ("id-huge-recipients", "POST", f"/v1/campaigns/{10**25}/recipients", {"recipients": []}, [],
     "acme", 400, "id"),
    ("suppression-traversal", "DELETE", "/v1/suppressions/..%2F..%2Fspool.db", None, [], "acme",
     400, "address"),
    ("suppression-nul", "DELETE", "/v1/suppressions/a%00@example.org", None, [], "acme", 400,
     "address"),
    ("suppression-absent", "DELETE", "/v1/suppressions/nobody@example.org", None, [], "acme",
     404, None),
    ("unknown-route", "GET", "/v1/nothing", None, [], "acme", 404, None),
    ("openapi-traversal", "GET", "/v1/openapi.json/../../etc/passwd", None, [], "acme", 404,
     None),
    # pagination and query parameters
    ("limit-negative", "GET", "/v1/suppressions?limit=-1", None, [], "acme", 400, "limit"),
    ("limit-zero", "GET", "/v1/suppressions?limit=0", None, [], "acme", 400, "limit"),
    ("limit-huge", "GET", f"/v1/suppressions?limit={10**30}", None, [], "acme", 400, "limit"),
    ("limit-float", "GET", "/v1/suppressions?limit=1e3", None, [], "acme", 400, "limit"),
    ("limit-max", "GET", f"/v1/suppressions?limit={2**63 - 1}", None, [], "acme", 200, None),
    ("window-bad", "GET", "/v1/stats?window=1y", None, [], "acme", 400, "window"),
    ("by-bad", "GET", "/v1/stats?by=rcpt", None, [], "acme", 400, "by"),
    ("query-nul", "GET", "/v1/stats?window=1h%00", None, [], "acme", 400, "window"),
    # methods
    ("put", "PUT", "/v1/messages", MSG, [], "acme", 405, None),
    ("delete-campaigns", "DELETE", "/v1/campaigns", None, [], "acme", 405, None),
    # recipients uploads
    ("csv-binary", "POST", "/v1/campaigns/{cid}/recipients", b"\xff\xfe\x00\x01",
     [("Content-Type", "text/csv")], "acme", 400, "recipients"),
    ("csv-nul", "POST", "/v1/campaigns/{cid}/recipients", b"email,name\na\x00@example.org,x\n",
     [("Content-Type", "text/csv")], "acme", 400, None),
    ("csv-no-email", "POST", "/v1/campaigns/{cid}/recipients", b"name\nx\n",
     [("Content-Type", "text/csv")], "acme", 400, "recipients"),
    ("csv-empty", "POST", "/v1/campaigns/{cid}/recipients", b"",
     [("Content-Type", "text/csv")], "acme", 400, "recipients"),
    ("ndjson-garbage", "POST", "/v1/campaigns/{cid}/recipients", b"{\n[\n",
     [("Content-Type", "application/x-ndjson")], "acme", 400, None),
    ("ndjson-bigint", "POST", "/v1/campaigns/{cid}/recipients",
     b'{"email": "a@example.org", "name": 1000000000000000000000000000000}\n',
     [("Content-Type", "application/x-ndjson")], "acme", 202, None),
    ("json-recipients-bad", "POST", "/v1/campaigns/{cid}/recipients",
     {"recipients": [{"email": 5}]}, [], "acme", 400, "recipients[0]"),
    ("json-recipients-strict", "POST", "/v1/campaigns/{cid}/recipients?strict=1",
     {"recipients": [{"email": "ok@example.org", "name": "x"}, {"email": "bad"}]}, [], "acme",
     400, "recipients[1]"),
    # another tenant's resources
    ("other-message", "GET", "/v1/messages/{kept}", None, [], "acme", 404, None),
    ("other-campaign", "GET", "/v1/campaigns/{kept_campaign}", None, [], "acme", 404, None),
    ("other-pause", "POST", "/v1/campaigns/{kept_campaign}/pause", None, [], "acme", 404, None),
    ("other-cancel", "POST", "/v1/campaigns/{kept_campaign}/cancel", None, [], "acme", 404, None),
    ("other-recipients", "POST", "/v1/campaigns/{kept_campaign}/recipients",
     {"recipients": [{"email": "x@example.org", "name": "x"}]}, [], "acme", 404, None),
    ("other-template", "POST", "/v1/messages",
     {"to": "a@example.org", "template": "{kept_campaign}", "variables": {"name": "x"}}, [],
     "acme", 400, "message.template"),
]  # fmt: skip


def _fill(v: Any, names: dict[str, Any]) -> Any:
    if isinstance(v, str):
        if re.fullmatch(r"\{\w+\}", v):
            return names[v[1:-1]]
        return v.format(**names) if "{" in v and re.search(r"\{(kept|cid)\w*\}", v) else v
    if isinstance(v, dict):
        return {k: _fill(x, names) for k, x in v.items()}
    return v


@pytest.fixture(scope="module")
def names(server: Server) -> dict[str, Any]:
    st, body = api(server, "POST", "/v1/campaigns", {**CAMPAIGN, "name": "mine"})
    assert st == 201, body
    return {
        "cid": body["id"],
        "kept": server.kept[0],  # type: ignore[attr-defined]
        "kept_campaign": server.kept_campaign,  # type: ignore[attr-defined]
    }


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "headers", "key", "status", "field"),
    HOSTILE,
    ids=[h[0] for h in HOSTILE],
)
def test_hostile_input(
    server: Server, names: dict[str, Any], name: str, method: str, path: str, body: Any,
    headers: list[tuple[str, str]], key: str | None, status: int, field: str | None,
) -> None:  # fmt: skip
    path = _fill(path, names)
    body = _fill(body, names)
    raw = body if isinstance(body, bytes) else None
    st, out = api(server, method, path, None if raw is not None else body, key=key, raw=raw,
                  headers=headers)  # fmt: skip
    assert st == status, (st, out)
    if st >= 400:
        _err(st, out, field)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nX-API-Key: a\r\n b\r\n\r\n",  # obs-fold
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nX-API-Key: a\x00b\r\n\r\n",
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nX-API\rKey: a\r\n\r\n",
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nX-A\x00: a\r\n\r\n",
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\rb\r\n\r\n",
        b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nX API Key: a\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /v1/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/messages/1\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_malformed_http_is_4xx(server: Server, head: bytes) -> None:
    """CR/LF/NUL in header names and values, lying lengths: refused before any handler."""
    st, _h, _body = raw_request(server.port, "", "", head=head)
    assert 400 <= st < 500, st


def test_oversized_chunked_body_is_413(server: Server) -> None:
    chunk = b"x" * 32768
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + server.key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    st, _h, out = raw_request(server.port, "", "", head=head, body=body)
    assert st == 413, (st, out)
    _err(st, orjson.loads(out), None)


def test_405_names_allowed_methods(server: Server) -> None:
    st, h, _ = raw_request(
        server.port, "PATCH", "/v1/messages", [("Authorization", f"Bearer {server.key}")]
    )
    assert st == 405 and "POST" in h.get("allow", ""), h


def test_accepted_mail_is_not_lost(server: Server) -> None:
    """Last: what was accepted before the fuzzing is still there, untouched; no handler crashed."""
    for mid in server.kept:  # type: ignore[attr-defined]
        st, m = api(server, "GET", f"/v1/messages/{mid}", key="keeper")
        assert st == 200, m
        assert m["state"] in ("queued", "deferred", "inflight"), m
        assert m["events"][0]["event"] == "accepted"
    st, c = api(server, "GET", f"/v1/campaigns/{server.kept_campaign}", key="keeper")  # type: ignore[attr-defined]
    assert st == 200 and c["status"] == "active" and c["total"] == 2, c
    assert server.proc.poll() is None, "the server died"
    assert server.stop() == 0
    log = server.log.read_text(errors="replace")
    assert "internal error on" not in log, log[-5000:]
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(server.tmp / "spool"), readonly=True)
    try:
        for mid in server.kept:  # type: ignore[attr-defined]
            row = spool.message(mid)
            assert row is not None and row["state"] in ("queued", "deferred"), row
    finally:
        spool.close()
