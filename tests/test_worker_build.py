"""A delivery worker's own steps (fastsend.delivery.worker): building a batch's
messages on the direct render path, and placing the batches of one inbox read
per site queue -- against a real SMTP sink, with real rings."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from _message_helpers import use_impl
from _supervisor_helpers import worker_results
from fastsend import msgid, wire
from fastsend.config import Config, Route
from fastsend.delivery.pool import SiteQueue
from fastsend.delivery.worker import Worker
from fastsend.message import Campaign, RenderError
from fastsend.message.keys import generate, write_key
from fastsend.ring import Ring
from fastsend.sink import SinkProcess

SECRET = b"worker build test secret 0123456789"
SPEC = {
    "from": "Sender <news@sender.example.com>",
    "subject": "Hello {{ name }}, your {{ plan }} plan",
    "text": "Hi {{ name }},\n\naccount {{ account }}.\n" + "lorem ipsum dolor sit amet " * 60,
    "html": "<p>Hi {{ name }}</p>",
}
RCPTS = ["ann@d1.example.net", "björn@d2.example.net", "carl@bücher.example", "dee@d1.example.net"]
DATE = re.compile(rb"^Date: [^\r]*\r\n", re.M)


def _values(i: int) -> dict[str, str]:
    return {"name": f"Näme{i}", "plan": ("free", "pro")[i % 2], "account": f"A{i:09d}"}


def _config(tmp_path: Path, port: int = 9) -> Config:
    return Config(spool_dir=str(tmp_path), secret=SECRET, routes={"*": Route("127.0.0.1", port)})


@pytest.mark.parametrize("impl", ["py", "c"])
def test_for_batch_renders_what_render_does(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    use_impl(monkeypatch, impl)
    r = Campaign.from_dict(SPEC).compile()
    fast = r.for_batch()
    assert fast is not None
    personal, date = fast
    for i, rcpt in enumerate(RCPTS):
        mid = msgid.token(1000 + i, SECRET)
        got = personal(_values(i), rcpt, mid, date, False)
        want = r.render(rcpt, _values(i), mid)
        assert DATE.search(got) and DATE.sub(b"", got) == DATE.sub(b"", want)
    # A message it cannot render raises; render() says why.
    with pytest.raises(KeyError):
        personal({"name": "x"}, RCPTS[0], "m1", date, False)
    with pytest.raises(RenderError, match="plan"):
        r.render(RCPTS[0], {"name": "x"}, "m1")


@pytest.mark.parametrize("impl", ["py", "c"])
def test_a_deferred_message_makes_what_personal_does(
    monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """Assembly.deferred (for_batch(deferred=True)): the message personal()
    makes, from the variables or their JSON, made when it is called; when
    personal() raises, what the fallback returns for (rcpt, variables, id)."""
    use_impl(monkeypatch, impl)
    r = Campaign.from_dict(SPEC).compile()
    personal, date = r.for_batch()  # type: ignore[misc]
    deferred, date2 = r.for_batch(deferred=True)  # type: ignore[misc]
    assert date2 == date
    asked: list[tuple] = []

    def fallback(rcpt: str, variables: object, mid: str) -> object:
        asked.append((rcpt, variables, mid))
        return "why"

    for i, rcpt in enumerate(RCPTS):
        mid = msgid.token(1000 + i, SECRET)
        want = personal(_values(i), rcpt, mid, date, False)
        assert deferred(_values(i), rcpt, mid, date, fallback)() == want
        assert deferred(orjson.dumps(_values(i)), rcpt, mid, date, fallback)() == want
    assert deferred(b"", RCPTS[0], "m0", date, fallback)() == "why"  # no variables: {}
    bad = orjson.dumps({"name": "x"})
    assert deferred(bad, RCPTS[1], "m1", date, fallback)() == "why"
    assert asked == [(RCPTS[0], b"", "m0"), (RCPTS[1], bad, "m1")]


@pytest.mark.parametrize("impl", ["py", "c"])
def test_assembly_envelopes_are_what_the_deferred_loop_makes(
    monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """Assembly.envelopes (Worker.build_each's deferred loop, one sender):
    per item an Envelope from the sender to its recipient, tagged with its
    id, SMTPUTF8 as needs_smtputf8 says for a non-ASCII recipient (or always
    with sender_utf8), its data the DeferredMessage deferred() makes with the
    item's token (a blob's vars when the item refers to one), and both twins
    make the same."""
    use_impl(monkeypatch, impl)
    r = Campaign.from_dict(SPEC).compile()
    deferred, date = r.for_batch(deferred=True)  # type: ignore[misc]
    blob = orjson.dumps(_values(7))
    digest, ref = "ab" * 32, wire.blob_ref("ab" * 32)
    assert wire.blob_digest(ref) == digest
    items = [wire.Item(500 + i, rcpt, orjson.dumps(_values(i)), 1) for i, rcpt in enumerate(RCPTS)]
    items.append(wire.Item(600, "eve@d3.example.net", ref, 2))
    asked: list[str] = []

    def needs(rcpt: str) -> bool:
        asked.append(rcpt)
        return rcpt.startswith("b")

    def fallback(rcpt: str, variables: object, mid: str) -> object:
        return "why"

    for sender_utf8 in (False, True):
        asked.clear()
        got = r.assembly.envelopes(
            items, {digest: blob}, SECRET, date, fallback, "bounce@s.example", sender_utf8, needs
        )
        assert [e.tag for e in got] == [it.id for it in items]
        assert [e.rcpts for e in got] == [[it.rcpt] for it in items]
        assert {e.mail_from for e in got} == {"bounce@s.example"}
        assert not any(e.eightbit for e in got)
        want_utf8 = [sender_utf8 or rcpt.startswith("b") for rcpt in RCPTS] + [sender_utf8]
        assert [e.smtputf8 for e in got] == want_utf8
        assert asked == ([] if sender_utf8 else ["björn@d2.example.net", "carl@bücher.example"])
        for e, it in zip(got, items, strict=True):
            vs = blob if it.id == 600 else it.vars
            mid = msgid.token(it.id, SECRET)
            assert e.data() == deferred(vs, it.rcpt, mid, date, fallback)()
        assert got[-1].data() == deferred(_values(7), "eve@d3.example.net",
                                          msgid.token(600, SECRET), date, fallback)()  # fmt: skip
    # VERP: a callable sender makes each message's from its token.
    got = r.assembly.envelopes(items, {digest: blob}, SECRET, date, fallback, "b-{}@v.example".format,
                               False, needs)  # fmt: skip
    assert [e.mail_from for e in got] == [
        f"b-{msgid.token(it.id, SECRET)}@v.example" for it in items
    ]
    # Without blobs, a ref is the item's own vars (then not JSON: the fallback).
    got = r.assembly.envelopes(items[-1:], {}, SECRET, date, fallback, "b@s.example", False, needs)
    assert got[0].data() == "why"
    # No secret: the row id alone (msgid.token).
    got = r.assembly.envelopes(items[:1], {}, b"", date, fallback, "b@s.example", False, needs)
    assert got[0].data() == deferred(items[0].vars, RCPTS[0], "500", date, fallback)()


@pytest.mark.parametrize("impl", ["py", "c"])
def test_envelopes_made_now_hand_over_what_they_would_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """Assembly.envelopes with ``now`` (an rsa-sha256 campaign's batches):
    each DeferredMessage is made as the envelope is, handed over once at its
    first call (then made again if asked), the same message either way and
    from either twin, and one that cannot be made then (its fallback's
    Outcome) is left to be made when sent."""
    import dkim as dkimpy

    from fastsend.message.keys import load_private_key, public_txt

    use_impl(monkeypatch, impl)
    key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 1024), key)
    dk = {"domain": "sender.example.com", "selector": "s1", "key": str(key)}
    r = Campaign.from_dict({**SPEC, "dkim": dk}).compile()
    assert r.made_ahead
    txt = public_txt(load_private_key(str(key)))
    deferred, date = r.for_batch(deferred=True)  # type: ignore[misc]
    items = [wire.Item(500 + i, rcpt, orjson.dumps(_values(i)), 1) for i, rcpt in enumerate(RCPTS)]
    items.append(wire.Item(600, "eve@d3.example.net", b'{"name": "x"}', 2))  # missing values

    def fallback(rcpt: str, variables: object, mid: str) -> object:
        return "why"

    sig = re.compile(rb"^DKIM-Signature: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", re.M)
    got = r.assembly.envelopes(items, {}, SECRET, date, fallback, "b@s.example", False,
                               lambda _r: False, True)  # fmt: skip
    assert [e.data.made for e in got] == [True] * len(RCPTS) + [False]
    for e, it in zip(got, items, strict=True):
        if it.id == 600:
            assert e.data() == "why"
            continue
        first = e.data()
        assert type(first) is bytes and not e.data.made
        again = e.data()  # (made again: the first was handed over)
        want = deferred(it.vars, it.rcpt, msgid.token(it.id, SECRET), date, fallback)()
        assert sig.sub(b"", first) == sig.sub(b"", again) == sig.sub(b"", want)
        assert dkimpy.verify(first, dnsfunc=lambda _n, timeout=5: txt.encode())


def test_for_batch_is_not_used_for_tracked_or_signed_mail(tmp_path: Path) -> None:
    """Not for tracked mail; for signed mail only deferred (a DeferredMessage
    signs as it makes the message), with one signature (Ed25519 made when
    sent; an rsa-sha256 signature made as the batch is built, made_ahead)."""
    secret = tmp_path / "tracking.key"
    secret.write_text("a tracking secret of enough length 0123")
    tracking = {"base_url": "https://t.example.com", "opens": True, "secret_file": str(secret)}
    tracked = {**SPEC, "tracking": tracking}
    assert Campaign.from_dict(tracked).compile().for_batch() is None
    assert Campaign.from_dict(tracked).compile().for_batch(deferred=True) is None
    key = tmp_path / "k.pem"
    write_key(generate("ed25519"), key)
    dk = {"domain": "sender.example.com", "selector": "s1", "key": str(key)}
    signed = Campaign.from_dict({**SPEC, "dkim": dk})
    assert signed.compile().for_batch() is None
    assert signed.compile().for_batch(deferred=True) is not None
    assert not signed.compile().made_ahead
    twice = Campaign.from_dict({**SPEC, "dkim": [dk, {**dk, "selector": "s2"}]})
    assert twice.compile().for_batch(deferred=True) is None
    rsa_key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 1024), rsa_key)
    rsa_signed = Campaign.from_dict({**SPEC, "dkim": {**dk, "key": str(rsa_key)}})
    assert rsa_signed.compile().for_batch() is None
    assert rsa_signed.compile().for_batch(deferred=True) is not None
    assert rsa_signed.compile().made_ahead
    assert Campaign.from_dict(SPEC).compile().for_batch() is not None


def test_build_each_answers_a_failed_render_and_builds_the_rest(tmp_path: Path) -> None:
    w = Worker(0, _config(tmp_path), ["127.0.0.2"], Ring(1 << 16), Ring(1 << 16))
    w.campaign_specs[1] = Campaign.from_dict(SPEC).to_dict()
    r = w.renderer(1)
    items = [wire.Item(10 + i, rcpt, orjson.dumps(_values(i)), 0) for i, rcpt in enumerate(RCPTS)]
    # Not a string: the render fails for this recipient alone.
    items.insert(2, wire.Item(99, "bad@d1.example.net", orjson.dumps({**_values(0), "name": 5}), 0))

    async def build() -> list:
        envs = w.build(wire.Batch(1, "d1.example.net", items))
        if w.flush_handle is not None:
            w.flush_handle.cancel()
        return envs

    envs = asyncio.run(build())
    assert [e.tag for e in envs] == [10, 11, 12, 13]
    for e, it in zip(envs, [it for it in items if it.id != 99], strict=True):
        assert e.rcpts == [it.rcpt] and e.mail_from == "news@sender.example.com"
        assert e.smtputf8 == r.needs_smtputf8(it.rcpt)
        want = r.render(it.rcpt, orjson.loads(it.vars), msgid.token(it.id, SECRET))
        assert DATE.sub(b"", e.data) == DATE.sub(b"", want)
    assert [e.smtputf8 for e in envs] == [False, True, False, False]  # IDN domain: no SMTPUTF8
    [res] = w.out
    assert res.id == 99 and res.kind == wire.K_FAILED and res.code == 550
    assert res.text.startswith("render:") and "string" in res.text


def _items(bad_vars: bytes) -> list[wire.Item]:
    """RCPTS as items 10, 11, ..., with one more (id 99, third) whose
    variables are ``bad_vars``."""
    items = [wire.Item(10 + i, rcpt, orjson.dumps(_values(i)), 0) for i, rcpt in enumerate(RCPTS)]
    items.insert(2, wire.Item(99, "bad@d1.example.net", bad_vars, 0))
    return items


def _worker_to_sink(
    tmp_path: Path, spec: dict, bad_vars: bytes, made: list[bool] | None = None
) -> tuple[list, dict[int, wire.Res], Worker, int]:
    """A worker sending campaign ``spec`` to :func:`_items` through a real
    sink that saves what it gets in ``tmp_path/saved``: the envelopes it
    built, the outcomes by id, the worker, the sink's port. ``made`` gets,
    per envelope, whether its message was made as it was built (bytes, or a
    DeferredMessage made ahead)."""
    with SinkProcess("--save", str(tmp_path / "saved")) as sink:
        config = _config(tmp_path, sink.addresses[0][1])
        inbox, outbox = Ring(1 << 20), Ring(1 << 20)
        enc = wire.encoder.encode
        inbox.put(enc(wire.CampaignSpec(1, spec)))
        inbox.put(enc(wire.Batch(1, "d1.example.net", _items(bad_vars))))
        inbox.put(enc(wire.Drain()))
        w = Worker(0, config, ["127.0.0.2"], inbox, outbox)
        built: list = []
        real_build = w.build

        def build(batch: wire.Batch, deferred: bool = False) -> list:
            built.extend(envs := real_build(batch, deferred))
            if made is not None:
                made.extend(type(e.data) is bytes or e.data.made for e in envs)
            return envs

        w.build = build  # type: ignore[method-assign]
        asyncio.run(asyncio.wait_for(w.main(), 60))
    return built, {res.id: res for res in worker_results(outbox)}, w, sink.port


@pytest.mark.parametrize("impl", ["py", "c"])
def test_deferred_messages_are_made_as_they_are_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """A worker's site queues hold DeferredMessages (build(deferred=True)): each
    is made by the SMTP client as its transaction starts, delivered with the
    bytes render() makes, and one that cannot be rendered is answered failed
    (550 5.6.0 render: ...) with nothing sent for it."""
    use_impl(monkeypatch, impl)
    bad_vars = orjson.dumps({**_values(0), "name": 5})  # not a string
    built, results, w, port = _worker_to_sink(
        tmp_path, Campaign.from_dict(SPEC).to_dict(), bad_vars
    )
    items = _items(bad_vars)
    assert len(built) == 5 and all(type(e.data) is not bytes for e in built)
    assert sorted(results) == [10, 11, 12, 13, 99]
    bad = results.pop(99)
    assert (bad.kind, bad.code, bad.enhanced, bad.stage) == (wire.K_FAILED, 550, "5.6.0", "local")
    assert bad.text.startswith("render:") and "string" in bad.text
    assert (bad.mx, bad.source_ip) == (f"127.0.0.1:{port}", "127.0.0.2")  # where it was to go
    assert all(res.kind == wire.K_DELIVERED for res in results.values())
    r = w.renderer(1)
    saved = sorted((tmp_path / "saved").iterdir())
    assert len(saved) == len(RCPTS)
    got = sorted(DATE.sub(b"", p.read_bytes().split(b"\r\n\r\n", 1)[1]) for p in saved)
    want = sorted(
        DATE.sub(b"", r.render(it.rcpt, orjson.loads(it.vars), msgid.token(it.id, SECRET))
                 .split(b"\r\n\r\n", 1)[1])
        for it in items if it.id != 99
    )  # fmt: skip
    assert got == want


def test_batches_of_one_read_go_onto_their_site_queue_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim arrives as one batch per recipient domain; every batch read in
    one wake-up for the same site is pushed once, and a Drain read with them
    still delivers each recipient exactly once, each with its outcome."""
    pushes: list[int] = []
    real_push = SiteQueue.push

    def counting_push(self: SiteQueue, envelopes: list) -> None:
        pushes.append(len(envelopes))
        real_push(self, envelopes)

    monkeypatch.setattr(SiteQueue, "push", counting_push)
    n_domains, per = 12, 5
    ids = list(range(1, n_domains * per + 1))
    with SinkProcess() as sink:
        config = _config(tmp_path, sink.addresses[0][1])
        inbox, outbox = Ring(1 << 20), Ring(1 << 20)
        enc = wire.encoder.encode
        inbox.put(enc(wire.CampaignSpec(1, Campaign.from_dict(SPEC).to_dict())))
        for d in range(n_domains):
            items = [
                wire.Item(i, f"u{i}@d{d}.example.net", orjson.dumps(_values(i)), 0)
                for i in ids[d * per : (d + 1) * per]
            ]
            inbox.put(enc(wire.Batch(1, f"d{d}.example.net", items)))
        inbox.put(enc(wire.Drain()))
        w = Worker(0, config, ["127.0.0.2"], inbox, outbox)

        async def run() -> None:
            # The route's site is known before the read, as after a worker's
            # first batch to it: every batch is placed in the read itself.
            await w.resolver.site_for("d0.example.net")
            await asyncio.wait_for(w.main(), 60)

        asyncio.run(run())
    assert pushes == [n_domains * per]
    results = worker_results(outbox)
    assert all(res.kind == wire.K_DELIVERED and res.code == 250 for res in results)
    assert Counter(res.id for res in results) == dict.fromkeys(ids, 1)


def test_a_read_of_signed_batches_lets_the_loop_run_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches whose messages are signed as they are built (rsa-sha256: ~0.26
    ms a message at 2048 bits, ~2 ms at 4096) are not all built in one
    callback: after READ_SLICE s of building, the worker reads the rest of its
    inbox in the loop's next iteration (here 0: a batch an iteration), so
    replies are read, messages sent and Stats written meanwhile (a whole
    window read at once held the loop for seconds; silent 30 s, the supervisor
    kills the worker). Every recipient is still delivered, once."""
    from fastsend.delivery import worker as worker_mod

    monkeypatch.setattr(worker_mod, "READ_SLICE", 0.0)
    key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 1024), key)
    dk = {"domain": "sender.example.com", "selector": "s1", "key": str(key)}
    spec = Campaign.from_dict({**SPEC, "dkim": dk}).to_dict()
    n_domains, per = 6, 3
    ids = list(range(1, n_domains * per + 1))
    ticks = [0]
    seen: list[int] = []  # the loop iteration each batch was built in
    with SinkProcess() as sink:
        config = _config(tmp_path, sink.addresses[0][1])
        inbox, outbox = Ring(1 << 20), Ring(1 << 20)
        enc = wire.encoder.encode
        inbox.put(enc(wire.CampaignSpec(1, spec)))
        for d in range(n_domains):
            items = [
                wire.Item(i, f"u{i}@d{d}.example.net", orjson.dumps(_values(i)), 0)
                for i in ids[d * per : (d + 1) * per]
            ]
            inbox.put(enc(wire.Batch(1, f"d{d}.example.net", items)))
        inbox.put(enc(wire.Drain()))
        w = Worker(0, config, ["127.0.0.2"], inbox, outbox)
        real_build = w.build

        def build(batch: wire.Batch, deferred: bool = False) -> list:
            seen.append(ticks[0])
            return real_build(batch, deferred)

        w.build = build  # type: ignore[method-assign]

        async def run() -> None:
            loop = asyncio.get_running_loop()

            def tick() -> None:  # counts the loop's iterations
                ticks[0] += 1
                if not w.done.is_set():
                    loop.call_soon(tick)

            await w.resolver.site_for("d0.example.net")  # every batch placed as read
            loop.call_soon(tick)
            await asyncio.wait_for(w.main(), 60)

        asyncio.run(run())
    assert len(seen) == n_domains
    assert seen == sorted(set(seen))  # each batch in an iteration of its own
    results = worker_results(outbox)
    assert all(res.kind == wire.K_DELIVERED and res.code == 250 for res in results)
    assert Counter(res.id for res in results) == dict.fromkeys(ids, 1)


def test_a_push_that_fails_defers_every_recipient_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batches of a read wait in Worker.placed: if putting them on their
    queue fails (a bug), each of their recipients is answered deferred, once."""

    def broken_push(self: SiteQueue, envelopes: list) -> None:
        raise RuntimeError("broken ready queue")

    monkeypatch.setattr(SiteQueue, "push", broken_push)
    inbox, outbox = Ring(1 << 20), Ring(1 << 20)
    enc = wire.encoder.encode
    inbox.put(enc(wire.CampaignSpec(1, Campaign.from_dict(SPEC).to_dict())))
    for d in range(3):
        items = [wire.Item(10 * d + i, f"u{i}@d{d}.example.net", orjson.dumps(_values(i)), 0)
                 for i in range(4)]  # fmt: skip
        inbox.put(enc(wire.Batch(1, f"d{d}.example.net", items)))
    w = Worker(0, _config(tmp_path), ["127.0.0.2"], inbox, outbox)

    async def run() -> None:
        await w.resolver.site_for("d0.example.net")
        w.on_inbox()
        w.flush()

    asyncio.run(run())
    results = worker_results(outbox)
    assert all(res.kind == wire.K_DEFERRED and res.code == 451 for res in results)
    assert {res.text for res in results} == {"local error: RuntimeError"}
    assert Counter(res.id for res in results) == {10 * d + i: 1 for d in range(3) for i in range(4)}
    assert w.busy == 0 and not w.placed
    assert "broken ready queue" in capsys.readouterr().err


def _signed_worker_run(
    tmp_path: Path, alg: str, made: list[bool] | None = None
) -> tuple[list, dict[int, wire.Res], list[bytes], dict[str, str], Worker]:
    """A worker sending SPEC signed with one ``alg`` key to a real sink (which
    saves what it gets): RCPTS plus one recipient whose values cannot be
    rendered (id 99). The envelopes built, the outcomes by id, the messages
    saved, the selector's TXT record, the worker (``made``: see _worker_to_sink)."""
    key = tmp_path / f"{alg}.pem"
    write_key(generate(alg, 2048), key)
    dk = {"domain": "sender.example.com", "selector": "s1", "key": str(key)}
    spec = Campaign.from_dict({**SPEC, "dkim": dk}).to_dict()
    built, results, w, _ = _worker_to_sink(tmp_path, spec, orjson.dumps({"name": "x"}), made)
    saved = [p.read_bytes() for p in sorted((tmp_path / "saved").iterdir())]
    from fastsend.message.keys import load_private_key, public_txt

    txt = {"s1._domainkey.sender.example.com": public_txt(load_private_key(str(key)))}
    return built, results, saved, txt, w


@pytest.mark.parametrize("alg", ["rsa", "ed25519"])
@pytest.mark.parametrize("impl", ["py", "c"])
def test_deferred_signed_messages_verify_at_a_real_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str, alg: str
) -> None:
    """Mail with one DKIM signature waits on the site queues as
    DeferredMessages too, made by the one compiled loop (Assembly.envelopes):
    Ed25519 made and signed by the SMTP client as its transaction starts,
    rsa-sha256 made and signed as the batch is built (back to back, not in
    the client's reply path), not by a render() per message; what the sink
    saved verifies with dkimpy and OpenDKIM, and is what render() makes; one
    that cannot be rendered is answered 550 5.6.0, nothing sent."""
    import dkim as dkimpy

    from _message_helpers import opendkim_verify
    from conftest import require_program

    exe = require_program("opendkim")
    use_impl(monkeypatch, impl)
    made: list[bool] = []
    built, results, saved, txt, w = _signed_worker_run(tmp_path, alg, made)
    assert len(built) == 5 and all(type(e.data) is not bytes for e in built)
    # rsa: each made ahead but the one that cannot be (made, and failed, when sent)
    want_made = [alg == "rsa" and e.tag != 99 for e in built]
    assert made == want_made
    assert sorted(results) == [10, 11, 12, 13, 99]
    bad = results.pop(99)
    assert (bad.kind, bad.code, bad.enhanced, bad.stage) == (wire.K_FAILED, 550, "5.6.0", "local")
    assert bad.text.startswith("render:") and "missing variable" in bad.text
    assert all(res.kind == wire.K_DELIVERED for res in results.values())
    assert len(saved) == len(RCPTS)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt[name.decode().rstrip(".")].encode()

    r = w.renderer(1)
    a = "ed25519-sha256" if alg == "ed25519" else "rsa-sha256"
    sig = re.compile(rb"^DKIM-Signature: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", re.M)
    want = sorted(
        DATE.sub(b"", sig.sub(b"", r.render(rcpt, _values(i), msgid.token(10 + i, SECRET))))
        for i, rcpt in enumerate(RCPTS)
    )
    got = []
    for data in saved:
        assert data.startswith(f"DKIM-Signature: v=1; a={a};".encode()), data[:200]
        assert dkimpy.verify(data, dnsfunc=dnsfunc)
        verdict = opendkim_verify(exe, tmp_path, data, txt)
        assert "s=s1," in verdict and "succeeded" in verdict, verdict
        got.append(DATE.sub(b"", sig.sub(b"", data)))
    assert sorted(got) == want


