"""SIGHUP of a real ``fastsend serve``: the new config's warnings are printed
(as at start), and a config with an error is refused with the error naming
the key while the running config stays in force."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests._serve_helpers import Served

RULE = '[[shaping.rule]]\nname = "typo"\naction = "rest"\nmatch = "x"\nprovider = "gogle"\n'


def hup(s: Served, want: str, timeout: float = 20.0) -> str:
    n = len(s.lines)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while not any(want in ln for ln in s.lines[n:]):
        assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
        time.sleep(0.05)
    return "".join(s.lines[n:])


def test_sighup_prints_warnings_and_refuses_a_config_with_errors(tmp_path: Path) -> None:
    s = Served(tmp_path, None, serve_args=("--no-workers",))
    try:
        s.extra = RULE
        s.write_config()
        out = hup(s, "configuration reloaded")
        assert ("SIGHUP: warning: [[shaping.rule]] \"typo\": provider 'gogle' is not a"
                " provider") in out, out
        # An error (a TLS key that does not exist): refused, naming the key.
        s.extra = (f'[submission]\nlisten = "127.0.0.1:0"\ntls_cert = "{tmp_path}/c.pem"\n'
                   f'tls_key = "{tmp_path}/k.pem"\n')  # fmt: skip
        s.write_config()
        out = hup(s, "config not reloaded")
        assert f"[submission] tls_cert: cannot read {tmp_path}/c.pem" in out, out
        assert "configuration reloaded" not in out
        assert s.req("GET", "/v1/campaigns")[0] == 200  # still serving, on the old config
    finally:
        assert s.stop() == 0
