"""The TLS pump (stack/tls.py) over an in-memory transport pair: handshake, data both
ways, large writes under flow control, half-close, close_notify, failed handshakes."""

from __future__ import annotations

import asyncio
import hashlib
import ssl

import pytest

from stack.certs import LabCA, ServerCert, server_context
from stack.tls import TlsHandshakeError, TlsProtocol


class MemTransport(asyncio.Transport):
    """One end of an in-memory byte pipe with a bounded 'socket buffer': bytes move to
    the peer a slice per loop turn, so a large write really fills the buffer."""

    SLICE = 64 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: MemTransport | None = None
        self.protocol: asyncio.Protocol | None = None
        self.buffer = bytearray()
        self.high, self.low = 64 * 1024, 16 * 1024
        self.paused = False
        self.closing = False
        self.eof_pending = False
        self.reading = True
        self.inbox: list[bytes] = []
        self.pumping = False
        self.sent = bytearray()  # everything that went out, for assertions
        self.lost = False

    def write(self, data) -> None:
        if self.closing:
            return
        self.buffer += data
        self.sent += data
        if not self.paused and len(self.buffer) > self.high:
            self.paused = True
            self.protocol.pause_writing()
        self._pump()

    def _pump(self) -> None:
        if not self.pumping:
            self.pumping = True
            self.loop.call_soon(self._move)

    def _move(self) -> None:
        self.pumping = False
        if self.buffer:
            chunk = bytes(self.buffer[:self.SLICE])
            del self.buffer[:self.SLICE]
            self.peer._arrive(chunk)
            if self.paused and len(self.buffer) <= self.low:
                self.paused = False
                self.protocol.resume_writing()
            self._pump()
        elif self.eof_pending:
            self.eof_pending = False
            self.peer._arrive_eof()
            if self.closing:  # our FIN is through: closed on our side (the peer's
                self._lose()  # side stays open until it closes too, as in TCP)

    def _arrive(self, data: bytes) -> None:
        if self.lost:
            return
        if self.reading:
            self.protocol.data_received(data)
        else:
            self.inbox.append(data)

    def _arrive_eof(self) -> None:
        if not self.reading:
            self.inbox.append(None)  # after the data it follows, as TCP delivers it
            return
        if not self.lost and not self.protocol.eof_received() and not self.closing:
            self.close()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.closing = True
            self.protocol.connection_lost(None)

    def write_eof(self) -> None:
        self.eof_pending = True
        self._pump()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.eof_pending = True
        self._pump()

    def abort(self) -> None:
        self.closing = True
        self._lose()
        self.peer._lose()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        while self.inbox and self.reading:
            item = self.inbox.pop(0)
            if item is None:
                self._arrive_eof()
            else:
                self.protocol.data_received(item)

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high if high is not None else self.high
        self.low = low if low is not None else self.high // 4

    def get_write_buffer_limits(self):
        return self.low, self.high

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def get_extra_info(self, name, default=None):
        return {"peername": ("10.0.0.1", 1234)}.get(name, default)


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open_on_eof: bool = False) -> None:
        self.transport = None
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None
        self.pauses = 0
        self.resumed = asyncio.Event()
        self.keep_open_on_eof = keep_open_on_eof
        self.got = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()

    def eof_received(self):
        self.eof.set()
        return self.keep_open_on_eof

    def connection_lost(self, exc) -> None:
        self.lost_exc = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.resumed.set()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = LabCA(str(tmp_path_factory.mktemp("state")))
    cert, key = ca.issue(["www.example.test", "10.77.0.2"])
    server = server_context([ServerCert(cert, key, ["www.example.test"])])
    client = ssl.create_default_context(cafile=ca.cert_path)
    client.set_alpn_protocols(["http/1.1"])
    return ca, server, client


