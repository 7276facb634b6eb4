"""Campaign files: load, validate, normalise, and compile into a renderer.

A campaign is a TOML file (or the equivalent dict from JSON). The minimal form::

    from = "Example News <news@example.com>"
    subject = "Hello {{ first_name | default(\"there\") }}"
    text = "Hi {{ first_name }}, ..."

Everything else is optional; see ``examples/campaign.toml`` for all keys.
:meth:`Campaign.to_dict` gives a self-contained normalised dict (bodies and
attachments inlined, key paths made absolute) that :meth:`Campaign.from_dict`
accepts unchanged: that is what the spool stores and what forked workers
compile from. Private keys are never inlined: only their absolute paths.

Validation happens here, before sending starts (:class:`CampaignError`):
unknown keys, bad templates, bad addresses, reserved header names, missing
files, recipient-list columns that lack a variable. This module does no MIME
work itself (see :mod:`fastsend.message.mime`) and no signing (see
:mod:`fastsend.message.dkim`).
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fastsend.message.errors import CampaignError, DkimKeyMissing
from fastsend.message.headers import HeaderError, encode_domain, parse_mailbox, split_address
from fastsend.message.mime import Renderer, ascii_uri_literals
from fastsend.message.rawmime import name_disguise
from fastsend.message.template import PLAIN_NAME as _PLAIN_NAME
from fastsend.message.template import Template, TemplateError
from fastsend.message.tracking import check_spec as check_tracking

__all__ = ["BUILTIN_VARIABLES", "Campaign", "PathKeyError", "check_inline", "check_one_click"]

BUILTIN_VARIABLES = frozenset({"email", "message_id"})
# Also built in when [tracking] signs unsubscribe links; otherwise a column like any other.
TRACKED_VARIABLES = frozenset({"unsubscribe_url"})
_TOP_KEYS = {
    "name", "description", "from", "reply_to", "to", "subject", "text", "html",
    "text_file", "html_file", "transfer_encoding", "attachments", "headers", "dkim",
    "list_unsubscribe", "feedback_id", "return_path", "verp_domain", "verp_prefix",
    "tracking", "text_from_html",
}  # fmt: skip
_RESERVED = {
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "content-disposition", "dkim-signature",
    "return-path", "received", "list-unsubscribe", "list-unsubscribe-post", "feedback-id",
    "sender",
}  # fmt: skip
# Verdicts a receiver writes (RFC 8601, RFC 8617, RFC 7208): a sender's own
# would claim checks that were never made; and the trace fields the delivering
# system writes (RFC 9228 Delivered-To, Postfix's X-Original-To, Exim's
# Envelope-To): a Delivered-To naming the recipient makes Postfix's local
# delivery bounce the message as a mail loop (5.4.6).
_VERDICTS = {
    "authentication-results", "arc-seal", "arc-message-signature",
    "arc-authentication-results", "received-spf",
    "delivered-to", "x-original-to", "envelope-to",
}  # fmt: skip
_RESERVED |= _VERDICTS
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_DKIM_KEYS = {"domain", "selector", "key", "canonicalization", "headers"}
_CANON = {"relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"}


class PathKeyError(CampaignError):
    """A campaign from a tenant (HTTP API, SMTP) names a server file; ``key`` is its path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def check_inline(d: Any) -> None:
    """Refuse every key that would make the server read a file (:class:`PathKeyError`).

    Campaigns that arrive over the network carry their content inline only:
    ``text``/``html`` (not ``text_file``/``html_file``), attachments as
    ``data_b64`` (not ``path``), no ``dkim`` table (keys are the operator's,
    chosen by tenant and From domain) and no ``tracking.secret_file``. Called
    before :meth:`Campaign.from_dict`, so nothing has been opened or even
    stat()ed when it raises: an error never tells whether a path exists.
    Campaign files given to the CLI by the operator may use paths.
    """
    if not isinstance(d, Mapping):
        return  # from_dict reports the shape
    for key in ("text_file", "html_file"):
        if key in d:
            raise PathKeyError(key, f"file paths are not accepted here; send {key[:-5]} inline")
    atts = d.get("attachments")
    for i, a in enumerate(_list(atts)):
        if isinstance(a, str) or (isinstance(a, Mapping) and "path" in a):
            raise PathKeyError(
                f"attachments[{i}].path",
                "file paths are not accepted here; send the content as data_b64 with a filename",
            )
    if "dkim" in d:
        dk = d["dkim"]
        first = dk[0] if isinstance(dk, list) and dk else dk
        key = "dkim.key" if isinstance(first, Mapping) and "key" in first else "dkim"
        raise PathKeyError(
            key, "DKIM keys are the server's: they are chosen by tenant and From domain"
        )
    check_one_click(d)
    tracking = d.get("tracking")
    if isinstance(tracking, Mapping) and "tenant" in tracking:
        raise PathKeyError("tracking.tenant", "set by the server (the key's tenant)")
    if isinstance(tracking, Mapping) and "secret_file" in tracking:
        raise PathKeyError(
            "tracking.secret_file", "file paths are not accepted here; the server signs links"
        )


