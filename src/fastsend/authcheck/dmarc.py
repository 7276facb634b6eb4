"""The ``DMARC`` record check and the From-domain ``alignment`` check."""

from __future__ import annotations

import re

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
    org_domain,
)

_POLICIES = ("none", "quarantine", "reject")
# A record that starts like a DMARC record: receivers that select on this prefix see
# "v=DMARC1 p=reject" (no ';') as a (broken) record, so the check judges it too.
_DMARC_RE = re.compile(r"^\s*v\s*=\s*DMARC1(?![A-Za-z0-9])", re.I)


def parse_dmarc(rec: str) -> tuple[dict[str, str], list[str], list[str]]:
    """A DMARC record's tags (lower-case names), syntax errors and warnings."""
    pairs, errors = _tag_list(rec)
    tags = {k.lower(): v for k, v in pairs}
    warns: list[str] = []
    if not pairs or pairs[0][0].lower() != "v" or pairs[0][1] != "DMARC1":
        errors.append("must start with v=DMARC1")
    if "p" not in tags:
        errors.append("no p= tag (required)")
    elif tags["p"].lower() not in _POLICIES:
        errors.append(f"p={tags['p']} (none, quarantine or reject)")
    if "sp" in tags and tags["sp"].lower() not in _POLICIES:
        errors.append(f"sp={tags['sp']} (none, quarantine or reject)")
    for t in ("adkim", "aspf"):
        if t in tags and tags[t].lower() not in ("r", "s"):
            errors.append(f"{t}={tags[t]} (r or s)")
    if "pct" in tags and not (tags["pct"].isdigit() and int(tags["pct"]) <= 100):
        errors.append(f"pct={tags['pct']} (0-100)")
    if "ri" in tags and not tags["ri"].isdigit():
        errors.append(f"ri={tags['ri']} (seconds)")
    if "fo" in tags and not all(o.strip() in ("0", "1", "d", "s") for o in tags["fo"].split(":")):
        errors.append(f"fo={tags['fo']} (0, 1, d, s separated by ':')")
    for t in ("rua", "ruf"):
        for uri in _uris(tags.get(t, "")):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+", uri) or (
                uri.lower().startswith("mailto:") and "@" not in uri
            ):
                errors.append(f"{t}: bad URI {uri!r}")
    known = {"v", "p", "sp", "adkim", "aspf", "pct", "rua", "ruf", "fo", "rf", "ri", "np",
             "psd", "t"}  # fmt: skip
    for k in tags:
        if k not in known:
            warns.append(f"unknown tag {k}= (ignored by receivers; a typo?)")
    return tags, errors, warns


