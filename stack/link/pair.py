"""Two links joined by a unix datagram socketpair: a wire between two runtimes in one
process, with real file descriptors and a real event loop, and no root needed."""

from __future__ import annotations

import socket


class SocketPairLink:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.tx_errors = 0
        self.name = "pair"
        self.vnet_hdr = False

    @classmethod
    def pair(cls) -> tuple[SocketPairLink, SocketPairLink]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_batch(self, limit: int = 256) -> list[bytes]:
        frames = []
        recv = self.sock.recv
        try:
            for _ in range(limit):
                frames.append(recv(65550))
        except BlockingIOError:
            pass
        return frames

    def write(self, frame: bytes, vnet_header: bytes | None = None) -> None:
        try:
            self.sock.send(frame)
        except OSError:
            self.tx_errors += 1  # a full queue drops, like a wire

    def close(self) -> None:
        self.sock.close()