def check_one_click(d: Any) -> None:
    """Refuse ``list_unsubscribe.one_click = true`` without an https URL to POST to
    (its ``url``, or the signed one of ``[tracking] unsubscribe`` on a base_url):
    RFC 8058 one-click is a POST to an HTTPS URI of List-Unsubscribe, so a
    mailto: alone cannot be one; it was silently sent without
    List-Unsubscribe-Post. Called on what users write (a campaign file, a
    tenant's template), not in :meth:`Campaign.from_dict`: a campaign spooled
    before, whose normal form says one_click = true beside a mailto: alone
    (then the default), must still load."""
    if not isinstance(d, Mapping):
        return
    u = d.get("list_unsubscribe")
    if not isinstance(u, Mapping) or u.get("one_click") is not True or u.get("url"):
        return
    t = d.get("tracking")
    if isinstance(t, Mapping) and t.get("unsubscribe") and t.get("base_url"):
        return
    raise CampaignError(
        "list_unsubscribe.one_click = true needs an https:// url to POST to (RFC 8058):"
        " a mailto: alone cannot be one-click; add url = \"https://...\" (with a"
        " placeholder identifying the recipient), or [tracking] unsubscribe = true with"
        " a base_url, or drop one_click"
    )


def _str(d: Mapping[str, Any], key: str, where: str = "") -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise CampaignError(f"{where}{key} must be a string, not {type(v).__name__}")
    return v


