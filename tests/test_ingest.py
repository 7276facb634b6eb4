"""Crash-safe list ingest: accepting a recipient list is a durable job in the
spool (source path, size, mtime, SHA-256, row count and the last committed
line, written with each batch), on both backends.

- A list cut short (the process died between batches) is continued by
  ``fastsend resume`` from its last committed row: nothing lost, nothing
  spooled twice; ``fastsend queue`` shows "spooling: N of M rows" meanwhile.
- A changed or missing file: ``resume`` says how many rows were never accepted
  and exits 1 (after delivering what was accepted); ``--abandon-rest`` closes
  the job without them and exits 0.
- kill -9 of the whole process group at random points of ingest and delivery
  (several times, so some land inside a commit), then ``resume``: every
  recipient reached the sink (its own log) at least once, and duplicates are
  at most the messages in flight at the kills, which ``resume`` reports.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from tests._engine_helpers import (
    CAMPAIGN,
    fastsend_cmd,
    received_counts,
    run_fastsend,
    run_killed,
    summary,
    write_campaign,
)

from fastsend.accept import Acceptor, check_campaign, rows_left, source_problem
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.sink import SinkProcess
from fastsend.spool import IngestJob, Spool, open_spool

# Claimed-but-unanswered messages per worker: the default window of the runs
# below (two workers, no source IPs of their own).
WINDOW = Config(workers=2).window_for(0)


def write_list(path: Path, n: int, bad_at: tuple[int, ...] = ()) -> list[str]:
    """A CSV of n good rows (plus a bad row after each index in bad_at)."""
    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(n)]
    with open(path, "w") as f:
        f.write("email,name\n")
        for i, a in enumerate(addrs):
            f.write(f"{a},N{i}\n")
            if i in bad_at:
                f.write("not-an-address,X\n")
    return addrs


def crashed_ingest(url: str, tmp: Path, n: int, batches: int) -> tuple[IngestJob, list[str]]:
    """The state a crash leaves: a job that committed ``batches`` of 1000 rows."""
    path = tmp / "list.csv"
    addrs = write_list(path, n, bad_at=(10,))
    spool = open_spool(url)
    events = EventLog(str(tmp / "spool" / "events.jsonl"))
    acceptor = Acceptor(spool, events, None)
    cid = acceptor.create_campaign(check_campaign(Campaign.from_dict(_campaign())), name="c")
    job = acceptor.start_ingest(cid, str(path))
    feed = acceptor.ingest(job, chunk=1000)
    for _ in range(batches):
        next(feed)
    events.close()  # the generator is dropped: the process "died" here
    now = spool.get_ingest(job.id)
    spool.close()
    assert now is not None
    return now, addrs


def _campaign() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(CAMPAIGN)


def resume(url: str, sink: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    host, port = sink.addresses[0]
    return run_fastsend(
        "resume", "--spool", url, "--route", f"*={host}:{port}", "--workers", "1",
        "--json", "--no-progress", "--max-wait", "5", *extra, timeout=300,
    )  # fmt: skip


def test_row_count_matches_what_read_yields(tmp_path: Path) -> None:
    from fastsend import recipients

    csv_path = tmp_path / "a.csv"
    csv_path.write_text('email,name\n\na@x.example,"multi\nline"\nbad,1,2\n\nb@x.example,B\n')
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"email": "a@x.example"}\n\n  \nnot json\n{"email": 5}\n')
    for p in (csv_path, jl):
        assert recipients.count_rows(str(p)) == len(list(recipients.read(str(p)))) == 3
    (tmp_path / "e.csv").write_text("")
    assert recipients.count_rows(str(tmp_path / "e.csv")) == 0


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_survey_counts_what_read_yields_whatever_the_lines(tmp_path: Path, block: int) -> None:
    """survey() counts lines at C speed and looks at a line only when it may be
    blank: its count is what read() yields for line ends CR, LF and CRLF (split
    by the block), whitespace-only lines (Unicode spaces too), a BOM, literal
    quotes, and quoted fields spanning lines (counted by the csv module); and
    its digest is the file's SHA-256."""
    import hashlib

    from fastsend import recipients

    rng = random.Random(block)
    pieces = ["u@x.example", "n", ",", '"', "\n", "\r", "\r\n", " ", "\t", "\xa0", "\u3000",
              "\u2028", "\x1c", "\x85", "\x0b", "\u00e9", '{"email": "j@x.example"}']  # fmt: skip
    cases = [
        "\ufeffemail,name\r\na@x.example,A\r\n\r\n \u3000\r\nb@x.example,B",
        'email,name\na@x.example,O"Brien\n\xa0\nb@x.example,"B, the ""second""\nline"\n',
        "email\n\n\n a@x.example \n\x85\n",
    ]
    for _ in range(400):
        cases.append("email,name\n" + "".join(rng.choices(pieces, k=rng.randint(0, 30))))
        cases.append("".join(rng.choices(pieces, k=rng.randint(0, 30))))
    for i, text in enumerate(cases):
        for ext in (".csv", ".jsonl"):
            p = tmp_path / f"c{i}{ext}"
            p.write_bytes(text.encode())
            try:
                want = len(list(recipients.read(str(p))))
            except recipients.RecipientsError:
                continue  # not a list read() accepts (no email column)
            digest, rows = recipients.survey(str(p), block=block)
            assert rows == want, (text, ext)
            assert digest == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_batches_are_what_read_yields_after_a_line(tmp_path: Path, ext: str) -> None:
    """batches(): the rows read() yields after line ``after``, ``size`` good
    rows a batch with the bad rows among them, each batch's last line, and one
    last batch (marked, short or empty) at the end of the file."""
    from fastsend import recipients

    p = tmp_path / f"l{ext}"
    lines = []
    for i in range(23):
        ok = i % 5 != 3
        addr = f"u{i}@x.example" if ok else "not-an-address"
        lines.append(f"{addr},N{i}" if ext == ".csv" else f'{{"email": "{addr}", "name": "N{i}"}}')
        if i % 7 == 6:
            lines.append("")  # a blank line: no row
    p.write_text(("email,name\n" if ext == ".csv" else "") + "\n".join(lines) + "\n")
    every = list(recipients.read(str(p)))
    for after in (0, 5, 12, 40):
        for size in (1, 4, 100):
            got = list(recipients.batches(str(p), after=after, size=size))
            want = [
                r for r in every if (r.line if isinstance(r, recipients.BadRow) else r[0]) > after
            ]
            assert [b.last for b in got] == [False] * (len(got) - 1) + [True]
            assert all(len(b.rows) == size for b in got[:-1]) and len(got[-1].rows) < size
            rows = [(ln, *r) for b in got for ln, r in zip(b.lines, b.rows, strict=True)]
            bad = [r for b in got for r in b.bad]
            assert rows == [r for r in want if not isinstance(r, recipients.BadRow)]
            assert bad == [r for r in want if isinstance(r, recipients.BadRow)]
            last = [r.line if isinstance(r, recipients.BadRow) else r[0] for r in want]
            assert got[-1].line == (max(last) if last else after)
            for b in got[:-1]:
                assert b.line == b.lines[-1]  # a full batch ends at its last good row
    got = list(recipients.batches(str(p), size=4, first=2))  # a first batch of its own size
    assert [len(b.rows) for b in got] == [2, 4, 4, 4, 4, 1]


