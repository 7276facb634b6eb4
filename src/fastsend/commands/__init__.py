"""Subcommands of the sending engine: send, resume, demo, queue."""
