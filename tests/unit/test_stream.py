"""The paced stream service (UDP and TCP 5004): its request, its chunks, its pace."""

import asyncio

from stack.apps.stream import (
    HEADER,
    MAX_COUNT,
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
                b"STREAM 1 100 nan"):
        assert parse_request(bad) is None, bad


def test_a_chunk_is_its_size_and_carries_its_number_and_stamp():
    data = chunk(7, 200, 1000, 12.5)
    assert len(data) == 1000 and read_header(data) == (7, 12.5, 200)
    assert chunk(8, 200, 1000, 0.0)[HEADER.size:] != data[HEADER.size:]  # its own bytes


class _Transport:
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((asyncio.get_running_loop().time(), data, addr))


def test_udp_chunks_leave_at_the_asked_pace_one_stream_per_client():
    async def main():
        counters = {"stream_bad_requests": 0, "stream_udp_streams": 0,
                    "stream_udp_chunks": 0}
        proto = StreamUdpProtocol(counters)
        transport = _Transport()
        proto.connection_made(transport)
        proto.datagram_received(b"STREAM 5 100 20", ("10.0.0.2", 4000))
        proto.datagram_received(b"STREAM 5 100 20", ("10.0.0.2", 4000))  # already busy
        proto.datagram_received(b"nonsense", ("10.0.0.3", 4000))
        for _ in range(100):
            if len(transport.sent) == 5 and not proto.active:
                break
            await asyncio.sleep(0.01)
        return counters, transport.sent, proto.active

    counters, sent, active = asyncio.run(main())
    assert [read_header(d)[0] for _, d, _ in sent] == [0, 1, 2, 3, 4] and not active
    assert counters == {"stream_bad_requests": 2, "stream_udp_streams": 1,
                        "stream_udp_chunks": 5}
    assert sent[-1][0] - sent[0][0] >= 0.075  # four intervals of 20 ms: late maybe, never early
