"""The TAP device, opened with python-pytun, read and written without blocking.

The API leaves room for the virtio-net header (IFF_VNET_HDR, docs/architecture.md):
`read_batch` hands up frames with the header stripped, `write` takes a frame and,
when offloads are on, the 10-byte header to put in front of it.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytun

from stack.link import LinkError
from stack.wire.virtio import (
    NO_OFFLOAD,
    TUNSETOFFLOAD,
    VNET_HDR_LEN,
    checksum_trusted,
    offload_flags,
)

READ_SIZE = 65550  # a 64 KB GSO frame plus headers fits (docs/architecture.md, "Offloads")


class TapLink:
    def __init__(self, name: str, offload: str = "", multi_queue: bool = False) -> None:
        """`offload`: '' (plain frames), 'csum' or 'tso' (stack.wire.virtio); with
        `multi_queue` each TapLink of one name is a queue of one multi-queue TAP."""
        self.name = name
        self.offload = offload
        self.vnet_hdr = bool(offload)
        self.multi_queue = multi_queue
        self._dev: pytun.TunTapDevice | None = None
        self.fd = -1
        self.tx_errors = 0

    def open(self, where: str) -> None:
        """Create and open the TAP; `where` names its namespace in error messages."""
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI
        if self.vnet_hdr:
            flags |= pytun.IFF_VNET_HDR
        if self.multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        try:
            self._dev = pytun.TunTapDevice(name=self.name, flags=flags)
        except pytun.Error as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            if code == errno.EBUSY or (code == errno.EINVAL and self.multi_queue):
                # a multi-queue open of a TAP someone holds as a single queue: EINVAL
                raise LinkError(f"TAP device {self.name} in {where} is already in use "
                                "(is another tapstack running there?)") from None
            if code in (errno.EPERM, errno.EACCES):
                raise LinkError(f"no permission to create TAP device {self.name}; "
                                "run as root") from None
            raise LinkError(f"cannot open TAP device {self.name} in {where}: "
                            f"{exc.args[-1] if exc.args else exc}") from None
        self.fd = self._dev.fileno()
        if self.vnet_hdr:
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, offload_flags(self.offload))
            except OSError as exc:
                raise LinkError(f"TAP device {self.name} refused offloads: "
                                f"{exc.strerror}") from None
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def read_batch(self, limit: int = 256) -> list[bytes]:
        """Every frame that is ready now, up to `limit` (one wakeup drains the queue)."""
        frames: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            for _ in range(limit):
                frames.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        return frames

    def split(self, raw: bytes) -> tuple[memoryview, memoryview, bool]:
        """With IFF_VNET_HDR: (its virtio-net header, the Ethernet frame, whether the
        frame's checksum is trusted)."""
        view = memoryview(raw)
        return view[:VNET_HDR_LEN], view[VNET_HDR_LEN:], checksum_trusted(view)

    def write(self, frame: bytes, vnet_header: bytes | None = None) -> None:
        try:
            if self.vnet_hdr:
                os.writev(self.fd, [vnet_header or NO_OFFLOAD, frame])
            else:
                os.write(self.fd, frame)
        except OSError:
            # EIO while the host side is down, ENOBUFS/EAGAIN when its queue is full:
            # the frame is lost like on a wire; TCP and the peers recover.
            self.tx_errors += 1

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None
            self.fd = -1
