"""End to end: `fastsend send` of N personalised ~4 KB messages to Postfix's
smtp-sink on loopback, against Postfix's smtp-source at its best concurrency on
the same sink, in the same run.

Prints, for both: messages/s and client CPU microseconds per message (for
fastsend: the supervisor and every worker, from the kernel's rusage of the
whole process tree), fastsend's peak memory (PSS) (sum over its processes, sampled), and
the ratios. `--million` adds a 1,000,000-recipient run that shows total memory
stays flat (goal: under 1 GB). Exits non-zero when a number cannot be measured.

    python bench/end_to_end.py                 # 200,000 messages
    python bench/end_to_end.py --quick         # 20,000
    python bench/end_to_end.py --million       # plus the 1M-recipient memory run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import orjson
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from _common import free_port, machine, run_smtp_source, start_smtp_sink

CAMPAIGN = """\
from = "Bench <bench@sender.example.com>"
subject = "Your report, {{ name }}"
text = \"\"\"Hello {{ name }},

Account {{ account }}, plan {{ plan }}.
FILLER
\"\"\"
"""


def write_inputs(tmp: str, n: int, size: int) -> tuple[str, str]:
    """A ~size-byte message: a static body with three per-recipient variables
    (how real campaigns personalise), and an n-row CSV list."""
    camp = os.path.join(tmp, "campaign.toml")
    filler = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[: max(0, size - 450)]
    with open(camp, "w") as f:
        f.write(CAMPAIGN.replace("FILLER", filler))
    rcpts = os.path.join(tmp, f"r{n}.csv")
    plans = ("free", "pro", "team")
    with open(rcpts, "w") as f:
        f.write("email,name,account,plan\n")
        for i in range(n):
            f.write(f"user{i}@d{i % 100}.example.net,Name{i},A{i:09d},{plans[i % 3]}\n")
    return camp, rcpts


class RSSSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = False

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop:
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        # PSS: shared pages (forked code, the rings) counted once overall.
                        rss += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            time.sleep(0.05)


def run_fastsend(
    camp: str, rcpts: str, port: int, tmp: str, workers: int, tag: str, dkim: bool = False
) -> dict:
    spool = os.path.join(tmp, f"spool-{tag}")
    cmd = [
        sys.executable,
        "-m",
        "fastsend",
        "send",
        camp,
        "-r",
        rcpts,
        "--route",
        f"*=127.0.0.1:{port}",
        "--source-ip",
        "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5",
        "--workers",
        str(workers),
        "--spool",
        spool,
        "--json",
        "--no-progress",
    ]
    if not dkim:
        cmd.append("--no-dkim")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = RSSSampler(proc.pid)
    sampler.start()
    out = b""
    # Read stdout while waiting (it is small), then reap with rusage of the whole tree.
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fastsend send failed: {err[-2000:]}")
    summary = orjson.loads(out.decode().strip().splitlines()[-1])
    summary["wall_s"] = wall
    summary["cpu_s"] = ru.ru_utime + ru.ru_stime
    summary["peak_pss_mb"] = sampler.peak / 1e6
    return summary


def _sign_loop(key_pem: bytes, seconds: float, q: Any) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key = serialization.load_pem_private_key(key_pem, None)
    data = b"x" * 64
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg]
        n += 1
    q.put(n / (time.perf_counter() - t0))


def openssl_sign_rate(key_pem: bytes, procs: int, seconds: float = 3.0) -> float:
    """RSA-2048 signatures per second with OpenSSL alone, one process per core."""
    import multiprocessing as mp

    q: Any = mp.Queue()
    ps = [mp.Process(target=_sign_loop, args=(key_pem, seconds, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    rates = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return float(sum(rates))


def dkim_run(tmp: str, port: int, workers: int, n: int, size: int) -> None:
    key_path = os.path.join(tmp, "dkim.pem")
    subprocess.run(
        [sys.executable, "-m", "fastsend", "dkim", "keygen", "--domain", "sender.example.com",
         "--selector", "b1", "--bits", "2048", "--out", key_path, "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    camp, rcpts = write_inputs(tmp, n, size)
    with open(camp, "a") as f:
        f.write(f'[dkim]\ndomain = "sender.example.com"\nselector = "b1"\nkey = "{key_path}"\n')
    with open(key_path, "rb") as f:
        pem = f.read()
    base = openssl_sign_rate(pem, os.cpu_count() or 1)
    fs = run_fastsend(camp, rcpts, port, tmp, workers, "dkim", dkim=True)
    rate = fs["msgs_per_s"]
    cores = os.cpu_count() or 1
    cpu_us = fs["cpu_s"] / n * 1e6
    sign_us = cores / base * 1e6
    print(
        f"DKIM rsa-sha256 2048: fastsend send {rate:.0f} msg/s signed and delivered"
        f" ({cpu_us:.0f} us CPU/msg, all processes); OpenSSL alone on {cores} cores:"
        f" {base:.0f} signatures/s ({sign_us:.0f} us CPU/signature)"
    )
    print(f"ratio rate (DKIM)            : {rate / base:.2f}x  (DESIGN target >= 0.85x)")
    print(
        f"ratio CPU (OpenSSL/fastsend) : {sign_us / cpu_us:.2f}x  (the share of fastsend's"
        " CPU per message that is the signature itself)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--sessions", default="5,10,20,50", help="smtp-source -s values to try")
    ap.add_argument("--quick", action="store_true", help="20,000 messages")
    ap.add_argument("--million", action="store_true", help="add the 1M-recipient RSS run")
    ap.add_argument(
        "--dkim",
        action="store_true",
        help="add a run signing rsa-sha256 (2048-bit) vs OpenSSL signing alone on every core",
    )
    args = ap.parse_args()
    n = 20_000 if args.quick else args.messages
    workers = args.workers or (os.cpu_count() or 1)
    print(f"machine: {machine()}")
    print(
        f"settings: {n} messages of ~{args.size} B, personalised; smtp-sink on 127.0.0.1;"
        f" fastsend {workers} workers, 4 source IPs, no DKIM"
    )
    port = free_port()
    sink = start_smtp_sink(port)
    try:
        with tempfile.TemporaryDirectory(prefix="fastsend-e2e-") as tmp:
            camp, rcpts = write_inputs(tmp, n, args.size)
            base = []
            for s in (int(x) for x in args.sessions.split(",")):
                wall, cpu = run_smtp_source(port, s, n, args.size)
                base.append((n / wall, cpu / n * 1e6, s))
                print(
                    f"smtp-source -s {s:3d}: {n / wall:9.0f} msg/s  {cpu / n * 1e6:6.1f} us CPU/msg"
                )
            b_rate, b_cpu, b_s = max(base)
            fs = run_fastsend(camp, rcpts, port, tmp, workers, "main")
            if fs["delivered"] != n:
                print(f"fastsend delivered {fs['delivered']} of {n}", file=sys.stderr)
                return 1
            f_rate_total = n / fs["wall_s"]
            f_rate = fs["msgs_per_s"]
            f_cpu = fs["cpu_s"] / n * 1e6
            print(
                f"fastsend send      : {f_rate:9.0f} msg/s delivering"
                f" ({f_rate_total:.0f} msg/s including spooling the list and start-up),"
                f" {f_cpu:6.1f} us CPU/msg (all processes), peak memory (PSS) {fs['peak_pss_mb']:.0f} MB"
            )
            print(
                f"baseline: smtp-source at its best concurrency (-s {b_s}): {b_rate:.0f} msg/s,"
                f" {b_cpu:.1f} us CPU/msg"
            )
            print(f"ratio rate (delivery phase) : {f_rate / b_rate:.2f}x  (goal >= 1.0x)")
            print(f"ratio rate (whole command)  : {f_rate_total / b_rate:.2f}x")
            print(
                f"ratio CPU per message       : {f_cpu / b_cpu:.2f}x  (smtp-source is C with no"
                " spool; informational)"
            )
            if args.dkim:
                dkim_run(tmp, port, workers, min(n, 40_000), args.size)
            if args.million:
                m = 1_000_000
                camp2, rcpts2 = write_inputs(tmp, m, args.size)
                big = run_fastsend(camp2, rcpts2, port, tmp, workers, "million")
                print(
                    f"1,000,000 recipients: delivered {big['delivered']}, {big['msgs_per_s']:.0f}"
                    f" msg/s, peak memory (PSS) of all fastsend processes {big['peak_pss_mb']:.0f} MB"
                    f" (goal < 1000 MB): {'OK' if big['peak_pss_mb'] < 1000 else 'OVER'}"
                )
                if big["delivered"] != m:
                    return 1
    finally:
        sink.terminate()
        sink.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
