"""Workers hand each other what they do not own: two real nodes, as two workers would
hold them, joined by the same unix datagram sockets the supervisor makes."""

import random

import dpkt
import pytest

from stack.net.host import Host, HostConfig
from stack.net.tcp.layer import EPHEMERAL_HIGH, EPHEMERAL_LOW
from stack.workers import Steering, _sum_into, make_inboxes, owner_of
from tests.helpers import HOST_IP, HOST_MAC, STACK_IP, STACK_MAC, arp_frame, eth


class Recorder:
    def __init__(self):
        self.got = []

    def on_datagram(self, data, addr):
        self.got.append((data, addr))

    def on_error(self, exc):
        self.got.append(exc)


@pytest.fixture
def workers():
    inboxes = make_inboxes(2)
    senders = [tx for _, tx in inboxes]
    hosts = [Host(HostConfig(mac=STACK_MAC, address=STACK_IP, gateway=HOST_IP),
                  random.Random(i)) for i in range(2)]
    steering = [Steering(h.node, i, 2, inboxes[i][0], senders) for i, h in enumerate(hosts)]
    for s in steering:
        s.install()
    yield hosts, steering
    for rx, tx in inboxes:
        rx.close()
        tx.close()


def port_owned_by(worker: int, lport: int = 80, start: int = 40000) -> int:
    return next(p for p in range(start, 65536) if owner_of(HOST_IP, p, lport, 2) == worker)


def syn(rport: int, lport: int = 80) -> bytes:
    tcp = dpkt.tcp.TCP(sport=rport, dport=lport, seq=1000, flags=dpkt.tcp.TH_SYN,
                       win=65535)
    return eth(dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=6, ttl=64, data=tcp))


def tcp_out(frames):
    out = []
    for f in frames:
        pkt = dpkt.ethernet.Ethernet(bytes(f[0] if type(f) is tuple else f))
        if isinstance(pkt.data, dpkt.ip.IP) and isinstance(pkt.data.data, dpkt.tcp.TCP):
            out.append(pkt.data.data)
    return out


def test_a_syn_for_the_other_worker_is_answered_by_it_and_arp_is_shared(workers):
    (w0, w1), (s0, s1) = workers
    for h in (w0, w1):
        h.tcp.listen(80, lambda conn: None)
    w0.receive(arp_frame(), 0.0)  # the kernel asks worker 0 who we are
    w0.poll(0.0)
    s1.take_inbox(0.0)
    assert w1.node.neighbour_mac(HOST_IP) == HOST_MAC  # learnt without asking
    assert w1.stats()["arp"]["tx_replies"] == 0  # and without answering again
    rport = port_owned_by(1)
    w0.receive(syn(rport), 0.0)
    assert tcp_out(w0.poll(0.0)) == []  # not worker 0's: nothing from it
    assert w0.stats()["worker"]["handoffs_out"] == 1
    s1.take_inbox(0.0)
    (synack,) = tcp_out(w1.poll(0.0))  # no ARP needed: it learnt the MAC
    assert synack.dport == rport and synack.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert w1.stats()["worker"]["handoffs_in"] == 1
    # the handshake's last ACK, plain (the fused receive path would take it): worker 0
    # neither takes it nor resets it, worker 1 gets it and the connection is up
    ack = dpkt.tcp.TCP(sport=rport, dport=80, seq=1001, ack=synack.seq + 1,
                       flags=dpkt.tcp.TH_ACK, win=65535)
    w0.receive(eth(dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=6, ttl=64, data=ack)), 0.0)
    assert tcp_out(w0.poll(0.0)) == [] and w0.stats()["worker"]["handoffs_out"] == 2
    s1.take_inbox(0.0)
    assert w1.stats()["tcp"]["passive_opens"] == 1
    own = port_owned_by(0)
    w0.receive(syn(own), 0.0)
    assert [s.dport for s in tcp_out(w0.poll(0.0))] == [own]  # its own: answered here


def test_a_fragmented_datagram_is_reassembled_then_handed_over_whole(workers):
    (w0, w1), (s0, s1) = workers
    users = [Recorder(), Recorder()]
    for h, u in zip((w0, w1), users, strict=True):
        h.udp.bind(5000, u)
    rport = port_owned_by(1, lport=5000)
    data = bytes(range(256)) * 12  # 3072 bytes: three fragments
    udp = dpkt.udp.UDP(sport=rport, dport=5000, data=data)
    udp.ulen = len(udp)
    whole = bytes(udp)
    pieces = [whole[i:i + 1480] for i in range(0, len(whole), 1480)]
    for i, piece in enumerate(pieces):
        ip = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=17, ttl=64, id=77, data=piece,
                        mf=int(i < len(pieces) - 1), offset=i * 1480 // 8)
        w0.receive(eth(ip), 0.0)
    assert users[0].got == [] and w0.stats()["worker"]["handoffs_out"] == 1
    s1.take_inbox(0.0)
    assert users[1].got == [(data, ("10.77.0.1", rport))]


