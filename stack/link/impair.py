"""netem-like faults on any link: loss, delay with jitter, reordering, duplication,
corruption. These kernels have no sch_netem, and tests need faults on both sides.

Pure: frames go in with the time, come out with the time they are due. The same queue
serves the in-memory link (virtual clock) and the TAP runtime (real clock).
"""

from __future__ import annotations

import heapq
import itertools
import random

from stack.counters import Counters

_KEYS = ("loss", "delay", "jitter", "reorder", "duplicate", "corrupt", "seed")


class ImpairSpecError(ValueError):
    pass


def _percent(key: str, text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ImpairSpecError(f"{key}={text} is not a percentage like 1%") from None
    if not 0.0 <= value <= 1.0:
        raise ImpairSpecError(f"{key}={text} is outside 0%..100%")
    return value


def _seconds(key: str, text: str) -> float:
    units = (("ms", 1e-3), ("us", 1e-6), ("s", 1.0))
    for suffix, scale in units:
        if text.endswith(suffix):
            try:
                value = float(text[: -len(suffix)]) * scale
            except ValueError:
                break
            if value < 0:
                break
            return value
    raise ImpairSpecError(f"{key}={text} is not a duration like 5ms")


class Impairment:
    """Faults applied to one direction of a link."""

    def __init__(self, loss: float = 0.0, delay: float = 0.0, jitter: float = 0.0,
                 reorder: float = 0.0, duplicate: float = 0.0, corrupt: float = 0.0,
                 seed: int | None = None, counters: Counters | None = None,
                 prefix: str = "impair") -> None:
        self.loss, self.delay, self.jitter = loss, delay, jitter
        self.reorder, self.duplicate, self.corrupt = reorder, duplicate, corrupt
        self.rng = random.Random(seed)
        self.counters = counters if counters is not None else Counters()
        self.prefix = prefix
        self.counters.declare(*(f"{prefix}.{k}" for k in (
            "frames", "dropped", "reordered", "duplicated", "corrupted")))
        self._queue: list[tuple[float, int, bytes]] = []
        self._order = itertools.count()
        self._last_due = 0.0

    @classmethod
    def parse(cls, spec: str, **kw) -> Impairment:
        """'loss=1%,delay=5ms,jitter=2ms,reorder=5%,duplicate=1%,corrupt=0.5%,seed=7'"""
        values: dict = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, text = part.partition("=")
            if not sep or key not in _KEYS:
                raise ImpairSpecError(f"{part!r} is not one of "
                                      f"{', '.join(k + '=' for k in _KEYS)}")
            if key in ("delay", "jitter"):
                values[key] = _seconds(key, text)
            elif key == "seed":
                try:
                    values[key] = int(text)
                except ValueError:
                    raise ImpairSpecError(f"seed={text} is not an integer") from None
            else:
                values[key] = _percent(key, text)
        return cls(**values, **kw)

    @property
    def active(self) -> bool:
        return any((self.loss, self.delay, self.jitter, self.reorder, self.duplicate,
                    self.corrupt))

    def push(self, frame: bytes, now: float) -> None:
        c = self.counters
        p = self.prefix
        rng = self.rng
        c[p + ".frames"] += 1
        if self.loss and rng.random() < self.loss:
            c[p + ".dropped"] += 1
            return
        copies = 1
        if self.duplicate and rng.random() < self.duplicate:
            c[p + ".duplicated"] += 1
            copies = 2
        for _ in range(copies):
            out = frame
            if self.corrupt and rng.random() < self.corrupt and len(frame) > 14:
                # flip one bit past the Ethernet header, like a damaged wire would
                c[p + ".corrupted"] += 1
                b = bytearray(frame)
                i = rng.randrange(14, len(b))
                b[i] ^= 1 << rng.randrange(8)
                out = bytes(b)
            due = now + self.delay
            if self.jitter:
                due += rng.uniform(-self.jitter, self.jitter)
            # without reordering, jitter must not reorder either: keep FIFO order
            due = max(due, now, self._last_due)
            if self.reorder and rng.random() < self.reorder:
                c[p + ".reordered"] += 1
                # hold this one back so that the next frames overtake it
                due += max(self.delay, 0.001) + 0.001
            else:
                self._last_due = due
            heapq.heappush(self._queue, (due, next(self._order), out))

    def pop_due(self, now: float) -> list[bytes]:
        queue = self._queue
        out = []
        while queue and queue[0][0] <= now:
            out.append(heapq.heappop(queue)[2])
        return out

    def next_deadline(self) -> float | None:
        return self._queue[0][0] if self._queue else None
