"""The fused IPv4+TCP receive path changes nothing but speed: the same segments, fed to
two identical receivers, one with the fused path on and one with it off, leave the same
connection state and counters and make the very same frames, whatever the segments hold
(odd options, IP options, fragments, bad checksums, RST/SYN/FIN, out-of-window data...).

Input frames are built here with struct and a word-by-word checksum, not with the
stack's codecs."""

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stack.net.ipv4 as ipv4_module
from stack.link.impair import Impairment
from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig
from tests.unit.tcp_peer import open_pair
from tests.unit.test_checksum import reference_checksum

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A_MAC, B_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def tcp_options(kind: str, ts_val: int, ts_ecr: int) -> bytes:
    ts = struct.pack("!BBII", 8, 10, ts_val & 0xFFFFFFFF, ts_ecr & 0xFFFFFFFF)
    return {
        "none": b"",
        "ts": b"\x01\x01" + ts,  # the usual layout: what the fused path reads
        "ts_last": ts + b"\x01\x01",  # the same option, elsewhere
        "ts_sack": b"\x01\x01" + ts + b"\x01\x01\x05\x0a" + struct.pack("!II", 1, 2),
        "mss": b"\x02\x04\x05\xb4",
        "ts_mss": b"\x01\x01" + ts + b"\x02\x04\x05\xb4",
        "bad_length": b"\x01\x01\x08\x00" + ts[2:],  # length 0: malformed
        "unknown": b"\x01\x01\x1e\x0a" + ts[2:],  # an unknown kind where TS would be
        "eol": b"\x00" * 12,
    }[kind]


def frame(seq: int, ack: int, flags: int, window: int, options: bytes, payload: bytes,
          sport: int, dport: int, mutation: str, ident: int) -> tuple[bytes, bool]:
    """An Ethernet frame from A to B (and whether the link says the checksum is
    trusted), spoilt as `mutation` says."""
    src, dst, ttl = A_IP, B_IP, 64
    if mutation == "martian_source":
        src = bytes([127, 0, 0, 1])
    elif mutation == "not_ours":
        dst = bytes([10, 0, 0, 9])
    elif mutation == "directed_broadcast":
        dst = bytes([10, 0, 0, 255])
    elif mutation == "ttl_zero":
        ttl = 0
    offset_words = (20 + len(options)) // 4
    if mutation == "data_offset_short":
        offset_words = 4
    elif mutation == "data_offset_long":
        offset_words = 15
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      offset_words << 4, flags, window, 0, 0) + options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp_sum = reference_checksum(pseudo + tcp)
    if mutation == "bad_tcp_checksum" or mutation == "trusted_bad_checksum":
        tcp_sum ^= 0x0101
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    ip_options = b"\x01\x01\x01\x00" if mutation == "ip_options" else b""
    frag = 0x4000  # DF
    if mutation == "more_fragments":
        frag = 0x2000
    elif mutation == "fragment_offset":
        frag = 0x0001
    total = 20 + len(ip_options) + len(tcp)
    if mutation == "total_too_long":
        total += 4
    header = struct.pack("!BBHHHBBH4s4s", 0x45 + len(ip_options) // 4, 0, total, ident,
                         frag, ttl, 6, 0, src, dst) + ip_options
    ip_sum = reference_checksum(header)
    if mutation == "bad_ip_checksum":
        ip_sum ^= 0x0100
    header = header[:10] + struct.pack("!H", ip_sum) + header[12:]
    if mutation == "version_6":
        header = b"\x65" + header[1:]
    packet = header + tcp
    if mutation == "padded":
        packet += b"\xaa" * 7  # bytes past the datagram's total length
    elif mutation == "truncated":
        packet = packet[:36]
    return B_MAC + A_MAC + b"\x08\x00" + packet, mutation == "trusted_bad_checksum"