@pytest.mark.parametrize("ephemeral", [True, False])
def test_an_icmp_error_goes_to_the_worker_whose_flow_it_quotes(workers, ephemeral):
    """Port unreachable for a datagram worker 1's endpoint sent: its endpoint hears of
    it, worker 0's does not (an ephemeral port by its remainder, a fixed one by the
    hash of the quoted destination)."""
    (w0, w1), (s0, s1) = workers
    if ephemeral:
        lport, rport = next(p for p in range(EPHEMERAL_LOW, EPHEMERAL_HIGH) if p % 2), 53
    else:
        lport = 5000
        rport = next(p for p in range(1024, 65536) if owner_of(HOST_IP, p, lport, 2) == 1)
    users = [Recorder(), Recorder()]
    for h, u in zip((w0, w1), users, strict=True):
        h.udp.bind(lport, u, remote=(HOST_IP, rport))
    quoted = dpkt.ip.IP(src=STACK_IP, dst=HOST_IP, p=17, ttl=64,
                        data=dpkt.udp.UDP(sport=lport, dport=rport, data=b"q"))
    error = dpkt.icmp.ICMP(type=3, code=3, data=dpkt.icmp.ICMP.Unreach(data=bytes(quoted)))
    w0.receive(eth(dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, ttl=64, data=error)), 0.0)
    assert w0.stats()["worker"]["handoffs_out"] == 1 and users[0].got == []
    s1.take_inbox(0.0)
    assert w1.stats()["worker"]["handoffs_in"] == 1
    assert len(users[1].got) == 1 and isinstance(users[1].got[0], OSError)


def test_a_handed_over_datagram_is_counted_received_once(workers):
    (w0, w1), (s0, s1) = workers
    for h in (w0, w1):
        h.tcp.listen(80, lambda conn: None)
    w0.receive(syn(port_owned_by(1)), 0.0)
    s1.take_inbox(0.0)
    received = [h.stats()["ipv4"]["rx_packets"] for h in (w0, w1)]
    assert received == [0, 1]  # the owner counts it; the worker that passed it on not


def test_a_fixed_local_port_another_worker_would_get_the_replies_of_is_refused(workers):
    (w0, w1), _ = workers
    w0.receive(arp_frame(), 0.0)
    theirs = next(p for p in range(1024, 32768) if owner_of(HOST_IP, 80, p, 2) == 1)
    with pytest.raises(OSError, match="belongs to another worker"):
        w0.tcp.connect(HOST_IP, 80, 0.0, local_port=theirs)
    assert w1.tcp.connect(HOST_IP, 80, 0.0, local_port=theirs).local_port == theirs


def test_each_worker_picks_its_own_ephemeral_ports(workers):
    (w0, w1), _ = workers
    w0.receive(arp_frame(), 0.0)
    for index, host in enumerate((w0, w1)):
        tcp = {host.tcp.connect(HOST_IP, 80, 0.0).local_port for _ in range(40)}
        udp = {host.udp.bind(0, Recorder()).port for _ in range(40)}
        assert len(tcp) == len(udp) == 40
        ports = tcp | udp
        assert all(p % 2 == index for p in ports)
        assert all(owner_of(HOST_IP, 80, p, 2) == index for p in ports)


def test_owner_spreads_flows_to_one_port_over_every_worker():
    rng = random.Random(4)
    for count in (2, 3, 4):
        seen = [owner_of(bytes(rng.randrange(256) for _ in range(4)),
                         rng.randrange(1024, 65536), 80, count) for _ in range(4000)]
        shares = [seen.count(i) / len(seen) for i in range(count)]
        assert all(abs(s - 1 / count) < 0.05 for s in shares), shares


def test_stats_of_workers_add_up_and_copied_tables_count_once(workers):
    hosts, _ = workers
    for h in hosts:
        h.tcp.listen(80, lambda conn: None)
    total = {}
    for h in hosts:
        _sum_into(total, h.stats())
    one = hosts[0].stats()
    assert total["ipv4"]["routes"] == one["ipv4"]["routes"] == 2  # each holds the table
    assert total["tcp"]["listeners"] == 1 and total["udp"]["endpoints"] == 0
    assert total["tcp"]["connections"] == 0
    hosts[1].tcp.connect(HOST_IP, 80, 0.0)
    hosts[0].tcp.connect(HOST_IP, 80, 0.0)
    total = {}
    for h in hosts:
        _sum_into(total, h.stats())
    assert total["tcp"]["connections"] == 2 and total["tcp"]["active_opens"] == 2