class Campaign:
    """A validated campaign; :meth:`compile` gives the per-process renderer."""

    def __init__(self, spec: dict[str, Any], templates: dict[str, Template]) -> None:
        self._spec = spec
        self._templates = templates

    # -- construction ---------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Campaign:
        """Read a TOML campaign file (paths inside are relative to its folder)."""
        p = Path(path)
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not text
            data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise CampaignError(f"cannot read campaign {p}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CampaignError(f"{p}: not valid TOML: {exc}") from None
        try:
            check_one_click(data)
        except CampaignError as exc:
            raise CampaignError(f"{p}: {exc}") from None
        return cls.from_dict(data, base_dir=p.parent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | Path | None = None) -> Campaign:
        """Validate and normalise ``d`` (as parsed from TOML or JSON, or from to_dict)."""
        if not isinstance(d, Mapping):
            raise CampaignError("a campaign must be a table/object")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise CampaignError(f"unknown campaign keys: {', '.join(sorted(unknown))}")
        spec: dict[str, Any] = {}
        for key in ("name", "description", "from", "reply_to", "to", "subject", "feedback_id",
                    "return_path", "verp_domain", "verp_prefix"):  # fmt: skip
            v = _str(d, key)
            if v is not None:
                spec[key] = v
        for key in ("from", "subject"):
            if key not in spec:
                raise CampaignError(f"campaign has no {key!r}")
        for part in ("text", "html"):
            inline, fname = _str(d, part), _str(d, part + "_file")
            if inline is not None and fname is not None:
                raise CampaignError(f"give {part} or {part}_file, not both")
            if fname is not None:
                inline = _read_text(base / fname, part + "_file")
            if inline is not None:
                spec[part] = inline
        if "text" not in spec and "html" not in spec:
            raise CampaignError("campaign has neither text nor html")
        _check_size(spec, d.get("headers"))
        derive = d.get("text_from_html", True)
        if not isinstance(derive, bool):
            raise CampaignError("text_from_html must be true or false")
        if not derive:
            spec["text_from_html"] = False  # (kept: the spooled spec must not derive one)
        elif "text" not in spec:
            _derive_text(spec)
            if "text" in spec:  # (its placeholders are parsed too, here and when spooled)
                _check_size(spec, d.get("headers"), derived=True)
        te = _str(d, "transfer_encoding") or "quoted-printable"
        if te not in ("quoted-printable", "base64"):
            raise CampaignError("transfer_encoding must be 'quoted-printable' or 'base64'")
        spec["transfer_encoding"] = te
        spec["attachments"] = [_attachment(a, base) for a in _list(d.get("attachments"))]
        cids = [a["cid"] for a in spec["attachments"] if "cid" in a]
        if cids and "html" not in spec:
            raise CampaignError("an attachment with a cid (an inline image) needs an html part")
        if len(set(cids)) < len(cids):
            raise CampaignError("two attachments have one cid")
        spec["headers"] = _headers(d.get("headers"))
        spec["dkim"] = [_dkim(x, base) for x in _list(d.get("dkim"))]
        spec["list_unsubscribe"] = _unsub(d.get("list_unsubscribe"))
        tracking = d.get("tracking", {})
        if not isinstance(tracking, Mapping):
            raise CampaignError("[tracking] must be a table")
        spec["tracking"] = check_tracking(tracking)
        for key in ("return_path",):
            if key in spec:
                _check_addr(spec[key], key)
        if "verp_domain" in spec:
            try:
                split_address("x@" + spec["verp_domain"])
            except HeaderError as exc:
                raise CampaignError(f"verp_domain: {exc}") from None
        templates = _parse_templates(spec)
        _one_click(spec, templates)
        # A From/Reply-To without placeholders is checked now, not per recipient.
        for key in ("from", "reply_to", "to"):
            if key in spec and templates[key].is_static:
                try:
                    parse_mailbox(spec[key])
                except HeaderError as exc:
                    raise CampaignError(f"{key}: {exc}") from None
        if not templates["from"].is_static:
            raise CampaignError("from must not contain placeholders (it decides DKIM and DMARC)")
        return cls(spec, templates)

    def to_dict(self) -> dict[str, Any]:
        """Self-contained normalised form (bodies and attachments inlined)."""
        import copy

        return copy.deepcopy(self._spec)

    # -- questions ------------------------------------------------------------
    @property
    def from_address(self) -> str:
        return parse_mailbox(self._spec["from"])[1]

    @property
    def from_domain(self) -> str:
        return split_address(self.from_address)[1]

    @property
    def variables(self) -> set[str]:
        """Recipient-list columns the campaign needs (used without a default)."""
        names: set[str] = set()
        for t in self._templates.values():
            names |= t.required()
        return names - self._builtins

    @property
    def _builtins(self) -> frozenset[str]:
        t = self._spec["tracking"]
        if t.get("unsubscribe") and t.get("base_url"):
            return BUILTIN_VARIABLES | TRACKED_VARIABLES
        return BUILTIN_VARIABLES

    @property
    def all_variables(self) -> set[str]:
        """Every column name mentioned, with or without a default."""
        names: set[str] = set()
        for t in self._templates.values():
            names |= t.names
        return names - self._builtins

    @property
    def personalised(self) -> bool:
        """Whether recipients get different text: any placeholder other than
        ``message_id`` (a column, ``email``, ...). Messages that are not may share
        one multi-recipient transaction (signed tracking links are checked by the
        caller on the Renderer, which owns them)."""
        names: set[str] = set()
        for t in self._templates.values():
            names |= t.names
        return bool(names - {"message_id"})

    @property
    def identical(self) -> bool:
        """Whether every recipient would get the same bytes apart from the
        envelope, To, Message-ID and signatures: no placeholder at all (not even
        ``message_id``), no signed tracking or unsubscribe links, no VERP. Only
        such messages may share one multi-recipient transaction, and then carry
        headers that name no recipient (``Renderer.render_shared``)."""
        names: set[str] = set()
        for t in self._templates.values():
            names |= t.names
        spec = self._spec
        tracking = spec.get("tracking") or {}
        return not names and not spec.get("verp_domain") and not (
            tracking.get("base_url") and (
                tracking.get("opens") or tracking.get("clicks") or tracking.get("unsubscribe")
            )
        )  # fmt: skip

    def check_columns(self, columns: Iterable[str]) -> None:
        """CampaignError naming each needed variable that is not a column."""
        have = set(columns)
        missing = self.variables - have
        if missing:
            shown = sorted(have - {"email"})
            cols = ", ".join(repr(c[:64]) for c in shown[:20]) + (", ..." if shown[20:] else "")
            odd = next((c for c in shown if not _PLAIN_NAME.fullmatch(c)), None)
            raise CampaignError(
                "recipient list lacks columns for variables without a default: "
                + ", ".join(sorted(missing))
                + f" (its columns: {cols or 'none but email'}"
                + (f'; a column such as {odd[:64]!r} is written {{{{ row["{odd[:64]}"] }}}}'
                   if odd else "")
                + ")"
            )  # fmt: skip

    @property
    def dkim(self) -> list[dict[str, Any]]:
        return [dict(x) for x in self._spec["dkim"]]

    def dkim_for(self, domain: str | None = None) -> list[dict[str, Any]]:
        """DKIM settings whose d= aligns (relaxed) with ``domain`` (default: From domain).

        The ``send`` command refuses a campaign for which this is empty unless
        ``--no-dkim`` is given.
        """
        dom = (domain or self.from_domain).lower().rstrip(".")
        return [
            dict(x)
            for x in self._spec["dkim"]
            if dom == x["domain"].lower() or dom.endswith("." + x["domain"].lower())
        ]

    @property
    def tracking(self) -> dict[str, Any]:
        return dict(self._spec["tracking"])

    def compile(self, msgid_tag: str = "", max_size: int = 0) -> Renderer:
        """The renderer for this process: templates split, DKIM keys loaded;
        ``msgid_tag``: the spool's Message-ID label (fastsend.msgid.new_tag);
        ``max_size``: octets of a message at most ([delivery] max_message_size,
        0: no limit)."""
        signers = []
        if self._spec["dkim"]:  # cryptography is imported only to sign
            from fastsend.message.dkim import Signer

            signers = [Signer.from_settings(x) for x in self._spec["dkim"]]
        return Renderer(self._spec, signers, msgid_tag, max_size)


# -- helpers ----------------------------------------------------------------
def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, list):
        return v
    return [v]