MUTATIONS = ["none"] * 12 + [
    "bad_tcp_checksum", "trusted_bad_checksum", "bad_ip_checksum", "ip_options",
    "more_fragments", "fragment_offset", "ttl_zero", "martian_source", "not_ours",
    "directed_broadcast", "total_too_long", "padded", "truncated", "version_6",
    "data_offset_short", "data_offset_long",
]
OPTIONS = ["ts"] * 6 + ["none", "ts_last", "ts_sack", "mss", "ts_mss", "bad_length",
                        "unknown", "eol"]
FLAGS = [ACK] * 6 + [ACK | PSH] * 3 + [ACK | FIN, ACK | URG, RST, RST | ACK, SYN,
                                       SYN | ACK, FIN, 0, ACK | SYN | FIN]

SEGMENT = st.fixed_dictionaries({
    "mutation": st.sampled_from(MUTATIONS),
    "options": st.sampled_from(OPTIONS),
    "flags": st.sampled_from(FLAGS),
    # where it starts: at RCV.NXT mostly, else ahead (a gap), behind (a duplicate) or
    # far outside the window
    "seq": st.sampled_from([0] * 8 + [1448, 3000, -700, -1448, 5_000_000, -5_000_000]),
    "ack": st.sampled_from([0] * 8 + [1, -1, 100_000, -100_000]),
    "ts": st.sampled_from([1] * 6 + [0, -1, -5_000, 0x7FFFFFFF]),
    "size": st.sampled_from([1448] * 4 + [0, 1, 99, 1000, 1447]),
    "window": st.sampled_from([0xFFFF] * 6 + [0, 100]),
    "port": st.sampled_from(["conn"] * 10 + ["other"]),
    "gap": st.sampled_from([0.0] * 6 + [0.001, 0.05, 1.0]),
})


def receiver_pair(seed: int):
    a = Host(HostConfig(mac=A_MAC, address=A_IP), random.Random(seed))
    b = Host(HostConfig(mac=B_MAC, address=B_IP), random.Random(seed + 1))
    wire = MemoryWire(a, b)
    wire.start()
    client, server = open_pair(wire, a, b)
    a.poll(wire.now)  # what A still had to send is not part of this test
    b.poll(wire.now)
    return wire, b, client, server


def plain_fields(obj) -> dict:
    out = {}
    for name in getattr(obj, "__slots__", None) or vars(obj):
        value = getattr(obj, name, None)
        if isinstance(value, (int, float, str, bool, type(None), tuple)):
            out[name] = value
    return out


def feed(seed: int, segments: list[dict], fused: bool) -> dict:
    ipv4_module.FUSED = fused
    try:
        wire, b, client, server = receiver_pair(seed)
        taken = []
        parsed_by_fused = b.ipv4.fused_tcp

        def counted(*args):
            taken.append(1)
            parsed_by_fused(*args)

        b.ipv4.fused_tcp = counted
        user = server.user  # (the connection lets go of it when it ends)
        now = wire.now
        ts_clock = server.ts_recent  # what B last saw from A; the specs move it
        sent, fed = [], []
        payload = random.Random(seed).randbytes(1448)
        for i, spec in enumerate(segments):
            now += spec["gap"]
            ts_clock += spec["ts"]
            sport = client.local_port if spec["port"] == "conn" else 1234
            opts = tcp_options(spec["options"], ts_clock, server._ts_now(now))
            data, trusted = frame(server.rcv_nxt + spec["seq"], server.snd_nxt + spec["ack"],
                                  spec["flags"], spec["window"], opts,
                                  payload[:spec["size"]], sport, 80, spec["mutation"], i)
            fed.append(data)
            b.receive(data, now, checksum_trusted=trusted)
            sent += [bytes(f) for f in b.poll(now)]
        return {"sent": sent, "fed": fed, "server": plain_fields(server),
                "cc": plain_fields(server.cc), "rto": plain_fields(server.rto),
                "data": bytes(user.data), "eof": user.eof,
                "closed": [repr(e) for e in user.closed],
                "counters": dict(b.counters), "stats": b.stats(),
                "connections": sorted(b.tcp.connections),
                "time_wait": len(b.tcp.time_wait), "fused": len(taken)}
    finally:
        ipv4_module.FUSED = True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(1, 1000), segments=st.lists(SEGMENT, min_size=1, max_size=40))
