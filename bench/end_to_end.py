"""End to end: `fastsend send` of N personalised ~4 KB messages to Postfix's
smtp-sink on loopback, against Postfix's smtp-source on the same sink, in the
same run.

The headline is the whole command, timed as smtp-source is: from process launch
to exit (fastsend: reading the list, spooling it, start-up, delivery, shutdown).
The delivery phase alone (fastsend's own summary) follows, labelled as such.
What each side delivered is checked against the sink's own count (smtp-sink
-c), not only fastsend's spool. Message sizes are equal: one message of each
client is captured by a `fastsend sink --save` first, and smtp-source's -l is
set so that its messages are as large as fastsend's (both sizes are printed).

Each setting runs --repeat times (default 3), interleaved (smtp-source at every
session count, then fastsend, then again), so load on a shared machine hits
both alike; medians are shown with min-max. smtp-source's best session count
(by median rate) is the baseline; each ratio is also shown per repeat, against
the smtp-source run just before that fastsend run (the VM's speed drifts, up to
~1.8x over a day; adjacent runs share its state), and a fixed pure-Python loop
timed before, between and after the repeats shows that state. CPU is user+system of the whole process tree
from the kernel (wait4), so fastsend's supervisor and every worker count; the
supervisor/worker split comes from fastsend's summary.

The workers' CPU per message is also held against fastsend's own SMTP client
alone (bench/smtp_throughput.py's client: pipelined connections on uvloop, no
spool, no rendering, no shaping), run on the same sink in each repeat, like
for like: as many client processes as workers, at once, each with the
connections a worker holds to the site (max_connections x its source IPs),
groups of [delivery] pipeline, a new connection every
max_messages_per_connection messages. Goal: workers <= 1.3x its send phase.
(One client process with 20 connections, the baseline of earlier runs, is
printed too: it has a core to itself and fewer sockets, so it is cheaper per
message than the same client run the way the workers run.)

Prints the machine, the settings, both sides and the ratios; exits non-zero
when a side could not be measured or delivered fewer than all messages.

    python bench/end_to_end.py                 # 100,000 messages, 3 repeats
    python bench/end_to_end.py --quick         # 20,000
    python bench/end_to_end.py --million       # plus the 1M-recipient memory run
    python bench/end_to_end.py --dkim          # plus rsa-2048 signing vs OpenSSL, and what
        # DKIM adds beyond the signature (the same send unsigned, interleaved)
    python bench/end_to_end.py --suppression 100000 [--only-suppression]
        # plus the cost of checking the suppression list again at dispatch: a list
        # of that many rows (none of them a recipient), the check off and on,
        # interleaved, --repeat runs each (goal: < 2% of throughput)
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
from _common import (
    SmtpSink,
    compile_bytecode,
    fmt_mr,
    free_port,
    machine,
    median_range,
    program,
)
from smtp_throughput import measure_fastsend as measure_client
from smtp_throughput import measure_fastsend_parallel as measure_clients

CAMPAIGN = """\
from = "Bench <bench@sender.example.com>"
subject = "Your report, {{ name }}"
text = \"\"\"Hello {{ name }},

