"""MTA-STS (RFC 8461): a recipient domain's own rule that its mail goes only to
its named MX hosts, over TLS with a certificate valid for the MX name.

Discovery, per domain delivered by MX (``[tls] mta_sts``, on by default):

1. TXT ``_mta-sts.DOMAIN``: exactly one record starting ``v=STSv1`` with an
   ``id`` (else: no policy). Looked up beside the MX query (``asyncio.gather``
   in :class:`~fastsend.delivery.mx.MXResolver`), and cached with the MX
   answer: a domain without a policy costs one cached DNS query, no time.
2. A new id (or none cached): the policy is fetched from
   ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` -- a certificate valid
   for that name (``[tls] ca_file`` or the system's trust store), a 200 answer
   (redirects are not followed), ``text/plain``, at most 64 KiB, in
   ``[tls] policy_timeout`` -- asynchronously, in the worker whose batch asked:
   only that domain's batches wait for it, never the loop. The host's addresses
   follow ``[delivery] allow_private_mx`` like an MX's.
3. The policy is kept for its ``max_age`` in memory and in
   ``SPOOL/mta-sts/DOMAIN.json`` (written whole, then renamed): the other
   workers, a restart and the next ``send`` read it there rather than fetch
   again. One fetch per domain per node: the fetching worker holds
   ``DOMAIN.lock`` (``flock``, never blocking: the others poll it
   asynchronously, then read what it wrote; it dies with a killed worker), and
   a failed fetch leaves ``DOMAIN.fail`` (its id), so no worker asks again
   before ``FETCH_RETRY``. A cached policy stays in force until it expires
   even when the TXT record disappears or DNS fails (an attacker who strips
   the record must not turn the policy off, RFC 8461 5.1); a failed fetch
   keeps the cached policy and is tried again after ``FETCH_RETRY``; with none
   cached the domain's mail goes as if it had no policy (5.1, "deliver as if
   no policy").
4. Refresh (RFC 8461 3.3, 10.2): a cached policy is fetched again before its
   ``max_age`` ends -- once ``REFRESH_FRACTION`` of it (at most
   ``REFRESH_MAX``) has passed -- in the background while the cached one
   stays in force (the domain's mail never waits for it), and at once when the
   TXT id changes; a failed refresh keeps the cached policy until it expires.

Applying it (:func:`apply`, then ``delivery/pool.py``):

- ``enforce``: only MX hosts matching a policy ``mx`` pattern
  (``*.example.net`` is one leftmost label), STARTTLS required, the
  certificate verified for the MX name; any failure defers (4.7.5), never
  clear text nor an unlisted MX;
- ``testing``: the same check, and on failure the mail goes anyway as the site
  would without a policy; the failure is reported;
- ``none``: as if no policy.

Each failure is a TLS-RPT (RFC 8460) result: an event ``tls_report`` in the
event log (policy domain, result type, MX, source IP, whether the mail went
anyway) and the workers' counters ``tls_policy_sessions`` /
``tls_policy_failures`` (``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

MAX_POLICY = (
    64 * 1024
)  # bytes of a policy body (RFC 8461 3.2 names none; Postfix's resolver: 64 KiB)
MAX_HEADERS = 16 * 1024
MAX_AGE_MAX = 31557600  # 3.2: max_age is at most a year
FETCH_RETRY = 300.0  # a failed fetch is not tried again for this long (per domain, per node)
# A cached policy is fetched again once this share of its max_age has passed
# (at most REFRESH_MAX seconds): well before it ends, so a host down for a
# while or a missed id change never leaves the domain without its policy.
REFRESH_FRACTION, REFRESH_MAX = 0.5, 86400.0
LOCK_POLL = 0.05  # seconds between looks at another worker's fetch lock
SESSIONS_EVERY = 60.0  # s between a worker's tls_sessions events (TLS-RPT successes)
TXT_MIN_TTL, TXT_MAX_TTL = 30.0, 3600.0  # how long a TXT answer (or its absence) stands
MODES = ("enforce", "testing", "none")
CACHE_MAX = 20000  # domains remembered per worker (memory flat)
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
PATH = "/.well-known/mta-sts.txt"


class PolicyError(Exception):
    """A policy that could not be had; ``result`` is its TLS-RPT result type
    (sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid)."""

    def __init__(self, result: str, text: str) -> None:
        super().__init__(text)
        self.result = result


class Policy(msgspec.Struct, frozen=True):
    """A domain's MTA-STS policy as fetched (``fetched``: Unix time)."""

    domain: str
    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        return mx_matches(host, self.mx)

    @property
    def lines(self) -> tuple[str, ...]:
        """The policy as TLS-RPT's ``policy-string`` (RFC 8460 4.4: its lines)."""
        return (
            "version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
            f"max_age: {self.max_age}",
        )  # fmt: skip