async def _pair(server_ctx, client_ctx, hostname="www.example.test", server_app=None,
                client_app=None, timeout=None):
    loop = asyncio.get_running_loop()
    a, b = MemTransport(loop), MemTransport(loop)
    a.peer, b.peer = b, a
    server_app = server_app or Recorder()
    client_app = client_app or Recorder()
    server_waiter = loop.create_future()
    client_waiter = loop.create_future()
    server = TlsProtocol(server_app, server_ctx, server_side=True, waiter=server_waiter,
                         loop=loop, handshake_timeout=timeout)
    client = TlsProtocol(client_app, client_ctx, server_side=False,
                         server_hostname=hostname, waiter=client_waiter, loop=loop,
                         handshake_timeout=timeout)
    a.protocol, b.protocol = server, client
    server.connection_made(a)
    client.connection_made(b)
    return (server, server_app, server_waiter, a), (client, client_app, client_waiter, b)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_handshake_and_data_both_ways(pki):
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(server_ctx, client_ctx)
        await asyncio.gather(sw, cw)
        assert client.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert client.transport.get_extra_info("ssl_object").selected_alpn_protocol() \
            == "http/1.1"
        assert client.transport.get_extra_info("peercert")["subjectAltName"][0] == \
            ("DNS", "www.example.test")
        assert client.transport.get_extra_info("peername") == ("10.0.0.1", 1234)
        capp.transport.write(b"hello over TLS")
        while bytes(sapp.data) != b"hello over TLS":
            sapp.got.clear()
            await sapp.got.wait()
        sapp.transport.write(b"and back")
        while bytes(capp.data) != b"and back":
            capp.got.clear()
            await capp.got.wait()

    run(main())


def test_large_write_with_flow_control(pki):
    _, server_ctx, client_ctx = pki
    payload = bytes(range(256)) * (8 * 4096 + 7)  # 8 MB and a bit

    async def main():
        (server, sapp, sw, _), (client, capp, cw, raw) = await _pair(server_ctx, client_ctx)
        await asyncio.gather(sw, cw)
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 20):
            capp.transport.write(view[i:i + (1 << 20)])
            if capp.transport.get_write_buffer_size() > 64 * 1024:
                await capp.resumed.wait()
        while len(sapp.data) < len(payload):
            sapp.got.clear()
            await sapp.got.wait()
        assert hashlib.sha256(sapp.data).digest() == hashlib.sha256(payload).digest()
        assert capp.pauses > 0  # the application was told to stop, and resumed
        assert len(raw.sent) > len(payload)  # what went on the wire was ciphertext
        assert payload[:4096] not in raw.sent

    run(main())


def test_paused_reading_holds_data(pki):
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(server_ctx, client_ctx)
        await asyncio.gather(sw, cw)
        sapp.transport.pause_reading()
        capp.transport.write(b"x" * 100_000)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(sapp.data) == 0
        sapp.transport.resume_reading()
        while len(sapp.data) < 100_000:
            sapp.got.clear()
            await sapp.got.wait()

    run(main())


def test_half_close_then_reply(pki):
    """The client sends a request and close_notify (write_eof); the server still answers."""
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(
            server_ctx, client_ctx, server_app=Recorder(keep_open_on_eof=True))
        await asyncio.gather(sw, cw)
        capp.transport.write(b"request")
        capp.transport.write_eof()
        await sapp.eof.wait()
        assert bytes(sapp.data) == b"request"
        assert server.close_notify_received
        sapp.transport.write(b"reply after the client's EOF")
        sapp.transport.close()
        await capp.lost.wait()
        assert bytes(capp.data) == b"reply after the client's EOF"
        assert client.close_notify_received  # the server's close sent close_notify
        await sapp.lost.wait()

    run(main())


def test_close_sends_close_notify(pki):
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(server_ctx, client_ctx)
        await asyncio.gather(sw, cw)
        capp.transport.write(b"last words")
        capp.transport.close()
        assert capp.transport.is_closing()
        await sapp.lost.wait()
        await capp.lost.wait()
        assert bytes(sapp.data) == b"last words"
        assert server.close_notify_received and sapp.eof.is_set()

    run(main())


def test_failed_handshake_wrong_name(pki):
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(
            server_ctx, client_ctx, hostname="www.other.test")
        with pytest.raises(TlsHandshakeError, match="certificate verify failed: "
                                                    "Hostname mismatch"):
            await cw
        with pytest.raises(TlsHandshakeError):  # the client's alert reached the server
            await sw
        assert capp.transport is None and sapp.transport is None  # never connected

    run(main())


def test_failed_handshake_unknown_ca(pki, tmp_path):
    _, server_ctx, _ = pki
    other = LabCA(str(tmp_path))
    client_ctx = ssl.create_default_context(cafile=other.cert_path)

    async def main():
        (_, _, sw, _), (_, _, cw, _) = await _pair(server_ctx, client_ctx)
        with pytest.raises(TlsHandshakeError, match="self-signed certificate in certificate chain"):
            await cw
        with pytest.raises(TlsHandshakeError, match="unknown ca"):
            await sw

    run(main())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_refused(pki):
    _, server_ctx, client_ctx = pki
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")

    async def main():
        (_, _, sw, _), (_, _, cw, _) = await _pair(server_ctx, old)
        with pytest.raises(TlsHandshakeError):
            await sw
        with pytest.raises(TlsHandshakeError):
            await cw

    run(main())