@pytest.mark.parametrize("alg", ["ed25519", "rsa"])
def test_a_signed_message_that_cannot_be_signed_is_deferred_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alg: str
) -> None:
    """A signature that fails (a fault put into the pure signer: libsodium or
    libcrypto refusing) loses nothing: made when sent (Ed25519) or failing as
    the batch is built (rsa-sha256: then tried again when sent), that message
    is answered 451 4.3.0 local error -- deferred, so the supervisor retries
    it -- with nothing sent for it and the others delivered (an rsa-sha256
    one deferred its whole batch, the others too)."""
    from fastsend.message import dkim as dkim_mod

    use_impl(monkeypatch, "py")

    def failing(real: Any) -> Any:
        def sign(*args: Any) -> bytes:
            lines = args[1] if alg == "rsa" else args[0]
            if b"To: ann@d1.example.net\r\n" in lines:  # RCPTS[0]'s message
                raise RuntimeError("failed to sign")
            return real(*args)  # type: ignore[no-any-return]

        return sign

    if alg == "rsa":
        monkeypatch.setattr(
            dkim_mod.PyRsaSigner, "sign_lines", failing(dkim_mod.PyRsaSigner.sign_lines)
        )
    else:
        monkeypatch.setattr(dkim_mod, "ed25519_sign_lines", failing(dkim_mod.ed25519_sign_lines))
    _built, results, saved, _txt, _w = _signed_worker_run(tmp_path, alg)
    assert sorted(results) == [10, 11, 12, 13, 99]
    res = results.pop(10)
    assert (res.kind, res.code, res.enhanced) == (wire.K_DEFERRED, 451, "4.3.0")
    assert res.text == "local error: RuntimeError"
    assert results.pop(99).code == 550
    assert all(res.kind == wire.K_DELIVERED for res in results.values())
    assert len(saved) == len(RCPTS) - 1


