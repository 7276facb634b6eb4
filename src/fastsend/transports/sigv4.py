"""AWS Signature Version 4 for one request (the SES v2 API).

Written here rather than taken from botocore: the algorithm is a fixed
specification of a few HMAC-SHA256 steps, botocore would be a large
dependency (and a synchronous client) for them, and the signing key is
derived once per UTC day and reused. Tests check our headers byte for byte
against botocore's ``SigV4Auth`` and send through moto in server mode, which
verifies the signature against the stored secret key.

It signs ``host``, ``x-amz-date``, ``content-type`` and, with temporary
credentials, ``x-amz-security-token``. It never logs or returns the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse

ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class Signer:
    def __init__(
        self, access_key: str, secret_key: str, region: str, service: str, token: str = ""
    ) -> None:
        self.access_key = access_key
        self._secret = secret_key
        self.region = region
        self.service = service
        self.token = token
        self._day = ""
        self._key = b""

    def __repr__(self) -> str:
        return f"Signer({self.region}/{self.service})"

    def signing_key(self, day: str) -> bytes:
        if day != self._day:
            k = _hmac(("AWS4" + self._secret).encode(), day)
            k = _hmac(k, self.region)
            k = _hmac(k, self.service)
            self._key, self._day = _hmac(k, "aws4_request"), day
        return self._key

    def sign(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        now: float | None = None,
    ) -> dict[str, str]:
        """Headers to send: ``headers`` plus Host, X-Amz-Date, Authorization."""
        u = urllib.parse.urlsplit(url)
        t = time.gmtime(time.time() if now is None else now)
        amzdate = time.strftime("%Y%m%dT%H%M%SZ", t)
        day = amzdate[:8]
        out = dict(headers)
        out["X-Amz-Date"] = amzdate
        if self.token:
            out["X-Amz-Security-Token"] = self.token
        host = u.hostname or ""
        if u.port and not (
            (u.scheme == "https" and u.port == 443) or (u.scheme == "http" and u.port == 80)
        ):
            host = f"{host}:{u.port}"
        canon = {"host": host}
        for k, v in out.items():
            canon[k.lower()] = " ".join(v.strip().split())
        names = sorted(canon)
        signed = ";".join(names)
        path = urllib.parse.quote(u.path or "/", safe="/-_.~")
        query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
            for k, v in sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
        )
        creq = "\n".join(
            [
                method.upper(),
                path,
                query,
                "".join(f"{n}:{canon[n]}\n" for n in names),
                signed,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        sts = "\n".join([ALGORITHM, amzdate, scope, hashlib.sha256(creq.encode()).hexdigest()])
        sig = hmac.new(self.signing_key(day), sts.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (
            f"{ALGORITHM} Credential={self.access_key}/{scope}, SignedHeaders={signed},"
            f" Signature={sig}"
        )
        return out