def _csv_module_rows(path: Path, after: int) -> list[Any]:
    """What batches() yields for a CSV list, read by the csv module alone (the
    reference of the plain-line path): (line, address, domain, vars) rows and
    bad rows, in file order."""
    import csv

    from fastsend import recipients
    from fastsend.address import AddressError, normalize

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        ei = header.index("email")
        names = header[:ei] + header[ei + 1 :]
        out: list[Any] = []
        end = 1

        def bad(start: int, line: int, why: str) -> recipients.BadRow:
            if start < line:  # a record over several lines: its first line, its span
                why += f" (one record over lines {start}-{line}: a quoted field holds line breaks)"
            return recipients.BadRow(start, why)

        for rec in reader:
            line = reader.line_num
            start, end = end + 1, line
            if line <= after:
                continue
            if not any(f.strip() for f in rec):  # a blank line, or a spreadsheet's ",,,"
                continue
            if len(rec) != len(header):
                why = f"expected {len(header)} columns, found {len(rec)}"
                out.append(bad(start, line, why))
                continue
            email = rec.pop(ei)
            try:
                addr, domain = normalize(email)
            except AddressError as e:
                out.append(bad(start, line, str(e)))
                continue
            out.append((line, addr, domain, orjson.dumps(dict(zip(names, rec, strict=True)))))
        return out


