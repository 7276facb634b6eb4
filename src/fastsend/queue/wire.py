"""Moved to :mod:`fastsend.wire` (a value module, the bottom layer): this name
stays for code written against the old path. New code imports fastsend.wire."""

from fastsend.wire import *  # noqa: F403
from fastsend.wire import encoder, from_worker_decoder  # noqa: F401
