import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.wire.checksum import (
    checksum_ok,
    internet_checksum,
    mod_ffff,
    ones_sum,
    pseudo_header_sum,
)


def reference_checksum(data: bytes) -> int:
    """RFC 1071 4.1, word by word: the slow, obvious definition."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_known_ipv4_header():
    # A classic example header (Wikipedia "IPv4 header checksum"): checksum b861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861
    filled = header[:10] + b"\xb8\x61" + header[12:]
    assert checksum_ok(filled)
    assert not checksum_ok(header[:10] + b"\xb8\x62" + header[12:])


@given(st.binary(min_size=1, max_size=3000).filter(lambda b: any(b)))
def test_matches_word_by_word_definition(data):
    assert internet_checksum(data) == reference_checksum(data)


def test_negative_zero_sum_gives_0000_never_ffff():
    # words summing to 0xFFFF: RFC 1624 3, a sender's checksum is 0x0000 here
    for data in (b"\xff\xff", b"\x12\x34\xed\xcb", bytes.fromhex("0001fffe")):
        assert reference_checksum(data) == 0 and internet_checksum(data) == 0
        assert checksum_ok(data + b"\x00\x00")


@given(st.binary(min_size=2, max_size=1500).filter(lambda b: len(b) % 2 == 0))
def test_inserting_the_checksum_verifies(data):
    csum = internet_checksum(data)
    assert checksum_ok(data + csum.to_bytes(2, "big"))


def test_pseudo_header_sum_equals_summing_the_bytes():
    src, dst = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
    pseudo = src + dst + bytes([0, 6]) + (1480).to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, 6, 1480) == ones_sum(pseudo)



@settings(max_examples=300)
@given(st.binary(max_size=1600) | st.binary(min_size=1600, max_size=20_000),
       st.integers(0, 1 << 20))
def test_mod_ffff_is_the_remainder(data, extra):
    """Segment-sized and jumbo-frame-sized numbers (where it cuts first) and smaller
    ones, all 0xFF bytes (the largest carries) among them."""
    for x in (int.from_bytes(data, "big") + extra, int.from_bytes(b"\xff" * len(data), "big")):
        assert mod_ffff(x) == x % 0xFFFF