def test_handshake_timeout(pki):
    """A peer that never answers: the handshake fails after the timeout, not never."""
    _, server_ctx, client_ctx = pki

    class Silent(asyncio.Protocol):
        def data_received(self, data):
            pass

    async def main():
        loop = asyncio.get_running_loop()
        a, b = MemTransport(loop), MemTransport(loop)
        a.peer, b.peer = b, a
        a.protocol = Silent()
        waiter = loop.create_future()
        client = TlsProtocol(Recorder(), client_ctx, server_side=False,
                             server_hostname="www.example.test", waiter=waiter, loop=loop,
                             handshake_timeout=0.2)
        b.protocol = client
        client.connection_made(b)
        with pytest.raises(TlsHandshakeError, match=r"did not complete in 0\.2 s"):
            await waiter
        assert b.closing

    run(main())


def test_start_tls_failure_reaches_the_protocols_connection_lost(pki, tmp_path):
    """start_tls keeps a protocol that was already connected: when the handshake fails,
    start_tls raises and that protocol's connection_lost gets the reason."""
    from stack.tls import start_tls

    _, server_ctx, _ = pki
    wrong = ssl.create_default_context(cafile=LabCA(str(tmp_path)).cert_path)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = MemTransport(loop), MemTransport(loop)
        a.peer, b.peer = b, a
        server = TlsProtocol(Recorder(), server_ctx, server_side=True, loop=loop,
                             waiter=loop.create_future())
        a.protocol = server
        server.connection_made(a)
        plain = Recorder()
        b.protocol = plain
        plain.connection_made(b)
        with pytest.raises(TlsHandshakeError, match="certificate verify failed"):
            await start_tls(loop, b, plain, wrong, server_hostname="www.example.test")
        await plain.lost.wait()
        return plain.lost_exc

    exc = run(main())
    assert isinstance(exc, TlsHandshakeError) and "certificate verify failed" in str(exc)


def test_data_held_while_paused_comes_before_the_eof(pki):
    """The peer writes and closes while the application has paused reading: after
    resume_reading every byte arrives, then the EOF (not the EOF first)."""
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(server_ctx, client_ctx)
        await asyncio.gather(sw, cw)
        capp.transport.pause_reading()
        sapp.transport.write(b"y" * 100_000)
        sapp.transport.close()
        await sapp.lost.wait()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(capp.data) == 0 and not capp.eof.is_set()
        capp.transport.resume_reading()
        await capp.eof.wait()
        assert len(capp.data) == 100_000  # all of it, before the EOF
        assert client.close_notify_received and client.counters["truncated"] == 0

    run(main())


def test_write_eof_keeps_what_the_peer_still_sends(pki):
    """close_notify goes out (write_eof) while records the app has not read yet sit in
    the TLS buffer: OpenSSL's shutdown must not swallow them."""
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(
            server_ctx, client_ctx, server_app=Recorder(keep_open_on_eof=True),
            client_app=PauseOnce())
        await asyncio.gather(sw, cw)
        sapp.transport.write(b"z" * 60_000)
        while not capp.data:
            capp.got.clear()
            await capp.got.wait()
        assert len(capp.data) < 60_000  # paused after the first record
        capp.transport.write_eof()
        await sapp.eof.wait()
        sapp.transport.write(b"!" * 10)
        sapp.transport.close()
        capp.transport.resume_reading()
        await capp.lost.wait()
        assert bytes(capp.data) == b"z" * 60_000 + b"!" * 10

    run(main())


class PauseOnce(Recorder):
    """Pauses reading inside its first data_received."""

    def data_received(self, data):
        super().data_received(data)
        if len(self.data) == len(data):
            self.transport.pause_reading()


def test_a_pause_inside_data_received_loses_nothing_at_the_close(pki):
    """The app pauses after the first record while more records sit decrypted-to-be in
    the TLS buffer, and the peer's close arrives meanwhile: after resume, every byte
    then the EOF."""
    _, server_ctx, client_ctx = pki

    async def main():
        (server, sapp, sw, _), (client, capp, cw, _) = await _pair(
            server_ctx, client_ctx, client_app=PauseOnce())
        await asyncio.gather(sw, cw)
        sapp.transport.write(b"w" * 60_000)  # four records, one slice of the wire
        sapp.transport.close()
        await sapp.lost.wait()
        assert 0 < len(capp.data) < 60_000 and not capp.eof.is_set()
        capp.transport.resume_reading()
        await capp.eof.wait()
        assert len(capp.data) == 60_000

    run(main())