def _txn_results() -> list:
    """Results of every shape Worker.add_results meets, in one list."""
    from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Outcome, TxnResult

    ok = Outcome(DELIVERED, 250, "2.0.0", "Ok: queued as Q1", "data", "mx1[10.0.0.1]:25")
    bare = Outcome(DELIVERED, 250, "", "", "data", "")
    return [
        TxnResult(1, [ok], "Q1"),
        TxnResult(2, [bare], "Q2"),  # no text: the queue id; no mx: the connection's
        TxnResult(3, [bare], ""),
        TxnResult(4, [Outcome(DEFERRED, 451, "4.3.0", "try later", "rcpt", "mx1")]),
        TxnResult(5, [ok], "Q5"),
        TxnResult([6, 7], [bare, Outcome(FAILED, 550, "5.1.1", "no such user", "rcpt")], "Q6"),
        TxnResult(8, [Outcome("delivered", 250, "2.0.0", "ok")]),  # an equal kind string
        TxnResult("nine", [ok], "Q9"),  # not an int tag: the general path
        TxnResult(10, [Outcome(FAILED, 554, "5.7.1", "refused", "data", "mx2")]),
        TxnResult(11, [ok]),
        TxnResult(12, [ok]),
    ]


@pytest.mark.parametrize("mx", ["", "sink[127.0.0.1]:25"])
def test_collect_delivered_twins_agree(mx: str) -> None:
    from fastsend import _accel
    from fastsend.delivery.worker import py_collect_delivered

    twin = _accel.compiled("collect_delivered")
    rs = _txn_results()
    for i in range(len(rs) + 1):
        a: list[wire.Res | wire.Sent] = []
        b: list[wire.Res | wire.Sent] = []
        assert twin(rs, i, a, "127.0.0.2", mx) == py_collect_delivered(rs, i, b, "127.0.0.2", mx)
        assert a == b
    a = []
    assert twin(rs, 0, a, "127.0.0.2", mx) == 3
    assert [(r.id, r.text, r.mx) for r in wire.expand(a)] == [
        (1, "Ok: queued as Q1", mx or "mx1[10.0.0.1]:25"),
        (2, "Q2", mx),
        (3, "", mx),
    ]


