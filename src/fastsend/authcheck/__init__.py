"""Sender-authentication checks for a sending domain (``fastsend check-domain``).

``check_domain(domain, ips, keys, nameservers, return_path_domain, dkim_domain)``
looks up and judges, each as a pass/warn/fail :class:`Check` with the exact
records to add or change when something is wrong:

- ``MX`` (and ``MX <return-path domain>`` when it differs): the domain takes
  mail, so bounces and replies arrive. No MX with an address record is a
  warning (implicit MX), no MX at all a failure; a null MX (RFC 7505) fails
  for a sending domain, as does a null MX mixed with others and an MX naming
  an IP literal; an MX host that is a CNAME warns (RFC 2181 10.3); an MX host
  without an address fails.
- ``SPF`` (RFC 7208, :mod:`fastsend.authcheck.spf`), for the return-path
  domain (the envelope sender SPF is evaluated on): one record, valid syntax,
  each ``--ip`` authorised (and by which mechanism), within the 10-lookup and
  2-void-lookup limits for an IP that matches nothing, an ``all`` term that is
  neither ``+all`` nor missing; ``ptr`` and ``%{p}`` warn.
- ``DKIM <selector>`` for each (selector, private key): one key record at
  ``selector._domainkey.<dkim domain>``, ``v=DKIM1``, ``k=`` matching the key
  type, ``p=`` not empty (revoked) and equal to the private key's public half,
  ``h=`` allowing sha256, ``s=`` allowing email, ``t=y`` (testing) warns, an
  RSA key under 1024 bits fails and under 2048 warns.
- ``DMARC`` (RFC 7489): discovery at ``_dmarc.<domain>``, then at the
  organizational domain; several records, a syntax error or a bad/missing
  ``p=`` fail; the policy that applies to the domain (``sp=`` for a subdomain
  covered by the organizational record); ``p=none``, ``pct`` < 100, no ``rua``
  and an external ``rua`` without its ``_report._dmarc`` authorisation warn.
- ``alignment``: the From domain against the DKIM ``d=`` (``adkim``) and the
  return-path domain (``aspf``), strict (equal) or relaxed (same
  organizational domain), counting only a DKIM key / SPF result that passed.
- ``PTR <ip>``: a PTR record whose name resolves back to the IP (FCrDNS);
  several PTR names or a generic-looking name warn. With ``ehlo`` (the name
  said in EHLO from the IP): a name that is not fully qualified (``localhost``)
  or does not resolve to the IP fails, one that is not the PTR name warns.
- ``DNS``: warns when lookups failed (timeouts, server failures).

A lookup that fails (SERVFAIL, timeout) is never read as "no record": the
check that needed it fails saying the lookup failed, with no record to publish
(publishing a second SPF or DMARC record next to an unseen one breaks both),
and DMARC discovery does not fall back past it. SPF terms are checked against
RFC 7208's grammar: a domain-spec ends in a toplabel with a letter or a macro
(``a:192.0.2.5`` is a permerror; the fix writes ``ip4:``), CIDR lengths have
no leading zeros. Every printed TXT record is a valid zone-file line: values
over 255 characters are split into character-strings.

The organizational domain comes from the Public Suffix List (the
``publicsuffixlist`` package's bundled snapshot, no network); without that
package a small built-in heuristic is used and ``org_source`` says so.

JSON (``fastsend check-domain --json``; schema 1, fields are only ever added)::

    {
      "schema": 1,
      "domain": "example.com",               # the From domain, lower case
      "organizational_domain": "example.com",
      "org_source": "psl" | "heuristic",
      "status": "pass" | "warn" | "fail",    # the worst check
      "summary": {"pass": 5, "warn": 1, "fail": 0},
      "checks": [
        {"name": "SPF",                      # MX, MX <d>, SPF, DKIM <sel>, DKIM, DMARC,
                                             # alignment, PTR <ip>, DNS
         "status": "pass" | "warn" | "fail",
         "detail": "...",                    # the notes joined with "; "
         "notes": ["...", ...],              # one finding each, worst first
         "fix": "..."}                       # records to add/change, one a line ("" if none)
      ],
      "records": ["name. IN TXT \\"...\\"", ...] # every fix line of a non-pass check
    }

It does no network I/O other than DNS queries through dnspython to the given
nameservers (the system's when none are given).
"""

from fastsend.authcheck.common import FAIL, PASS, WARN, Check, make_lookup, org_domain
from fastsend.authcheck.dkim import parse_dkim
from fastsend.authcheck.dmarc import parse_dmarc
from fastsend.authcheck.report import check_domain, report

__all__ = [
    "FAIL",
    "PASS",
    "WARN",
    "Check",
    "check_domain",
    "make_lookup",
    "org_domain",
    "parse_dkim",
    "parse_dmarc",
    "report",
]
