"""The out-of-order queue against a model that stores every byte by its position: the
same blocks (maximal runs), the same bytes (the latest data wins where they overlap),
the same refusals at its limits, the same data handed back when the hole fills."""

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.net.tcp.buffers import OutOfOrderQueue

BASE = 0xFFFFF000  # the sequence space wraps inside the test's range


def runs(model: dict[int, int]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytearray]] = []
    for pos in sorted(model):
        if out and out[-1][0] + len(out[-1][1]) == pos:
            out[-1][1].append(model[pos])
        else:
            out.append((pos, bytearray([model[pos]])))
    return [(start, bytes(buf)) for start, buf in out]


ADD = st.tuples(st.integers(1, 6000), st.integers(1, 1500))


@settings(max_examples=300, deadline=None)
@given(adds=st.lists(ADD, max_size=40), limit=st.sampled_from([1 << 20, 8000, 3000]),
       max_blocks=st.sampled_from([512, 3]), hole=st.integers(0, 7000))
def test_the_queue_behaves_like_the_byte_model(adds, limit, max_blocks, hole):
    q = OutOfOrderQueue(limit, max_blocks)
    model: dict[int, int] = {}
    for n, (offset, size) in enumerate(adds):
        data = bytes((n * 31 + k) & 0xFF for k in range(size))
        after = dict(model)
        for k in range(size):
            after[offset + k] = data[k]
        island = not any(p in model for p in range(offset - 1, offset + size + 1))
        allowed = len(after) <= limit and not (island and len(runs(model)) >= max_blocks)
        assert q.add(BASE, (BASE + offset) & 0xFFFFFFFF, memoryview(data)) == allowed
        if allowed:
            model = after
            touched = next(s for s, b in runs(model) if s <= offset < s + len(b))
            assert q.last_added == (BASE + touched) & 0xFFFFFFFF
        assert [((s - BASE) & 0xFFFFFFFF, bytes(b)) for s, b in q.blocks] == runs(model)
        assert q.bytes == len(model)
    # the hole below the first block fills up to `hole`: what is contiguous comes back
    first = runs(model)[0] if model else None
    got = q.pop_ready((BASE + hole) & 0xFFFFFFFF)
    if first is None or first[0] > hole:
        assert got is None
    else:
        assert got == first[1][hole - first[0]:]
        assert type(got) is bytes
