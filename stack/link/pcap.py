"""A pcap tee: every frame received and sent, in order, for tcpdump -r and tshark -r."""

from __future__ import annotations

import time
from typing import BinaryIO

import dpkt


class PcapTee:
    def __init__(self, path: str, snaplen: int = 65535) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = dpkt.pcap.Writer(self._file, snaplen=snaplen,
                                        linktype=dpkt.pcap.DLT_EN10MB)
        self.count = 0  # frames written: the last one's number in Wireshark is this

    def write(self, frame: bytes, ts: float | None = None) -> None:
        self._writer.writepkt(frame, ts if ts is not None else time.time())
        self.count += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
