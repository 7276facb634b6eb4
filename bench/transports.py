"""Transports side by side: `fastsend send` of N personalised messages through
each route kind against local endpoints, next to direct SMTP to Postfix's
smtp-sink (the baseline), in the same run.

- smtp      --route '*=127.0.0.1:PORT' to smtp-sink (C, pipelining): the baseline
- relay     [transports] kind = "relay": aiosmtpd with STARTTLS + AUTH PLAIN
            (trustme certificate; no PIPELINING, as aiosmtpd offers none)
- sendgrid  v3 mail/send to a local aiohttp server (tests/_provider_servers.py)
- mailgun   messages.mime to a local aiohttp server
- ses       SES v2 SendEmail, SigV4-signed, to moto in server mode (werkzeug:
            its own speed bounds this one)

The endpoints run in this process (threads); fastsend's figures are its own
processes' (the supervisor's and workers' CPU, from its summary): messages/s
and CPU microseconds per message. Ratios are against direct SMTP. DKIM is off for all
(identical work per message; the transport is what differs). Exits non-zero
when a side could not be measured.

    python bench/transports.py            # 5,000 messages per transport
    python bench/transports.py --quick    # 1,000
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import free_port, machine, start_smtp_sink  # noqa: E402

CAMPAIGN = """\
from = "Bench <bench@sender.example.com>"
subject = "Your report, {{ name }}"
text = \"\"\"Hello {{ name }},

Account {{ account }}.
FILLER
\"\"\"
"""


def inputs(tmp: str, n: int) -> tuple[str, str]:
    camp = os.path.join(tmp, "campaign.toml")
    with open(camp, "w") as f:
        f.write(CAMPAIGN.replace("FILLER", "lorem ipsum dolor sit amet " * 60))
    rcpts = os.path.join(tmp, "r.csv")
    with open(rcpts, "w") as f:
        f.write("email,name,account\n")
        for i in range(n):
            f.write(f"user{i}@d{i % 50}.example.net,Name{i},A{i:09d}\n")
    return camp, rcpts


def run(
    tag: str, tmp: str, camp: str, rcpts: str, config: str, env: dict[str, str], workers: int
) -> dict[str, Any]:
    cfg = os.path.join(tmp, f"{tag}.toml")
    with open(cfg, "w") as f:
        f.write(config)
    full = {**os.environ, **env}
    cmd = [sys.executable, "-m", "fastsend", "send", camp, "-r", rcpts, "-c", cfg, "--spool",
           os.path.join(tmp, f"spool-{tag}"), "--json", "--no-progress", "--no-dkim",
           "--workers", str(workers)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: fastsend send failed: {err.decode()[-2000:]}")
    s = orjson.loads(out.decode().strip().splitlines()[-1])
    cpu = s["supervisor_cpu_s"] + s["workers_cpu_s"]
    return {"tag": tag, "wall_s": wall, "delivered": s["delivered"], "msgs_per_s": s["msgs_per_s"],
            "cpu_us_per_msg": cpu / max(1, s["delivered"]) * 1e6}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    n = a.n or (1000 if a.quick else 5000)

    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
    from tests._provider_servers import Recorder, ThreadedApp, mailgun_app, sendgrid_app

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        camp, rcpts = inputs(tmp, n)
        retry = "[retry]\nmin_backoff = 1\nmax_backoff = 2\n"
        # Baseline: direct SMTP to smtp-sink.
        port = free_port()
        sink = start_smtp_sink(port)
        try:
            results.append(
                run(
                    "smtp (smtp-sink)",
                    tmp,
                    camp,
                    rcpts,
                    retry + f'[routes]\n"*" = "127.0.0.1:{port}"\n',
                    {},
                    a.workers,
                )
            )
        finally:
            sink.terminate()
            sink.wait(5)
        # Relay: aiosmtpd, STARTTLS + AUTH PLAIN.
        ca = trustme.CA()
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(sctx)
        ca_file = os.path.join(tmp, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                return "250 2.0.0 Ok: queued"

        def auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and data.password == b"pw"
            return AuthResult(success=ok, handled=False)

        rport = free_port()
        ctl = Controller(Handler(), hostname="127.0.0.1", port=rport, tls_context=sctx, require_starttls=True,
                         authenticator=auth, auth_required=True, decode_data=False)  # fmt: skip
        ctl.start()
        try:
            cfg = retry + (f'[transports.r]\nkind = "relay"\nhost = "127.0.0.1"\nport = {rport}\n'
                           f'ca_file = "{ca_file}"\nmax_connections = 16\n[routes]\n"*" = "r"\n')  # fmt: skip
            results.append(run("relay (aiosmtpd, STARTTLS+AUTH)", tmp, camp, rcpts, cfg,
                               {"FASTSEND_R_USERNAME": "u", "FASTSEND_R_PASSWORD": "pw"}, a.workers))  # fmt: skip
        finally:
            ctl.stop()
        rec = Recorder()
        with ThreadedApp(sendgrid_app("k", rec)) as app:
            cfg = (
                retry
                + f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\nmax_connections = 32\n[routes]\n"*" = "sg"\n'
            )
            results.append(
                run(
                    "sendgrid (local server)",
                    tmp,
                    camp,
                    rcpts,
                    cfg,
                    {"FASTSEND_SG_API_KEY": "k"},
                    a.workers,
                )
            )
        rec = Recorder()
        with ThreadedApp(mailgun_app("k", rec, "mg.example.com")) as app:
            cfg = retry + (f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\ndomain = "mg.example.com"\n'
                           'max_connections = 32\n[routes]\n"*" = "mg"\n')  # fmt: skip
            results.append(
                run(
                    "mailgun (local server)",
                    tmp,
                    camp,
                    rcpts,
                    cfg,
                    {"FASTSEND_MG_API_KEY": "k"},
                    a.workers,
                )
            )
        import boto3
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        try:
            host, mport = moto.get_host_and_port()
            url = f"http://{host}:{mport}"
            boto3.client("sesv2", endpoint_url=url, region_name="eu-west-1", aws_access_key_id="AKIDBENCH",
                         aws_secret_access_key="s").create_email_identity(EmailIdentity="sender.example.com")  # fmt: skip
            cfg = retry + (f'[transports.ses-bench]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{url}"\n'
                           'max_connections = 32\n[routes]\n"*" = "ses-bench"\n')  # fmt: skip
            results.append(run("ses (moto server)", tmp, camp, rcpts, cfg,
                               {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "s"}, a.workers))  # fmt: skip
        finally:
            moto.stop()

    base = results[0]
    print(
        f"machine: {machine()} (shared with other jobs: figures are noisy; CPU/message is steadier)"
    )
    print(
        f"settings: {n} personalised messages (~1.9 KB), {a.workers} workers, DKIM off, loopback endpoints"
    )
    print(
        f"{'transport':36} {'msgs/s':>9} {'CPU us/msg':>11} {'vs smtp (msgs/s)':>17} {'vs smtp (CPU)':>14}"
    )
    bad = False
    for r in results:
        if r["delivered"] != n:
            bad = True
        print(f"{r['tag']:36} {r['msgs_per_s']:9.0f} {r['cpu_us_per_msg']:11.0f} "
              f"{r['msgs_per_s'] / base['msgs_per_s']:17.2f} {r['cpu_us_per_msg'] / base['cpu_us_per_msg']:14.2f}")  # fmt: skip
    print(json.dumps(results))
    if bad:
        print("a transport did not deliver every message", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