def _uris(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _uri_domain(uri: str) -> str:
    if not uri.lower().startswith("mailto:"):
        return ""
    addr = uri[7:].split("!")[0].split("?")[0]
    return addr.rpartition("@")[2].lower().rstrip(".")


def _dmarc_records(name: str, look: _Lookup, j: _Judge) -> list[str] | None:
    """The DMARC records at ``name``; None when the lookup failed (noted in ``j``)."""
    txts = _records(look, j, name, "TXT")
    return None if txts is None else [t for t in txts if _DMARC_RE.match(t)]


_KNOWN_DMARC = ("sp", "adkim", "aspf", "rua", "ruf", "fo", "rf", "ri")


def _rebuild_dmarc(tags: dict[str, str], org: str, sub: bool = False) -> str:
    """The recommended record: valid tags kept, unknown ones and pct < 100 dropped,
    a none policy raised to quarantine, rua added when missing."""
    p = tags.get("p", "").lower()
    out = {"v": "DMARC1", "p": p if p in _POLICIES else "none"}
    for k in _KNOWN_DMARC:
        if k in tags and not parse_dmarc(f"v=DMARC1; p=none; {k}={tags[k]}")[1]:
            out[k] = tags[k]
    if sub and out.get("sp", "").lower() == "none":
        out["sp"] = "quarantine"
    elif (not sub or "sp" not in out) and out["p"] == "none" and p in _POLICIES:
        out["p"] = "quarantine"
    if "rua" not in out:
        out["rua"] = f"mailto:dmarc-reports@{org}"
    return "; ".join(f"{k}={v}" for k, v in out.items())


def check_dmarc(domain: str, look: _Lookup) -> tuple[Check, dict[str, str]]:
    """The DMARC check; also the tags of the record that applies ({} if none)."""
    j = _Judge("DMARC")
    org = org_domain(domain)
    where = domain
    recs = _dmarc_records(f"_dmarc.{domain}", look, j)
    if recs == [] and org != domain:
        where, recs = org, _dmarc_records(f"_dmarc.{org}", look, j)
    if recs is None:  # no fallback past a failed lookup (RFC 7489 6.6.3)
        return j.check(), {}
    name = f"_dmarc.{where}"
    default = f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{org}"
    if not recs:
        looked = f"_dmarc.{domain}" + (f" or _dmarc.{org}" if org != domain else "")
        j.add(FAIL, f"no DMARC record at {looked}", _txt(f"_dmarc.{domain}", default))
        return j.check(), {}
    if len(recs) > 1:
        j.add(FAIL, f"{len(recs)} DMARC records at {name}: receivers apply none "
                    "(RFC 7489 6.6.3); keep one",
              _txt(name, _rebuild_dmarc(parse_dmarc(recs[0])[0], org, where != domain)))  # fmt: skip
        return j.check(), {}
    rec = recs[0]
    tags, errors, warns = parse_dmarc(rec)
    fixed = _txt(name, _rebuild_dmarc(tags, org, where != domain))
    for e in errors:
        j.add(FAIL, f"syntax error in {rec!r}: {e}", fixed)
    for w in warns:
        j.add(WARN, w, fixed)
    p = tags.get("p", "").lower()
    sub = where != domain
    policy = (tags.get("sp") or p).lower() if sub else p
    whence = f"record at {name}" + (" (sp= for subdomains)" if sub and "sp" in tags else "")
    if policy in _POLICIES:
        if policy == "none":
            j.add(WARN, f"policy for {domain} is none ({whence}): monitoring only, spoofed "
                        "mail is still delivered; move to quarantine once reports are clean",
                  fixed)  # fmt: skip
        else:
            j.add(PASS, f"p={p}: policy for {domain} is {policy} ({whence})")
    pct = tags.get("pct", "100")
    if pct.isdigit() and int(pct) < 100:
        j.add(WARN, f"pct={pct}: the policy applies to {pct}% of failing mail only", fixed)
    rua = _uris(tags.get("rua", ""))
    if not rua:
        j.add(WARN, "no rua=: you get no aggregate reports", fixed)
    for tag in ("rua", "ruf"):
        for uri in _uris(tags.get(tag, "")):
            dest = _uri_domain(uri)
            if dest and org_domain(dest) != org:
                auth = f"{where}._report._dmarc.{dest}"
                probe = _Judge("")
                found = _dmarc_records(auth, look, probe)
                if found is None:
                    j.add(WARN, f"{tag} {uri}: could not look up {auth} (DNS failure)")
                elif not found:
                    j.add(WARN, f"{tag} {uri} is in another domain, which has not authorised "
                                f"reports for {where} (RFC 7489 7.1)",
                          _txt(auth, "v=DMARC1"))  # fmt: skip
    if "ruf" in tags:
        j.add(PASS, f"ruf={tags['ruf']} (failure reports: few receivers send them)")
    return j.check(), tags


def _aligned(a: str, b: str, strict: bool) -> bool:
    return a == b if strict else org_domain(a) == org_domain(b)


def check_alignment(
    domain: str,
    tags: dict[str, str],
    dkim_domain: str,
    dkim_ok: bool | None,
    rp: str,
    spf_ok: bool,
) -> Check:
    """DMARC identifier alignment (RFC 7489 3.1); ``dkim_ok`` is None when no key was given."""
    j = _Judge("alignment")
    strict_d = tags.get("adkim", "r").lower() == "s"
    strict_s = tags.get("aspf", "r").lower() == "s"
    mode = lambda s: "strict" if s else "relaxed"  # noqa: E731
    d_al = _aligned(dkim_domain, domain, strict_d)
    s_al = _aligned(rp, domain, strict_s)
    if dkim_ok is None:
        dk = "no DKIM key given"
    elif not d_al:
        dk = f"DKIM d={dkim_domain} NOT aligned with {domain} ({mode(strict_d)})"
    elif not dkim_ok:
        dk = f"DKIM d={dkim_domain} aligned but its key check failed"
    else:
        dk = f"DKIM d={dkim_domain} aligned ({mode(strict_d)})"
    if not s_al:
        sp = f"return path {rp} NOT aligned with {domain} ({mode(strict_s)})"
    elif not spf_ok:
        sp = f"return path {rp} aligned but SPF does not pass for every --ip"
    else:
        sp = f"return path {rp} aligned and SPF passes ({mode(strict_s)})"
    dkim_good = bool(dkim_ok) and d_al
    spf_good = spf_ok and s_al
    if dkim_good:
        j.add(PASS, f"{dk}; {sp}")
    elif spf_good:
        j.add(WARN, f"{dk}; {sp}: only SPF aligns, which forwarding breaks; sign with "
                    f"DKIM d={domain}")  # fmt: skip
    else:
        j.add(FAIL, f"{dk}; {sp}: DMARC fails for this mail; sign with DKIM d={domain}")
    return j.check()
