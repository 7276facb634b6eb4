"""fastsend.smtp: a pipelined SMTP client, sans-I/O core plus an asyncio transport.

The public face (see docs/INTERFACES.md, "SMTP client")::

    from fastsend.smtp import ConnectOptions, Timeouts, connect, SMTPConnection
    conn = await connect(ConnectOptions(host="127.0.0.1", port=2525))
    results = await conn.send(envelopes)   # list[TxnResult], never raises
    await conn.quit()

- :mod:`fastsend.smtp.client`: the state machine (no sockets, no asyncio).
- :mod:`fastsend.smtp.replies`: reply parsing and dot-stuffing (compiled twins).
- :mod:`fastsend.smtp.transport`: the only module that touches sockets.
- :mod:`fastsend.smtp.errors`: LocalProtocolError (our bug) and
  RemoteProtocolError (the peer's fault).

The server-side parser (``fastsend.smtp.server``) lives in this package too but
is not imported here: the client does not depend on it.
"""

from fastsend.smtp.client import CommandDone, SMTPClient
from fastsend.smtp.errors import LocalProtocolError, RemoteProtocolError, SMTPProtocolError
from fastsend.smtp.replies import ReplyParser, dot_stuff
from fastsend.smtp.transport import ConnectOptions, SMTPConnection, Timeouts, connect

__all__ = [
    "CommandDone",
    "ConnectOptions",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ReplyParser",
    "SMTPClient",
    "SMTPConnection",
    "SMTPProtocolError",
    "Timeouts",
    "connect",
    "dot_stuff",
]
