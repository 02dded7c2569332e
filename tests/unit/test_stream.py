"""The paced stream service: its request, its chunks, its pace, its bounds."""

import asyncio

from stack.apps.stream import (
    HEADER,
    MAX_COUNT,
    MAX_STREAMS,
    Streams,
    StreamTcpProtocol,
    StreamUdpProtocol,
    chunk,
    parse_request,
    read_header,
)


def test_requests_within_bounds_are_read_and_the_rest_refused():
    assert parse_request(b"STREAM 200 1000 10\n") == (200, 1000, 0.01)
    for bad in (b"", b"STREAM", b"STREAM 1 2", b"STREAM x 100 10", b"stream 1 100 10",
                f"STREAM {MAX_COUNT + 1} 100 10".encode(), b"STREAM 1 15 10",
                b"STREAM 1 1401 10", b"STREAM 1 100 0.5", b"STREAM 0 100 10",
                b"STREAM 1 100 nan", b"STREAM 10 1400 0.5"):
        assert parse_request(bad) is None, bad


def test_a_chunk_is_its_size_and_carries_its_number_and_stamp():
    data = chunk(7, 200, 1000, 12.5)
    assert len(data) == 1000 and read_header(data) == (7, 12.5, 200)
    assert chunk(8, 200, 1000, 0.0)[HEADER.size:] != data[HEADER.size:]  # its own bytes


class _Udp:
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((asyncio.get_running_loop().time(), data, addr))


async def _until(check, limit=2.0):
    for _ in range(int(limit / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)


def test_udp_chunks_leave_at_the_asked_pace_one_stream_per_client():
    async def main():
        streams = Streams()
        proto = StreamUdpProtocol(streams)
        transport = _Udp()
        proto.connection_made(transport)
        proto.datagram_received(b"STREAM 5 100 20", ("10.0.0.2", 4000))
        proto.datagram_received(b"STREAM 5 100 20", ("10.0.0.2", 4001))  # a report
        proto.datagram_received(b"nonsense", ("10.0.0.3", 4000))
        await _until(lambda: len(transport.sent) == 5 and not proto.active)
        return streams, transport.sent, proto.active

    streams, sent, active = asyncio.run(main())
    assert [read_header(d)[0] for _, d, _ in sent] == [0, 1, 2, 3, 4] and not active
    assert {a for _, _, a in sent} == {("10.0.0.2", 4000)}
    assert streams.counters == {"stream_bad_requests": 1, "stream_udp_streams": 1,
                                "stream_udp_chunks": 5} and streams.active == 0
    assert sent[-1][0] - sent[0][0] >= 0.075  # four intervals of 20 ms: late maybe, never early


def test_a_udp_stream_nobody_reports_on_stops_and_streams_are_capped(monkeypatch):
    """A forged request costs ALIVE_FOR seconds of one stream; no more than MAX_STREAMS
    run at once."""
    import stack.apps.stream as stream

    monkeypatch.setattr(stream, "ALIVE_FOR", 0.1)

    async def main():
        streams = Streams()
        proto = StreamUdpProtocol(streams)
        transport = _Udp()
        proto.connection_made(transport)
        for i in range(MAX_STREAMS + 3):
            proto.datagram_received(b"STREAM 1000 100 10", (f"10.0.1.{i}", 4000))
        running = streams.active
        await _until(lambda: streams.active == 0)
        return streams, transport.sent, running

    streams, sent, running = asyncio.run(main())
    assert running == MAX_STREAMS and streams.counters["stream_refused"] == 3
    assert streams.counters["stream_udp_timeouts"] == MAX_STREAMS and streams.active == 0
    assert len(sent) < MAX_STREAMS * 30  # ~0.1 s of each, not 10 s


class _Tcp:
    def __init__(self):
        self.data, self.closed, self.paused = bytearray(), False, False

    def write(self, data):
        self.data += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


def test_tcp_streams_to_the_end_then_fins_and_refuses_bad_or_slow_requests(monkeypatch):
    import stack.apps.stream as stream

    monkeypatch.setattr(stream, "REQUEST_TIMEOUT", 0.05)

    async def main():
        streams = Streams()
        good, t1 = StreamTcpProtocol(streams), _Tcp()
        good.connection_made(t1)
        good.data_received(b"STREAM 4 ")
        good.pause_writing()  # before the request: nothing to pause yet
        good.data_received(b"100 5\n")
        assert good.eof_received() is True  # a half-close does not end the stream
        good.pause_writing()
        await asyncio.sleep(0.05)
        held = len(t1.data)
        good.resume_writing()
        await _until(lambda: t1.closed)
        bad, t2 = StreamTcpProtocol(streams), _Tcp()
        bad.connection_made(t2)
        bad.data_received(b"x" * 101)
        slow, t3 = StreamTcpProtocol(streams), _Tcp()
        slow.connection_made(t3)
        await _until(lambda: t3.closed)
        for p in (good, bad, slow):
            p.connection_lost(None)
        return streams, t1, t2, t3, held

    streams, t1, t2, t3, held = asyncio.run(main())
    assert held <= 100  # paused: at most the chunk sent before the pause
    assert len(t1.data) == 400 and t1.closed
    assert [read_header(bytes(t1.data[i:i + 100]))[0] for i in range(0, 400, 100)] == \
        [0, 1, 2, 3]
    assert t2.closed and t3.closed and streams.counters["stream_bad_requests"] == 2
    assert streams.counters["stream_tcp_chunks"] == 4 and streams.active == 0
