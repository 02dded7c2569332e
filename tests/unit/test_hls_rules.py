"""The HLS playlist checker (RFC 8216's rules), on playlists written by hand."""

import pytest

from stack.video.hls import HlsError, attributes, check, parse_master, parse_media

MEDIA = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:2
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-PLAYLIST-TYPE:VOD
#EXTINF:2.000000,
seg_000.ts
#EXTINF:1.960000,
seg_001.ts
#EXT-X-ENDLIST
"""

MASTER = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-STREAM-INF:BANDWIDTH=540800,RESOLUTION=426x240,CODECS="avc1.4d401e,mp4a.40.2"
240p/index.m3u8

#EXT-X-STREAM-INF:BANDWIDTH=1315600,RESOLUTION=640x360,CODECS="avc1.4d401e,mp4a.40.2"
360p/index.m3u8
"""


def test_a_good_media_playlist():
    pl = parse_media(MEDIA, "index.m3u8")
    assert pl.target == 2 and pl.endlist and pl.playlist_type == "VOD"
    assert pl.segments == [(2.0, "seg_000.ts"), (1.96, "seg_001.ts")]


@pytest.mark.parametrize(("change", "rule"), [
    (("#EXTINF:1.960000,", "#EXTINF:2.600000,"), "over the target duration"),
    (("#EXT-X-ENDLIST\n", ""), "must end with EXT-X-ENDLIST"),
    (("#EXT-X-TARGETDURATION:2\n", ""), "exactly one EXT-X-TARGETDURATION"),
    (("#EXTM3U\n", ""), "first line must be #EXTM3U"),
    (("#EXTINF:2.000000,\n", ""), "has no EXTINF"),
])
def test_media_playlists_that_break_a_rule(change, rule):
    with pytest.raises(HlsError, match=rule):
        parse_media(MEDIA.replace(*change), "index.m3u8")


def test_a_duration_that_rounds_down_to_the_target_is_allowed():
    parse_media(MEDIA.replace("#EXTINF:1.960000,", "#EXTINF:2.499,"), "index.m3u8")


def test_the_master_playlist_names_its_variants_with_their_attributes():
    variants = parse_master(MASTER)
    assert [(a["BANDWIDTH"], a["RESOLUTION"], uri) for a, uri in variants] == [
        ("540800", "426x240", "240p/index.m3u8"), ("1315600", "640x360", "360p/index.m3u8")]
    assert variants[0][0]["CODECS"] == "avc1.4d401e,mp4a.40.2"  # a quoted list, kept whole
    with pytest.raises(HlsError, match="no CODECS"):
        parse_master(MASTER.replace(',CODECS="avc1.4d401e,mp4a.40.2"', "", 1))
    assert attributes('A=1,B="x,y",C=z') == {"A": "1", "B": "x,y", "C": "z"}


def test_renditions_must_be_cut_alike(tmp_path):
    (tmp_path / "master.m3u8").write_text(MASTER)
    for name, media in (("240p", MEDIA), ("360p", MEDIA.replace("1.960000", "1.500000"))):
        d = tmp_path / name
        d.mkdir()
        (d / "index.m3u8").write_text(media)
        for seg in ("seg_000.ts", "seg_001.ts"):
            (d / seg).write_bytes(b"\x47" * 188)
    with pytest.raises(HlsError, match="not cut where the others are"):
        check(str(tmp_path), with_ffprobe=False)
    (tmp_path / "360p" / "index.m3u8").write_text(MEDIA)
    assert len(check(str(tmp_path), with_ffprobe=False)["variants"]) == 2
    (tmp_path / "360p" / "seg_001.ts").unlink()
    with pytest.raises(HlsError, match=r"seg_001\.ts is missing"):
        check(str(tmp_path), with_ffprobe=False)