Account {{ account }}, plan {{ plan }}.
FILLER
\"\"\"
"""


CLIENT_CONNECTIONS = 20  # the earlier baseline: one process (bench/smtp_throughput.py's client)
SOURCE_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def worker_shape(workers: int) -> tuple[int, int, int]:
    """(connections per worker, envelopes per pipelined group, messages per
    connection) of ``fastsend send`` as this bench runs it: the [delivery]
    defaults and the source IPs each worker owns (Config.ips_for_worker)."""
    from fastsend.config import Config

    c = Config(source_ips=list(SOURCE_IPS), workers=workers)
    d = c.delivery
    per_worker = [d.max_connections * len(c.ips_for_worker(i)) for i in range(workers)]
    return max(per_worker), d.pipeline, d.max_messages_per_connection


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
    """Peak PSS of a process tree, sampled every ``interval`` seconds.

    Reading smaps_rollup walks every page table of every process, ~0.6 ms per
    process here: at 20 samples a second it took ~0.5 s of CPU per 100k send
    (a sixth of fastsend's own CPU) from the machine fastsend shares with its
    receiver, during fastsend's runs only. Four samples a second cost ~1% and
    still see the plateau of a multi-second send; ``cpu_s`` is what it took."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.cpu_s = 0.0
        self.stop = False

    def run(self) -> None:
        c0 = time.thread_time()
        try:
            self._sample()
        finally:
            self.cpu_s = time.thread_time() - c0

    def _sample(self) -> None:
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
            time.sleep(self.interval)


def run_fastsend(
    camp: str,
    rcpts: str,
    port: int,
    tmp: str,
    workers: int,
    tag: str,
    dkim: bool = False,
    config: str = "",
    suppression_rows: int = 0,
    cpus: str = "",
) -> dict:
    spool = os.path.join(tmp, f"spool-{tag}")
    if suppression_rows:
        fill_suppression(spool, suppression_rows)
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
        ",".join(SOURCE_IPS),
        "--workers",
        str(workers),
        "--spool",
        spool,
        "--json",
        "--no-progress",
    ]
    if not dkim:
        cmd.append("--no-dkim")
    if config:
        cmd += ["-c", config]
    if cpus:  # taskset execs the command: the same process, its rusage
        cmd = ["taskset", "-c", cpus, *cmd]
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
    summary["wall_s"] = wall  # launch to exit, as smtp-source is timed
    summary["cpu_s"] = ru.ru_utime + ru.ru_stime  # the whole process tree
    summary["peak_pss_mb"] = sampler.peak / 1e6
    summary["sampler_cpu_s"] = sampler.cpu_s
    return summary


def fill_suppression(spool: str, rows: int) -> None:
    """A suppression list of ``rows`` addresses (none of them a bench recipient)."""
    from fastsend.suppression import SuppressionList

    os.makedirs(spool, exist_ok=True)
    with SuppressionList(os.path.join(spool, "suppression.db")) as s:
        s.add_entries(
            ("default", f"gone{i}@d{i % 100}.example.net", "userunknown", "import", None)
            for i in range(rows)
        )


def suppression_run(
    tmp: str, camp: str, rcpts: str, sink: SmtpSink, workers: int, n: int, rows: int, repeat: int
) -> bool:
    """The dispatch-time suppression check off and on, the same ``rows``-row list in
    both (so the accept-time check costs the same), interleaved: delivery-phase
    rate and supervisor CPU per message (where the check runs)."""
    confs = {}
    for on in (False, True):
        confs[on] = os.path.join(tmp, f"check-{on}.toml")
        with open(confs[on], "w") as f:
            f.write(f"[delivery]\ncheck_suppression = {'true' if on else 'false'}\n")
    res: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    ok = True
    for rep in range(repeat):
        for on in (False, True) if rep % 2 == 0 else (True, False):  # order bias cancels
            before = sink.messages()
            r = run_fastsend(camp, rcpts, sink.port, tmp, workers, f"supp-{on}-{rep}",
                             config=confs[on], suppression_rows=rows)  # fmt: skip
            if r["delivered"] != n or sink.messages() - before != n:
                print(f"suppression run: delivered {r['delivered']} of {n}", file=sys.stderr)
                ok = False
            res[on].append(r)
    med = {}
    for on in (False, True):
        d = [r["msgs_per_s"] for r in res[on]]
        w = [n / r["wall_s"] for r in res[on]]
        sup = [r["supervisor_cpu_s"] / n * 1e6 for r in res[on]]
        cpu = [r["cpu_s"] / n * 1e6 for r in res[on]]
        print(
            f"dispatch-time suppression check {'on ' if on else 'off'}: delivery phase"
            f" {fmt_mr(d)} msg/s, whole command {fmt_mr(w)} msg/s, supervisor"
            f" {fmt_mr(sup, '.2f')} us CPU/msg, all processes {fmt_mr(cpu, '.1f')} us CPU/msg"
        )
        med[on] = (median_range(d)[0], median_range(sup)[0], median_range(cpu)[0])
    (d0, s0, c0), (d1, s1, c1) = med[False], med[True]
    print(
        f"cost of the dispatch-time check, {rows:,}-row list: delivery rate"
        f" {(1 - d1 / d0) * 100:+.1f}% (goal < 2%), supervisor CPU {s1 - s0:+.2f} us/msg,"
        f" all processes {(c1 / c0 - 1) * 100:+.1f}% CPU/msg"
    )
    # The check itself, timed alone (less noisy than the end-to-end difference on a
    # shared machine): the supervisor's lookup for one claim of `window` messages.
    from fastsend.suppression import SuppressionList

    with SuppressionList(os.path.join(tmp, "spool-supp-True-0", "suppression.db")) as sl:
        addrs = [f"user{i}@d{i % 100}.example.net" for i in range(4000)]
        t0, k = time.process_time(), 0
        while time.process_time() - t0 < 1.0:
            sl.reasons_many(addrs)
            k += 1
        per = (time.process_time() - t0) / (k * len(addrs)) * 1e6
    print(
        f"the check alone: {per:.2f} us CPU per message (claims of {len(addrs)}) ="
        f" {per / c0 * 100:.1f}% of fastsend's CPU per message,"
        f" {per / s0 * 100:.1f}% of the supervisor's"
    )
    return ok


