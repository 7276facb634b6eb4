"""Test and demo helpers that ship with fastsend (real servers on loopback)."""