def _read_text(p: Path, what: str) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # (a byte-order mark is not text)
    except OSError as exc:
        raise CampaignError(f"{what}: cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CampaignError(f"{what}: {p} is not UTF-8 text") from None


def _check_addr(addr: str, what: str) -> None:
    try:
        split_address(addr)
    except HeaderError as exc:
        raise CampaignError(f"{what}: {exc}") from None


_B64_SPACE = re.compile(r"[ \t\r\n]+")


def _attachment(a: Any, base: Path) -> dict[str, str]:
    if isinstance(a, str):
        a = {"path": a}
    if not isinstance(a, Mapping):
        raise CampaignError("each attachment must be a path or a table with 'path'")
    bad = set(a) - {"path", "filename", "content_type", "data_b64", "cid"}
    if bad:
        raise CampaignError(f"unknown attachment keys: {', '.join(sorted(bad))}")
    if "data_b64" in a:
        data_b64 = a["data_b64"]
        if isinstance(data_b64, str):
            # Base64 as MIME writes it (RFC 2045 6.8: lines of 76; `base64`,
            # Python's encodebytes, PHP's chunk_split) was refused as "not valid
            # base64": the line breaks and spaces go, the characters are checked.
            data_b64 = _B64_SPACE.sub("", data_b64)
        try:
            base64.b64decode(data_b64, validate=True)
        except (ValueError, TypeError):
            raise CampaignError("attachment data_b64 is not valid base64") from None
        fname = a.get("filename")
        if not fname:
            raise CampaignError("an inlined attachment needs a filename")
    else:
        if "path" not in a:
            raise CampaignError("attachment has no path")
        p = base / str(a["path"])
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise CampaignError(f"attachment {p}: {exc.strerror}") from None
        data_b64 = base64.b64encode(raw).decode("ascii")
        fname = a.get("filename") or p.name
    fname = str(fname)
    if (why := filename_problem(fname)) is not None:
        raise CampaignError(f"bad attachment filename {fname[:200]!r}: {why}")
    import mimetypes  # here: only attachments need it

    ctype = a.get("content_type") or mimetypes.guess_type(fname)[0] or "application/octet-stream"
    if not isinstance(ctype, str) or len(ctype) > 255 or not _CTYPE.fullmatch(ctype):
        raise CampaignError(
            f"bad attachment content_type {str(ctype)[:80]!r}: type/subtype, then any"
            ' parameters as ; name=value or ; name="value" (RFC 2045 5.1)'
        )
    if ctype.lower().startswith(("message/", "multipart/")) or fname.lower().endswith(".eml"):
        # A message attached (a forward): a mail client shows its attachments' names too.
        from fastsend.message.rawmime import RawMimeError, check_names, crlf_lines

        try:
            check_names(crlf_lines(base64.b64decode(data_b64)))
        except RawMimeError as exc:
            raise CampaignError(f"attachment {fname[:200]!r} (a message): {exc}") from None
    out = {"filename": fname, "content_type": ctype, "data_b64": data_b64}
    cid = a.get("cid")
    if cid is not None:
        # an inline image, <img src="cid:NAME">: Content-ID <NAME> (RFC 2392; no
        # "%", so the cid: URL is the id as written, nor <>, space or controls)
        if not isinstance(cid, str) or not _CID.fullmatch(cid):
            raise CampaignError(
                f"bad attachment cid {str(cid)[:80]!r}: 1-200 letters, digits and"
                " !#$&'*+-./=?^_`{|}~@ (written in the HTML as src=\"cid:NAME\")"
            )
        out["cid"] = cid
    return out


def filename_problem(name: str) -> str | None:
    """Why ``name`` may not be an attachment's file name, or None: empty, a
    path (``/``, ``\\``), or a character that makes it show other than it is
    (:func:`fastsend.message.rawmime.name_disguise`). Refused, never quietly
    changed: the tenant learns its file would be shown as something else, and
    nothing renames what it sends."""
    if not name.strip():
        return "empty"
    if "/" in name or "\\" in name:
        return "a / or \\ makes it a path, not a name"
    return name_disguise(name)


# RFC 2045 5.1: type "/" subtype *(";" attribute "=" value), value a token or a
# quoted-string (printable ASCII, no backslash): "text/csv; charset=utf-8" is one.
_TOKEN = r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"
_CTYPE = re.compile(
    rf'{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[ !#-\[\]-~]*"))*'
)
_CID = re.compile(r"[A-Za-z0-9!#$&'*+\-./=?^_`{|}~@]{1,200}")


def _headers(h: Any) -> dict[str, str]:
    if h is None:
        return {}
    if not isinstance(h, Mapping):
        raise CampaignError("[headers] must be a table of name = value")
    out: dict[str, str] = {}
    for name, value in h.items():
        if not _HEADER_NAME.fullmatch(name):
            raise CampaignError(f"bad header name {name!r}")
        if name.lower() in _RESERVED:
            who = "receivers" if name.lower() in _VERDICTS else "fastsend"
            raise CampaignError(f"header {name!r} is set by {who}, not by [headers]")
        if not isinstance(value, str):
            raise CampaignError(f"header {name!r} must be a string")
        out[name] = value
    return out


def _dkim(x: Any, base: Path) -> dict[str, Any]:
    if not isinstance(x, Mapping):
        raise CampaignError("[dkim] must be a table (or [[dkim]] tables)")
    bad = set(x) - _DKIM_KEYS
    if bad:
        raise CampaignError(f"unknown [dkim] keys: {', '.join(sorted(bad))}")
    for k in ("domain", "selector", "key"):
        if not isinstance(x.get(k), str) or not x[k]:
            raise CampaignError(f"[dkim] needs {k!r}")
    try:  # d= in A-labels, as the From domain it must align with is written
        domain = encode_domain(x["domain"].strip().rstrip(".")).lower()
    except HeaderError as exc:
        raise CampaignError(f"[dkim] domain: {exc}") from None
    out: dict[str, Any] = {
        "domain": domain,
        "selector": x["selector"],
        "key": str((base / x["key"]).resolve()),
        "canonicalization": x.get("canonicalization", "relaxed/relaxed"),
    }
    if out["canonicalization"] not in _CANON:
        raise CampaignError(f"[dkim] canonicalization must be one of {sorted(_CANON)}")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9\-._]*[A-Za-z0-9])?", out["selector"]):
        raise CampaignError(f"bad DKIM selector {out['selector']!r}")
    if "headers" in x:
        hs = x["headers"]
        if not isinstance(hs, list) or not all(isinstance(s, str) and s for s in hs):
            raise CampaignError("[dkim] headers must be a list of header names")
        if "from" not in [s.lower() for s in hs]:
            raise CampaignError("[dkim] headers must include From (RFC 6376)")
        out["headers"] = [s.lower() for s in hs]
    if not Path(out["key"]).is_file():
        # What to do about it, not only what is wrong: the command that makes the key.
        raise DkimKeyMissing(
            f"[dkim] key file not found: {out['key']} (make one with `fastsend dkim keygen"
            f" --domain {domain} --selector {out['selector']} --out {out['key']}` and publish"
            " the record it prints)"
        )
    return out


