"""Codecs only: bytes <-> header values. No state, no clock, no I/O."""
