"""A list's columns as a spreadsheet or another sender's export names them: a
column whose name is no plain name ("First Name") is a template variable as
``{{ row["First Name"] }}`` (an unknown one is said with the list's columns);
a JSON-lines list (and the API's recipients) takes the address under the names
a CSV's address column may have ("Email", "Email Address", "to") and the
variables of a nested "variables" / "vars" / "data" object, as the API's
messages do."""

from __future__ import annotations

import email
from email import policy
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import run_fastsend, summary

from fastsend import recipients
from fastsend.message import Campaign, CampaignError
from fastsend.message.template import Template, TemplateError
from fastsend.sink import SinkProcess
from test_serve_api import Client, arun


def test_a_column_with_spaces_is_a_variable_as_row_of_its_name() -> None:
    t = Template('Hi {{ row["First Name"] }}, {{ row[\'Zip/Postal\'] | default("-") }}'
                 ' {{ row["a \\"q\\""] }}')  # fmt: skip
    assert [p.name for p in t.placeholders] == ["First Name", "Zip/Postal", 'a "q"']
    assert t.render({"First Name": "Ann", 'a "q"': "x"}) == "Hi Ann, - x"
    with pytest.raises(TemplateError, match=r'written \{\{ row\["First Name"\] \}\}'):
        Template("Hi {{ First Name }}")
    with pytest.raises(TemplateError, match="bad placeholder"):
        Template('Hi {{ row[""] }}')


def test_an_unknown_variable_names_the_lists_columns() -> None:
    camp = Campaign.from_dict({"from": "a@example.com", "subject": "Hi {{ first_name }}",
                               "text": "x"})  # fmt: skip
    with pytest.raises(CampaignError) as e:
        camp.check_columns({"email", "First Name", "Last Name"})
    said = str(e.value)
    assert "first_name" in said and "'First Name', 'Last Name'" in said
    assert '{{ row["First Name"] }}' in said


def test_send_fills_a_spreadsheets_columns(tmp_path: Path) -> None:
    lst = tmp_path / "list.csv"
    lst.write_text("Email Address,First Name,Zip/Postal\nann@x.example,Ann,75001\n"
                   "bob@x.example,Bob,\n")  # fmt: skip
    camp = tmp_path / "c.toml"
    camp.write_text('from = "n@sender.example.com"\nsubject = "Hi {{ row[\\"First Name\\"] }}"\n'
                    'text = "Zip {{ row[\'Zip/Postal\'] | default(\\"none\\") }}.\\n"\n')  # fmt: skip
    saved = tmp_path / "saved"
    with SinkProcess("--save", str(saved)) as sink:
        host, port = sink.addresses[0]
        res = run_fastsend("send", str(camp), "-r", str(lst), "--route", f"*={host}:{port}",
                           "--spool", str(tmp_path / "spool"), "--json", "--no-progress",
                           "--no-dkim")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert summary(res)["delivered"] == 2
    got = {}
    for f in saved.iterdir():
        m = email.message_from_bytes(f.read_bytes(), policy=policy.default)
        got[m["Subject"]] = m.get_content().strip()
    assert got == {"Hi Ann": "Zip 75001.", "Hi Bob": "Zip none."}


def _rows(path: Path) -> list[Any]:
    return list(recipients.read(str(path)))


def test_json_lines_take_the_address_and_variables_as_the_api_does(tmp_path: Path) -> None:
    lst = tmp_path / "l.jsonl"
    lst.write_text("\n".join([
        '{"Email": "a@x.example", "name": "A"}',
        '{"to": "b@x.example", "variables": {"name": "B", "n": 1.50}}',
        '{"E-mail Address": "c@x.example", "vars": {"name": "C"}, "plan": "pro"}',
        '{"email": "d@x.example", "data": {"name": "D"}, "to": "kept as a variable"}',
        '{"Email": "e@x.example", "to": "f@x.example", "name": "E"}',
        '{"email": "g@x.example", "name": "G", "vars": {"name": "H"}}',
        '{"name": "no address"}',
    ]) + "\n")  # fmt: skip
    got = _rows(lst)
    good = {r[1]: orjson.loads(r[3]) for r in got if not isinstance(r, recipients.BadRow)}
    assert good == {
        "a@x.example": {"name": "A"},
        "b@x.example": {"name": "B", "n": "1.50"},
        "c@x.example": {"name": "C", "plan": "pro"},
        "d@x.example": {"name": "D", "to": "kept as a variable"},
    }
    bad = {r.line: r.error for r in got if isinstance(r, recipients.BadRow)}
    assert set(bad) == {5, 6, 7}
    assert "'Email', 'to'" in bad[5] and "'name' is given twice" in bad[6]
    assert "email" in bad[7]
    assert {"email", "name", "plan", "n", "to"} <= recipients.columns(str(lst))
    assert "vars" not in recipients.columns(str(lst))


def test_api_recipients_take_the_same_shapes(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        tpl = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
        st, body = await c.req("POST", "/v1/campaigns", {"template": tpl, "recipients": [
            {"to": "a@x.example", "vars": {"name": "A"}},
            {"Email": "b@x.example", "variables": {"name": "B"}},
            {"email": "c@x.example", "name": "C", "data": {"name": "twice"}},
        ]})  # fmt: skip
        assert st == 201 and body["accepted"] == 2, body
        assert body["errors"][0]["row"] == 3 and "twice" in body["errors"][0]["error"]
        rows = [c.ctx.spool.message(i) for i in (1, 2)]
        assert [(m["rcpt"], m["vars"]) for m in rows if m] == [
            ("a@x.example", {"name": "A"}), ("b@x.example", {"name": "B"})]  # fmt: skip

    arun(tmp_path, t)