FLOOR_SWING = 0.15  # the OpenSSL floor's before/after difference beyond which the ratio is flagged


def openssl_floor(procs: int, cpus: str = "") -> float:
    """RSA-2048 signatures per second of `openssl speed -multi PROCS rsa2048`
    (on the cores ``cpus`` names, with taskset, when given)."""
    out = subprocess.run(
        [*(["taskset", "-c", cpus] if cpus else []),
         "openssl", "speed", "-seconds", "3", "-multi", str(procs), "rsa2048"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        f = line.split()
        if line.startswith("rsa 2048 bits") or (len(f) > 5 and f[:3] == ["rsa", "2048", "bits"]):
            return float(f[5])
    raise SystemExit("could not measure `openssl speed -multi N rsa2048`")


def sign_cpu_us(key_path: str, seconds: float = 1.0) -> tuple[float, float]:
    """CPU microseconds of one rsa-sha256 signature with ``key_path`` in this
    process: (fastsend's signer, as a worker calls it: ``RsaSigner`` over a
    one-line header block; `cryptography`'s ``sign``, for reference)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from fastsend.message.dkim import rsa_signer
    from fastsend.message.keys import load_private_key

    key = load_private_key(key_path)
    signer = rsa_signer(key)  # type: ignore[arg-type]
    data, pad, sha = b"x" * 600, padding.PKCS1v15(), hashes.SHA256()
    lines = (data,)

    def cpu(fn: Any) -> float:
        t0, k = time.process_time(), 0
        while time.process_time() - t0 < seconds:
            fn()
            k += 1
        return (time.process_time() - t0) / k * 1e6

    return (
        cpu(lambda: signer.sign_lines(lines, b"b=", b"b=", False)),
        cpu(lambda: key.sign(data, pad, sha)),  # type: ignore[union-attr, call-arg]
    )


def dkim_run(
    tmp: str, sink: SmtpSink, workers: int, n: int, size: int, repeat: int, pin: bool = False
) -> bool:
    """``fastsend send`` signing rsa-sha256 (2048) against `openssl speed -multi
    N rsa2048`, the same send without DKIM interleaved (what DKIM adds beyond
    the signature), and the arithmetic of what the goal can reach here.

    ``pin``: the floor "on the cores used", with the receiver off them: the last
    core is smtp-sink's alone (sched_setaffinity), fastsend (supervisor and one
    worker per remaining core) and `openssl speed -multi N` run on the others
    (taskset), as a sender and a remote receiver would."""
    cpus = ""
    if pin:
        ncpu = os.cpu_count() or 1
        if ncpu < 2:
            raise SystemExit("--dkim-pin needs two cores or more (one is the receiver's)")
        workers = ncpu - 1
        cpus = f"0-{workers - 1}" if workers > 1 else "0"
        os.sched_setaffinity(sink.proc.pid, {ncpu - 1})
        print(
            f"pinned: fastsend send (supervisor + {workers} worker(s)) and the OpenSSL floor on"
            f" core(s) {cpus}; smtp-sink alone on core {ncpu - 1}"
        )
    key_path = os.path.join(tmp, "dkim.pem")
    subprocess.run(
        [sys.executable, "-m", "fastsend", "dkim", "keygen", "--domain", "sender.example.com",
         "--selector", "b1", "--bits", "2048", "--out", key_path, "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    camp, rcpts = write_inputs(tmp, n, size)
    camp_dkim = os.path.join(tmp, "campaign-dkim.toml")
    with open(camp) as src, open(camp_dkim, "w") as f:
        f.write(src.read())
        f.write(f'[dkim]\ndomain = "sender.example.com"\nselector = "b1"\nkey = "{key_path}"\n')
    # The floor before and after the runs, averaged: load on a shared machine
    # changes over a run, and both sides should see the same.
    floor_before = openssl_floor(workers, cpus)
    sign_before = sign_cpu_us(key_path)
    ok = True
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for rep in range(repeat):
        for signed in (True, False) if rep % 2 == 0 else (False, True):
            before, sink_cpu0 = sink.messages(), sink.cpu_s()
            fs = run_fastsend(camp_dkim if signed else camp, rcpts, sink.port, tmp, workers,
                              f"dkim{rep}-{signed}", dkim=signed, cpus=cpus)  # fmt: skip
            fs["sink_cpu_s"] = sink.cpu_s() - sink_cpu0
            got = sink.messages() - before
            if got != n or fs["delivered"] != n:
                what = "DKIM" if signed else "no-DKIM"
                print(f"{what} run: spool {fs['delivered']}, sink counted {got}, of {n}",
                      file=sys.stderr)  # fmt: skip
                ok = False
            runs[signed].append(fs)
    floor_after = openssl_floor(workers, cpus)
    base = (floor_before + floor_after) / 2
    sign_after = sign_cpu_us(key_path)
    sign_us = min(sign_before[0], sign_after[0])
    crypto_us = min(sign_before[1], sign_after[1])

    def per_process(rs: list[dict[str, Any]]) -> dict[str, list[float]]:
        return {
            "all fastsend processes": [f["cpu_s"] / n * 1e6 for f in rs],
            "supervisor": [f["supervisor_cpu_s"] / n * 1e6 for f in rs],
            "workers": [sum(f["worker_cpu_s"]) / n * 1e6 for f in rs],
            "smtp-sink (the receiver)": [f["sink_cpu_s"] / n * 1e6 for f in rs],
        }

    per, plain = per_process(runs[True]), per_process(runs[False])
    rates = [n / f["wall_s"] for f in runs[True]]
    print(
        f"DKIM rsa-sha256 2048, {n} messages, {repeat} runs: fastsend send (whole command)"
        f" {fmt_mr(rates)} msg/s; delivery phase"
        f" {fmt_mr([f['msgs_per_s'] for f in runs[True]])} msg/s; sink counted"
        f" {n if ok else 'FEWER'} each"
    )
    print("  CPU per message, by process (us), signed: " + "; ".join(
        f"{k} {fmt_mr(v, '.1f')}" for k, v in per.items()
    ))  # fmt: skip
    # How evenly the workers shared the signing: the busiest worker's share of
    # the workers' CPU (50% with two: both ended together, no core idle).
    shares = [max(f["worker_cpu_s"]) / max(1e-9, sum(f["worker_cpu_s"])) * 100 for f in runs[True]]
    print(f"  busiest worker's share of the workers' CPU, signed: {fmt_mr(shares, '.0f')}%"
          f" (even: {100 / workers:.0f}%)")  # fmt: skip
    print("  the same send without DKIM, interleaved (us): " + "; ".join(
        f"{k} {fmt_mr(v, '.1f')}" for k, v in plain.items()
    ))  # fmt: skip
    floor_us = workers * 1e6 / base  # CPU per signature of the floor, on these cores
    print(
        f"OpenSSL floor: `openssl speed -multi {workers} rsa2048`: {base:.0f} signs/s"
        f" (mean of {floor_before:.0f} before and {floor_after:.0f} after the runs) ="
        f" {floor_us:.0f} us per signature on {workers} cores; one signature here (CPU"
        f" time): fastsend's signer {sign_us:.0f} us, cryptography's sign {crypto_us:.0f} us"
    )
    med = {k: median_range(v)[0] for k, v in per.items()}
    med0 = {k: median_range(v)[0] for k, v in plain.items()}
    fs_us, sink_us = med["all fastsend processes"], med["smtp-sink (the receiver)"]
    fs0_us, sink0_us = med0["all fastsend processes"], med0["smtp-sink (the receiver)"]
    beyond = fs_us - fs0_us - sign_us
    print(
        f"  DKIM beyond the signature: {fs_us:.1f} - {fs0_us:.1f} (unsigned) - {sign_us:.0f}"
        f" (signature) = {beyond:+.1f} us/msg (workers"
        f" {med['workers'] - med0['workers'] - sign_us:+.1f}, supervisor"
        f" {med['supervisor'] - med0['supervisor']:+.1f}, smtp-sink {sink_us - sink0_us:+.1f})"
    )
    # What the ratio can reach when every core is busy: the floor's signatures
    # per CPU-second against fastsend's (and, on shared cores, the receiver's)
    # CPU per message. Pinned, the receiver has a core of its own.
    recv, recv0 = (0.0, 0.0) if pin else (sink_us, sink0_us)
    cap = sign_us / (fs_us + recv)
    alone = sign_us / fs_us
    ceiling = sign_us / (sign_us + fs0_us + recv0)
    need = sign_us / 0.95 - sign_us
    where = "the receiver on a core of its own" if pin else "cores shared with the receiver"
    print(
        f"  cap on {workers} core(s), {where}: signature / (all fastsend"
        f"{'' if pin else ' + smtp-sink'}) CPU per message = {sign_us:.0f} /"
        f" {fs_us + recv:.0f} = {cap:.2f}x; fastsend alone (the receiver elsewhere):"
        f" {sign_us:.0f} / {fs_us:.0f} = {alone:.2f}x"
    )
    print(
        f"  the goal's ceiling here, even if DKIM cost only the signature: {sign_us:.0f} /"
        f" ({sign_us:.0f} + {fs0_us:.1f} unsigned send + {recv0:.1f} receiver) ="
        f" {ceiling:.2f}x; 0.95x needs everything but the signature <= {need:.1f} us/msg"
        + ("" if ceiling >= 0.95 else f": OUT OF REACH on {workers} core(s), {where}")
    )
    f_rate = median_range(rates)[0]
    print(
        f"ratio rate (DKIM, whole command / OpenSSL floor): {f_rate / base:.2f}x  (goal >= 0.95x;"
        f" {f_rate / base / cap * 100:.0f}% of the cap)"
    )
    # The floor is measured before and after the runs: when it moved, the
    # machine's load changed meanwhile and the ratio is not one condition's.
    swing = max(floor_before, floor_after) / max(1e-9, min(floor_before, floor_after)) - 1
    if swing > FLOOR_SWING:
        print(
            f"  UNRELIABLE: the floor moved {swing * 100:.0f}% between before and after the runs"
            f" (> {FLOOR_SWING * 100:.0f}%: the load changed); the ratio against the floor"
            f" before would be {f_rate / floor_before:.2f}x, after {f_rate / floor_after:.2f}x"
        )
    return ok


def startup_run(tmp: str, camp: str, sink: SmtpSink, workers: int, repeat: int) -> None:
    """A one-message `fastsend send`: what start-up and shutdown cost per command
    (wall and CPU from launch to exit, all processes)."""
    one = os.path.join(tmp, "one-bench.csv")
    with open(one, "w") as f:
        f.write("email,name,account,plan\nuser1@d1.example.net,Name1,A000000001,pro\n")
    runs = [run_fastsend(camp, one, sink.port, tmp, workers, f"one{i}") for i in range(repeat)]
    if any(r["delivered"] != 1 for r in runs):
        raise SystemExit("the one-message send did not deliver")
    print(
        f"fastsend send of 1 message ({workers} workers; start-up, spooling, delivery,"
        f" shutdown): wall {fmt_mr([r['wall_s'] for r in runs], '.3f')} s, CPU (all"
        f" processes) {fmt_mr([r['cpu_s'] for r in runs], '.3f')} s"
    )


def run_source(port: int, sessions: int, count: int, length: int) -> tuple[float, float]:
    """smtp-source -d (persistent sessions, no pipelining): (wall s, CPU s), from launch."""
    cmd = [program("smtp-source"), "-4", "-d", "-s", str(sessions), "-m", str(count)]
    cmd += ["-l", str(length), "-f", "bench@example.com", "-t", "rcpt@example.net"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"smtp-source failed with status {status}")
    return wall, ru.ru_utime + ru.ru_stime


def calibrate(tmp: str, camp: str, size: int) -> tuple[int, int, int]:
    """Capture one message of each client in a `fastsend sink --save`: returns
    (fastsend's message size, smtp-source's -l giving the same size, that size)."""
    from fastsend.sink import SinkProcess

    save = os.path.join(tmp, "calibrate")
    one = os.path.join(tmp, "one.csv")
    with open(one, "w") as f:
        f.write("email,name,account,plan\nuser55555@d55.example.net,Name55555,A000055555,pro\n")
    with SinkProcess("--save", save) as sp:
        fs = run_fastsend(camp, one, sp.port, tmp, 1, "calibrate")
        if fs["delivered"] != 1:
            raise SystemExit("calibration: fastsend did not deliver")
        names = sorted(os.listdir(save))
        fs_size = os.path.getsize(os.path.join(save, names[0]))
        run_source(sp.port, 1, 1, size)
        deadline = time.monotonic() + 5
        while len(os.listdir(save)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        other = [x for x in os.listdir(save) if x not in names]
        if not other:
            raise SystemExit("calibration: smtp-source's message did not arrive")
        src_size = os.path.getsize(os.path.join(save, other[0]))
    length = max(1, size - (src_size - fs_size))
    return fs_size, length, src_size - size + length


def host_probe() -> float:
    """Milliseconds of process CPU a fixed pure-Python loop takes: the VM's
    speed at that moment (it swings by up to ~1.8x over the day here)."""
    t0 = time.process_time()
    x = 0
    for i in range(2_000_000):
        x += i & 7
    return (time.process_time() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--sessions", default="10,20,50", help="smtp-source -s values to try")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats (medians shown)")
    ap.add_argument("--quick", action="store_true", help="20,000 messages")
    ap.add_argument("--million", action="store_true", help="add the 1M-recipient memory run")
    ap.add_argument(
        "--dkim",
        action="store_true",
        help="add a run signing rsa-sha256 (2048-bit) vs `openssl speed -multi N rsa2048`",
    )
    ap.add_argument(
        "--suppression",
        type=int,
        default=0,
        metavar="ROWS",
        help="add runs with the dispatch-time suppression check off and on, a ROWS-row list",
    )
    ap.add_argument("--only-suppression", action="store_true", help="only the --suppression runs")
    ap.add_argument("--only-dkim", action="store_true", help="only the --dkim run")
    ap.add_argument(
        "--dkim-pin",
        action="store_true",
        help="the --dkim run with smtp-sink alone on the last core, fastsend and the"
        " OpenSSL floor on the others",
    )
    args = ap.parse_args()
    args.dkim = args.dkim or args.only_dkim or args.dkim_pin
    n = 20_000 if args.quick else args.messages
    workers = args.workers or (os.cpu_count() or 1)
    sessions = [int(x) for x in args.sessions.split(",")]
    ok = True
    bytecode = compile_bytecode("fastsend")
    with tempfile.TemporaryDirectory(prefix="fastsend-e2e-") as tmp:
        camp, rcpts = write_inputs(tmp, n, args.size)
        fs_size, src_len, src_size = calibrate(tmp, camp, args.size)
        print(f"machine: {machine()} (shared: wall-clock figures are noisy; CPU/msg less so)")
        print(bytecode)
        print(
            f"settings: {n} messages, {args.repeat} interleaved repeats, medians (min-max);"
            f" Postfix smtp-sink on 127.0.0.1 counts what arrives.\n"
            f"  fastsend send: {workers} workers, 4 source IPs, no DKIM, personalised"
            f" messages of {fs_size} B, spool on {tmp}\n"
            f"  smtp-source -d -s {args.sessions} -l {src_len}: messages of {src_size} B"
            " (no pipelining, no spool)"
        )
        sink = SmtpSink(free_port())
        src: dict[int, list[tuple[float, float]]] = {s: [] for s in sessions}
        src_sink: dict[int, list[float]] = {s: [] for s in sessions}  # smtp-sink us CPU/msg
        fsr: list[dict[str, Any]] = []
        alone: list[tuple[float, float, float, float]] = []  # fastsend's SMTP client alone
        alone1: list[tuple[float, float, float, float]] = []  # ... one process, 20 connections
        conns, group, per_conn = worker_shape(workers)
        try:
            if args.suppression:
                rows = args.suppression
                ok = suppression_run(tmp, camp, rcpts, sink, workers, n, rows, args.repeat)
                if args.only_suppression:
                    return 0 if ok else 1
            if args.only_dkim:
                ok = dkim_run(tmp, sink, workers, min(n, 20_000), args.size, args.repeat,
                              args.dkim_pin)  # fmt: skip
                return 0 if ok else 1
            startup_run(tmp, camp, sink, workers, args.repeat)
            probes = [host_probe()]
            for rep in range(args.repeat):
                if rep:
                    probes.append(host_probe())
                for s in sessions:
                    before, sink0 = sink.messages(), sink.cpu_s()
                    wall, cpu = run_source(sink.port, s, n, src_len)
                    got = sink.messages() - before
                    src_sink[s].append((sink.cpu_s() - sink0) / n * 1e6)
                    if got != n:
                        print(f"smtp-source -s {s}: sink counted {got} of {n}", file=sys.stderr)
                        ok = False
                    src[s].append((n / wall, cpu / n * 1e6))
                before, sink0 = sink.messages(), sink.cpu_s()
                fs = run_fastsend(camp, rcpts, sink.port, tmp, workers, f"r{rep}")
                fs["sink_got"] = sink.messages() - before
                fs["sink_cpu_s"] = sink.cpu_s() - sink0
                if fs["delivered"] != n or fs["sink_got"] != n:
                    print(
                        f"fastsend: spool says {fs['delivered']} delivered, sink counted"
                        f" {fs['sink_got']}, of {n}",
                        file=sys.stderr,
                    )
                    ok = False
                fsr.append(fs)
                # The workers' baseline: fastsend's SMTP client alone (no spool,
                # no render), bench/smtp_throughput.py's client, same sink, run
                # the way the workers run (processes, connections, groups).
                before = sink.messages()
                got_alone = measure_clients(sink.port, workers, conns, n, group, per_conn)
                if got_alone is None or sink.messages() - before != n:
                    print("fastsend's client alone could not be measured", file=sys.stderr)
                    ok = False
                else:
                    alone.append(got_alone)
                before = sink.messages()
                got_alone = measure_client(sink.port, CLIENT_CONNECTIONS, n, group)
                if got_alone is not None and sink.messages() - before == n:
                    alone1.append(got_alone)
            probes.append(host_probe())
            for s in sessions:
                rates = [r for r, _c in src[s]]
                cpus = [c for _r, c in src[s]]
                print(
                    f"smtp-source -d -s {s:<3}        : {fmt_mr(rates):>22} msg/s"
                    f"  {fmt_mr(cpus, '.1f'):>20} us CPU/msg; smtp-sink"
                    f" {fmt_mr(src_sink[s], '.1f')} us CPU/msg"
                )
            best = max(sessions, key=lambda s: median_range([r for r, _ in src[s]])[0])
            b_rate = median_range([r for r, _ in src[best]])[0]
            b_cpu = median_range([c for _, c in src[best]])[0]
            w_rates = [n / f["wall_s"] for f in fsr]
            w_cpu = [f["cpu_s"] / n * 1e6 for f in fsr]
            sup_cpu = [f["supervisor_cpu_s"] / n * 1e6 for f in fsr]
            wrk_cpu = [f["workers_cpu_s"] / n * 1e6 for f in fsr]
            d_rates = [f["msgs_per_s"] for f in fsr]
            print(
                f"fastsend send (whole command): {fmt_mr(w_rates):>22} msg/s"
                f"  {fmt_mr(w_cpu, '.1f'):>20} us CPU/msg (all processes)"
            )
            print(
                f"  of which supervisor {fmt_mr(sup_cpu, '.1f')} us, workers"
                f" {fmt_mr(wrk_cpu, '.1f')} us per message (the delivery phase);"
                f" delivery phase alone {fmt_mr(d_rates)} msg/s;"
                f" peak memory (PSS, all processes) {fmt_mr([f['peak_pss_mb'] for f in fsr])} MB"
                f" (sampled every 0.25 s by the bench, which took"
                f" {fmt_mr([f['sampler_cpu_s'] * 1e3 for f in fsr])} ms CPU per run)"
            )
            print(
                f"  each worker (us CPU/msg):"
                f" {[[round(c / n * 1e6, 1) for c in f['worker_cpu_s']] for f in fsr]};"
                f" smtp-sink receiving from fastsend"
                f" {fmt_mr([f['sink_cpu_s'] / n * 1e6 for f in fsr], '.1f')} us CPU/msg;"
                f" outside the delivery phase (launch to exit minus the phase)"
                f" {fmt_mr([f['wall_s'] - f['elapsed_s'] for f in fsr], '.3f')} s"
            )
            print(
                f"  delivered: spool {[f['delivered'] for f in fsr]},"
                f" counted by smtp-sink {[f['sink_got'] for f in fsr]}"
            )
            if alone:
                a_send = [a[3] for a in alone]
                w_med, a_med = median_range(wrk_cpu)[0], median_range(a_send)[0]
                if alone1:
                    a1 = [a[3] for a in alone1]
                    print(
                        f"fastsend's SMTP client alone, one process, {CLIENT_CONNECTIONS}"
                        f" connections (the earlier baseline, a core to itself): send phase"
                        f" {fmt_mr(a1, '.1f')} us CPU/msg; workers / it:"
                        f" {w_med / median_range(a1)[0]:.2f}x"
                    )
                print(
                    f"fastsend's SMTP client alone as the workers run ({workers} processes at"
                    f" once, {conns} connections each, groups of {group}, {per_conn} messages"
                    f" per connection, messages of ~4.3 KB, no spool, no render): send phase"
                    f" {fmt_mr(a_send, '.1f')} us CPU/msg, from launch"
                    f" {fmt_mr([a[1] for a in alone], '.1f')} us"
                )
                print(
                    f"ratio worker CPU/msg (fastsend workers / client alone, send phase):"
                    f" {w_med / a_med:.2f}x  (goal <= 1.3x)"
                )
            f_rate = median_range(w_rates)[0]
            f_cpu = median_range(w_cpu)[0]
            # Each repeat's fastsend run against the smtp-source run just before
            # it (best session count): the host's speed drifts over a minute
            # (the same smtp-source run costs 17-37 us/msg on this VM from one
            # hour to the next), and adjacent runs share its state.
            pair_rate = [n / f["wall_s"] / src[best][i][0] for i, f in enumerate(fsr)]
            pair_cpu = [w_cpu[i] / src[best][i][1] for i in range(len(fsr))]
            print(
                f"host speed (a fixed pure-Python loop, ms; lower is faster):"
                f" {' '.join(f'{x:.0f}' for x in probes)} (before, between repeats, after)"
            )
            print(
                f"baseline: smtp-source at its best session count (-s {best}):"
                f" {b_rate:.0f} msg/s, {b_cpu:.1f} us CPU/msg"
            )
            print(
                f"ratio msgs/s (whole command / smtp-source): {f_rate / b_rate:.2f}x  (goal >= 1.25x);"
                f" per adjacent pair {fmt_mr(pair_rate, '.2f')}"
            )
            print(
                f"ratio CPU/msg (fastsend / smtp-source)    : {f_cpu / b_cpu:.2f}x  (goal <= 1.0x);"
                f" per adjacent pair {fmt_mr(pair_cpu, '.2f')}"
            )
            if args.dkim:
                ok = dkim_run(tmp, sink, workers, min(n, 20_000), args.size, args.repeat,
                              args.dkim_pin) and ok  # fmt: skip
            if args.million:
                m = 1_000_000
                camp2, rcpts2 = write_inputs(tmp, m, args.size)
                before = sink.messages()
                big = run_fastsend(camp2, rcpts2, sink.port, tmp, workers, "million")
                got = sink.messages() - before
                print(
                    f"1,000,000 recipients: delivered {big['delivered']} (sink counted {got}),"
                    f" {m / big['wall_s']:.0f} msg/s whole command, peak memory (PSS) of all"
                    f" fastsend processes {big['peak_pss_mb']:.0f} MB (goal < 300 MB):"
                    f" {'OK' if big['peak_pss_mb'] < 300 else 'OVER'}"
                )
                ok = ok and big["delivered"] == m and got == m
        finally:
            sink.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
