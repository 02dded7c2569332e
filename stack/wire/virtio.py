"""The 10-byte virtio_net_hdr that leads every frame on a TAP opened with IFF_VNET_HDR
(docs/architecture.md, "Offloads"): checksum offload and TCP segmentation offload."""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80

TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

NO_OFFLOAD = bytes(VNET_HDR_LEN)
# an IPv4 (no options) + TCP frame whose checksum the kernel finishes: the field holds
# the pseudo-header sum, the sum runs from the TCP header (14 + 20) to the end
CSUM_TCPV4 = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16)

# What a link's virtio-net header is used for: nothing (plain frames, no header),
# checksums only (MTU-sized frames, the kernel finishes and verifies TCP checksums), or
# checksums and segmentation (TSO out, GSO super-frames in).
OFFLOAD_MODES = ("", "csum", "tso")


def offload_mode(value: bool | str | None) -> str:
    """'' (plain), 'csum' or 'tso' from a flag or a config value: True means 'tso' (what
    `offload = true` always meant); ValueError for anything else."""
    if value is None or value is False:
        return ""
    if value is True:
        return "tso"
    if value in OFFLOAD_MODES:
        return value
    raise ValueError(f"{value!r} is not an offload mode (csum, tso, or true/false)")


def offload_flags(mode: str) -> int:
    """TUNSETOFFLOAD's argument for a mode: what the kernel may hand us and finish for us."""
    return TUN_F_CSUM | TUN_F_TSO4 if mode == "tso" else TUN_F_CSUM


def tcp_offload_header(ip_header_len: int, tcp_header_len: int, payload_len: int,
                       mss: int) -> bytes:
    """Checksum offload for one IPv4/TCP frame, and TSO when it carries more than one
    MSS: the kernel cuts it into `mss`-byte segments and finishes every checksum."""
    csum_start = 14 + ip_header_len
    gso = payload_len > mss
    return VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4 if gso else GSO_NONE,
                         csum_start + tcp_header_len if gso else 0, mss if gso else 0,
                         csum_start, 16)


def checksum_trusted(header: bytes | memoryview) -> bool:
    """True when the kernel owns or already verified the transport checksum: the frame
    is ours to take as it is (a GSO super-frame carries only the pseudo-header sum)."""
    return bool(header[0] & (F_NEEDS_CSUM | F_DATA_VALID))


def as_captured(frame: bytes | bytearray | memoryview,
                header: bytes | memoryview | None) -> bytes | bytearray | memoryview:
    """The frame as a capture should show it: with the checksum the kernel will finish
    (NEEDS_CSUM) finished here, so tapstack's own pcap never shows a partial sum. Costs
    a checksum pass, only for frames that go to a pcap."""
    if header is None or not header[0] & F_NEEDS_CSUM:
        return frame
    _, _, _, _, start, offset = VNET_HDR.unpack(header[:VNET_HDR_LEN])
    if start + offset + 2 > len(frame):
        return frame
    # the field holds the pseudo-header sum: summing from `start` over it gives the
    # whole checksum, as the kernel (or a NIC) would
    csum = internet_checksum(frame[start:])
    if offset == 6 and csum == 0:
        csum = 0xFFFF  # UDP: a computed 0 is sent as all ones (RFC 768)
    done = bytearray(frame)
    done[start + offset] = csum >> 8
    done[start + offset + 1] = csum & 0xFF
    return done