def test_plain_csv_lines_read_as_the_csv_module_reads_them(tmp_path: Path) -> None:
    """Lines with no '"' are split at "," (csv_plain_rows, compiled and pure
    twins alike), the rest read by the csv module from the first quote on: the
    same rows, vars bytes, line numbers and bad rows as the csv module's
    reading, for any line ends, blank and bad lines, non-ASCII and escaped
    values, a quote late in the list, after any line and in any batch size."""
    from fastsend import _accel, recipients

    rng = random.Random(11)
    cells = ["u@x.example", "Ünï@exämple.DE", "bad", "", " ", "v\\w", "tab\tx", "é", "a;b",
             "\x01", "O\"Brien", '"q,u"', "日本"]  # fmt: skip
    ends = ["\n", "\r\n", "\r"]
    for case in range(120):
        width = rng.randint(1, 4)
        names = [f"c{j}" if rng.random() < 0.8 else f"n\u00e9{j}" for j in range(width - 1)]
        header = names[:]
        header.insert(rng.randint(0, width - 1), "email")
        body = []
        for i in range(rng.randint(0, 60)):
            k = width + (rng.random() < 0.1) - (rng.random() < 0.1)
            row = [f"r{i}@d{i % 3}.example" if rng.random() < 0.8 else rng.choice(cells)]
            row += [rng.choice(cells) if rng.random() < 0.3 else f"v{i}" for _ in range(k - 1)]
            if rng.random() < 0.05 or case % 10 != 0:  # most lists have no quote at all
                row = [c.replace('"', "") for c in row]
            body.append(",".join(row))
        eol = rng.choice(ends)
        text = ",".join(header) + eol + eol.join(body) + (eol if rng.random() < 0.7 else "")
        p = tmp_path / f"p{case}.csv"
        p.write_bytes(text.encode())
        for after in (0, 3, 17):
            want = _csv_module_rows(p, after)
            for size in (1, 5, 2000):
                got: list[Any] = []
                for b in recipients.batches(str(p), after=after, size=size):
                    good = [(ln, *r) for ln, r in zip(b.lines, b.rows, strict=True)]
                    got += sorted(good + b.bad, key=lambda r: r.line if isinstance(r, recipients.BadRow) else r[0])  # fmt: skip
                assert got == want, (text, after, size)
    # the twins, chunk by chunk, with a stop at a quote and at the field size limit
    pure, comp = recipients.py_csv_plain_rows, _accel.compiled("csv_plain_rows")
    keys = [b'"a":', b'"\xc3\xa9":']
    chunk = ["u@x.example,1,2\n", "\r\n", "bad,1,2\r", " , \n", "x@y.example,\x01,\\\n",
             "t@x.example,é,3", "q@x.example,\"1\",2\n", "z@x.example,1,2\n"]  # fmt: skip
    for limit in (1, 2, 100):
        for maxlen in (5, 1000):
            outs = []
            for fn in (pure, comp):
                rows: list[Any] = []
                lines: list[int] = []
                bad: list[Any] = []
                res = fn(chunk, 0, 1, 0, 3, 0, keys, maxlen, limit, rows, lines, bad, 0)
                outs.append((res, rows, lines, bad))
            assert outs[0] == outs[1]
    assert _accel.compiled("vars_json")(keys, ["x", "\n"]) == recipients.py_vars_json(
        keys, ["x", "\n"]) == b'{"a":"x","\xc3\xa9":"\\n"}'  # fmt: skip


def test_plain_lines_read_in_place_as_the_reference_reads_them() -> None:
    """The compiled csv_plain_rows reads a plain line (ASCII, its fields, an
    address normalize's plain case takes, no value JSON escapes) where it lies:
    the same rows (address and domain as normalize gives them, vars bytes),
    line numbers, bad rows and stops as the reference, for addresses at and
    past every limit of the plain case and values with and without escapes."""
    from fastsend import _accel, address, recipients

    pure, comp = recipients.py_csv_plain_rows, _accel.compiled("csv_plain_rows")
    address.normalize("warm@up.example")  # the compiled normalize's cache is set up
    rng = random.Random(5)
    locals_ = ["u", "a.b", "x+tag", "o'neil", "{}~", ".lead", "dot.", "two..dots", "sp ace",
               "l" * 64, "l" * 65, "", "é", "a@b"]  # fmt: skip
    domains = ["d.example", "D.Example", "x-y.example", "-bad.example", "bad_.example",
               "toolong" + "x" * 60 + ".example", "a." * 120 + "example", "", "dé.example",
               "1.2.3.4", "d.example."]  # fmt: skip
    values = ["v", "", " ", "a\\b", "t\tx", "\x7f", "é", "x;y", "N0", "{}", "\x1f"]
    for width in (1, 2, 3, 5):
        for ei in range(width):
            keys = [f'"k{j}":'.encode() for j in range(width - 1)]
            chunk = []
            for i in range(400):
                email = f"{rng.choice(locals_)}@{rng.choice(domains)}"
                if rng.random() < 0.5:
                    email = f"r{i}@d{i % 7}.example"
                fields = [rng.choice(values) for _ in range(width - 1)]
                fields.insert(ei, email)
                if rng.random() < 0.05:
                    fields.append("extra")
                if rng.random() < 0.05:
                    fields = fields[:-1]
                chunk.append(",".join(fields) + rng.choice(["\n", "\r\n", "\r", ""]))
            for limit in (7, 10_000):
                outs = []
                for fn in (pure, comp):
                    rows: list[Any] = []
                    lines: list[int] = []
                    bad: list[Any] = []
                    res = [0, 1, 0, False]
                    while res[0] < len(chunk):
                        res = list(fn(chunk, res[0], res[1], 3, width, ei, keys, 1000, limit,
                                      rows, lines, bad, res[2]))  # fmt: skip
                    outs.append((res, rows, lines, bad))
                assert outs[0] == outs[1], (width, ei, limit)
                assert len(outs[0][1]) > 100


