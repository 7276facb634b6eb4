"""``fastsend top -c fastsend.toml`` (or ``--spool DIR|redis://...``): a live full-screen view.

NAME
    fastsend.commands.top -- the operators' terminal view of the rollups.

DESCRIPTION
    Redraws every ``--interval`` seconds (default 1) on the terminal's
    alternate screen with plain ANSI sequences (no curses: the screen is a few
    dozen lines of text, and plain ANSI works in any terminal and in tmux):

    - the spool's messages per state;
    - totals and rates over the last ``--minutes`` (default 60): accepted,
      delivered, deferred, bounced (hard), complaints, unsubscribes, opens
      and clicks (human-likely / machine), delivery, bounce and complaint
      rates (with the 0.3% line), unique open rate, CTR, click-to-open;
    - per-minute sparklines (delivered, deferred, bounced); deferrals and
      bounces by reason;
    - tables per provider, per source IP and per campaign (cut to the
      terminal's height).

    Node-wide by default (every tenant); ``--tenant NAME`` narrows to one.
    ``q`` (or Ctrl-C) quits; ``--once`` prints one frame and exits (scripts);
    output that is no terminal gets plain frames, one per ``--interval``.
    It reads the rollup store and the spool read-only: safe beside a running
    ``send`` or ``serve``.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import sys
import time
from typing import Any

from fastsend.analytics.query import StatsQuery, rates, run_query
from fastsend.analytics.store import IDX, RollupStore
from fastsend.analytics.stores import open_store
from fastsend.commands.common import die

NODE = "*"
SPARK = "▁▂▃▄▅▆▇█"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (TOML): its spool")
    p.add_argument("--spool", help="spool directory or redis:// URL (default ./spool)")
    p.add_argument("--tenant", default="", help="one tenant's figures (default: every tenant)")
    p.add_argument("--minutes", type=int, default=60, help="the window, in minutes (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    p.add_argument("--once", action="store_true", help="print one frame and exit")


def _pct(v: float | None) -> str:
    return "    –  " if v is None else f"{100 * v:6.2f}%"


def _n(v: int) -> str:
    return f"{v:,}"


# SGR sequences (bold, colours) of a frame, for output that is no terminal.
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def _styled(out: Any) -> bool:
    """Whether ``--once`` writes bold and colour: to a terminal, unless NO_COLOR is set
    (https://no-color.org). A frame piped to a file, ``grep`` or a mail is plain text."""
    return bool(out.isatty()) and not os.environ.get("NO_COLOR")


def spark(values: list[int], width: int) -> str:
    vals = values[-width:]
    top = max(vals, default=0)
    if top <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(7, int(v * 7 / top + 0.999))] if v else " " for v in vals)


class Top:
    def __init__(self, store: RollupStore, spool: Any, tenant: str, minutes: int) -> None:
        self.store = store
        self.spool = spool
        self.tenant = tenant or NODE
        self.minutes = minutes

    def frame(self, now: float, width: int, height: int) -> list[str]:
        t1 = int(now) - int(now) % 60 + 60
        t0 = t1 - self.minutes * 60
        q = StatsQuery(self.tenant, t0, t1, "minute", [], {}, 50)
        allq = run_query(self.store, q)
        c = allq["totals"]["counts"]
        r = allq["totals"]["rates"]
        who = "all tenants" if self.tenant == NODE else f"tenant {self.tenant}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))
        out = [
            f"\x1b[1mfastsend top\x1b[0m — {who} — last {self.minutes} min — {stamp}   (q quits)"
        ]
        try:
            states = self.spool.counts() if self.spool is not None else {}
        except Exception:
            states = {}
        if states:
            out.append("spool: " + "  ".join(f"{k} {_n(v)}" for k, v in states.items() if v))
        out.append("")
        out.append(
            f"accepted {_n(c['accepted'])}   delivered {_n(c['delivered'])}   deferred"
            f" {_n(c['deferred'])}   bounced {_n(c['bounced'])} (hard {_n(c['bounced_hard'])})"
            f"   expired {_n(c['expired'])}   complaints {_n(c['complaints'])}"
            f"   unsubscribes {_n(c['unsubscribes'])}"
        )
        out.append(
            f"opens {_n(c['opens'])} human / {_n(c['opens_machine'])} machine"
            f" (unique {_n(c['opens_unique'])} / {_n(c['opens_machine_unique'])})   clicks"
            f" {_n(c['clicks'])} human / {_n(c['clicks_machine'])} machine"
            f" (unique {_n(c['clicks_unique'])} / {_n(c['clicks_machine_unique'])})"
        )
        cr = r["complaint_rate"]
        warn = "  \x1b[31mOVER the 0.3% line\x1b[0m" if cr is not None and cr >= 0.003 else ""
        out.append(
            f"delivery {_pct(r['delivery_rate'])}  bounce {_pct(r['bounce_rate'])}  complaint"
            f" {_pct(cr)} (line 0.30%){warn}  unique open {_pct(r['unique_open_rate'])}"
            f"  CTR {_pct(r['click_rate'])}  click-to-open {_pct(r['click_to_open_rate'])}"
        )
        s = allq["series"]
        out.append("")
        out.append("delivered/min " + spark(s["delivered"], max(10, width - 20)))
        out.append("deferred/min  " + spark(s["deferred"], max(10, width - 20)))
        out.append("bounced/min   " + spark(s["bounced"], max(10, width - 20)))
        for kind in ("deferred", "bounced"):
            items = list(allq["reasons"][kind].items())[:5]
            text = "  ".join(f"{k} {_n(v)}" for k, v in items) or "–"
            out.append(f"{kind} by reason: {text}")
        head = (f"{'':24s} {'accepted':>9s} {'delivered':>9s} {'deferred':>9s} {'bounced':>8s}"
                f" {'bounce':>8s} {'complaint':>9s} {'open':>8s} {'CTR':>8s}")  # fmt: skip
        for dim, title in (("provider", "BY PROVIDER"), ("source_ip", "BY SOURCE IP")):
            q = StatsQuery(self.tenant, t0, t1, "total", [dim], {}, 8, reasons=False)
            groups = run_query(self.store, q)["groups"]
            out += ["", f"\x1b[1m{title}\x1b[0m", head]
            for name, g in groups.items():
                out.append(self._row(name or "(none)", g["counts"]))
        out += ["", "\x1b[1mBY CAMPAIGN\x1b[0m", head]
        for name, row in self._campaigns(t0, t1)[:8]:
            out.append(self._row(name, row))
        return [line[: width + 20] for line in out[:height]]

    def _row(self, name: str, counts: dict[str, int]) -> str:
        row = [counts.get(k, 0) for k in IDX]
        rr = rates(row)
        return (
            f"{name[:24]:24s} {row[IDX['accepted']]:9,d} {row[IDX['delivered']]:9,d}"
            f" {row[IDX['deferred']]:9,d} {row[IDX['bounced']]:8,d} {_pct(rr['bounce_rate']):>8s}"
            f" {_pct(rr['complaint_rate']):>9s} {_pct(rr['unique_open_rate']):>8s}"
            f" {_pct(rr['click_rate']):>8s}"
        )

    def _campaigns(self, t0: int, t1: int) -> list[tuple[str, dict[str, int]]]:
        """Per campaign (campaigns live in their tenants' rows)."""
        try:
            camps = self.spool.list_campaigns() if self.spool is not None else []
        except Exception:
            camps = []
        tenants = sorted({c.tenant or "default" for c in camps})
        if self.tenant != NODE:
            tenants = [self.tenant]
        names = {c.id: c.name for c in camps}
        out = []
        for t in tenants:
            q = StatsQuery(t, t0, t1, "total", ["campaign"], {}, 50, reasons=False)
            for g in run_query(self.store, q)["groups"].values():
                cid = g["key"]["campaign"]
                out.append((f"{cid} {names.get(cid, '')}", g["counts"]))
        out.sort(key=lambda kv: -(kv[1].get("delivered", 0) + kv[1].get("accepted", 0)))
        return out


