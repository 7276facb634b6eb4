"""Messages and lists as users write them (session 18's audit of messages,
lists, DSNs and providers).

- A CSV whose columns are separated by ";" (Excel's "CSV" where the decimal
  mark is a comma: German, French, Spanish, Italian, ... locales) or by tab
  (a TSV export) was refused whole ("its columns are separated by ';'"): it is
  read as written, its separator taken from the header line, counted ahead
  (survey) as it is read, quoted fields holding the separator or line breaks
  included.
- An attachment's ``data_b64`` as MIME writes base64 (lines of 76, what
  ``base64`` and most libraries' encoders give) was refused as "not valid
  base64".
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from pathlib import Path

import pytest

from _smtp_helpers import RecordingHandler
from fastsend import recipients
from fastsend.message import Campaign
from fastsend.message.campaign import CampaignError
from test_message_audit import receiver
from test_message_audit17 import _rcpts, _send

__all__ = ["receiver"]

EXCEL_DE = (  # Excel (German) "CSV (Trennzeichen-getrennt)": BOM, CRLF, ";", quoted fields
    "\ufeffE-Mail;Vorname;Ort\r\n"
    "anna@example.org;Anna;\"Köln; Altstadt\"\r\n"
    ";;\r\n"
    "bernd@example.org;Bernd;\"Zeile 1\r\nZeile 2\"\r\n"
    "kein-at;X;Y\r\n"
    "carla@example.org;Carla;Bonn\r\n"
)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_csv_is_read_as_written(tmp_path: Path, sep: str) -> None:
    p = tmp_path / "list.csv"
    p.write_text(EXCEL_DE.replace(";", sep) if sep != ";" else EXCEL_DE, encoding="utf-8",
                 newline="")  # fmt: skip
    got = list(recipients.read(str(p)))
    good = [(r[0], r[1], json.loads(r[3])) for r in got if isinstance(r, tuple)]
    bad = [b for b in got if not isinstance(b, tuple)]
    assert [g[1] for g in good] == ["anna@example.org", "bernd@example.org", "carla@example.org"]
    city = "Köln; Altstadt" if sep == ";" else "Köln\t Altstadt"
    assert good[0][2] == {"Vorname": "Anna", "Ort": city}
    assert good[1][2]["Ort"] == "Zeile 1\r\nZeile 2"
    assert [b.line for b in bad] == [6], bad
    assert recipients.survey(str(p))[1] == len(got)  # counted ahead as read (progress, resume)
    assert recipients.columns(str(p)) == {"email", "Vorname", "Ort"}


def test_a_comma_csv_is_read_as_before() -> None:
    """A "," header keeps ","; a ";" in it is a column's character ("a;b" a name)."""
    assert recipients.csv_separator("email,name;x\n") == ","
    assert recipients.csv_separator("email\n") == ","
    assert recipients.csv_separator("E-Mail;Name\n") == ";"
    assert recipients.csv_separator("Email Address\tFirst Name\n") == "\t"
    assert recipients.csv_separator("mail;name\n") == ","  # (no email column: said as before)


def test_send_takes_an_excel_semicolon_list(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    campaign = 'from = "news@sender.example"\nsubject = "Hallo {{ Vorname }}"\ntext = "{{ Ort }}\\n"\n'
    p = _send(tmp_path, campaign, "r.csv", EXCEL_DE, port)
    assert p.returncode == 1, p.stderr  # (one bad row: kein-at)
    assert _rcpts(handler) == ["anna@example.org", "bernd@example.org", "carla@example.org"]
    assert json.loads(p.stdout)["delivered"] == 3
    assert any(b"Subject: Hallo Anna" in m["data"] for m in handler.messages)


def test_an_attachment_in_base64_with_line_breaks_is_taken() -> None:
    raw = bytes(range(256)) * 3
    for data in (base64.encodebytes(raw).decode(),  # lines of 76, LF
                 base64.encodebytes(raw).decode().replace("\n", "\r\n"),
                 base64.b64encode(raw).decode()):  # fmt: skip
        c = Campaign.from_dict({"from": "n@s.example", "subject": "s", "text": "t",
                                "attachments": [{"filename": "a.bin", "data_b64": data}]})  # fmt: skip
        assert c.to_dict()["attachments"][0]["data_b64"] == base64.b64encode(raw).decode()
        m = email.message_from_bytes(c.compile().render("r@example.net", {}, "1-abcdefghij"),
                                     policy=email.policy.default)  # fmt: skip
        (att,) = [p for p in m.walk() if p.get_filename() == "a.bin"]
        assert att.get_content() == raw
    with pytest.raises(CampaignError, match="not valid base64"):
        Campaign.from_dict({"from": "n@s.example", "subject": "s", "text": "t",
                            "attachments": [{"filename": "a.bin", "data_b64": "ab!c"}]})  # fmt: skip