def test_a_list_not_in_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    from fastsend import recipients

    spool_url = str(tmp_path / "spool")

    rows = "".join(f"u{i}@x.example,N{i}\n" for i in range(3000))
    p = tmp_path / "latin1.csv"
    p.write_bytes(b"email,name\n" + rows.encode() + "j@x.example,Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(recipients.RecipientsError, match="line 3002: not UTF-8"):
        recipients.survey(str(p))
    camp = write_campaign(tmp_path)
    res = run_fastsend("send", camp, "-r", str(p), "--spool", spool_url, "--no-dkim",
                       "--route", "*=127.0.0.1:9", "--json", "--no-progress")  # fmt: skip
    assert res.returncode == 2 and "line 3002: not UTF-8 text" in res.stderr
    assert "Traceback" not in res.stderr
    spool = open_spool(spool_url)
    try:
        assert sum(spool.counts().values()) == 0  # nothing of it was spooled
    finally:
        spool.close()
    (tmp_path / "head.csv").write_bytes(b"email,nam\xe9\n")  # the header: refused at once
    res = run_fastsend("send", camp, "-r", str(tmp_path / "head.csv"), "--spool", spool_url,
                       "--no-dkim", "--route", "*=127.0.0.1:9", "--json", "--no-progress")  # fmt: skip
    assert res.returncode == 2 and "not UTF-8 text" in res.stderr, res.stderr


def test_resume_continues_an_unfinished_list(spool_url: str, tmp_path: Path) -> None:
    job, addrs = crashed_ingest(spool_url, tmp_path, 5000, batches=2)
    assert (job.total, job.accepted, job.rejected, job.status) == (5001, 2000, 1, "running")
    assert rows_left(job) == 3000 and source_problem(job) is None
    q = run_fastsend("queue", "--spool", spool_url)
    assert q.returncode == 0, q.stderr
    assert "spooling: 2,001 of 5,001 rows" in q.stdout
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        res = resume(spool_url, sink)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming the ingest" in res.stderr
    s = summary(res)
    assert s["delivered"] == 5000 and s["deferred"] == 0 and s["rows_never_accepted"] == 0
    got = received_counts(log)
    assert set(got) == set(addrs) and max(got.values()) == 1  # nothing spooled twice
    spool = open_spool(spool_url)
    try:
        done = spool.get_ingest(job.id)
        assert done is not None and done.status == "done"
        assert (done.accepted, done.rejected, rows_left(done)) == (5000, 1, 0)
    finally:
        spool.close()
    q = run_fastsend("queue", "--spool", spool_url)
    assert "spooling" not in q.stdout


@pytest.mark.parametrize("damage", ["changed", "gone"])
def test_resume_reports_rows_of_a_changed_or_missing_list(
    spool_url: str, tmp_path: Path, damage: str
) -> None:
    job, addrs = crashed_ingest(spool_url, tmp_path, 3000, batches=1)
    path = Path(job.source["path"])
    if damage == "changed":
        with open(path, "r+") as f:  # same size, other bytes
            f.seek(30)
            f.write("X")
    else:
        path.unlink()
    assert source_problem(job) == damage
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        res = resume(spool_url, sink)
        assert res.returncode == 1, res.stderr[-3000:]
        assert f"is {damage}: 2,000 row(s) of campaign {job.campaign} were never accepted" in (
            res.stderr
        )
        s = summary(res)
        assert s["rows_never_accepted"] == 2000
        assert s["delivered"] == 1000  # what was accepted is delivered all the same
        # Still unfinished: shown by queue, refused again without --abandon-rest.
        assert "spooling: 1,001 of 3,001 rows" in run_fastsend("queue", "--spool", spool_url).stdout
        assert resume(spool_url, sink).returncode == 1
        res = resume(spool_url, sink, "--abandon-rest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "abandoned its 2,000 row(s) never accepted" in res.stderr
    assert summary(res)["rows_abandoned"] == 2000
    assert set(received_counts(log)) == set(addrs[:1000])
    assert "spooling" not in run_fastsend("queue", "--spool", spool_url).stdout


# -- kill -9 at random points -------------------------------------------------------


def _state(url: str) -> tuple[dict[str, int], list[IngestJob]]:
    try:
        s: Spool = open_spool(url, readonly=True)
    except Exception:
        return {}, []
    try:
        return s.counts(), s.list_ingests()
    except Exception:  # the schema is being created right now
        return {}, []
    finally:
        s.close()


def _wait(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _gone, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10
    )
    assert not alive, "a process of the group survived kill -9"


@pytest.mark.slow
def test_kill_9_during_ingest_and_delivery_then_resume(spool_url: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("FASTSEND_KILL_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"kill seed {seed} (FASTSEND_KILL_SEED to repeat)")
    n = 30000 if not spool_url.startswith("redis") else 15000
    path = tmp_path / "list.csv"
    addrs = write_list(path, n)
    camp = write_campaign(tmp_path)
    log = tmp_path / "sink.jsonl"
    in_flight_at_kills = 0
    kills: list[str] = []
    with SinkProcess("--log", str(log), "--latency-ms", "1") as sink:
        host, port = sink.addresses[0]
        common = ["--spool", spool_url, "--route", f"*={host}:{port}", "--workers", "2",
                  "--json", "--no-progress", "--max-wait", "5"]  # fmt: skip
        cmd = fastsend_cmd("send", str(camp), "-r", str(path), "--no-dkim", *common)
        # Three runs killed at random points: the send while it reads the list
        # (batches commit every 2000 rows, so some kills land inside one), a
        # resume at a random moment, a resume in the middle of delivery.
        for phase in ("ingest", "any", "delivery"):
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            if phase == "ingest":
                _wait(lambda: bool(_state(spool_url)[1]))
                time.sleep(rng.uniform(0.0, 0.3))
            elif phase == "any":
                time.sleep(rng.uniform(0.5, 2.5))
            else:
                base = _state(spool_url)[0].get("delivered", 0)
                goal = base + rng.randrange(200, 2000)
                # Until the goal, or the run's end (fewer than the goal may be
                # left): the kill below is then a no-op.
                _wait(
                    lambda g=goal, p=proc: p.poll() is not None
                    or _state(spool_url)[0].get("delivered", 0) >= g,
                    60,
                )
            if proc.poll() is None:
                _kill_group(proc)
                counts, jobs = _state(spool_url)
                in_flight_at_kills += counts.get("inflight", 0)
                kills.append(
                    f"{phase}: delivered {counts.get('delivered', 0)}, in flight"
                    f" {counts.get('inflight', 0)}, list read"
                    f" {[j.accepted + j.rejected for j in jobs]}"
                )
            else:
                proc.communicate()
            cmd = fastsend_cmd("resume", *common)
        res = run_fastsend("resume", *common, timeout=600)
    print("\n".join(kills))
    assert res.returncode == 0, res.stderr[-3000:]
    s = summary(res)
    assert s["delivered"] == n and s["deferred"] == 0, s
    got = received_counts(log)
    assert set(got) == set(addrs), f"{len(set(addrs) - set(got))} recipient(s) lost"
    dups = sum(c - 1 for c in got.values())
    print(f"duplicates {dups}, in flight at the kills {in_flight_at_kills}")
    # A duplicate is a message that was in flight when its process was killed:
    # resume takes those back and reports them (recovered_inflight).
    assert dups <= in_flight_at_kills <= len(kills) * 2 * WINDOW
    _counts, jobs = _state(spool_url)
    assert [j.status for j in jobs] == ["done"] and jobs[0].accepted == n


def test_events_of_a_batch_a_killed_reader_committed_are_told_by_the_next(
    spool_url: str, tmp_path: Path
) -> None:
    """kill -9 of ``send`` once its list's 2nd batch is committed, before that
    batch's "accepted" events: ``resume`` emits them (``"resumed": true``), so
    every spooled row has its event; the rows of the other batches are told
    once, by the reader that spooled them."""
    n = 5000
    path = tmp_path / "list.csv"
    addrs = write_list(path, n, bad_at=(300,))
    camp = write_campaign(tmp_path)
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        common = ["--spool", spool_url, "--route", f"*={host}:{port}", "--workers", "1",
                  "--json", "--no-progress", "--max-wait", "5"]  # fmt: skip
        run_killed(
            "ingest-kill-after-commit:2", "send", str(camp), "-r", str(path), "--no-dkim",
            *common,
        )  # fmt: skip
        _counts, jobs = _state(spool_url)
        # The first chunk (256 rows) and the 2nd batch (2,000) are spooled; the
        # job names the 2nd batch's ids as untold.
        assert [(j.accepted, j.untold[1] - j.untold[0] + 1) for j in jobs] == [(2256, 2000)]
        res = run_fastsend("resume", *common, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(res)["delivered"] == n
    assert "emitted the events of 2000 row(s)" in res.stderr
    (log,) = tmp_path.rglob("events.jsonl")
    events = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    told: dict[int, list[dict[str, Any]]] = {}
    delivered: set[int] = set()
    for e in events:
        if e["event"] in ("accepted", "suppressed"):
            told.setdefault(e["id"], []).append(e)
        elif e["event"] == "delivered":
            delivered.add(e["id"])
    assert len(delivered) == n and set(told) == delivered  # every row told
    assert {e["rcpt"] for es in told.values() for e in es} == set(addrs)
    assert all(len(es) == 1 for es in told.values())  # once: the clear was not lost
    resumed = sorted(mid for mid, es in told.items() if es[0].get("resumed"))
    first, last = jobs[0].untold
    assert resumed == list(range(first, last + 1))
    _counts, jobs = _state(spool_url)
    assert [(j.status, j.untold) for j in jobs] == [("done", (0, 0))]


def test_a_list_changed_while_read_stops_before_its_changed_rows(
    spool_url: str, tmp_path: Path
) -> None:
    """The list is read as delivery makes room, so it may be rewritten while
    being read: each batch is checked against the file as it was opened before
    it is accepted; rows read from a changed file are never spooled, the job
    stays where the last good batch ended and resume sees the change."""
    from fastsend.recipients import RecipientsError

    path = tmp_path / "list.csv"
    write_list(path, 5000)
    spool = open_spool(spool_url)
    events = EventLog(str(tmp_path / "events.jsonl"))
    acceptor = Acceptor(spool, events, None)
    cid = acceptor.create_campaign(check_campaign(Campaign.from_dict(_campaign())), name="c")
    job = acceptor.start_ingest(cid, str(path))
    feed = acceptor.ingest(job, chunk=1000)
    assert next(feed).accepted == 1000 and next(feed).accepted == 2000
    with open(path, "r+") as f:  # rewritten in place, same size
        text = f.read()
        f.seek(0)
        f.write(text.replace("user2500@", "evil2500@"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(RecipientsError, match="changed while it was being read"):
        next(feed)
    now = spool.get_ingest(job.id)
    assert now is not None and now.accepted == 2000 and now.line == 2001 and not now.finished
    assert spool.counts(cid)["queued"] + spool.counts(cid)["inflight"] == 2000
    assert source_problem(now) == "changed"
    events.close()
    spool.close()


def test_send_reads_a_long_list_as_the_windows_have_room(spool_url: str, tmp_path: Path) -> None:
    """`send` on a local spool reads its list paced by dispatch (the list file is
    the incoming queue; the rows read go straight to the windows' room): what
    is accepted and not yet delivered stays within the windows plus a chunk or
    two, never the whole list. On both backends every row is delivered exactly
    once, with one accepted and one delivered event, the job done, nothing
    left queued."""
    n, window = 12000, 500
    path = tmp_path / "list.csv"
    addrs = write_list(path, n)
    camp = write_campaign(tmp_path)
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f"[delivery]\nwindow = {window}\n")
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        res = run_fastsend(
            "send", str(camp), "-r", str(path), "--no-dkim", "-c", str(conf),
            "--spool", spool_url, "--route", f"*={host}:{port}", "--workers", "2",
            "--json", "--no-progress", "--max-wait", "5", timeout=300,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    s = summary(res)
    assert s["delivered"] == n and s["deferred"] == 0, s
    got = received_counts(log)
    assert set(got) == set(addrs) and max(got.values()) == 1
    counts, jobs = _state(spool_url)
    assert counts["delivered"] == n and counts["inflight"] == counts["queued"] == 0
    assert [j.status for j in jobs] == ["done"]
    events_path = tmp_path / "spool" / "events.jsonl"
    accepted = delivered = ahead = 0
    kinds: dict[int, list[str]] = {}
    with open(events_path, "rb") as f:
        for line in f:
            ev = orjson.loads(line)
            if ev["event"] in ("accepted", "delivered"):
                kinds.setdefault(ev["id"], []).append(ev["event"])
                accepted += ev["event"] == "accepted"
                delivered += ev["event"] == "delivered"
                ahead = max(ahead, accepted - delivered)
    assert len(kinds) == n and all(k == ["accepted", "delivered"] for k in kinds.values())
    if not spool_url.startswith("redis"):  # a shared spool's list is read ahead
        # Two windows, the chunk that found them full and the one read a
        # FEED_LAG later at most (the whole list before this pacing).
        assert ahead <= 2 * window + 2 * 2000 + 2000, ahead


# -- one reader per list ---------------------------------------------------------

HOLDER = """
import sys, time
from fastsend.spool import open_spool
spool = open_spool(sys.argv[1])
spool.hold_ingest(int(sys.argv[2]))
print("held", flush=True)
while True:
    spool.renew()  # what a reading process's loop does
    time.sleep(0.05)
"""


def test_a_list_has_one_reader_and_a_killed_one_does_not_block(
    spool_url: str, tmp_path: Path
) -> None:
    """A live process reading a list (here one that holds the job and reads
    slowly) makes `fastsend resume` stop at once with an error naming its pid,
    exit 75, the queue untouched; killed with -9, its hold does not block: the
    next `resume` reads on (on Redis without waiting out the lease: the holder
    ran on this host and is gone)."""
    import sys

    job, addrs = crashed_ingest(spool_url, tmp_path, 3000, batches=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, spool_url, str(job.id)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        log = tmp_path / "sink.jsonl"
        with SinkProcess("--log", str(log)) as sink:
            busy = resume(spool_url, sink)
            assert busy.returncode == 75, busy.stderr[-2000:]
            assert f"ingest job {job.id} is being read by pid {holder.pid} on " in busy.stderr
            assert not log.exists() or not received_counts(log)  # nothing was delivered
            spool = open_spool(spool_url)
            try:
                same = spool.get_ingest(job.id)
                assert same is not None and (same.accepted, same.status) == (1000, "running")
            finally:
                spool.close()
            holder.kill()  # kill -9: it leaves its hold behind
            holder.wait(10)
            res = resume(spool_url, sink)
        assert res.returncode == 0, res.stderr[-3000:]
        assert summary(res)["delivered"] == 3000
        got = received_counts(log)
        assert set(got) == set(addrs) and max(got.values()) == 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_lease_of_another_host_is_waited_out(redis_server: Any, tmp_path: Path) -> None:
    """On a shared spool a reader on another host cannot be checked from here:
    its lease is respected until it expires (it stops being renewed when that
    host dies), then the list is read on."""
    import orjson
    import redis

    url = str(redis_server.url(node="n1", dir=str(tmp_path / "spool")))
    job, addrs = crashed_ingest(url, tmp_path, 1500, batches=1)
    prefix = url.split("prefix=")[1].split("&")[0]
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    tag = {"pid": 4242, "host": "other-host.invalid", "start": 1.0, "since": time.time()}
    # A lease of 60 s, cut to 0.5 s once it was respected: it was 3 s, and a resume
    # that took longer to start (a loaded CI) found it lapsed and read the list (rc 0).
    lease = f"{{{prefix}}}:ing:{job.id}:lease"
    r.set(lease, orjson.dumps(tag), px=60_000)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        busy = resume(url, sink)
        assert busy.returncode == 75, busy.stderr[-2000:]
        assert "being read by pid 4242 on other-host.invalid" in busy.stderr
        assert r.pexpire(lease, 500)  # that host died: its lease is no longer renewed
        deadline = time.monotonic() + 60
        while r.exists(f"{{{prefix}}}:ing:{job.id}:lease") and time.monotonic() < deadline:
            time.sleep(0.1)
        res = resume(url, sink)
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(received_counts(log)) == set(addrs)


LATE_HOLDER = """
import sys
from fastsend.spool import open_spool
spool = open_spool(sys.argv[1])
spool.hold_ingest(int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()  # holds until the test closes stdin
"""


def test_redis_rows_of_a_lapsed_ingest_lease_are_refused(redis_server: Any,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """A writer stalled past its ingest lease (another process took the job
    over, or nobody did) adds no row: add_messages checks the lease in the same
    transaction as the rows (WATCH/MULTI/EXEC on a real redis-server) and raises
    IngestLost naming the new holder; the job's position is unchanged."""
    import sys

    from fastsend.spool import IngestLost, IngestMark

    url = str(redis_server.url(node="n1", dir=str(tmp_path / "spool"), lease="1"))
    sp = open_spool(url)
    try:
        cid = sp.create_campaign(_campaign())
        source = {"path": str(tmp_path / "l.csv"), "size": 1, "mtime_ns": 1, "sha256": "x"}
        job = sp.create_ingest(cid, source, 10)  # held by this process
        rows = [(f"a{i}@x.example", "x.example", b"{}") for i in range(3)]
        assert len(sp.add_messages(cid, rows, time.time(), ingest=IngestMark(job, 3, 3, 0))) == 3
        time.sleep(1.3)  # a stall longer than the lease: nobody renewed it
        with pytest.raises(IngestLost, match=f"ingest job {job}: this process's lease"):
            sp.add_messages(cid, rows, time.time(), ingest=IngestMark(job, 6, 6, 0))
        sp.hold_ingest(job)  # free again: taken back, then lapses again
        time.sleep(1.3)
        other = subprocess.Popen([sys.executable, "-c", LATE_HOLDER, url, str(job)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ))  # fmt: skip
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "held"
            with pytest.raises(IngestLost, match=f"pid {other.pid} on .* reads it now"):
                sp.add_messages(cid, rows, time.time(), ingest=IngestMark(job, 6, 6, 0))
        finally:
            assert other.stdin is not None
            other.stdin.close()
            other.wait(10)
        assert sum(sp.counts(cid).values()) == 3  # no row of the refused batches
        j = sp.get_ingest(job)
        assert j is not None and (j.line, j.accepted) == (3, 3)
        # Rows without an ingest mark (the API's messages) need no lease.
        assert len(sp.add_messages(cid, rows, time.time())) == 3
    finally:
        sp.close()


def test_a_short_first_chunk_then_whole_chunks(spool_url: str, tmp_path: Path) -> None:
    """`send` spools a short first chunk before the engine starts (a batch per
    worker, so the workers are forked sooner), then whole chunks: each commits
    the job's position, and a reader stopped after the first leaves the job
    where that chunk ended, for `resume`."""
    path = tmp_path / "list.csv"
    write_list(path, 2500, bad_at=(5,))
    spool = open_spool(spool_url)
    events = EventLog(str(tmp_path / "events.jsonl"))
    acceptor = Acceptor(spool, events, None)
    cid = acceptor.create_campaign(check_campaign(Campaign.from_dict(_campaign())), name="c")
    job = acceptor.start_ingest(cid, str(path))
    feed = acceptor.ingest(job, chunk=1000, first=300)
    first = next(feed)
    assert (first.accepted, first.rejected, first.line) == (300, 1, 302)
    now = spool.get_ingest(job.id)
    assert now is not None and now.accepted == 300 and not now.finished
    assert [m.accepted for m in feed] == [1300, 2300, 2500]
    done = spool.get_ingest(job.id)
    assert done is not None and done.finished and rows_left(done) == 0
    c = spool.counts(cid)
    assert c["queued"] + c["inflight"] == 2500
    events.close()
    spool.close()


def test_a_quote_never_closed_is_named_where_it_opens(tmp_path: Path) -> None:
    """A stray quote opening a field makes the csv module read the rest of the
    file into that field: one bad row that silently held every row after it,
    reported at the file's last line as "expected 2 columns, found 1". Now it
    is named on the line the quote opened, saying it was never closed; a bad
    record over several lines whose quote did close is named by its first line
    with its span; the rows before are read."""
    from fastsend import recipients

    p = tmp_path / "r.csv"
    p.write_text('email,name\na@x.example,A\n"b@x.example,B\nc@x.example,C\nd@x.example,D\n')
    got = list(recipients.read(str(p)))
    assert got[0][:2] == (2, "a@x.example")
    assert len(got) == 2 and isinstance(got[1], recipients.BadRow), got
    assert got[1].line == 3, got[1]
    assert "quote opened on this line is never closed" in got[1].error, got[1]
    assert "the 2 line(s) after it" in got[1].error, got[1]
    p.write_text('email,name\na@x.example,"two\nlines",extra\nb@x.example,B\n')
    got = list(recipients.read(str(p)))
    assert isinstance(got[0], recipients.BadRow) and got[0].line == 2, got
    assert "one record over lines 2-3" in got[0].error, got[0]
    assert got[1][:2] == (4, "b@x.example"), got


def test_a_field_over_the_csv_limit_is_said_plainly(tmp_path: Path) -> None:
    """A quote never closed within the csv module's field limit (131,072
    characters: the rest of a big list read into one field) stopped ``send``
    with a Python traceback. Now it is a clear error naming the line the quote
    opened on, before anything is spooled; a single over-long field says so
    ("a field longer than ..."), not the csv module's words."""
    from fastsend import recipients

    p = tmp_path / "unclosed.csv"
    with open(p, "w") as f:
        f.write('email,name\na@x.example,A\nb@x.example,"Bob\n')
        f.writelines(f"u{i}@x.example,N{i}\n" for i in range(8000))
    camp = write_campaign(tmp_path)
    spool = tmp_path / "spool"
    res = run_fastsend("send", str(camp), "-r", str(p), "--route", "*=127.0.0.1:9",
                       "--spool", str(spool), "--no-dkim", "--json", "--no-progress")  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "line 3: a quote opened on this line is not closed within 131,072" in res.stderr, (
        res.stderr[-2000:]
    )
    assert open_spool(str(spool)).counts()["queued"] == 0
    with pytest.raises(recipients.RecipientsError, match="line 3: a quote opened"):
        list(recipients.read(str(p)))

    long = tmp_path / "long.csv"
    long.write_text(f'email,name\na@x.example,"A"\nb@x.example,{"x" * 140_000}\nc@x.example,C\n')
    with pytest.raises(recipients.RecipientsError, match="line 3: a field longer than 131,072"):
        recipients.survey(str(long))
    with pytest.raises(recipients.RecipientsError, match="line 3: a field longer than 131,072"):
        list(recipients.read(str(long)))