def _open(args: argparse.Namespace) -> tuple[RollupStore, Any]:
    from fastsend.spool import SpoolError, is_redis_url, open_spool, spool_local_dir

    spool_arg = args.spool
    if args.config:
        from fastsend.config import load

        cfg = load(args.config)
        spool_arg = spool_arg or cfg.spool_dir
    spool_arg = spool_arg or "./spool"
    if is_redis_url(spool_arg):  # (a view: it works against a replica)
        spool = open_spool(spool_arg, readonly=True)
        return open_store(spool, spool_local_dir(spool_arg)), spool
    view: Any = None  # no spool yet: the rollups alone
    try:
        view = open_spool(spool_arg, readonly=True)
    except SpoolError:
        pass
    return open_store(spool_arg, readonly=True), view


def run(args: argparse.Namespace) -> int:
    from fastsend.config import ConfigError

    if args.minutes < 1 or args.minutes > 1440 or not args.interval > 0:
        return die("--minutes must be 1..1440 and --interval > 0")
    try:
        store, spool = _open(args)
    except ConfigError as e:
        return die(str(e))
    except FileNotFoundError as e:
        return die(f"no rollups yet at {e} (run send or serve first)")
    except Exception as e:  # a spool that cannot be opened (a Redis that does not answer: 75)
        return die(f"cannot open the spool: {e}", getattr(e, "exit_status", 2))
    top = Top(store, spool, args.tenant, args.minutes)
    out = sys.stdout
    if args.once or not out.isatty():
        # One frame (--once), or output that is no terminal (a file, a pipe, a
        # log): frames as text, one per --interval, as `top -b` (the full-screen
        # view wrote its screen and cursor sequences into the file).
        try:
            while True:
                size = shutil.get_terminal_size((120, 60))
                lines = top.frame(time.time(), size.columns, 1000)
                lines[0] = lines[0].replace("   (q quits)", "")  # no key is read
                text = "\n".join(lines) + "\n"
                if not _styled(out):  # a pipe, a file, NO_COLOR: no escape sequences
                    text = _ESCAPES.sub("", text)
                out.write(text)
                if args.once:
                    return 0
                out.write("\n")
                out.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        finally:
            store.close()
            if spool is not None:
                spool.close()
    tty = sys.stdin.isatty()
    old: Any = None
    if tty:
        import termios
        import tty as ttymod

        old = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setcbreak(sys.stdin.fileno())
    out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
    try:
        while True:
            size = shutil.get_terminal_size((120, 40))
            lines = top.frame(time.time(), size.columns, size.lines)
            out.write("\x1b[H\x1b[2J" + "\r\n".join(lines))
            out.flush()
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                if not tty:
                    time.sleep(left)
                    break
                ready, _, _ = select.select([sys.stdin], [], [], left)
                if ready and os.read(sys.stdin.fileno(), 32).lower().startswith(b"q"):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        if old is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old)
        store.close()
        if spool is not None:
            spool.close()
