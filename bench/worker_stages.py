"""Where a worker's microseconds go per message, stage by stage, on one core.

Runs the worker's own code (``fastsend.delivery.worker.Worker``) on the
messages bench/end_to_end.py sends (a ~4 KB personalised campaign, three
per-recipient values, batches of 200 as the supervisor makes them), outside
the SMTP client, by process CPU time:

- batch decode: a ring record (msgpack) -> ``wire.Batch``;
- vars decode: each item's per-recipient values (JSON);
- msgid: the message's id token (HMAC-SHA256, ``fastsend.msgid``);
- render: the MIME message, as ``Worker.build_each`` makes it (without
  tracking or DKIM the compiled ``Assembly.personal`` directly,
  ``Renderer.for_batch``);
- envelope: MAIL FROM and the ``Envelope`` value;
- build (whole): ``Worker.build`` of the batch, all of the above but the decode
  together, with the loop around them;
- build, deferred: ``Worker.build(batch, deferred=True)``, what a worker does
  for its site queues: the envelopes with ``DeferredMessage`` data (the vars
  decode and the render are not done here);
- make (deferred): each such message made, as the SMTP client makes it when
  its transaction starts (vars decode + render); with the deferred build, the
  whole of the eager one;
- outcome collect: ``Worker.add_results`` of what the client returns;
- outcome encode: the ``wire.Results`` record for the supervisor;
- SMTP client protocol: the sans-I/O client (``fastsend.smtp.client``) doing
  a batch of these messages on one connection as smtp-sink answers them
  (PIPELINING, DATA; each reply burst: the last message's 250, MAIL's and
  RCPT's 250 and DATA's 354), no socket: replies parsed and matched,
  commands and dot-stuffed bodies made, one outcome per message. Not part of
  the worker-side total (it is the client's own cost);
- SMTP client, 32 sessions round-robin: the same client, 32 sessions (a
  worker's connections to one site) each given a group of 63 envelopes made
  beforehand (``pipeline``'s group, as a ready queue holds them), answered one
  reply burst at a time in turn, as smtp-sink answers a worker's connections:
  a session's next message starts 32 messages after its last, its envelope
  long out of cache, as in a worker (the groups released at the end, as the
  worker releases a group's envelopes);
- placing, batches of 6: what a batch costs besides building its messages
  (decode, site lookup, the site's ready queue), per message, for the small
  batches end_to_end.py's 100-domain list gets (the supervisor sends one per
  recipient domain), read as ``Worker.on_inbox`` reads them: 20 batches in a
  read, pushed once per site queue (``Worker.placed``, ``push_placed``);
- placing + deferred build, batches of 6: the same with each batch's
  envelopes built as a worker builds them (what a small batch costs whole).

Each figure is the best of ``--rounds`` rounds, both implementations
(compiled core and the pure-Python twins, ``FASTSEND_NO_EXTENSIONS=1``) in
the same run, each in its own process. The SMTP client's own cost per message
(the baseline the worker is held to, goal <= 1.3x) is measured by
bench/smtp_throughput.py and bench/end_to_end.py (workers' CPU/msg there);
this bench tells which stage to cut.

    python bench/worker_stages.py [--rounds 5] [--batches 50]

Exits non-zero when a figure cannot be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import orjson

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine

BATCH = 200
SMALL = 6  # messages per batch in end_to_end.py's runs (100 domains)
SESSIONS = 32  # a worker's connections to one site (16 per source IP x 2)
GROUP = 63  # envelopes per pipelined group (a 100k send's average, pipeline 64)
READ = 20  # such batches read from the inbox in one wake-up


def cpu_per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Best CPU seconds per call of ``fn`` over ``rounds`` rounds of ``calls`` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls)
    return best


async def measure(rounds: int, batches: int) -> dict[str, float]:
    from end_to_end import write_inputs

    from fastsend import _accel, msgid, wire
    from fastsend.config import Config, Route
    from fastsend.delivery.worker import Worker
    from fastsend.message import Campaign
    from fastsend.outcome import DELIVERED, Envelope, Outcome, TxnResult
    from fastsend.ring import Ring

    tmp = tempfile.mkdtemp(prefix="fastsend-stages-")
    camp_path, _rcpts = write_inputs(tmp, 1, 4096)
    spec = Campaign.load(camp_path).to_dict()
    config = Config(
        spool_dir=tmp,
        secret=b"bench installation secret 0123456789",
        routes={"*": Route("127.0.0.1", 2525)},  # as end_to_end.py's --route
    )
    worker = Worker(0, config, ["127.0.0.2"], Ring(1 << 20), Ring(64 << 20))
    worker.campaign_specs[1] = spec
    r = worker.renderer(1)
    fast = r.for_batch()
    if fast is None:
        raise SystemExit("the bench campaign should render on the direct path")
    personal, date = fast
    plans = ("free", "pro", "team")
    items = [
        wire.Item(
            1000 + i,
            f"user{i}@d{i % 100}.example.net",
            orjson.dumps({"name": f"Name{i}", "account": f"A{i:09d}", "plan": plans[i % 3]}),
            0,
        )
        for i in range(BATCH)
    ]
    batch = wire.Batch(1, "d1.example.net", items)
    record = wire.encoder.encode(batch)
    decode = wire.to_worker_decoder.decode
    secret = config.secret
    mids = [msgid.token(it.id, secret) for it in items]
    values = [orjson.loads(it.vars) for it in items]
    datas = [r.render(it.rcpt, v, m) for it, v, m in zip(items, values, mids, strict=True)]
    ok = Outcome(DELIVERED, 250, "2.0.0", "Ok: queued as 4Xq1", "data")
    results = [TxnResult(it.id, [ok], "4Xq1") for it in items]
    per = BATCH * batches  # messages per round

    def over_batch(fn: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for i in range(BATCH):
                fn(i)

        return run

    def collect() -> None:
        worker.add_results(results, "127.0.0.2", "sink[127.0.0.1]:25")
        worker.out = []

    worker.add_results(results, "127.0.0.2", "sink[127.0.0.1]:25")
    out, worker.out = worker.out, []
    if worker.flush_handle is not None:
        worker.flush_handle.cancel()
        worker.flush_handle = None
    # Per batch: what a batch costs besides its messages (decode, site lookup,
    # the site's ready queue: push, trim, scale) -- with the end_to_end.py list
    # (100 domains) a claim splits into batches of a few messages.
    small = wire.encoder.encode(wire.Batch(1, "d1.example.net", items[:SMALL]))
    site = await worker.resolver.site_for("d1.example.net")  # a route: no DNS
    if worker.resolver.cached("d1.example.net") is not site:
        raise SystemExit("the bench route is not cached after its first lookup")
    queue = worker.site_queue(site, wire.Batch(1, "d1.example.net", []))
    queue.closing = True  # no connections: the queue's bookkeeping alone
    envs = worker.build(wire.Batch(1, "d1.example.net", items[:SMALL]))

    held: list[object] = [None]

    def build_whole() -> None:
        # The last batch's envelopes stay alive while the next is built, as they
        # wait on a worker's ready queues.
        held[0] = worker.build(batch)

    def build_deferred() -> None:
        held[0] = worker.build(batch, deferred=True)

    deferred_envs = worker.build(batch, deferred=True)
    if any(type(e.data) is bytes for e in deferred_envs):
        raise SystemExit("the bench campaign should be made when sent (DeferredMessage)")

    def make_deferred() -> None:
        for e in deferred_envs:
            e.data()

    from fastsend.smtp.client import SMTPClient

    sink_next = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    sink_each = b"250 2.0.0 Ok\r\n" + sink_next  # a message's end, the next one's start
    client_envs = [
        Envelope(r.envelope_from(mids[i]), [items[i].rcpt], datas[i], tag=items[i].id)
        for i in range(BATCH)
    ]

    def session() -> None:
        c = SMTPClient("bench.example", "sink[127.0.0.1]:25")
        c.receive_data(b"220 smtp-sink ESMTP\r\n")
        c.send_ehlo()
        c.receive_data(b"250-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n")
        c.send_envelopes(client_envs)
        done = len(c.receive_data(sink_next))
        c.data_to_send()
        for _ in range(BATCH - 1):
            done += len(c.receive_data(sink_each))
            c.data_to_send()
        done += len(c.receive_data(b"250 2.0.0 Ok\r\n"))
        if done != BATCH:
            raise SystemExit(f"the client finished {done} of {BATCH} transactions")

    def sessions() -> float:
        """CPU seconds per message of SESSIONS sessions answered in turn."""
        groups = [
            [Envelope(e.mail_from, list(e.rcpts), e.data, tag=e.tag) for e in client_envs[:GROUP]]
            for _ in range(SESSIONS)
        ]
        clients = []
        for _ in range(SESSIONS):
            c = SMTPClient("bench.example", "sink[127.0.0.1]:25")
            c.receive_data(b"220 smtp-sink ESMTP\r\n")
            c.send_ehlo()
            c.receive_data(b"250-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n")
            clients.append(c)
        t0 = time.process_time()
        for c, g in zip(clients, groups, strict=True):
            c.send_envelopes(g)
            c.data_to_send()
        done = 0
        for c in clients:
            done += len(c.receive_data(sink_next))
            c.data_to_send()
        for _ in range(GROUP - 1):
            for c in clients:
                done += len(c.receive_data(sink_each))
                c.data_to_send()
        for c in clients:
            done += len(c.receive_data(b"250 2.0.0 Ok\r\n"))
        del groups
        spent = time.process_time() - t0
        if done != SESSIONS * GROUP:
            raise SystemExit(f"the clients finished {done} of {SESSIONS * GROUP} transactions")
        return spent / (SESSIONS * GROUP)

    def place() -> None:
        for _ in range(READ):
            b = decode(small)
            worker.busy += 1
            worker.place_batch(b, worker.resolver.cached(b.domain), worker.placed)
        worker.push_placed()
        queue.pending.clear()

    stages: dict[str, Callable[[], object]] = {
        "batch decode": lambda: decode(record),
        "vars decode": over_batch(lambda i: orjson.loads(items[i].vars)),
        "msgid": over_batch(lambda i: msgid.token(items[i].id, secret)),
        "render": over_batch(lambda i: personal(values[i], items[i].rcpt, mids[i], date, False)),
        "envelope": over_batch(
            lambda i: Envelope(
                r.envelope_from(mids[i]),
                [items[i].rcpt],
                datas[i],
                tag=items[i].id,
                smtputf8=r.needs_smtputf8(items[i].rcpt),
            )
        ),
        "build (whole, per message)": build_whole,
        "build, deferred": build_deferred,
        "make (deferred)": make_deferred,
        "outcome collect": collect,
        "outcome encode": lambda: wire.encoder.encode(wire.Results(out)),
        "SMTP client protocol": session,
    }
    figures: dict[str, float] = {}
    for name, fn in stages.items():
        figures[name] = cpu_per_call(fn, batches, rounds) / BATCH * 1e6
    figures[f"SMTP client, {SESSIONS} sessions round-robin"] = (
        min(sessions() for _ in range(2 * rounds)) * 1e6
    )
    # The same with each batch's envelopes built, as place_batch builds them
    # (deferred: Worker.direct's compiled call for this campaign).
    figures[f"placing + deferred build, batches of {SMALL}"] = (
        cpu_per_call(place, batches, rounds) / (READ * SMALL) * 1e6
    )
    worker.build = lambda _batch, deferred=False: list(envs)  # type: ignore[method-assign]  # placing alone
    figures[f"placing, batches of {SMALL}"] = (
        cpu_per_call(place, batches, rounds) / (READ * SMALL) * 1e6
    )
    if worker.flush_handle is not None:
        worker.flush_handle.cancel()
    figures["_compiled"] = float(_accel.HAVE_EXTENSIONS and not _accel.NO_EXTENSIONS)
    figures["_size"] = float(len(datas[0]))
    figures["_per_round"] = float(per)
    return figures


def child(rounds: int, batches: int) -> int:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    except (AttributeError, OSError):
        pass
    print(json.dumps(asyncio.run(measure(rounds, batches))))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=50, help="batches of 200 per round")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.rounds, args.batches)
    res: dict[str, dict[str, float]] = {}
    # glibc gives the top of the heap back past 128 kB free (M_TRIM_THRESHOLD):
    # a bench that frees a batch's 800 kB of messages at once then faults the
    # pages in again at the next batch, ~1 us per message that depends on the
    # heap's layout (a stage more or less moved it), not on the code measured.
    # A worker's heap does not churn that way (its envelopes wait on ready
    # queues): ~0.5 page faults per message over a whole 100k `send`.
    trim = {"MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", str(256 << 20))}
    for label, env in (("compiled", trim), ("pure", {**trim, "FASTSEND_NO_EXTENSIONS": "1"})):
        cmd = [sys.executable, os.path.abspath(__file__), "--child"]
        cmd += ["--rounds", str(args.rounds), "--batches", str(args.batches)]
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"error: the {label} run failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            return 2
        res[label] = json.loads(p.stdout.strip().splitlines()[-1])
    if not res["compiled"]["_compiled"]:
        print("error: fastsend._core is not built: no compiled figures", file=sys.stderr)
        return 2
    c, p = res["compiled"], res["pure"]
    print(f"machine: {machine()} (shared: CPU time, best of {args.rounds} rounds)")
    print(
        f"settings: the end_to_end.py campaign ({int(c['_size'])} B messages, 3 per-recipient"
        f" values, text/plain quoted-printable), batches of {BATCH},"
        f" {int(c['_per_round'])} messages per round, pinned to one core,"
        f" MALLOC_TRIM_THRESHOLD_={trim['MALLOC_TRIM_THRESHOLD_']}"
    )
    print(f"  {'stage':28s} {'compiled':>10s} {'pure':>10s}   (CPU us per message)")
    for name in c:
        if name.startswith("_"):
            continue
        print(f"  {name:28s} {c[name]:10.2f} {p[name]:10.2f}")
    whole = c["build, deferred"] + c["make (deferred)"] + c["batch decode"]
    whole += c["outcome collect"] + c["outcome encode"]
    print(
        f"  worker-side total (deferred build + make + decode + collect + encode), compiled:"
        f" {whole:.2f} us/msg"
    )
    print(
        f"  SMTP client protocol (sans-I/O, not in the total), compiled:"
        f" {c['SMTP client protocol']:.2f} us/msg"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
