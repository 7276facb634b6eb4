"""guard25's audit: shaping and guardrails across reloads (serve's SIGHUP)."""

from __future__ import annotations

from pathlib import Path

from tests._serve_helpers import Served, until
from tests.test_multinode import TPL
from tests.test_serve_reload import hup

from fastsend.sink import SinkThread


def test_a_reload_during_a_campaigns_sample_does_not_hold_the_campaign(tmp_path: Path) -> None:
    """A campaign's first ``min_sample`` (500) messages go out while the rest
    waits in the window for their outcomes (Dispatch.sample_cap). A SIGHUP's
    retiring worker gives back what it had not sent, and the new worker's claim
    comes back in another order: the rest first, then the sample. The first
    message not in the full sample held every one after it, the sample's own
    too: nothing of the campaign went until ``sample_wait`` (30 s; here an hour)
    made the sample stale. Now the sample goes at once, and the rest as it is
    answered."""
    with SinkThread(max_connections=2, latency_ms=20.0) as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}",
                   delivery="max_connections = 8\npipeline = 4",
                   extra="[guardrails]\nsample_wait = 3600")  # fmt: skip
        try:
            rows = [{"email": f"a{i}@d.test", "name": "x"} for i in range(3000)]
            st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
            assert st == 201, out
            until("a refusal", lambda: sink.stats.faults.get("max-connections", 0) >= 1)
            hup(s, "configuration reloaded")
            until("the campaign's mail after the reload",
                  lambda: sink.stats.messages >= 1500 or s.proc.poll() is not None)  # fmt: skip
            got = {r for m in list(sink.messages) for r in m.recipients}
            # The sample (the list's first 500: claimed first) went before the rest.
            missing = [i for i in range(500) if f"a{i}@d.test" not in got]
            assert not missing, (len(missing), missing[:10])
        finally:
            s.stop()
