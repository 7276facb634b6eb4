"""Local stand-ins for the providers' HTTP APIs, on loopback, each in a thread.

They implement the documented requests, authentication and error answers:

- SendGrid v3 ``POST /v3/mail/send``: ``Authorization: Bearer KEY`` (else 401
  with an ``errors`` body), JSON with 1..1000 personalizations and content
  (each value at least one character), 202 +
  ``X-Message-Id``; 400 ``{"errors": [{"message", "field"}]}`` for a bad
  recipient; 429 + Retry-After above the account's rate.
- Mailgun ``POST /v3/DOMAIN/messages.mime``: basic auth ``api:KEY`` (else 401
  "Forbidden"), multipart ``to`` + ``message`` file; 200
  ``{"id", "message": "Queued. Thank you."}``; 400 ``{"message"}``; 429.
- SES: moto in server mode (it verifies SigV4 against the IAM key it issued)
  behind a pass-through proxy that adds what moto lacks: the account's max
  send rate (429 TooManyRequestsException "Maximum sending rate exceeded"),
  a BadRequestException "Illegal address" for ``reject*`` recipients and the
  sandbox's MessageRejected "Email address is not verified" for
  ``unverified*`` recipients.

A recipient whose local part starts with ``reject`` is refused permanently
(a request naming several recipients is refused whole, as the providers do).
The rate is a token bucket per server (recipients per second, burst = rate).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web


class Bucket:
    """A provider's send rate (recipients per second, burst = a second's worth).
    It starts nearly empty at the first request (not full, nor filled while the
    sender starts), and the first ``throttle_first`` requests find it empty
    whatever their size: a test always sees the limit reached, whatever the
    machine's speed (on a loaded machine the sender could stay under the rate
    for a whole run), without the rate bounding the whole run's length."""

    def __init__(self, rate: float, throttle_first: int = 0) -> None:
        self.rate = rate
        self.tokens = min(rate, 4.0)
        self.t = 0.0  # set by the first request
        self.throttle_first = throttle_first
        self.lock = threading.Lock()  # the relay's handler runs in several threads

    def take(self, n: int) -> bool:
        with self.lock:
            if self.throttle_first > 0:
                self.throttle_first -= 1
                return False
            if not self.rate:
                return True
            now = time.monotonic()
            if not self.t:
                self.t = now
            self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= n:
                self.tokens -= n
                return True
            return False


