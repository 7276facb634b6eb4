"""Messages built and signed per second on one core: fastsend vs its baselines.

Measures, in one run, on one pinned core, by process CPU time:

- fastsend build only (compiled core), vs the stdlib ``email`` package
  building the same message (goal: >= 50x);
- fastsend build + DKIM rsa-sha256 (2048-bit), vs the raw OpenSSL sign rate:
  the faster of the same key via ``cryptography`` and ``openssl speed
  rsa2048`` on the same core (goal: >= 85%); for reference, the same with a
  body that differs per recipient from its first line (its SHA-256 every time);
- fastsend build + DKIM ed25519-sha256, vs the raw Ed25519 sign rate of the
  same key via ``cryptography`` (PyNaCl too when installed; the faster one is
  the baseline) (goal: >= 70%);
- build + ed25519 with a body that differs per recipient (its last
  placeholder, at the end of the text part), vs the same raw rate (goal:
  >= 70%): canonicalization + SHA-256 of each body, the prefix it shares with
  the last one hashed once (``BodyHasher``);
- for reference, stdlib ``email`` + dkimpy rsa-sha256, and build + ed25519
  with a body that differs from its first line (nothing shared: the whole
  body hashed every time). The first ed25519 goal figure's body repeats, so
  its body hash is cached as in a campaign whose body has no per-recipient
  values.

The message: ~4 KB personalised text + HTML (multipart/alternative,
quoted-printable), a personalised Subject and six placeholders per message.
Each figure is the best of ``--rounds`` rounds of ``--seconds`` each, rounds
interleaved so a noisy neighbour hurts all figures alike.

    python bench/build_sign.py [--seconds 1.0] [--rounds 3] [--strict]

Exits 2 when a figure cannot be measured; with ``--strict``, 1 when a goal is
missed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from fastsend import _accel
from fastsend.message import Campaign
from fastsend.message.keys import generate, load_private_key, write_key

PARA = (
    "Dear {{ first_name }}, thank you for being a customer since {{ since }}. "
    "This month we have selected offers that match what you looked at in {{ city }}: "
    "fresh arrivals, seasonal discounts and free delivery on orders over 50 EUR. "
)
FILLER = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.\n"
)
TEXT = PARA + "\n\n" + FILLER * 6 + "\nYour code: {{ code }}\n"
HTML = "<html><body><p>" + PARA + "</p>\n" + ("<p>" + FILLER + "</p>\n") * 6 + "</body></html>\n"
VARS = {"first_name": "Alexandra", "since": "2019", "city": "Zürich", "code": "X7Q-99"}


def cpu_rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per CPU second of ``fn`` over about ``seconds`` of CPU time."""
    n, batch = 0, 1
    start = time.process_time()
    while True:
        for _ in range(batch):
            fn()
        n += batch
        spent = time.process_time() - start
        if spent >= seconds:
            return n / spent
        batch = min(batch * 2, 1000)


