"""The 10-byte virtio_net_hdr that leads every frame on a TAP opened with IFF_VNET_HDR
(docs/architecture.md, "Offloads"): checksum offload and TCP segmentation offload."""

from __future__ import annotations

import struct

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
