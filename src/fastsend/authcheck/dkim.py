"""The ``DKIM <selector>`` checks: the published key matches the private key."""

from __future__ import annotations

import base64
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastsend.authcheck.common import (
    FAIL,
    PASS,
    WARN,
    Check,
    _Judge,
    _Lookup,
    _records,
    _tag_list,
    _txt,
)
from fastsend.message.keys import load_private_key, public_p, public_txt


def parse_dkim(rec: str) -> tuple[dict[str, str], list[str]]:
    """A DKIM key record's tags (p= without whitespace) and its syntax errors."""
    pairs, errors = _tag_list(rec)
    tags = {k.lower(): v for k, v in pairs}
    if "v" in tags:
        if pairs[0][0].lower() != "v":
            errors.append("v= must be the first tag")
        if tags["v"] != "DKIM1":
            errors.append(f"v={tags['v']} (must be DKIM1)")
    if "p" not in tags:
        errors.append("no p= tag")
    else:
        tags["p"] = "".join(tags["p"].split())
    return tags, errors


def _published_key(k: str, p: str) -> tuple[Any, str]:
    """(public key object or None, problem)."""
    try:
        raw = base64.b64decode(p, validate=True)
    except ValueError:
        return None, "p= is not valid base64"
    if k == "ed25519":
        if len(raw) != 32:
            return None, f"p= is {len(raw)} bytes (an Ed25519 key is 32)"
        return ed25519.Ed25519PublicKey.from_public_bytes(raw), ""
    try:
        pub = serialization.load_der_public_key(raw)
    except ValueError:
        return None, "p= is not a DER RSA public key"
    if not isinstance(pub, rsa.RSAPublicKey):
        return None, f"p= holds a {type(pub).__name__}, not an RSA key"
    return pub, ""


def check_dkim(sel: str, path: str, domain: str, look: _Lookup) -> Check:
    j = _Judge(f"DKIM {sel}")
    name = f"{sel}._domainkey.{domain}"
    key = load_private_key(path)
    want_txt = _txt(name, public_txt(key))
    key_type = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    txts = _records(look, j, name, "TXT")
    if txts is None:
        return j.check()
    recs = [t for t in txts if "p=" in t or t.lstrip().startswith("v=DKIM1")]
    if not recs:
        j.add(FAIL, f"no key record at {name}", want_txt)
        return j.check()
    if len(recs) > 1:
        j.add(FAIL, f"{len(recs)} key records at {name}: verifiers may take either",
              want_txt)  # fmt: skip
    rec = recs[0]
    for part in (t for t in txts if t not in recs and re.fullmatch(r"[A-Za-z0-9+/=\s;]+", t)):
        j.add(FAIL, f"the TXT record {part[:40]!r}... at {name} looks like the rest of the key, "
                    "which verifiers never see: publish one TXT record (of several strings), "
                    "not two", want_txt)  # fmt: skip
    tags, errors = parse_dkim(rec)
    for e in errors:
        j.add(FAIL, f"syntax: {e}", want_txt)
    k = tags.get("k", "rsa").lower()
    if k not in ("rsa", "ed25519"):
        j.add(FAIL, f"unknown key type k={k}", want_txt)
    elif k != key_type:
        j.add(FAIL, f"k={k} but {path} is an {key_type} key", want_txt)
    h = [a.strip().lower() for a in tags.get("h", "").split(":") if a.strip()]
    if h and "sha256" not in h:
        j.add(FAIL, f"h={tags['h']} does not allow sha256 (the hash fastsend signs with)",
              want_txt)  # fmt: skip
    s = [a.strip().lower() for a in tags.get("s", "*").split(":")]
    if "*" not in s and "email" not in s:
        j.add(FAIL, f"s={tags['s']} does not allow email", want_txt)
    flags = [f.strip().lower() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        j.add(WARN, "t=y: testing mode, receivers treat failures as unsigned; drop t=y",
              _txt(name, public_txt(key)))  # fmt: skip
    p = tags.get("p")
    if p == "":
        j.add(FAIL, "p= is empty: the key is revoked (RFC 6376 3.6.1)", want_txt)
    elif p and k in ("rsa", "ed25519"):
        pub, problem = _published_key(k, p)
        if pub is None:
            j.add(FAIL, problem, want_txt)
        else:
            if isinstance(pub, rsa.RSAPublicKey):
                bits = pub.key_size
                if bits < 1024:
                    j.add(FAIL, f"RSA key of {bits} bits (< 1024: verifiers ignore it)",
                          want_txt)  # fmt: skip
                elif bits < 2048:
                    j.add(WARN, f"RSA key of {bits} bits (use 2048)")
            if public_p(key) == p or _same_key(pub, key.public_key()):
                j.add(PASS, f"{name} ({k}) matches {path}")
            else:
                j.add(FAIL, f"{name} does not match {path}", want_txt)
    return j.check()


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return bool(a.public_numbers() == b.public_numbers())
    return False
