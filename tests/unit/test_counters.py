"""The per-frame counters kept as slots (stack/counters.py) read and report like every
other counter: by name, in stats, zeros included, and nothing writes them by name."""

from stack.counters import HOT, Counters
from tests.unit.test_template import connected


def test_a_hot_counter_reads_by_name_and_shows_in_snapshots():
    c = Counters()
    c.declare("tcp.rx_segments", "tcp.resets_sent")
    assert c["tcp.rx_segments"] == 0 and c["tcp.nothing"] == 0
    c.hot.tcp_rx_segments += 3
    assert c["tcp.rx_segments"] == 3
    assert c.snapshot() == {"tcp.rx_segments": 3, "tcp.resets_sent": 0}
    assert c.grouped() == {"tcp": {"resets_sent": 0, "rx_segments": 3}}
    # undeclared and zero: not shown (an interface shows no TCP counters)
    assert "tcp.tx_segments" not in c.snapshot()
    copy = c.snapshot()
    c.hot.tcp_rx_segments += 1
    assert copy["tcp.rx_segments"] == 3  # a snapshot does not move


def test_after_a_transfer_the_hot_names_live_only_in_the_slots():
    wire, a, b, client, server = connected()  # two hosts, one connection
    client.send(bytes(50_000))
    wire.run(until=lambda: len(server.user.data) == 50_000, timeout=60)
    for host in (a, b):
        live = [host.node.counters] + [i.counters for i in host.node.interfaces]
        for counters in live:
            assert not set(HOT) & set(dict.keys(counters))  # nobody wrote one by name
        stats = host.stats()
        for name in HOT:
            layer, _, rest = name.partition(".")
            assert stats[layer][rest] == host.counters[name]
    assert b.node.counters["tcp.predicted_data"] == b.stats()["tcp"]["predicted_data"] > 0
    assert b.node.interfaces[0].counters["link.rx_frames"] == b.stats()["link"]["rx_frames"]
    assert b.node.interface_stats()["eth0"]["link"]["rx_bytes"] > 50_000
