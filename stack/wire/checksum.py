"""The Internet checksum (RFC 1071), computed by folding one big integer.

The ones' complement sum of 16-bit words equals the value of the whole buffer,
read as one big-endian integer, modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF).
`int.from_bytes` and `%` both run in C, which makes this several times faster
than summing words in Python.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


# Cut points, all multiples of 16 bits (so 2**k == 1 mod 0xFFFF): near a half and a
# quarter of the bits of a 1,448-byte payload, and multiples of 1,024 bits for larger
# numbers (their masks made once, up to a jumbo frame's half)
_HALF, _QUARTER = 5792, 2896
_HALF_MASK, _QUARTER_MASK = (1 << _HALF) - 1, (1 << _QUARTER) - 1
_CUT = 1024
_MASKS = [(1 << (i * _CUT)) - 1 for i in range(41)]


def mod_ffff(x: int) -> int:
    """`x % 0xFFFF`, sooner for a segment-sized or larger `x`. CPython divides digit by
    digit, while shifts and masks are cheap: adding the top half of the number to the
    bottom half leaves the remainder as it was and halves the digits to divide. A
    1,448-byte payload is cut twice at fixed places; a larger number near its middle
    until a few thousand bits are left; a small one is divided at once."""
    n = x.bit_length()
    if n <= 2 * _HALF + 512:  # up to a 1,448-byte payload with its TCP header
        if n > _HALF:
            x = (x >> _HALF) + (x & _HALF_MASK)
            x = (x >> _QUARTER) + (x & _QUARTER_MASK)
        return x % 0xFFFF
    while n > 4096:
        i = n // (2 * _CUT)
        mask = _MASKS[i] if i < len(_MASKS) else (1 << (i * _CUT)) - 1
        x = (x >> (i * _CUT)) + (x & mask)
        n = x.bit_length()
    return x % 0xFFFF


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """Ones' complement sum of `data` (padded to even length) plus `initial`, in [0, 0xFFFE]."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    return mod_ffff(int.from_bytes(data, "big") + initial)


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The value to put in a checksum field: the complement of the ones' complement sum.

    The modulo fold yields 0 where end-around-carry arithmetic yields 0xFFFF (negative
    zero); its complement is 0x0000, never 0xFFFF (RFC 1624 3: a sender computes
    0x0000, and Wireshark flags 0xFFFF as bad). UDP must send 0xFFFF for a computed
    0x0000 (RFC 768): that is the UDP codec's business.
    """
    s = ones_sum(data, initial)
    return 0xFFFF - s if s else 0


def checksum_ok(data: Buffer, initial: int = 0) -> bool:
    """True when `data` (checksum field included) sums to ones' complement zero."""
    return ones_sum(data, initial) == 0


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Ones' complement sum of the IPv4 pseudo-header (RFC 9293 3.1, RFC 768)."""
    return (int.from_bytes(src + dst, "big") + protocol + length) % 0xFFFF