def openssl_speed_rsa2048(seconds: float) -> float:
    """RSA-2048 signatures per second of `openssl speed rsa2048` (OpenSSL's own
    loop on a digest, on this process's core; 0.0 when it cannot run)."""
    try:
        out = subprocess.run(
            ["openssl", "speed", "-seconds", str(max(1, round(seconds))), "rsa2048"],
            capture_output=True, text=True, check=False, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    for line in out.splitlines():
        f = line.split()
        if f[:3] == ["rsa", "2048", "bits"] and len(f) > 5:
            return float(f[5])
    return 0.0


def stdlib_builder() -> Callable[[int], bytes]:
    from email import policy
    from email.message import EmailMessage
    from email.utils import formatdate

    def build(i: int) -> bytes:
        v = {**VARS, "email": f"user{i}@example.org"}
        text = TEXT
        html = HTML
        for k, val in v.items():
            text = text.replace("{{ " + k + " }}", val)
            html = html.replace("{{ " + k + " }}", val)
        m = EmailMessage(policy=policy.SMTP)
        m["From"] = "Example Shop <news@example.com>"
        m["To"] = v["email"]
        m["Subject"] = f"{v['first_name']}, your offers for {v['city']}"
        m["Date"] = formatdate()
        m["Message-ID"] = f"<m{i}@example.com>"
        m.set_content(text, cte="quoted-printable")
        m.add_alternative(html, subtype="html", cte="quoted-printable")
        return m.as_bytes()

    return build


def libraries() -> str:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return (
        f"cryptography {cryptography.__version__} ({backend.openssl_version_text()});"
        f" compiled core: {_accel.HAVE_EXTENSIONS and not _accel.NO_EXTENSIONS}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per figure per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = ap.parse_args()
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        pinned = f"pinned to cpu {cpu}"
    except (AttributeError, OSError):
        pinned = "not pinned"
    print(f"machine: {machine()}; {libraries()}")
    print(f"settings: {pinned}; best of {args.rounds} rounds x {args.seconds}s CPU each")

    tmp = Path(tempfile.mkdtemp(prefix="fastsend-bench-"))
    for name, alg in (("rsa", "rsa"), ("ed", "ed25519")):
        write_key(generate(alg, 2048), tmp / f"{name}.pem")
    base = {
        "from": "Example Shop <news@example.com>",
        "subject": "{{ first_name }}, your offers for {{ city }}",
        "text": TEXT,
        "html": HTML,
        "list_unsubscribe": {"url": "https://example.com/u/{{ message_id }}"},
    }

    def renderer(sel: str | None, vary: bool | str = False) -> Callable[[], bytes]:
        d = dict(base)
        if sel:
            d["dkim"] = {"domain": "example.com", "selector": sel, "key": str(tmp / f"{sel}.pem")}
        r = Campaign.from_dict(d).compile()
        counter = iter(range(1 << 62))

        def go() -> bytes:
            i = next(counter)
            if vary == "start":  # differs from its first line: nothing shared to hash once
                return r.render(f"user{i}@example.org", {**VARS, "first_name": f"A{i}"}, f"m{i}")
            if vary:  # a body that differs per recipient (its code, in the text part's end)
                return r.render(f"user{i}@example.org", {**VARS, "code": f"X{i}"}, f"m{i}")
            return r.render(f"user{i}@example.org", VARS, f"m{i}")

        return go

    build, build_rsa, build_ed = renderer(None), renderer("rsa"), renderer("ed")
    size = len(build())
    std = stdlib_builder()
    std_counter = iter(range(1 << 62))
    rsa_key = load_private_key(str(tmp / "rsa.pem"))
    ed_key = load_private_key(str(tmp / "ed.pem"))
    header_block = build().split(b"\r\n\r\n", 1)[0]
    digest = hashlib.sha256(header_block).digest()
    pkcs, sha = padding.PKCS1v15(), hashes.SHA256()
    raw_rsa = lambda: rsa_key.sign(header_block, pkcs, sha)  # type: ignore[call-arg]  # noqa: E731
    raw_ed = lambda: ed_key.sign(digest)  # type: ignore[call-arg]  # noqa: E731
    baselines_ed = {"cryptography": raw_ed}
    try:
        import nacl.signing  # type: ignore[import-not-found]
        from cryptography.hazmat.primitives import serialization

        seed = ed_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )  # fmt: skip
        nk = nacl.signing.SigningKey(seed)
        baselines_ed["pynacl"] = lambda: nk.sign(digest)
    except ImportError:
        pass

    def dkimpy_path() -> None:
        import dkim

        msg = std(next(std_counter))
        dkim.sign(msg, b"rsa", b"example.com", (tmp / "rsa.pem").read_bytes(),
                  include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])  # fmt: skip

    figures: dict[str, Callable[[], object]] = {
        "fastsend build": build,
        "stdlib email build": lambda: std(next(std_counter)),
        "fastsend build+rsa2048": build_rsa,
        "fastsend build+rsa2048, body varies": renderer("rsa", vary="start"),
        "raw rsa2048 sign": raw_rsa,
        "fastsend build+ed25519": build_ed,
        "fastsend build+ed25519, body varies": renderer("ed", vary=True),
        "fastsend build+ed25519, varies at start": renderer("ed", vary="start"),
        **{f"raw ed25519 sign ({k})": f for k, f in baselines_ed.items()},
    }
    best: dict[str, float] = {}
    for _round in range(args.rounds):
        for name, fn in figures.items():
            secs = args.seconds if "stdlib" not in name else max(args.seconds / 2, 0.3)
            best[name] = max(best.get(name, 0.0), cpu_rate(fn, secs))
        best["raw rsa2048 sign (openssl speed)"] = max(
            best.get("raw rsa2048 sign (openssl speed)", 0.0), openssl_speed_rsa2048(args.seconds)
        )
    best["stdlib email + dkimpy rsa2048"] = cpu_rate(dkimpy_path, max(args.seconds, 1.0))

    print(f"message: {size} octets, text+html, quoted-printable, 6 placeholders")
    for name, rate in best.items():
        print(f"  {name:36s} {rate:12,.0f} msg/s per core  ({1e6 / rate:9.1f} us)" if rate else
              f"  {name:36s} not measured")  # fmt: skip
    if not all(r > 0 for r in best.values()):
        print("error: some figures could not be measured", file=sys.stderr)
        return 2
    raw_ed_best = max(v for k, v in best.items() if k.startswith("raw ed25519"))
    raw_rsa_best = max(v for k, v in best.items() if k.startswith("raw rsa2048"))
    goals = [
        ("build-only vs stdlib email", best["fastsend build"] / best["stdlib email build"], 50.0),
        ("rsa2048 vs raw OpenSSL sign", best["fastsend build+rsa2048"] / raw_rsa_best, 0.85),
        ("rsa2048, body varies, vs raw", best["fastsend build+rsa2048, body varies"]
         / raw_rsa_best, 0.0),
        ("ed25519 vs raw ed25519 sign", best["fastsend build+ed25519"] / raw_ed_best, 0.70),
        ("ed25519, body varies, vs raw", best["fastsend build+ed25519, body varies"]
         / raw_ed_best, 0.70),
        ("ed25519, varies at start, vs raw", best["fastsend build+ed25519, varies at start"]
         / raw_ed_best, 0.0),
        ("rsa2048 vs stdlib+dkimpy", best["fastsend build+rsa2048"]
         / best["stdlib email + dkimpy rsa2048"], 0.0),
    ]  # fmt: skip
    missed = 0
    print("ratios:")
    for what, ratio, goal in goals:
        if goal:
            verdict = "PASS" if ratio >= goal else "MISS"
            missed += verdict == "MISS"
            shown = f"{ratio:.1f}x" if goal >= 1 else f"{ratio:.0%}"
            want = f"{goal:.0f}x" if goal >= 1 else f"{goal:.0%}"
            print(f"  {what:32s} {shown:>8s}  (goal >= {want})  {verdict}")
        else:
            shown = f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.0%}"
            print(f"  {what:32s} {shown:>8s}  (reference)")
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
