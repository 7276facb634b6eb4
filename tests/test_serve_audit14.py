"""Session 14's outside audit of serve's hostile input (the attacks on the trust
boundary itself are in test_hostile_tenant.py):

- a JSON-lines recipient row naming a key twice is refused with its line number
  (it was last-wins; a JSON body already gets a 400 naming the key): tried by an
  upload to a running ``fastsend serve`` (``fastsend send`` reads lists with the
  same reader, fastsend.recipients); so is a row nested too deep (it was a 500),
  and a CSV header naming a column twice is a 400 (it was last-wins);
- ``fastsend suppress export`` writes no cell a spreadsheet reads as a formula
  (= + - @ TAB CR at the start), and its output imports back as it was;
- a [tracking] secret of a few characters is a config error.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from tests._serve_helpers import ENV, Served

TPL = {"from": "a@evil.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("audit14"), "127.0.0.1:9", serve_args=("--no-workers",))
    try:
        yield s
    finally:
        s.stop()


def test_ndjson_row_naming_a_key_twice_is_refused_with_its_line(served: Served) -> None:
    st, got = served.req("POST", "/v1/campaigns", {"name": "dup", "template": TPL,
                                                   "recipients": []})  # fmt: skip
    assert st == 201, got
    cid = got["id"]
    rows = (
        b'{"email": "one@example.org", "name": "One"}\n'
        b'{"email": "two@example.org", "name": "Two", "name": "=cmd|x"}\n'
        b'{"email": "three@example.org", "name": "Three", "url": "https://x.example:8/a:b"}\n'
        b'{"email": "four@example.org", "name": "Four", "m": {"k": 1, "k": 2}}\n'
    )
    st, got = served.req("POST", f"/v1/campaigns/{cid}/recipients", raw=rows,
                         headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert st == 202, got
    assert got["accepted"] == 2 and got["rejected"] == 2, got
    assert [e["row"] for e in got["errors"]] == [2, 4], got
    assert "'name' appears twice" in got["errors"][0]["error"], got
    assert "'k' appears twice" in got["errors"][1]["error"], got
    # A JSON body's recipient list is held to the same rule (a 400 naming the key).
    st, got = served.req("POST", f"/v1/campaigns/{cid}/recipients",
                         raw=b'{"recipients": [{"email": "x@example.org", "email": "y@example.org"}]}')  # fmt: skip
    assert st == 400 and "email" in got["error"]["message"], got


def test_ndjson_row_nested_too_deep_is_a_refused_row_not_a_500(served: Served) -> None:
    """A value nested 300 levels (orjson reads 1,024, writes 254): the row is refused
    with its line, the others are spooled (it was a 500, and nothing spooled)."""
    st, got = served.req("POST", "/v1/campaigns", {"name": "deep", "template": TPL,
                                                   "recipients": []})  # fmt: skip
    assert st == 201, got
    deep = b'{"email": "deep@example.org", "n": ' + b"[" * 300 + b"]" * 300 + b"}\n"
    rows = b'{"email": "one@example.org", "name": "One"}\n' + deep + b'{"email": "x@example.org", "name": "X"}\n'
    st, got = served.req("POST", f"/v1/campaigns/{got['id']}/recipients", raw=rows,
                         headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert st == 202, got
    assert got["accepted"] == 2 and [e["row"] for e in got["errors"]] == [2], got
    assert "nested deeper than 32 levels" in got["errors"][0]["error"], got


def test_csv_header_naming_a_column_twice_is_a_400_and_errors_name_no_server_path(
    served: Served,
) -> None:
    st, got = served.req("POST", "/v1/campaigns", {"name": "csv", "template": TPL,
                                                   "recipients": []})  # fmt: skip
    assert st == 201, got
    url = f"/v1/campaigns/{got['id']}/recipients"
    csv_type = {"Content-Type": "text/csv"}
    st, got = served.req("POST", url, raw=b"email,name, name\nq@example.org,A,B\n",
                         headers=csv_type)  # fmt: skip
    assert st == 400, got
    assert "'name' twice" in got["error"]["message"], got
    st, got = served.req("GET", url.rpartition("/")[0])
    assert got["total"] == 0, got  # nothing spooled
    # A list that cannot be read: the answer says why, not where the server keeps it.
    st, got = served.req("POST", url, raw=b"email,name\nq@example.org,\xff\n", headers=csv_type)
    assert st == 400 and "UTF-8" in got["error"]["message"], got
    assert str(served.tmp) not in got["error"]["message"] and "upload-" not in got["error"]["message"]


def _cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsend", *args], input=stdin,
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=60)  # fmt: skip


# Valid addresses (every character is atext) a spreadsheet would run as formulas.
FORMULAS = [
    "=cmd|'/Ccalc'!A0@example.org",
    "+1+cmd|'/Ccalc'!A0@example.org",
    "-2+3@example.org",
    "'=quoted@example.org",
    "#hash@example.org",
    "plain@example.org",
]


def test_suppress_export_guards_formulas_and_imports_back(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    out = _cli("suppress", "add", "--spool", str(spool), "--source", "@SUM(A1:A9)", "--",
               *FORMULAS, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    exported = _cli("suppress", "export", "--spool", str(spool), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.reader(io.StringIO(exported.stdout)))
    assert rows[0][:3] == ["address", "reason", "source"]
    assert len(rows) == 1 + len(FORMULAS)
    for row in rows[1:]:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), row
    # Imported again (into another tenant): the very same addresses and sources.
    back = _cli("suppress", "import", "-", "--spool", str(spool), "--tenant", "again",
                stdin=exported.stdout, cwd=tmp_path)  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert f"imported {len(FORMULAS)} address(es)" in back.stdout
    listed = _cli("suppress", "list", "--json", "--spool", str(spool), "--tenant", "again",
                  cwd=tmp_path)  # fmt: skip
    entries = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(e["address"] for e in entries) == sorted(FORMULAS)
    assert {e["source"] for e in entries} == {"@SUM(A1:A9)"}


def test_short_tracking_secret_is_a_config_error(tmp_path: Path) -> None:
    """Every tracking, click and unsubscribe link carries an HMAC under [tracking]
    secret: one of a few characters is found offline from a single link, and then
    every link can be forged. Refused like a short [webhooks] secret, unnamed."""
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text('[spool]\ndir = "spool"\n[tracking]\nsecret = "hunter2"\n')
    out = _cli("check-config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out
    assert "[tracking] secret: 16+ characters" in out.stderr and "hunter2" not in out.stderr
    cfg.write_text('[spool]\ndir = "spool"\n[tracking]\nsecret = "0123456789abcdef"\n')
    assert _cli("check-config", str(cfg), cwd=tmp_path).returncode == 0


NESTED = """
[tenants.evil]
domains = ["parent.example"]
[tenants.acme]
domains = ["shop.parent.example"]
"""


def test_a_parent_domains_tenant_does_not_send_as_a_subdomain_another_tenant_has(
    tmp_path: Path,
) -> None:
    """evil is listed for parent.example, acme for shop.parent.example: evil's From at
    shop.parent.example (or under it) is 403 (it was accepted, and evil's key for
    parent.example would sign it, aligned by relaxed DMARC); its other subdomains stay
    its own. A domain listed for two tenants is a config error."""
    s = Served(tmp_path, "127.0.0.1:9", NESTED, serve_args=("--no-workers",))
    try:
        def send(frm: str, tenant: str) -> tuple[int, object]:
            return s.req("POST", "/v1/messages", {"from": frm, "to": "r@example.org",
                                                  "subject": "s", "text": "t"}, tenant=tenant)  # fmt: skip

        for frm in ("x@shop.parent.example", "x@Deep.Shop.Parent.Example."):
            st, got = send(frm, "evil")
            assert st == 403 and "shop.parent.example" in str(got), got
        assert send("x@www.parent.example", "evil")[0] == 202
        assert send("x@parent.example", "evil")[0] == 202
        assert send("x@deep.shop.parent.example", "acme")[0] == 202
        assert send("x@parent.example", "acme")[0] == 403
        # Nor does it put its click links on a host under acme's domain.
        tpl = {"from": "x@parent.example", "subject": "s", "html": "<a href='https://a.example/'>a</a>",
               "tracking": {"clicks": True, "base_url": "https://t.shop.parent.example"}}  # fmt: skip
        st, got = s.req("POST", "/v1/campaigns", {"template": tpl, "recipients": []}, tenant="evil")
        assert st == 403 and "t.shop.parent.example" in str(got), got
        tpl["tracking"] = {"clicks": True, "base_url": "https://t.parent.example"}
        assert s.req("POST", "/v1/campaigns", {"template": tpl, "recipients": []},
                     tenant="evil")[0] == 201  # fmt: skip
    finally:
        s.stop()
    cfg = tmp_path / "twice.toml"
    cfg.write_text('[spool]\ndir = "spool"\n[tenants.a]\ndomains = ["example.com"]\n'
                   '[tenants.b]\ndomains = ["Example.COM."]\n')  # fmt: skip
    out = _cli("check-config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "'example.com' is also [tenants.a]'s" in out.stderr, out