def _unsub(u: Any) -> dict[str, Any]:
    if u is None:
        return {}
    if not isinstance(u, Mapping):
        raise CampaignError("[list_unsubscribe] must be a table")
    bad = set(u) - {"mailto", "url", "one_click"}
    if bad:
        raise CampaignError(f"unknown [list_unsubscribe] keys: {', '.join(sorted(bad))}")
    out: dict[str, Any] = {}
    for k in ("mailto", "url"):
        if k in u:
            if not isinstance(u[k], str) or not u[k]:
                raise CampaignError(f"list_unsubscribe.{k} must be a string")
            out[k] = u[k]
    if "url" in out and not out["url"].lower().startswith("https://"):
        raise CampaignError("list_unsubscribe.url must be an https:// URL (RFC 8058)")
    oc = u.get("one_click")  # None: decided by _one_click once the URL is parsed
    if oc is not None and not isinstance(oc, bool):
        raise CampaignError("list_unsubscribe.one_click must be true or false")
    out["one_click"] = oc
    return out


def _one_click(spec: dict[str, Any], templates: Mapping[str, Template]) -> None:
    """Settle ``list_unsubscribe.one_click``. A one-click URL is POSTed to with
    nothing but ``List-Unsubscribe=One-Click`` (RFC 8058 3.1: it "MUST contain
    enough information to identify the mail recipient"), so one that is the
    same for every recipient (no placeholder) unsubscribes nobody: refused
    when one_click is asked for, and by default such a URL is a plain link
    (List-Unsubscribe without List-Unsubscribe-Post: it opens a page). A
    signed tracking unsubscribe URL replaces it (``[tracking] unsubscribe``)."""
    unsub = spec["list_unsubscribe"]
    if not unsub:
        return
    oc = unsub.get("one_click")
    t = spec["tracking"]
    url = templates.get("list_unsubscribe.url")
    if url is None and not (t.get("unsubscribe") and t.get("base_url")):
        unsub["one_click"] = False if oc is None else oc  # (a mailto: alone: no POST)
        return
    if url is None or (t.get("unsubscribe") and t.get("base_url")) or not url.is_static:
        unsub["one_click"] = True if oc is None else oc
        return
    if oc:
        raise CampaignError(
            "list_unsubscribe.url is the same for every recipient, so a one-click"
            " unsubscribe (RFC 8058) could not tell who asked: put a placeholder in it"
            " (e.g. {{ message_id }} or a column identifying the recipient), or set"
            " one_click = false"
        )
    unsub["one_click"] = False


