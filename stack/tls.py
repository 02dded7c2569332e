"""TLS over any asyncio transport, driven through the standard `ssl` module's memory BIOs.

    raw transport (TCP) <-> TlsProtocol <-> TlsTransport <-> the application's protocol

`TlsProtocol` is the protocol of the raw transport: it feeds the bytes it receives into
an `ssl.SSLObject` and writes what the SSLObject produces. Once the handshake is done it
gives the application a `TlsTransport` that encrypts on write. It works on tapstack's
TCP transports and on the kernel's (uvloop's own start_tls refuses foreign transports).

Flow control is the raw transport's: the application is paused when the encrypted bytes
waiting in TCP pass the high-water mark, and resumed below the low one. Reading paused
by the application pauses the raw transport too.

Closing sends close_notify, then closes TCP (RFC 8446 6.1 lets a party close without
waiting for the peer's close_notify). `write_eof` sends close_notify and a TCP FIN but
keeps reading: TLS 1.3 closes each direction on its own. A close_notify received is an
EOF for the application (`eof_received`); a TCP FIN without one is a truncation, also
reported as EOF (as browsers and curl treat HTTP/1.1 ends).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import Any

log = logging.getLogger("tapstack.tls")

READ_CHUNK = 256 * 1024  # bytes taken from the SSLObject per read
WRITE_CHUNK = 256 * 1024  # plaintext encrypted per step of a large write
HANDSHAKE_TIMEOUT = 60.0  # asyncio's default
_HANDSHAKING, _OPEN, _CLOSED = range(3)


class TlsHandshakeError(ConnectionError):
    """The TLS handshake failed; the message says why (certificate, protocol, timeout)."""


class TlsProtocol(asyncio.Protocol):
    """The raw transport's protocol: one TLS session between it and `app`."""

    def __init__(self, app: asyncio.BaseProtocol, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None,
                 waiter: asyncio.Future | None = None,
                 handshake_timeout: float | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 call_connection_made: bool = True,
                 counters: collections.Counter | None = None) -> None:
        self.app = app
        # handshakes, handshake_failures, handshake_timeouts, close_notify_received,
        # truncated (a FIN without close_notify): what `tapstack stats` shows as tls.*
        self.counters = counters if counters is not None else collections.Counter()
        self.call_connection_made = call_connection_made  # False for start_tls
        self.context = context
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.waiter = waiter
        self.loop = loop or asyncio.get_event_loop()
        self.handshake_timeout = HANDSHAKE_TIMEOUT if handshake_timeout is None \
            else handshake_timeout
        self.raw: asyncio.Transport | None = None
        self.transport: TlsTransport | None = None  # the application's, after the handshake
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.state = _HANDSHAKING
        self.timer: asyncio.TimerHandle | None = None
        self.app_paused_reading = False
        self.eof_sent = False  # our close_notify went out
        self.eof_seen = False  # the peer's close_notify (or FIN) came
        self.close_notify_received = False
        self.raw_eof = False  # TCP's FIN came (maybe before all of the data was read)
        self.app_keeps_open = False  # what the app's eof_received said
        self.app_paused_writing = False
        self.error: Exception | None = None  # why the handshake failed

    # -- the raw transport's callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing,
                                            server_side=self.server_side,
                                            server_hostname=self.server_hostname)
        if self.handshake_timeout:
            self.timer = self.loop.call_later(self.handshake_timeout, self._handshake_timeout)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self.incoming.write(data)
        if self.state == _HANDSHAKING:
            self._handshake()
        if self.state == _OPEN:
            self._read()

    def eof_received(self) -> bool:
        if self.state == _HANDSHAKING:
            self._fail(TlsHandshakeError("the peer closed the connection during the TLS "
                                         "handshake"))
            return False
        if self.eof_seen:  # close_notify came before the FIN: keep writing if the app does
            return not self._closing_app()
        self.raw_eof = True
        if self.app_paused_reading:
            return True  # what is still buffered is delivered first, then the EOF (_read)
        self._read()
        # not delivered yet (the app paused on the way): keep TCP open until it is
        return not self.eof_seen or self.app_keeps_open

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        state, self.state = self.state, _CLOSED
        if state == _HANDSHAKING:
            self.error = exc or TlsHandshakeError("the connection closed during the TLS "
                                                  "handshake")
            self._wake(self.error)
        app, self.app = self.app, None
        if self.transport is not None:
            self.transport._closing = True
        elif self.call_connection_made:
            return  # the application never saw this connection
        if app is not None:  # with the reason: a failed handshake, a broken record
            self.loop.call_soon(app.connection_lost, exc or self.error)

    def pause_writing(self) -> None:
        if self.state == _OPEN and self.app is not None and not self.app_paused_writing:
            self.app_paused_writing = True
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app_paused_writing and self.app is not None:
            self.app_paused_writing = False
            self.app.resume_writing()

    # -- the session ----------------------------------------------------------------------

    def _flush(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            if self.raw is not None and not self.raw.is_closing():
                self.raw.write(data)

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # the alert, so the peer learns why
            self._fail(TlsHandshakeError(_describe(exc)))
            return
        self._flush()
        self._cancel_timer()
        self.counters["handshakes"] += 1
        self.state = _OPEN
        self.transport = TlsTransport(self)
        try:
            if self.call_connection_made:
                self.app.connection_made(self.transport)
        except Exception as exc:
            self.loop.call_exception_handler({"message": "connection_made failed",
                                              "exception": exc, "protocol": self.app})
            self.transport.abort()
            return
        self._wake(None)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state == _HANDSHAKING:
            self.counters["handshake_timeouts"] += 1
            self._fail(TlsHandshakeError(f"TLS handshake did not complete in "
                                         f"{self.handshake_timeout:g} s"))
            if self.raw is not None:
                self.raw.abort()  # a peer that stalls the handshake gets no graceful close

    def _fail(self, exc: Exception) -> None:
        log.debug("TLS handshake failed: %s", exc)
        self.error = exc
        self.counters["handshake_failures"] += 1
        self._cancel_timer()
        self.state = _CLOSED
        self._wake(exc)
        if self.raw is not None:
            self.raw.close()  # the alert (already written) goes out before the FIN

    def _wake(self, exc: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _read(self) -> None:
        """Hand the application what the SSLObject has decrypted, unless it paused us."""
        sslobj = self.sslobj
        while self.state == _OPEN and not self.app_paused_reading and not self.eof_seen:
            try:
                data = sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                if self.raw_eof:  # everything that came is delivered: then the FIN
                    log.debug("TCP FIN without close_notify (truncation); reported as EOF")
                    self.counters["truncated"] += 1
                    self._app_eof()
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                log.debug("TLS error on an open session: %s", _describe(exc))
                self._flush()
                self.error = ConnectionError(f"TLS: {_describe(exc)}")
                if self.transport is not None:
                    self.transport._fatal(exc)
                break
            if not data:  # close_notify (the ssl module reads it as b"")
                self.close_notify_received = True
                self.counters["close_notify_received"] += 1
                self._flush()
                self._app_eof()
                break
            try:
                self.app.data_received(data)
            except Exception as exc:
                self.loop.call_exception_handler({"message": "data_received failed",
                                                  "exception": exc, "protocol": self.app})
                self.transport.abort()
                return
        self._flush()  # TLS 1.3 sends tickets and key updates after reads

    def _app_eof(self) -> bool:
        """The peer will send no more: tell the application; True keeps us half-open."""
        self.eof_seen = True
        self.app_keeps_open = False
        if self.app is None:
            return False
        try:
            keep_open = self.app_keeps_open = bool(self.app.eof_received())
        except Exception as exc:
            self.loop.call_exception_handler({"message": "eof_received failed",
                                              "exception": exc, "protocol": self.app})
            keep_open = False
        if not keep_open and self.transport is not None:
            self.transport.close()
        return keep_open

    def _closing_app(self) -> bool:
        return self.transport is not None and self.transport._closing

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            self.sslobj.write(view[start:start + WRITE_CHUNK])
            self._flush()

    def _close_notify(self) -> None:
        if self.eof_sent or self.state != _OPEN:
            return
        self.eof_sent = True
        # unwrap() also tries to read the peer's close_notify, and OpenSSL drops the
        # application data it reads on the way: keep the unread bytes out of its reach
        unread = self.incoming.read()
        try:
            self.sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify is not awaited
        except ssl.SSLError as exc:
            log.debug("close_notify: %s", _describe(exc))
        if unread:
            self.incoming.write(unread)
        self._flush()


class TlsTransport(asyncio.Transport):
    """What the application holds: writes are encrypted, reads decrypted."""

    def __init__(self, tls: TlsProtocol) -> None:
        super().__init__()
        self._tls = tls
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._closing or not data:
            return
        if self._tls.eof_sent:
            raise RuntimeError("cannot write after write_eof()")
        self._tls._encrypt(data)

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then a TCP FIN; the peer may go on sending (TLS 1.3 half-close)."""
        if self._closing or self._tls.eof_sent:
            return
        self._tls._close_notify()
        raw = self._tls.raw
        if raw.can_write_eof():
            raw.write_eof()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._tls._close_notify()
        self._tls.raw.close()

    def abort(self) -> None:
        self._closing = True
        self._tls.raw.abort()

    def _fatal(self, exc: Exception) -> None:
        self._closing = True
        self._tls.raw.abort()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._tls.app_paused_reading = True
        self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        tls = self._tls
        if not tls.app_paused_reading:
            return
        tls.app_paused_reading = False
        tls.raw.resume_reading()
        if tls.state == _OPEN:
            tls.loop.call_soon(tls._read)  # what was decrypted while we were paused

    def is_reading(self) -> bool:
        return not self._tls.app_paused_reading and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None
                                ) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.raw.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        sslobj = tls.sslobj
        if name == "sslcontext":
            return tls.context
        if name == "ssl_object":
            return sslobj
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "compression":
            return sslobj.compression()
        return tls.raw.get_extra_info(name, default)  # peername, sockname, socket, ...


def _describe(exc: BaseException) -> str:
    """One sentence from an ssl exception (its reason and verify message when present)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if reason:
        return reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


async def start_tls(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                    protocol: asyncio.BaseProtocol, context: ssl.SSLContext, *,
                    server_side: bool = False, server_hostname: str | None = None,
                    handshake_timeout: float | None = None,
                    call_connection_made: bool = False) -> TlsTransport:
    """Upgrade an open connection to TLS (loop.start_tls's contract): the protocol
    continues on the returned transport."""
    waiter = loop.create_future()
    tls = TlsProtocol(protocol, context, server_side=server_side,
                      server_hostname=server_hostname, waiter=waiter,
                      handshake_timeout=handshake_timeout, loop=loop,
                      call_connection_made=call_connection_made)
    transport.pause_reading()
    transport.set_protocol(tls)
    tls.connection_made(transport)
    transport.resume_reading()
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return tls.transport


def client_hostname(host: str | None, server_hostname: str | None) -> str | None:
    """asyncio's rule: the host connected to names the server unless told otherwise."""
    return server_hostname if server_hostname is not None else host
