"""Transports: how a route carries mail -- direct MX (``smtp``), an
authenticated SMTP ``relay``, or a provider's HTTP API (``ses``, ``sendgrid``,
``mailgun``). Messages are rendered and DKIM-signed by fastsend whatever the
transport; outcomes come back with the same kinds as SMTP's.

- ``spec.py``    -- ``[transports.NAME]``, route values, credentials (env / 0600 file)
- ``fastsend.delivery.routes`` -- in a worker: the queue for a batch, failover between transports
- ``relay.py``   -- a relay's ConnectOptions (AUTH, TLS, implicit TLS) and limits
- ``http.py``    -- provider answers -> Outcomes; ProviderQueue (in-flight bound, rate, throttling)
- ``control.py`` -- the providers' control headers (X-SES-*, X-SMTPAPI, X-Mailgun-*), removed
- ``sigv4.py``   -- AWS Signature Version 4
- ``ses.py``, ``sendgrid.py``, ``mailgun.py`` -- the providers' requests and answers

Provider events (webhooks) come back through fastsend.serve.provider_events.
"""
