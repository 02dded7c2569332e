"""A burst of segments works out its window field and options once: the segments after
the first reuse them (`_emit_more`). That must change nothing but speed: whole transfers
under seeded faults (loss, reordering, corruption: SACK blocks, quick ACKs, recovery)
send the very same frames, both ways, and end in the same state as when every segment
works them out again."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.net.tcp.tcp_output import OutputMixin
from tests.unit.test_fused_receive import transfer


def run(monkeypatch, seed: int, faults: str, size: int, reuse: bool) -> tuple[dict, int]:
    reused = []
    original = OutputMixin._emit_more

    def counted(self, seq, flags, payload, now, memo):
        reused.append(1)
        if reuse:
            original(self, seq, flags, payload, now, memo)
        else:
            self._emit(seq, flags, payload, now)  # the reference: everything again

    with monkeypatch.context() as m:
        m.setattr(OutputMixin, "_emit_more", counted)
        return transfer(seed, faults, size, True), len(reused)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(1, 10_000),
       faults=st.sampled_from(["", "loss=2%", "corrupt=2%", "reorder=5%,delay=1ms",
                               "loss=1%,duplicate=1%,corrupt=1%"]),
       size=st.integers(1, 100_000))
def test_reusing_the_ack_side_sends_the_same_frames(seed, faults, size):
    mp = pytest.MonkeyPatch()
    fast, _ = run(mp, seed, faults, size, True)
    slow, _ = run(mp, seed, faults, size, False)
    assert fast["got"] == slow["got"] == (True, True)
    for key in ("sent", "client", "server", "counters"):
        assert fast[key] == slow[key], key


def test_a_bulk_transfer_reuses_it(monkeypatch):
    result, reused = run(monkeypatch, 7, "", 200_000, True)
    assert result["got"] == (True, True)
    data_frames = sum(len(f) > 200 for f in result["sent"]["a"])
    assert reused > data_frames // 2  # most segments of a burst are not its first
