"""Analytics: rollups, engagement, rates and reputation signals operators act on.

- :mod:`~fastsend.analytics.store` -- the rollup store seam (SQLite beside the
  spool, or Redis beside a Redis spool);
- :mod:`~fastsend.analytics.rollup` -- the event-log listener that counts;
- :mod:`~fastsend.analytics.machine` + ``machine.toml`` -- machine opens/clicks;
- :mod:`~fastsend.analytics.query` -- time ranges, granularities, rates;
- :mod:`~fastsend.analytics.attach` -- wiring a Rollups to a spool and event log.

This package sits beside the engine: it reads events and the shaping policy,
never the scheduler's state, and never imports ``serve`` or ``commands``.
"""
