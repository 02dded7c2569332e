"""Header prediction changes nothing but speed: the same transfer, under the same seeded
faults, on the virtual clock, sends the very same frames both ways and ends in the same
connection state with the fast paths on and off."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

import stack.net.tcp.tcp_input as tcp_input
from stack.link.impair import Impairment
from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig
from tests.unit.tcp_peer import open_pair

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
STATE = ("rcv_nxt", "rcv_adv", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1",
         "snd_wl2", "max_snd_wnd", "ts_recent", "ts_recent_time", "_dupacks",
         "_segs_unacked", "_ack_now", "t_delack", "_probes_unanswered", "state",
         "_last_ack_sent", "_quickack", "_retries", "_in_recovery", "_recover",
         "_persist_backoff", "t_persist", "timer_at")


class Tapped:
    """A host whose every frame sent is written down."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.sent: list[bytes] = []

    def poll(self, now):
        out = self.host.poll(now)
        self.sent += [bytes(f) for f in out]
        return out

    def __getattr__(self, name):
        return getattr(self.host, name)


def _fields(obj) -> dict:
    """Every plain field of an object (its slots or its dict), for comparison."""
    names = getattr(obj, "__slots__", None) or vars(obj)
    out = {}
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float, str, bool, type(None), tuple)):
            out[name] = value
    return out


def transfer(seed: int, faults: str, size: int, predict: bool):
    tcp_input.PREDICT = predict
    try:
        a = Tapped(Host(HostConfig(mac=bytes.fromhex("020000000001"), address=A_IP),
                        random.Random(seed)))
        b = Tapped(Host(HostConfig(mac=bytes.fromhex("020000000002"), address=B_IP),
                        random.Random(seed + 1)))
        ab = Impairment.parse(f"{faults},seed={seed}", prefix="ab") if faults else None
        ba = Impairment.parse(f"{faults},seed={seed + 7}", prefix="ba") if faults else None
        wire = MemoryWire(a, b, ab, ba)
        wire.start()
        client, server = open_pair(wire, a, b)
        data = random.Random(seed).randbytes(size)
        client.send(data)
        wire.run(until=lambda: len(server.user.data) == size, timeout=600)
        return {"data": bytes(server.user.data) == data,
                "a_sent": a.sent, "b_sent": b.sent,
                "client": {k: getattr(client, k) for k in STATE},
                "server": {k: getattr(server, k) for k in STATE},
                "cc": (client.cc.cwnd, client.cc.ssthresh, server.cc.cwnd,
                       server.cc.ssthresh),
                "rto": (vars(client.rto) if hasattr(client.rto, "__dict__") else
                        {k: getattr(client.rto, k) for k in client.rto.__slots__},
                        vars(server.rto) if hasattr(server.rto, "__dict__") else
                        {k: getattr(server.rto, k) for k in server.rto.__slots__}),
                "cc_all": (_fields(client.cc), _fields(server.cc)),
                "predicted_acks": a.counters["tcp.predicted_acks"],
                "predicted_data": b.counters["tcp.predicted_data"]}
    finally:
        tcp_input.PREDICT = True


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(1, 10_000),
       faults=st.sampled_from(["", "loss=2%", "reorder=5%,delay=1ms", "loss=1%,duplicate=1%",
                               "delay=2ms,jitter=1ms"]),
       size=st.integers(1, 300_000))
def test_the_fast_paths_send_the_same_frames_and_leave_the_same_state(seed, faults, size):
    fast = transfer(seed, faults, size, True)
    slow = transfer(seed, faults, size, False)
    assert fast["data"] and slow["data"]
    assert fast["a_sent"] == slow["a_sent"] and fast["b_sent"] == slow["b_sent"]
    for side in ("client", "server", "cc", "rto", "cc_all"):
        assert fast[side] == slow[side], side
    assert slow["predicted_acks"] == slow["predicted_data"] == 0
    if not faults and size > 20_000:
        assert fast["predicted_data"] > 0  # the receiver's fast path was taken
