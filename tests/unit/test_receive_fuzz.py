"""`Host.receive` never raises and never hits an internal error, whatever arrives."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack.net.host import Host, HostConfig
from stack.wire.checksum import internet_checksum
from tests.helpers import HOST_IP, STACK_IP, STACK_MAC, arp_frame, ping_frame

SEEDS = [ping_frame(), ping_frame(data=b""), arp_frame(),
         arp_frame(op=2, tpa=STACK_IP, dst=STACK_MAC)]


def fresh() -> Host:
    return Host(HostConfig(mac=STACK_MAC, address=STACK_IP, gateway=HOST_IP),
                     random.Random(0))


def feed(iface: Host, frame: bytes) -> None:
    iface.receive(frame, 1.0)
    for out in iface.poll(1.0):
        assert len(out) >= 14
    assert iface.counters["stack.internal_errors"] == 0, iface.last_internal_error


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    feed(fresh(), data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=6), st.integers(0, 120), st.booleans())
def test_mutated_valid_frames(seed, flips, cut, fix_checksum):
    """Valid frames with a few bytes changed; with the IPv4 header checksum repaired, the
    damage reaches the engines behind it instead of stopping at the checksum check."""
    frame = bytearray(seed)
    for offset, value in flips:
        if offset < len(frame):
            frame[offset] = value
    if cut < len(frame):
        frame = frame[: len(frame) - cut]
    hlen = (frame[14] & 0x0F) * 4 if len(frame) > 14 else 0
    if fix_checksum and frame[12:14] == b"\x08\x00" and 20 <= hlen <= len(frame) - 14:
        frame[24:26] = b"\x00\x00"
        frame[24:26] = internet_checksum(frame[14 : 14 + hlen]).to_bytes(2, "big")
    feed(fresh(), bytes(frame))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=14, max_size=120), min_size=1, max_size=50))
def test_sequences_on_one_interface(frames):
    iface = fresh()
    for frame in frames:
        feed(iface, STACK_MAC + frame[6:])