@pytest.mark.parametrize("impl", ["py", "c"])
def test_add_results_records_every_outcome_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """Worker.add_results: one wire.Res per recipient (the deliveries in
    wire.Sent groups, expanded), in the order of the results, with either
    twin of collect_delivered."""
    from fastsend import _accel
    from fastsend.delivery import worker as worker_mod

    twin = worker_mod.py_collect_delivered if impl == "py" else _accel.compiled("collect_delivered")
    monkeypatch.setattr(worker_mod, "collect_delivered", twin)
    w = Worker(0, _config(tmp_path), ["127.0.0.2"], Ring(1 << 16), Ring(1 << 16))

    async def collect() -> list[wire.Res]:
        w.add_results(_txn_results(), "127.0.0.2", "")
        if w.flush_handle is not None:
            w.flush_handle.cancel()
        return wire.expand(w.out)

    out = asyncio.run(collect())
    assert [r.id for r in out] == [1, 2, 3, 4, 5, 6, 7, 8, "nine", 10, 11, 12]
    k = wire.K_DELIVERED
    assert [r.kind for r in out] == [k, k, k, wire.K_DEFERRED, k, k, wire.K_FAILED, k, k,
                                     wire.K_FAILED, k, k]  # fmt: skip
    assert [r.text for r in out][:3] == ["Ok: queued as Q1", "Q2", ""]
    assert out[5].text == "Q6" and out[5].queue_id == "Q6" and out[6].text == "no such user"
    assert out[9].stage == "data" and out[9].mx == "mx2" and out[3].stage == "rcpt"
    assert all(r.source_ip == "127.0.0.2" for r in out)


