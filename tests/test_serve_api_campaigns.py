"""The HTTP API: campaigns (JSON, CSV, JSON lines), pause/resume/cancel, stats, suppression."""

from __future__ import annotations

import time
from typing import Any

from test_serve_api import MSG, Client, arun

TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


def test_campaign_lifecycle(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req(
            "POST",
            "/v1/campaigns",
            {
                "name": "spring",
                "template": TPL,
                "recipients": [
                    {"email": "a@example.org", "name": "A"},
                    {"email": "b@example.org", "name": 7},
                    {"email": "broken", "name": "X"},
                    {"email": "c@example.org"},
                ],
            },
        )
        assert st == 201, body
        cid = body["id"]
        assert body["accepted"] == 2 and body["rejected"] == 2
        assert [e["row"] for e in body["errors"]] == [3, 4]
        row = c.ctx.spool.message(2)
        assert row is not None and row["vars"] == {"name": "7"}
        # CSV upload and JSON lines upload
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients",
            raw=b"email,name\nd@example.org,D\ne@example.org,E\n",
            headers={"Content-Type": "text/csv"},
        )  # fmt: skip
        assert st == 202 and up["accepted"] == 2, up
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients",
            raw=b'{"email": "f@example.org", "name": "F"}\n{"email": "bad@", "name": "G"}\n',
            headers={"Content-Type": "application/x-ndjson"},
        )  # fmt: skip
        assert st == 202 and up["accepted"] == 1 and up["rejected"] == 1
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients?strict=1",
            raw=b'{"email": "h@example.org", "name": "H"}\n{"email": "bad@", "name": "G"}\n',
            headers={"Content-Type": "application/x-ndjson"},
        )  # fmt: skip
        assert st == 400 and up["error"]["field"] == "recipients[1]"
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients", raw=b"mail,name\nx@example.org,X\n",
            headers={"Content-Type": "text/csv"},
        )  # fmt: skip
        assert st == 400 and up["error"]["field"] == "recipients"
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients", {"recipients": [{"email": "i@example.org",
                                                                         "name": "I"}]},
        )  # fmt: skip
        assert st == 202 and up["accepted"] == 1
        st, v = await c.req("GET", f"/v1/campaigns/{cid}")
        assert st == 200
        assert v["counts"]["queued"] == 6 and v["total"] == 6 and v["status"] == "active"
        for action, status in (("pause", "paused"), ("resume", "active"), ("cancel", "cancelled")):
            st, v = await c.req("POST", f"/v1/campaigns/{cid}/{action}")
            assert st == 200 and v["status"] == status
        st, _ = await c.req("POST", f"/v1/campaigns/{cid}/resume")
        assert st == 409
        st, lst = await c.req("GET", "/v1/campaigns")
        assert [x["id"] for x in lst["campaigns"]] == [cid]
        # other tenant: 404 as unknown; bad id: 400
        st, _ = await c.req("GET", f"/v1/campaigns/{cid}", tenant="other")
        assert st == 404
        st, _ = await c.req("POST", f"/v1/campaigns/{cid}/pause", tenant="other")
        assert st == 404
        st, _ = await c.req("GET", "/v1/campaigns/424242")
        assert st == 404
        st, _ = await c.req("GET", "/v1/campaigns/x")
        assert st == 400

    arun(tmp_path, t)


