"""The ABR player's rules on their own: the throughput estimate (hls.js's EWMA pair),
the choices it leads to, BOLA-BASIC's buffer thresholds, and the schedule syntax."""

import pytest

from stack.video.abr import Bola, Ewma, Fixed, Throughput, Variant, parse_schedule
from stack.video.hls import HlsError

LADDER = [Variant(510_400, "240p", "426x240", []), Variant(1_205_600, "360p", "640x360", []),
          Variant(3_440_800, "720p", "1280x720", [])]


def test_the_ewma_is_unbiased_from_its_first_sample_and_weighs_by_time():
    e = Ewma(3.0)
    assert e.estimate() is None
    e.sample(0.5, 4e6)
    assert e.estimate() == pytest.approx(4e6)  # warm-up bias removed
    e.sample(3.0, 1e6)  # one half-life at the new rate: halfway there (by weight)
    assert 1e6 < e.estimate() < 2.6e6


def test_throughput_takes_the_lower_average_and_climbs_more_carefully_than_it_stays():
    t = Throughput()
    assert t.choose(LADDER, 0, 0.0, 8.0, 2.0) == 0  # 500 kbit/s before any sample
    t.sample(1.0, 5e6)  # 5 Mbit/s
    # 720p needs 3.44 / 0.7 = 4.9 Mbit/s to climb to it, 3.44 / 0.95 = 3.6 to stay on it
    assert t.choose(LADDER, 1, 2.0, 8.0, 2.0) == 2
    t2 = Throughput()
    t2.sample(1.0, 4.2e6)
    assert t2.choose(LADDER, 1, 2.0, 8.0, 2.0) == 1 and t2.choose(LADDER, 2, 2.0, 8.0, 2.0) == 2
    assert t.choose(LADDER, 2, 7.0, 8.0, 2.0) is None  # the buffer is full: wait
    t.sample(4.0, 0.6e6)  # the link drops: the fast average falls first
    assert t.estimate() < 2e6 and t.choose(LADDER, 2, 2.0, 8.0, 2.0) <= 1


def test_bola_climbs_with_the_buffer_and_waits_above_its_target():
    b = Bola()
    picks = [b.choose(LADDER, 0, q, 8.0, 2.0) for q in (0.0, 1.0, 3.0, 5.0, 6.5)]
    assert picks[0] == 0  # empty buffer: the lowest
    assert picks[1:4] == sorted(picks[1:4]) and picks[3] == 2
    assert picks[4] is None  # past the target (8 s less a segment): wait


def test_fixed_keeps_its_rendition_and_the_schedule_is_read_or_refused():
    f = Fixed(index=1)
    assert {f.choose(LADDER, c, 0.0, 8.0, 2.0) for c in (0, 1, 2)} == {1}
    assert parse_schedule("8mbit:6,700kbit:10,8mbit") == [(8_000_000, 6.0),
                                                           (700_000, 10.0),
                                                           (8_000_000, None)]
    for bad in ("", "8mbit:0", "fast:3", "8mbit,700kbit:3", "1kbit:5"):
        with pytest.raises(HlsError):
            parse_schedule(bad)