def test_a_deferred_batch_is_built_by_the_campaign_s_direct_call(tmp_path: Path) -> None:
    """Worker.build(deferred=True) of a personalised campaign is
    Assembly.envelopes with what Worker.direct found once for the campaign
    (with VERP, each message's sender made from its token): the envelopes
    build_each makes; a shared campaign has none (build_each's other paths),
    and a new spec finds it again."""
    w = Worker(0, _config(tmp_path), ["127.0.0.2"], Ring(1 << 16), Ring(1 << 16))
    w.campaign_specs[1] = Campaign.from_dict(SPEC).to_dict()
    w.campaign_specs[2] = Campaign.from_dict({**SPEC, "verp_domain": "b.example.com"}).to_dict()
    same = {**SPEC, "subject": "Hi", "text": "Hi", "html": "<p>Hi</p>"}
    w.campaign_specs[3] = Campaign.from_dict(same).to_dict()
    items = [wire.Item(10 + i, rcpt, orjson.dumps(_values(i)), 0) for i, rcpt in enumerate(RCPTS)]
    batch = wire.Batch(1, "d1.example.net", items)
    got = w.build(batch, deferred=True)
    want = w.build_each(batch, w.renderer(1), deferred=True)
    assert w.direct(1) is not None and w.direct(2) is not None and w.direct(3) is None
    assert [(e.mail_from, e.rcpts, e.tag, e.smtputf8) for e in got] == [
        (e.mail_from, e.rcpts, e.tag, e.smtputf8) for e in want
    ]
    assert [DATE.sub(b"", e.data()) for e in got] == [DATE.sub(b"", e.data()) for e in want]
    verp = w.build(wire.Batch(2, "d1.example.net", items), deferred=True)
    r2 = w.renderer(2)
    assert [e.mail_from for e in verp] == [
        r2.envelope_from(msgid.token(it.id, SECRET)) for it in items
    ]  # one VERP sender each, as envelope_from makes it
    assert len({e.mail_from for e in verp}) == len(items)
    assert [DATE.sub(b"", e.data()) for e in verp] == [
        DATE.sub(b"", r2.render(it.rcpt, orjson.loads(it.vars), msgid.token(it.id, SECRET)))
        for it in items
    ]
    # A campaign's new spec: its direct call is found again from it.
    enc = wire.encoder.encode
    new = Campaign.from_dict({**SPEC, "from": "Other <o@other.example.com>"}).to_dict()
    w.inbox.put(enc(wire.CampaignSpec(1, new)))
    w._read_inbox()
    assert 1 not in w.directs
    assert {e.mail_from for e in w.build(batch, deferred=True)} == {"o@other.example.com"}