class ThreadedApp:
    """An aiohttp app on 127.0.0.1 in its own thread and loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=512)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedApp:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Recorder:
    def __init__(self, rate: float = 0.0, throttle_first: int = 0) -> None:
        self.bucket = Bucket(rate, throttle_first)
        self.accepted: list[Any] = []  # what each provider keeps of an accepted request
        self.recipients: Counter[str] = Counter()
        self.throttled = 0
        self.rejected = 0
        self.unauthorized = 0
        self.requests = 0
        self.times: list[float] = []  # monotonic time of each accepted recipient (Mailgun, SES)
        self.retry_after = "1"  # Mailgun's 429 says Retry-After ("": it says nothing)
        # Mailgun: unavailable (503 + Retry-After) for this many seconds from its first request.
        self.unavailable = 0
        self.down_until = 0.0
        self.unavailable_answers = 0
        self.to_fields: list[int] = []  # Mailgun: the ``to`` fields of each request
        self.refused_twice = 0  # SendGrid: requests refused for naming an address twice


def sendgrid_app(key: str, rec: Recorder) -> web.Application:
    async def send(request: web.Request) -> web.Response:
        rec.requests += 1
        if request.headers.get("Authorization") != f"Bearer {key}":
            rec.unauthorized += 1
            msg = "The provided authorization grant is invalid, expired, or revoked"
            return web.json_response({"errors": [{"message": msg, "field": None}]}, status=401)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"errors": [{"message": "Bad Request", "field": None}]}, status=400
            )
        pers = body.get("personalizations")
        if not isinstance(pers, list) or not 1 <= len(pers) <= 1000:
            return web.json_response(
                {"errors": [{"message": "The personalizations field is required and must have at least one personalization.", "field": "personalizations"}]},
                status=400,
            )  # fmt: skip
        for k in ("from", "subject", "content"):
            if not body.get(k):
                return web.json_response(
                    {"errors": [{"message": f"The {k} is required.", "field": k}]}, status=400
                )
        for i, c in enumerate(body["content"]):  # SendGrid: each a non-empty string
            if not isinstance(c, dict) or not isinstance(c.get("value"), str) or not c["value"]:
                msg = "The content value must be a string at least one character in length."
                return web.json_response(
                    {"errors": [{"message": msg, "field": f"content.{i}.value"}]}, status=400
                )
        rcpts = [t["email"] for p in pers for t in p.get("to", [])]
        twice = [r for r, n in Counter(r.lower() for r in rcpts).items() if n > 1]
        if twice:  # (its Mail Send errors page, under "personalizations")
            rec.refused_twice += 1
            msg = ("Each unique email address in the personalizations array should only be"
                   f" included once. You have included {twice[0]} more than once.")  # fmt: skip
            return web.json_response(
                {"errors": [{"message": msg, "field": "personalizations"}]}, status=400
            )
        if len(rcpts) > 1000:
            return web.json_response(
                {"errors": [{"message": "too many recipients", "field": "personalizations"}]},
                status=400,
            )
        bad = [
            {"message": "Does not contain a valid address.", "field": f"personalizations.{i}.to.0.email"}
            for i, r in enumerate(rcpts) if r.startswith("reject")
        ]  # fmt: skip
        if bad:  # the request refused whole, each refused personalization named
            rec.rejected += 1
            return web.json_response({"errors": bad}, status=400)
        if not rec.bucket.take(len(rcpts)):
            rec.throttled += 1
            return web.json_response(
                {"errors": [{"message": "too many requests", "field": None}]},
                status=429,
                headers={"Retry-After": "1", "X-RateLimit-Reset": str(int(time.time()) + 1)},
            )
        rec.accepted.append(body)
        rec.recipients.update(rcpts)
        return web.Response(status=202, headers={"X-Message-Id": uuid.uuid4().hex[:22]})

    app = web.Application(client_max_size=30 * 1024 * 1024)
    app.router.add_post("/v3/mail/send", send)
    return app


def mailgun_app(key: str, rec: Recorder, domain: str, delay: float = 0.0) -> web.Application:
    """Mailgun's messages.mime; with ``delay``, the answer to a message it took
    comes that many seconds late (a slow provider: it has the message already)."""

    async def send(request: web.Request) -> web.Response:
        import base64

        rec.requests += 1
        if rec.unavailable:  # in maintenance from the first request on, for a while
            now = time.monotonic()
            rec.down_until = rec.down_until or now + rec.unavailable
            if now < rec.down_until:
                rec.unavailable_answers += 1
                return web.json_response(
                    {"message": "Service Unavailable"},
                    status=503,
                    headers={"Retry-After": str(rec.unavailable)},
                )
        auth = request.headers.get("Authorization", "")
        ok = auth.startswith("Basic ") and base64.b64decode(auth[6:]) == f"api:{key}".encode()
        if not ok:
            rec.unauthorized += 1
            return web.Response(status=401, text="Forbidden")
        if request.match_info["domain"] != domain:
            return web.json_response(
                {"message": f"Domain not found: {request.match_info['domain']}"}, status=404
            )
        form = multipart_form(request.headers.get("Content-Type", ""), await request.read())
        if form is None:
            return web.json_response({"message": "expected multipart/form-data"}, status=400)
        to = [v.decode() for v in form.get("to", [])]
        data = form.get("message", [None])[0]
        if not to or data is None:
            return web.json_response({"message": "'to' parameter is missing"}, status=400)
        rec.to_fields.append(len(to))
        options = sum(len(k) + len(v) for k, vs in form.items() if k[:2] in ("o:", "h:", "v:")
                      for v in vs)  # fmt: skip
        if options > 16 * 1024:
            return web.json_response({"message": "Send options (parameters starting with o:,"
                                      " h:, or v:) are limited to 16 kB total"}, status=400)  # fmt: skip
        # Each value an RFC 5322 address-list (commas separate recipients).
        rcpts = [a for _n, a in email.utils.getaddresses(to) if a]
        if any(r.startswith("sandbox") for r in rcpts):  # an address not authorized
            rec.rejected += 1
            return web.json_response(
                {"message": f"Domain {domain} is not allowed to send: Sandbox subdomains are for"
                 " test purposes only. Please add your own domain or add the address to"
                 " authorized recipients in Account Settings."}, status=400,
            )  # fmt: skip
        for r in rcpts:
            if r.startswith("reject"):
                rec.rejected += 1
                return web.json_response(
                    {
                        "message": f"to parameter is not a valid address. please check documentation: {r}"
                    },
                    status=400,
                )
        if not rec.bucket.take(len(rcpts)):
            rec.throttled += 1
            return web.json_response(
                {"message": "Too Many Requests"},
                status=429,
                headers={"Retry-After": rec.retry_after} if rec.retry_after else {},
            )
        mid = f"<{uuid.uuid4().hex}@{domain}>"
        rec.times.extend([time.monotonic()] * len(rcpts))
        rec.accepted.append((rcpts, data, form.get("v:fastsend", [b""])[0].decode()))
        rec.recipients.update(rcpts)
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"id": mid, "message": "Queued. Thank you."})

    app = web.Application(client_max_size=30 * 1024 * 1024)
    app.router.add_post("/v3/{domain}/messages.mime", send)
    return app


_BOUNDARY = re.compile(r'multipart/form-data\s*;\s*boundary="?([^";]+)"?', re.I)
_NAME = re.compile(rb'^content-disposition:\s*form-data\s*;.*?\bname="([^"]*)"', re.I | re.M)


def multipart_form(ctype: str, body: bytes) -> dict[str, list[bytes]] | None:
    """The fields of a multipart/form-data body (RFC 7578), by name (a name
    given several times: each value, in order); None when it is not one. (aiohttp's request.post() reads each part's headers with the
    email package: most of this stand-in's time, the run's bottleneck.)"""
    m = _BOUNDARY.match(ctype)
    if not m:
        return None
    delim = b"--" + m.group(1).encode()
    chunks = body.split(delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        return None  # no closing delimiter
    out: dict[str, list[bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            return None
        head, sep, value = chunk[2:-2].partition(b"\r\n\r\n")
        name = _NAME.search(head)
        if not sep or name is None:
            return None
        out.setdefault(name.group(1).decode(), []).append(value)
    return out


def ses_proxy_app(upstream: str, rec: Recorder, max_send_rate: float = 0.0) -> web.Application:
    """Pass-through to moto (headers as signed, Host included) plus SES's max
    send rate, a BadRequestException for ``reject*`` recipients, an
    InvalidParameterValue naming no address for ``badlocal*`` ones and a sandbox
    MessageRejected for ``unverified*`` ones. With ``max_send_rate``, ``GET
    /v2/email/account`` answers the account's SendQuota with it (moto's has
    none)."""
    state: dict[str, ClientSession] = {}

    async def handle(request: web.Request) -> web.Response:
        rec.requests += 1
        body = await request.read()
        if max_send_rate and request.method == "GET" and request.path == "/v2/email/account":
            quota = {"Max24HourSend": 50000.0, "MaxSendRate": max_send_rate, "SentLast24Hours": 0.0}
            return web.json_response({"SendQuota": quota, "SendingEnabled": True,
                                      "ProductionAccessEnabled": True})  # fmt: skip
        if request.method == "POST" and request.path == "/v2/email/outbound-emails":
            doc = json.loads(body)
            rcpts = doc.get("Destination", {}).get("ToAddresses", [])
            unverified = [r for r in rcpts if r.startswith("unverified")]
            if unverified:  # a sandbox account: recipients must be verified identities
                rec.rejected += 1
                return web.json_response(
                    {"message": "Email address is not verified. The following identities failed the check in region EU-WEST-1: " + ", ".join(unverified)},
                    status=400, headers={"x-amzn-ErrorType": "MessageRejected:http://internal.amazon.com/coral/com.amazon.sesv2/"},
                )  # fmt: skip
            if any(r.startswith("reject") for r in rcpts):
                rec.rejected += 1
                return web.json_response(
                    {"message": "Illegal address"},
                    status=400, headers={"x-amzn-ErrorType": "BadRequestException:http://internal.amazon.com/coral/com.amazon.sesv2/"},
                )  # fmt: skip
            if any(r.startswith("badlocal") for r in rcpts):  # SES's text names no address
                rec.rejected += 1
                return web.json_response(
                    {"message": "Missing final '@domain'"},
                    status=400, headers={"x-amzn-ErrorType": "InvalidParameterValue:http://internal.amazon.com/coral/com.amazon.sesv2/"},
                )  # fmt: skip
            if not rec.bucket.take(len(rcpts)):
                rec.throttled += 1
                return web.json_response(
                    {"message": "Maximum sending rate exceeded."},
                    status=429, headers={"x-amzn-ErrorType": "TooManyRequestsException:"},
                )  # fmt: skip
        s = state.get("s")
        if s is None:
            s = state["s"] = ClientSession()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        async with s.request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as r:
            out = await r.read()
            status = r.status
            keep = {
                k: v
                for k, v in r.headers.items()
                if k.lower().startswith("x-amz") or k.lower() == "content-type"
            }
        if status < 300 and request.path == "/v2/email/outbound-emails":
            rec.recipients.update(rcpts)
            rec.times.extend([time.monotonic()] * len(rcpts))
        return web.Response(status=status, body=out, headers=keep)

    async def close(app: web.Application) -> None:
        if "s" in state:
            await state["s"].close()

    app = web.Application(client_max_size=30 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(close)
    return app


MAILGUN_SIGNING = "mailgun-webhook-signing-key-0123"  # (mailgun_serve_config's webhook key)


def mailgun_serve_config(tmp: Path, url: str, answer_timeout: float, backoff: float) -> str:
    """The config lines of a Mailgun transport at ``url`` (key "mg-key", domain
    mg.sender.example.com, from a 0600 credentials file), its webhook events
    signed with :data:`MAILGUN_SIGNING` (a 0600 key file), and a fixed retry
    ``backoff``: files made in ``tmp``."""
    creds = tmp / "mg.secret"
    creds.write_text("api_key = mg-key\n")
    creds.chmod(0o600)
    hook = tmp / "hook.secret"
    hook.write_text(f"signing_key = {MAILGUN_SIGNING}\n")
    hook.chmod(0o600)
    return (
        f'[transports.mg]\nkind = "mailgun"\nendpoint = "{url}"\n'
        f'domain = "mg.sender.example.com"\nanswer_timeout = {answer_timeout:g}\n'
        f'credentials_file = "{creds}"\n'
        f"[retry]\nmin_backoff = {backoff:g}\nmax_backoff = {backoff:g}\n"
        f'[provider_events]\nmailgun_signing_key_file = "{hook}"\n'
    )


def submit_hello(srv: Any, to: list[str]) -> list[str]:
    """POST one "Hi"/"Hello" message from a@sender.example.com to ``to`` through
    ``srv`` (a tests._serve_helpers.Served, tenant acme): the recipients' message ids."""
    msg = {"from": "a@sender.example.com", "subject": "Hi", "text": "Hello", "to": to}
    st, got = srv.req("POST", "/v1/messages", msg, tenant="acme")
    assert st == 202, got
    return list(got["messages"][0]["ids"])
