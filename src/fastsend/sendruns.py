"""A `fastsend send`'s recorded run (the options that say where and how its
mail goes, kept in its campaign's options) and what `serve` does with a
campaign a `send` left: set it aside for `fastsend resume`
(:func:`set_aside_sends`), which takes it back (:func:`take_back_set_aside`).
Here, below ``fastsend.commands`` and out of ``fastsend.serve`` (a plain send imports it), for serve to use."""

from __future__ import annotations

import os
import shlex
from typing import Any

# (fastsend.spool.base.ENDED: this module is below fastsend.spool, which imports it)
ENDED = frozenset({"cancelled", "abandoned"})

# The options of a run that say where and how its mail goes (the rest, --workers,
# --max-wait, --json..., are the command's own): `send` records them with its
# campaign (``RUN_OPTION``) and `resume` given none of them takes them back.
RUN_FLAGS = {"config": "-c", "route": "--route", "source_ip": "--source-ip", "helo": "--helo",
             "retry": "--retry", "nameserver": "--nameserver"}  # fmt: skip
RUN_OPTION = "run"


def run_flags(run: dict[str, Any]) -> str:
    """A recorded run's options as a command line says them."""
    words: list[str] = []
    for name, flag in RUN_FLAGS.items():
        value = run.get(name)
        for v in value if isinstance(value, list) else [value] if value else []:
            words += [flag, str(v)]
    return shlex.join(words) if words else "no options (MX, embedded defaults)"


# The reason a `serve` pausing a `send`'s campaign gives it (:func:`set_aside_sends`);
# `resume` takes such a campaign back (:func:`take_back_set_aside`).
SET_ASIDE = "set aside by serve: "


def _same_run(run: dict[str, Any], config_path: str) -> bool:
    """Whether a recorded run is serve's own: ``-c`` its config, nothing else."""
    path = run.get("config")
    return set(run) == {"config"} and isinstance(path, str) and (
        os.path.realpath(path) == os.path.realpath(config_path))  # fmt: skip


def set_aside_sends(spool: Any, config_path: str, spool_dir: str) -> list[str]:
    """At a `serve`'s start (with workers): pause (reason :data:`SET_ASIDE`) each
    active campaign a `send` spooled with other options than serve's own (its
    ``-c`` alone) that still has mail or a list to read (a `send` killed -9, or
    ended with mail deferred): serve's routes, source IPs, HELO and retries are
    not the ones its mail was sent with (before: serve delivered a `send
    --route`'s mail by its own routes, a test campaign to real MX hosts).
    Returns one line per campaign, naming the ``fastsend resume`` that
    continues it with its own options."""
    # On Redis (``send_owners``) a live process's send is left to it (its node
    # alone claims it), serve's own run whose process died is anyone's again.
    owners = getattr(spool, "send_owners", None)
    owned: dict[int, tuple[str, bool]] = owners() if owners is not None else {}
    reading = {j.campaign for j in spool.list_ingests(unfinished=True)}
    return _set_aside(spool, config_path, spool_dir, owned, reading, spool.list_campaigns())


def set_aside_dead_sends(spool: Any, config_path: str, spool_dir: str) -> list[str]:
    """A Redis `serve` with workers, every lease/2 (its tick): :func:`set_aside_sends`
    for the `send` campaigns whose process died since serve started (``P:own``
    names a node no live process holds: gone on this host, or its lease lapsed on
    another), and a dead send's ``P:own`` field dropped once its campaign has no
    mail left to deliver nor list to read, or is gone or ended (a finished send's
    field was kept for ever: every claim then read ``P:own``). Before, such a
    campaign's mail stayed unclaimed (no node claims a send's) until a `resume` or
    the next serve start. One ``HGETALL``/``MGET`` when no send died."""
    owned = spool.send_owners()
    dead = sorted(c for c, (n, live) in owned.items() if not live and n != spool.node)
    if not dead:
        return []
    infos = []
    counts = spool.counts_by_campaign(dead)
    reading = {j.campaign for j in spool.list_ingests(unfinished=True)}
    for cid in dead:
        info = spool.get_campaign(cid)
        left = sum(counts.get(cid, {}).get(s, 0) for s in ("queued", "inflight", "deferred"))
        over = info is not None and info.status == "active" and not left and cid not in reading
        if info is None or info.status in ENDED or over:
            spool.disown(cid)  # (nothing of it left for its send's options to say)
        elif info.status == "active":
            infos.append(info)
    return _set_aside(spool, config_path, spool_dir, owned, reading, infos) if infos else []


def _set_aside(spool: Any, config_path: str, spool_dir: str,
               owned: dict[int, tuple[str, bool]], reading: set[int],
               infos: Any) -> list[str]:  # fmt: skip
    me = getattr(spool, "node", None)
    out: list[str] = []
    for info in infos:
        run = (info.options or {}).get(RUN_OPTION)
        if not isinstance(run, dict) or info.status != "active":
            continue
        owner = owned.get(info.id)
        if owner is not None and owner[1] and owner[0] != me:
            continue  # its `send` runs: delivered by that process
        if _same_run(run, config_path):
            if owner is not None:
                spool.disown(info.id)
            continue
        if info.id not in reading and not spool.pending_domains([info.id], limit=1):
            continue
        spool.set_campaign_status(
            info.id, "paused", f"{SET_ASIDE}its `send` was given {run_flags(run)}"
        )
        out.append(
            f"campaign {info.id} {info.name!r} was spooled by `fastsend send` with"
            f" {run_flags(run)}, not serve's options: set aside (paused), not delivered;"
            f" continue it with `fastsend resume --spool {shlex_quote(spool_dir)}`"
            f"{'' if '://' in spool_dir else ' once serve is stopped'}"
            " (its recorded options are taken)"
        )
    return out


def take_back_set_aside(spool: Any) -> list[int]:
    """`resume`: the campaigns a `serve` set aside (:func:`set_aside_sends`) are
    active again, delivered with this run's options; returns their ids. On
    Redis the sends whose process is dead are this node's now (``adopt_sends``:
    no other node claims a send's campaign)."""
    adopt = getattr(spool, "adopt_sends", None)
    if adopt is not None:
        adopt()
    out: list[int] = []
    for info in spool.list_campaigns():
        if info.status == "paused" and info.reason.startswith(SET_ASIDE):
            spool.set_campaign_status(info.id, "active")
            out.append(info.id)
    return out


def shlex_quote(word: str) -> str:
    """A spool directory (absolute), or a spool URL without its password."""
    if "://" in word:
        from fastsend.redisurl import redact_url

        return shlex.quote(redact_url(word))
    return shlex.quote(os.path.abspath(word))
