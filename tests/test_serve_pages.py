"""The dashboard pages' includes (fastsend.serve.pages): what they render and what they refuse.

The pages themselves are driven in a real Chromium by test_serve_dashboard.py and
test_serve_charts.py; here the partials' assembly: every page renders whole (no
directive or field left, the CSP-bound script tags as meant, no inline code) and a
bad include fails at start with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

import pytest

from fastsend.serve.pages import MAX_DEPTH, load, render

SCRIPTS = {
    "dashboard.html": ["/dashboard/common.js", "/dashboard/app.js", "/dashboard/charts.js"],
    "campaign.html": ["/dashboard/common.js", "/dashboard/charts.js"],
    "ip.html": ["/dashboard/common.js", "/dashboard/charts.js"],
}


@pytest.mark.parametrize("page", sorted(SCRIPTS))
def test_every_page_renders_whole(page: str) -> None:
    html = render(page).decode("utf-8")
    assert html.startswith("<!DOCTYPE html>\n") and html.endswith("</html>\n")
    assert "<!--#" not in html and "{{" not in html and "}}" not in html
    assert re.findall(r'<script src="([^"]+)" defer></script>', html) == SCRIPTS[page]
    assert len(re.findall(r"<script\b", html)) == len(SCRIPTS[page])
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html)
    assert html.count('id="over-time"') == 1 and html.count('id="tbl-provider"') == 1
    # ids are unique: a partial taken in twice with the same id would break the script
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), page


def test_pages_differ_where_they_should() -> None:
    main, camp, ip = (render(p).decode() for p in ("dashboard.html", "campaign.html", "ip.html"))
    assert "(node-wide: admin tenants)" in main and "node-wide" not in camp + ip
    assert 'id="ch-ip"' in main and 'id="ch-ip"' in camp and 'id="ch-ip"' not in ip
    assert 'id="tbl-campaign"' in main and 'id="tbl-campaign"' not in camp + ip
    assert '<body data-page="campaign">' in camp and '<body data-page="ip">' in ip
    assert "<title>fastsend source IP</title>" in ip and '<span id="who">fastsend source IP<' in ip


def test_assets_are_served_as_stored() -> None:
    static = resources.files("fastsend.serve") / "static"
    for name in ("app.css", "app.js", "charts.js", "common.js"):
        assert load(name) == (static / name).read_bytes()
    assert load("dashboard.html") == render("dashboard.html")


def fake(files: dict[str, str]) -> Callable[[str], str]:
    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]

    return read


def test_fields_ifs_and_nested_includes() -> None:
    files = {
        "p.html": '<!--#include file="_a.html" t="T" on="1" off="" -->\nend\n',
        "_a.html": "<h1>{{t}}</h1>\n<!--#if on-->\nyes\n<!--#endif-->\n<!--#if off-->\nno\n"
                   '<!--#endif-->\n<!--#include file="_b.html" t="{{t}}!" -->\n',
        "_b.html": "<p>{{t}}</p>",
    }  # fmt: skip
    assert render("p.html", fake(files)) == b"<h1>T</h1>\nyes\n<p>T!</p>\nend\n"


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"p.html": '<!--#include file="_a.html" -->\n', "_a.html": "{{x}}"}, "no value for 'x'"),
        ({"p.html": '<!--#include file="_a.html" -->\n', "_a.html": "<!--#if x-->y<!--#endif-->"},
         "no value for 'x'"),
        ({"p.html": '<!--#include file="../x.html" -->\n'}, "not a partial"),
        ({"p.html": '<!--#include file="a.html" -->\n', "a.html": "x"}, "not a partial"),
        ({"p.html": '<!--#include file="_a.html" -->\n', "_a.html": '<!--#include file="_a.html" -->'},
         f"deeper than {MAX_DEPTH}"),
    ],
)  # fmt: skip
def test_bad_includes_fail_at_start(files: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        render("p.html", fake(files))


def test_missing_partial_fails() -> None:
    with pytest.raises(FileNotFoundError):
        render("p.html", fake({"p.html": '<!--#include file="_gone.html" -->\n'}))