def refresh_at(p: Policy) -> float:
    """When ``p`` is due to be fetched again (Unix time): well before it ends."""
    return p.fetched + min(p.max_age * REFRESH_FRACTION, REFRESH_MAX)


def mx_matches(host: str, patterns: tuple[str, ...]) -> bool:
    """RFC 8461 4.1: ``host`` equals a pattern, or a ``*.`` pattern with exactly
    one label in place of the ``*`` (``*.example.net`` matches
    ``mx1.example.net``, not ``example.net`` nor ``a.b.example.net``)."""
    h = host.lower().rstrip(".")
    for p in patterns:
        if p.startswith("*."):
            first, _, rest = h.partition(".")
            if first and rest == p[2:]:
                return True
        elif h == p:
            return True
    return False


def parse_txt(texts: list[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT strings, or None: records
    not starting ``v=STSv1`` are ignored, and anything but exactly one left, or
    one without a valid ``id``, is no policy (RFC 8461 3.1)."""
    recs = [t for t in texts if t.startswith("v=STSv1")]
    if len(recs) != 1:
        return None
    fields: dict[str, str] = {}
    for part in recs[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields.setdefault(k.strip(), v.strip())
    if fields.get("v") != "STSv1":
        return None
    pid = fields.get("id", "")
    return pid if _ID.fullmatch(pid) else None


def has_tlsrpt(texts: list[str]) -> bool:
    """Whether a domain's ``_smtp._tls`` TXT strings are one TLS-RPT record
    (RFC 8460 3: exactly one starting ``v=TLSRPTv1``, with a ``rua``); where
    its reports go is read when they are sent (``analytics/tlsrpt.py``)."""
    recs = [t for t in texts if t.startswith("v=TLSRPTv1")]
    return len(recs) == 1 and "rua=" in recs[0].replace(" ", "").lower()


def parse_policy(text: str, domain: str, pid: str, now: float) -> Policy:
    """The policy body (RFC 8461 3.2: ``key: value`` lines, CRLF or LF; unknown
    keys ignored), checked: version STSv1, a known mode, max_age 0..a year,
    at least one mx pattern unless the mode is none."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError("sts-policy-invalid", f"policy line without a colon: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            pat = value.lower().rstrip(".")
            if not pat or " " in pat or not _DOMAIN.fullmatch(pat.removeprefix("*.")):
                raise PolicyError("sts-policy-invalid", f"bad mx pattern {value[:80]!r}")
            mx.append(pat)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("sts-policy-invalid", "version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError("sts-policy-invalid", f"bad mode {mode[:20]!r}")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10) or int(age) > MAX_AGE_MAX:
        raise PolicyError("sts-policy-invalid", f"bad max_age {age[:20]!r}")
    if not mx and mode != "none":
        raise PolicyError("sts-policy-invalid", f"mode {mode} with no mx")
    return Policy(domain, pid, mode, tuple(mx), int(age), now)


@functools.cache
def verify_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context (the name checked, TLS 1.2 or later) trusting
    ``ca_file``, else the system's store; one per process (loading a store
    costs ~20 ms)."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def fetch(host: str, addrs: list[str], port: int, ctx: ssl.SSLContext) -> str:
    """GET https://HOST/.well-known/mta-sts.txt from the first of ``addrs``
    that answers; the body of a 200 text/plain answer, else PolicyError. The
    caller bounds the time. A small HTTP/1.1 client: connection close, a
    Content-Length or chunked body, no redirects (3.3: MUST NOT follow)."""
    last: Exception | None = None
    for addr in addrs[:3]:
        try:
            reader, writer = await asyncio.open_connection(
                addr, port, ssl=ctx, server_hostname=host, limit=MAX_HEADERS
            )
        except ssl.SSLCertVerificationError as e:
            raise PolicyError("sts-webpki-invalid", f"{host}: {e.verify_message}") from None
        except (OSError, ssl.SSLError) as e:
            last = e
            continue
        try:
            writer.write(
                f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fastsend\r\n"
                "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            return await _read_answer(reader, host)
        except (
            OSError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,  # headers over MAX_HEADERS
            ValueError,
        ) as e:
            raise PolicyError("sts-policy-fetch-error", f"{host}: {e!r}") from None
        finally:
            writer.close()
    raise PolicyError("sts-policy-fetch-error", f"{host}: {last or 'no address'}")


async def _read_answer(reader: asyncio.StreamReader, host: str) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1."):
        raise PolicyError("sts-policy-fetch-error", f"{host}: not an HTTP answer")
    if status[1] != "200":
        raise PolicyError("sts-policy-fetch-error", f"{host}: HTTP {status[1]} (not 200)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "text/plain":
        raise PolicyError("sts-policy-invalid", f"{host}: Content-Type {ctype!r}, not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                break
            if len(body) + size > MAX_POLICY:
                raise PolicyError("sts-policy-invalid", f"{host}: policy over {MAX_POLICY} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if not 0 <= n <= MAX_POLICY:
            raise PolicyError("sts-policy-invalid", f"{host}: policy over {MAX_POLICY} bytes")
        body = await reader.readexactly(n)
    else:
        body = await reader.read(MAX_POLICY + 1)
        while len(body) <= MAX_POLICY and (more := await reader.read(MAX_POLICY + 1 - len(body))):
            body += more
        if len(body) > MAX_POLICY:
            raise PolicyError("sts-policy-invalid", f"{host}: policy over {MAX_POLICY} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("sts-policy-invalid", f"{host}: policy is not UTF-8") from None


# (TXT strings or None when there is no record, seconds it stands); raises on a DNS failure
TxtLookup = Callable[[str], Awaitable[tuple[list[str] | None, float]]]
# a host's public addresses, or a str saying why there are none
AddrLookup = Callable[[str], Awaitable[list[str] | str]]


class MTASTS:
    """One worker's policies: memory, then the spool's directory, then a fetch.
    :meth:`policy` is what :class:`~fastsend.delivery.mx.MXResolver` awaits
    beside a domain's MX lookup."""

    def __init__(
        self, config: Any, txt: TxtLookup, addresses: AddrLookup, directory: str | None = None
    ) -> None:
        t = config.tls
        self.timeout: float = t.policy_timeout
        self.port: int = t.policy_port
        self.ca_file: str = t.ca_file
        self.dir = directory if directory is not None else os.path.join(config.spool_dir, "mta-sts")
        self._txt = txt
        self._addresses = addresses
        self.policies: dict[str, Policy] = {}
        # domain -> (monotonic expiry, TXT id or None): a domain without a
        # policy is asked once per TXT answer (an hour for none), not per MX answer
        self.txt: dict[str, tuple[float, str | None]] = {}
        self.retry_at: dict[str, float] = {}  # domain -> monotonic time of the next fetch
        self.events: list[dict[str, Any]] = []  # TLS-RPT results for the event log
        self.fetches = 0
        self._refreshing: dict[str, asyncio.Task[Policy | None]] = {}  # background refreshes
        # TLS-RPT successes: (policy type, domain, policy-string, mx-host) -> sessions,
        # sent as tls_sessions events every SESSIONS_EVERY s and when the worker ends
        self.sessions: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], int] = {}
        self.sessions_sent = time.monotonic()

    async def policy(self, domain: str) -> tuple[Policy | None, float]:
        """The policy in force for ``domain`` (None: none, or mode none) and the
        seconds this answer stands before the TXT record is asked again."""
        mono = time.monotonic()
        hit = self.txt.get(domain)
        if hit is not None and hit[0] > mono:
            pid, ttl = hit[1], hit[0] - mono
        else:
            try:
                texts, ttl = await self._txt(f"_mta-sts.{domain}")
                pid = parse_txt(texts) if texts is not None else None
            except Exception:  # DNS failure: the cached policy, if any, still holds
                pid, ttl = None, TXT_MIN_TTL
            ttl = min(TXT_MAX_TTL, max(TXT_MIN_TTL, ttl))
            if len(self.txt) >= CACHE_MAX:
                self.txt.clear()
            self.txt[domain] = (mono + ttl, pid)
        now = time.time()
        cached = self._cached(domain, now)
        if pid is not None and (cached is None or cached.id != pid):
            disk = self._read(domain, now)  # another worker (or run) may have it
            if disk is not None and disk.id == pid:
                cached = self._keep(disk)
            elif time.monotonic() >= self.retry_at.get(domain, 0.0):
                got = await self._fetch_shared(domain, pid, cached)
                if got is not None:
                    cached = got
                else:
                    ttl = min(ttl, FETCH_RETRY)
        elif cached is not None and now >= refresh_at(cached):
            disk = self._read(domain, now)  # refreshed by another worker already?
            if disk is not None and disk.id == cached.id and disk.fetched > cached.fetched:
                cached = self._keep(disk)
            elif time.monotonic() >= self.retry_at.get(domain, 0.0):
                self._refresh(domain, pid or cached.id, cached)
            # the site is asked again by the time the refresh is due once more
            ttl = min(ttl, FETCH_RETRY)
        if cached is None or cached.mode == "none":
            return None, ttl
        return cached, min(ttl, max(1.0, cached.expires - now))

    def _refresh(self, domain: str, pid: str, cached: Policy) -> None:
        """Fetch ``domain``'s policy again in the background; the cached one
        stays in force meanwhile, and after a failure (RFC 8461 3.3)."""
        if domain in self._refreshing or len(self._refreshing) >= CACHE_MAX:
            return
        task = asyncio.ensure_future(self._fetch_shared(domain, pid, cached))
        self._refreshing[domain] = task
        task.add_done_callback(lambda _t: self._refreshing.pop(domain, None))

    async def _fetch_shared(self, domain: str, pid: str, older: Policy | None) -> Policy | None:
        """The policy fetched by this worker or, when another worker of the node
        is fetching it (``DOMAIN.lock`` held), what that one got: one fetch per
        domain per node. The lock is polled, never waited on (the loop runs);
        a fetch failed anywhere on the node within ``FETCH_RETRY`` for this id
        is not tried again. ``older``: the policy this one replaces."""
        path = self._file(domain)
        if path is None:
            return await self._fetch(domain, pid, older)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(path[:-5] + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return await self._fetch(domain, pid, older)  # no shared directory: fetch alone
        try:
            try:
                async with asyncio.timeout(self.timeout + 1.0):
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            await asyncio.sleep(LOCK_POLL)
            except TimeoutError:  # the holder is stuck: its policy, or none for now
                return None
            now = time.time()
            disk = self._read(domain, now)
            if disk is not None and disk.id == pid and (older is None or disk.fetched > older.fetched):
                return self._keep(disk)  # fetched by another worker while this one waited
            failed_at = self._failed_at(domain, pid)
            if now - failed_at < FETCH_RETRY:
                self._retry_after(domain, FETCH_RETRY - (now - failed_at))
                return None
            return await self._fetch(domain, pid, older)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _failed_at(self, domain: str, pid: str) -> float:
        """When a worker of this node last failed to fetch policy ``pid`` (0: never)."""
        path = self._file(domain)
        try:
            assert path is not None
            with open(path[:-5] + ".fail", "rb") as f:
                got = f.read(64).decode("ascii", "replace").split()
            return float(got[1]) if len(got) == 2 and got[0] == pid else 0.0
        except (OSError, ValueError):
            return 0.0

    def _cached(self, domain: str, now: float) -> Policy | None:
        p = self.policies.get(domain)
        if p is None:
            p = self._read(domain, now)
            if p is not None:
                self._keep(p)
        if p is not None and p.expires <= now:
            self.policies.pop(domain, None)
            return None
        return p

    def _keep(self, p: Policy) -> Policy:
        if len(self.policies) >= CACHE_MAX:
            self.policies.clear()
        self.policies[p.domain] = p
        return p

    def _file(self, domain: str) -> str | None:
        return os.path.join(self.dir, domain + ".json") if _DOMAIN.fullmatch(domain) else None

    def _read(self, domain: str, now: float) -> Policy | None:
        path = self._file(domain)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                p = msgspec.json.decode(f.read(), type=Policy)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return p if p.domain == domain and p.expires > now else None

    def _write(self, p: Policy) -> None:
        path = self._file(p.domain)
        if path is None:
            return
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(p))
            os.replace(tmp, path)
        except OSError:
            pass  # memory still has it; the next worker fetches it again

    async def _fetch(self, domain: str, pid: str, older: Policy | None = None) -> Policy | None:
        host = f"mta-sts.{domain}"
        self.fetches += 1
        try:
            async with asyncio.timeout(self.timeout):
                addrs = await self._addresses(host)
                if isinstance(addrs, str):
                    raise PolicyError("sts-policy-fetch-error", addrs)
                text = await fetch(host, addrs, self.port, verify_context(self.ca_file))
            p = parse_policy(text, domain, pid, time.time())
        except PolicyError as e:
            self._failed(domain, pid, e.result, str(e), older)
            return None
        except TimeoutError:
            self._failed(
                domain, pid, "sts-policy-fetch-error",
                f"{host}: no answer in {self.timeout:g} s", older,
            )  # fmt: skip
            return None
        except Exception as e:  # whatever a hostile host makes of it: no policy, never a local error
            self._failed(domain, pid, "sts-policy-fetch-error", f"{host}: {e!r}"[:300], older)
            return None
        self.retry_at.pop(domain, None)
        self._write(p)
        path = self._file(domain)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path[:-5] + ".fail")
        return self._keep(p)

    def _retry_after(self, domain: str, seconds: float) -> None:
        if len(self.retry_at) >= CACHE_MAX:
            self.retry_at.clear()
        self.retry_at[domain] = time.monotonic() + seconds

    def _failed(
        self, domain: str, pid: str, result: str, text: str, older: Policy | None = None
    ) -> None:
        self._retry_after(domain, FETCH_RETRY)
        path = self._file(domain)
        if path is not None:  # the node's other workers wait as long (_fetch_shared)
            with contextlib.suppress(OSError):
                tmp = f"{path[:-5]}.fail.{os.getpid()}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(f"{pid} {time.time():.3f}")
                os.replace(tmp, path[:-5] + ".fail")
        # RFC 8460 4.3.1: no valid policy to be had is "no-policy-found"; with
        # one cached, the failure is that policy's (which stays in force)
        self.report(
            domain, older.mode if older else "", result, text, mx="", source_ip="", went=True,
            policy_type="sts" if older else "no-policy-found",
            policy=older.lines if older else (), mx_host=older.mx if older else (),
        )  # fmt: skip

    def report(
        self,
        domain: str,
        mode: str,
        result: str,
        text: str,
        *,
        mx: str,
        source_ip: str,
        went: bool,
        policy_type: str = "sts",
        policy: tuple[str, ...] = (),
        mx_host: tuple[str, ...] = (),
        receiving_ip: str = "",
    ) -> None:
        """One TLS-RPT session result (RFC 8460 result types; policy type sts,
        tlsa for DANE, no-policy-found): a failure is a ``tls_report`` event for
        the event log; a success (``result`` "") is counted, and the counts go
        as ``tls_sessions`` events (:meth:`take_events`). ``policy``: its
        policy-string; ``mx_host``: its mx patterns (sts) or MX host (tlsa)."""
        if not result:
            key = (policy_type, domain, policy, mx_host)
            if key in self.sessions or len(self.sessions) < CACHE_MAX:
                self.sessions[key] = self.sessions.get(key, 0) + 1
            return
        self.events.append({
            "time": time.time(), "event": "tls_report", "policy_type": policy_type,
            "policy_domain": domain, "mode": mode, "result": result, "mx": mx,
            "source_ip": source_ip, "receiving_ip": receiving_ip, "delivered_anyway": went,
            "text": text[:300], "policy": list(policy), "mx_host": list(mx_host),
        })  # fmt: skip

    def has_events(self) -> bool:
        """Whether :meth:`take_events` has something to send now."""
        return bool(self.events) or bool(
            self.sessions and time.monotonic() - self.sessions_sent >= SESSIONS_EVERY
        )

    def end(self) -> None:
        """The worker ends: its session counts go with its last events."""
        self.sessions_sent = float("-inf")

    def take_events(self) -> list[dict[str, Any]]:
        ev, self.events = self.events, []
        mono = time.monotonic()
        if self.sessions and mono - self.sessions_sent >= SESSIONS_EVERY:
            now = time.time()
            for (ptype, domain, policy, mx_host), n in self.sessions.items():
                ev.append({
                    "time": now, "event": "tls_sessions", "policy_type": ptype,
                    "policy_domain": domain, "policy": list(policy), "mx_host": list(mx_host),
                    "count": n,
                })  # fmt: skip
            self.sessions = {}
            if self.sessions_sent != float("-inf"):
                self.sessions_sent = mono
        return ev


def session_result(stage: str, code: int, text: str) -> str:
    """The RFC 8460 result type of a failed session under a policy: a reply
    refusing STARTTLS (454, 502 ...: it was offered, then not given) is
    starttls-not-supported as much as one not offering it; else by the
    transport's explanation (:func:`result_type`)."""
    if stage == "starttls" and code:
        return "starttls-not-supported"
    return result_type(text)


def result_type(text: str) -> str:
    """The RFC 8460 result type of a failed session under a policy, from the
    transport's explanation."""
    t = text.lower()
    if "does not offer starttls" in t or ("starttls" in t and "refused" in t):
        return "starttls-not-supported"
    if "hostname mismatch" in t or "doesn't match" in t or "not valid for" in t:
        return "certificate-host-mismatch"
    if "expired" in t:
        return "certificate-expired"
    if "certificate verify failed" in t or "self-signed" in t or "self signed" in t:
        return "certificate-not-trusted"
    return "validation-failure"
