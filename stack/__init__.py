"""tapstack: a userspace TCP/IP stack on a Linux TAP device."""

__version__ = "0.1.0"
