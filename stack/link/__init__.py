"""Devices that move Ethernet frames: the TAP, the pcap tee, namespace plumbing."""


class LinkError(Exception):
    """A device problem a user can act on; the message is one sentence."""