# What a campaign's templates may hold. A template is parsed, checked and compiled
# in tens of microseconds a placeholder and several an HTML tag, by serve as it is
# accepted (on its one loop: every tenant's requests, tracking links, listeners)
# and by every worker before its first message: 16 MB of "{{v}}" (3.2 million)
# held serve's loop for a minute and a worker's past the supervisor's 30 s silence
# limit (killed, restarted, killed again: no mail sent for anyone); 16 MB of "<b>"
# (5.3 million tags) held serve's loop ~40 s. A template naming each of a list's
# 1,000 columns several times, or the largest newsletter's HTML (a few thousand
# tags; Gmail clips a message's HTML past 102 KB), stays well under them.
MAX_PLACEHOLDERS = 10_000
MAX_HTML_TAGS = 100_000  # "<" in the HTML part


def _check_size(spec: Mapping[str, Any], headers: Any, derived: bool = False) -> None:
    """CampaignError when the templates hold more than MAX_PLACEHOLDERS
    placeholders (counted by their opening braces) or the HTML more than
    MAX_HTML_TAGS tags (its "<"), told before anything is parsed; ``derived``:
    counted again with the text part said from the HTML, which the spooled
    spec carries (a spec from_dict refuses when it is read back is never
    accepted: 6,000 in an HTML-only template were 201/202, then every use of
    the campaign a 500 and every message of it failed by the worker)."""
    n = sum(v.count("{{") for k, v in spec.items() if isinstance(v, str))
    if isinstance(headers, Mapping):
        n += sum(v.count("{{") for v in headers.values() if isinstance(v, str))
    if n > MAX_PLACEHOLDERS:
        said = (" with the text part said from the HTML (give a text part, or"
                " text_from_html = false)") if derived else ""  # fmt: skip
        raise CampaignError(
            f"the templates hold {n:,} placeholders{said}, at most {MAX_PLACEHOLDERS:,}"
        )
    tags = spec["html"].count("<") if isinstance(spec.get("html"), str) else 0
    if tags > MAX_HTML_TAGS:
        raise CampaignError(f"html: {tags:,} tags, at most {MAX_HTML_TAGS:,}")