def test_the_fused_path_leaves_the_same_state_and_sends_the_same_frames(seed, segments):
    fast = feed(seed, segments, True)
    slow = feed(seed, segments, False)
    assert slow["fused"] == 0
    assert fast["fed"] == slow["fed"]
    for key in ("sent", "server", "cc", "rto", "data", "eof", "closed", "counters",
                "stats", "connections", "time_wait"):
        assert fast[key] == slow[key], key


def test_plain_in_order_data_takes_the_fused_path():
    plain = {"mutation": "none", "options": "ts", "flags": ACK, "seq": 0, "ack": 0,
             "ts": 1, "size": 1448, "window": 0xFFFF, "port": "conn", "gap": 0.0}
    fast = feed(3, [plain] * 20, True)
    assert fast["fused"] == 20
    assert len(fast["data"]) == 20 * 1448


def test_unusual_segments_take_the_general_path():
    """Each of these must be left to the general path (its checks, its counters)."""
    base = {"mutation": "none", "options": "ts", "flags": ACK, "seq": 0, "ack": 0,
            "ts": 1, "size": 100, "window": 0xFFFF, "port": "conn", "gap": 0.0}
    for change in ({"mutation": m} for m in MUTATIONS if m not in
                   ("none", "padded", "trusted_bad_checksum")):
        assert feed(5, [dict(base, **change)], True)["fused"] == 0, change
    for change in ({"options": o} for o in OPTIONS if o not in ("ts", "none")):
        assert feed(5, [dict(base, **change)], True)["fused"] == 0, change
    # a checksum the link vouches for is not verified, on either path
    assert feed(5, [dict(base, mutation="trusted_bad_checksum")], True)["fused"] == 1


def transfer(seed: int, faults: str, size: int, fused: bool) -> dict:
    """A whole connection, both ways, under seeded faults (corruption included)."""
    ipv4_module.FUSED = fused
    try:
        a = Host(HostConfig(mac=A_MAC, address=A_IP), random.Random(seed))
        b = Host(HostConfig(mac=B_MAC, address=B_IP), random.Random(seed + 1))
        sent = {"a": [], "b": []}

        class Tapped:
            def __init__(self, host, name):
                self.host, self.name = host, name

            def poll(self, now):
                out = self.host.poll(now)
                sent[self.name] += [bytes(f) for f in out]
                return out

            def __getattr__(self, attr):
                return getattr(self.host, attr)

        ab = Impairment.parse(f"{faults},seed={seed}", prefix="ab") if faults else None
        ba = Impairment.parse(f"{faults},seed={seed + 7}", prefix="ba") if faults else None
        wire = MemoryWire(Tapped(a, "a"), Tapped(b, "b"), ab, ba)
        wire.start()
        client, server = open_pair(wire, wire.a, wire.b)
        client_user, server_user = client.user, server.user
        data = random.Random(seed).randbytes(size)
        client.send(data)
        server.send(data[: size // 3])
        client.shutdown()
        wire.run(until=lambda: server_user.eof and len(client_user.data) == size // 3,
                 timeout=600)
        server.shutdown()
        wire.run(timeout=120)
        return {"sent": sent, "client": plain_fields(client), "server": plain_fields(server),
                "got": (bytes(server_user.data) == data,
                        bytes(client_user.data) == data[: size // 3]),
                "counters": (dict(a.counters), dict(b.counters))}
    finally:
        ipv4_module.FUSED = True


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(1, 10_000),
       faults=st.sampled_from(["", "loss=2%", "corrupt=2%", "reorder=5%,delay=1ms",
                               "loss=1%,duplicate=1%,corrupt=1%"]),
       size=st.integers(1, 100_000))
def test_whole_transfers_are_the_same_with_and_without_it(seed, faults, size):
    fast = transfer(seed, faults, size, True)
    slow = transfer(seed, faults, size, False)
    assert fast["got"] == slow["got"] == (True, True)
    for key in ("sent", "client", "server", "counters"):
        assert fast[key] == slow[key], key