def test_campaign_bad_input(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, err = await c.req("POST", "/v1/campaigns", {"template": {"from": "a@example.com"}})
        assert st == 400 and err["error"]["field"] == "template"
        st, err = await c.req("POST", "/v1/campaigns", {"recipients": []})
        assert st == 400 and err["error"]["field"] == "template"
        st, err = await c.req(
            "POST", "/v1/campaigns",
            {"template": TPL, "strict": True, "recipients": [{"email": "x@"}]},
        )  # fmt: skip
        assert st == 400 and err["error"]["field"] == "recipients[0]"
        assert c.ctx.spool.list_campaigns() == []

    arun(tmp_path, t)


def test_stats(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req(
            "POST", "/v1/messages", {**MSG, "to": ["a@example.org", "b@example.net"]}
        )
        assert st == 202
        cid = c.ctx.tenant_campaign("acme")
        c.ctx.emit({"event": "delivered", "id": body["messages"][0]["ids"][0], "campaign": cid,
                    "rcpt": "a@example.org", "source_ip": "127.0.0.2", "time": time.time()})  # fmt: skip
        st, s = await c.req("GET", "/v1/stats?window=5m&by=domain")
        assert st == 200, s
        assert s["groups"]["example.org"]["counts"] == {"accepted": 1, "delivered": 1}
        assert s["groups"]["example.net"]["counts"] == {"accepted": 1}
        st, s = await c.req("GET", "/v1/stats")
        assert s["groups"][str(cid)]["counts"]["accepted"] == 2
        st, s = await c.req("GET", "/v1/stats?by=source_ip")
        assert s["groups"]["127.0.0.2"]["counts"] == {"delivered": 1}
        st, s = await c.req("GET", "/v1/stats", tenant="other")
        assert st == 200 and s["groups"] == {}
        for q, field in (("window=2d", "window"), ("by=rcpt", "by")):
            st, err = await c.req("GET", f"/v1/stats?{q}")
            assert st == 400 and err["error"]["field"] == field

    arun(tmp_path, t)


def test_suppression_endpoints(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, r = await c.req(
            "POST", "/v1/suppressions", {"addresses": ["x@example.org", "Y@Example.org"]}
        )
        assert st == 201 and r["added"] == 2
        st, r = await c.req("GET", "/v1/suppressions")
        assert [e["address"] for e in r["suppressions"]] == ["x@example.org", "Y@example.org"]
        st, r = await c.req("GET", "/v1/suppressions", tenant="other")
        assert r["suppressions"] == []
        # suppressed at injection
        st, body = await c.req("POST", "/v1/messages", {**MSG, "to": "y@example.org"})
        st, m = await c.req("GET", f"/v1/messages/{body['messages'][0]['ids'][0]}")
        assert m["state"] == "suppressed"
        st, r = await c.req("DELETE", "/v1/suppressions/x@example.org")
        assert st == 200
        st, r = await c.req("DELETE", "/v1/suppressions/x@example.org")
        assert st == 404
        st, r = await c.req("POST", "/v1/suppressions", {"addresses": ["ok@example.org", "no"]})
        assert st == 400 and r["error"]["field"] == "addresses[1]"
        st, r = await c.req(
            "POST", "/v1/suppressions", {"addresses": ["ok@example.org"], "reason": "Bad Reason"}
        )
        assert st == 400 and r["error"]["field"] == "reason"
        st, r = await c.req(
            "POST", "/v1/suppressions", {"addresses": ["ok@example.org"], "expires_in": -1}
        )
        assert st == 400 and r["error"]["field"] == "expires_in"
        st, r = await c.req("GET", "/v1/suppressions")
        assert [e["address"] for e in r["suppressions"]] == ["Y@example.org"]

    arun(tmp_path, t)


def test_the_global_suppression_list_through_the_api(tmp_path: Any) -> None:
    """``?scope=global`` (an admin key): the operator's global list, which
    suppresses for every tenant -- at injection as at dispatch. A tenant's key
    may neither read nor write it (403), and a tenant's own list still shows
    only its entries; the operator may lift a global unsubscribe."""

    async def t(c: Client) -> None:
        c.ctx.config.dashboard.admin_tenants = ["ops"]
        st, r = await c.req("POST", "/v1/suppressions?scope=global",
                            {"addresses": ["legal@example.org"], "reason": "unsubscribe"})  # fmt: skip
        assert st == 403 and r["error"]["field"] == "scope", r
        st, r = await c.req("GET", "/v1/suppressions?scope=global")
        assert st == 403
        st, r = await c.req("DELETE", "/v1/suppressions/legal@example.org?scope=global")
        assert st == 403
        st, r = await c.req("GET", "/v1/suppressions?scope=everyone", tenant="ops")
        assert st == 400 and r["error"]["field"] == "scope"
        st, r = await c.req("POST", "/v1/suppressions?scope=global", tenant="ops",
                            body={"addresses": ["legal@example.org"], "reason": "unsubscribe"})  # fmt: skip
        assert st == 201 and r["added"] == 1, r
        st, r = await c.req("GET", "/v1/suppressions?scope=global", tenant="ops")
        assert [e["address"] for e in r["suppressions"]] == ["legal@example.org"]
        for tenant in ("acme", "other"):
            st, r = await c.req("GET", "/v1/suppressions", tenant=tenant)
            assert r["suppressions"] == []
            st, body = await c.req("POST", "/v1/messages", {**MSG, "to": "Legal@Example.org"},
                                   tenant=tenant)  # fmt: skip
            assert st == 202, body
            st, m = await c.req("GET", f"/v1/messages/{body['messages'][0]['ids'][0]}",
                                tenant=tenant)  # fmt: skip
            assert m["state"] == "suppressed", (tenant, m)
        st, r = await c.req("DELETE", "/v1/suppressions/legal@example.org?scope=global",
                            tenant="ops")  # fmt: skip
        assert st == 200, r
        st, body = await c.req("POST", "/v1/messages", {**MSG, "to": "legal@example.org"})
        st, m = await c.req("GET", f"/v1/messages/{body['messages'][0]['ids'][0]}")
        assert m["state"] == "queued", m

    arun(tmp_path, t)