def _derive_text(spec: dict[str, Any]) -> None:
    """An HTML-only campaign gets a text part said from its HTML (htmltext):
    a message with only an HTML part is scored as spam (SpamAssassin's
    MIME_HTML_ONLY) and unreadable to a text-only reader. Kept in the spec,
    so the spooled campaign is sent as it was accepted. Nothing when the HTML
    says nothing in text (an image alone) or is no template (its own error
    comes from _parse_templates)."""
    try:
        Template(spec["html"])
    except TemplateError:
        return
    from fastsend.message.htmltext import html_to_text  # (here: html.entities, only for it)

    text = html_to_text(spec["html"])
    if text.strip():
        spec["text"] = text


def _parse_templates(spec: Mapping[str, Any]) -> dict[str, Template]:
    sources: dict[str, str] = {}
    for key in ("from", "reply_to", "to", "subject", "text", "html", "feedback_id"):
        if key in spec:
            sources[key] = spec[key]
    for name, value in spec["headers"].items():
        sources["headers." + name] = value
    for k in ("mailto", "url"):
        if k in spec["list_unsubscribe"]:
            sources["list_unsubscribe." + k] = spec["list_unsubscribe"][k]
    out: dict[str, Template] = {}
    for key, src in sources.items():
        try:
            out[key] = Template(src)
            if key.startswith("list_unsubscribe."):
                ascii_uri_literals(out[key].literals)  # (the header is ASCII)
        except (TemplateError, HeaderError) as exc:
            raise CampaignError(f"{key}: {exc}") from None
    return out
