"""Named counters, one flat table for the whole stack, grouped by layer when shown.

Names are `layer.what` (`ipv4.rx_bad_checksum`). Engines declare the names they own so
that `tapstack stats` shows zeros too: a zero is information.

The few counters that move with every frame or segment (HOT) are integer slots of
`counters.hot` instead of dict entries: `hot.tcp_rx_segments += 1` costs a fifth of
`counters["tcp.rx_segments"] += 1` on a Counter (a dict subclass the interpreter does
not specialise). They keep their names for readers: `counters[name]` reads the slot,
and `snapshot()` (what stats, all_counters and grouped show) folds them in. The code
that counts them writes the slot, never the name.
"""

from __future__ import annotations

from collections import Counter

HOT = ("link.rx_frames", "link.rx_bytes", "ipv4.rx_packets", "ipv4.rx_delivered",
       "ipv4.tx_packets", "tcp.rx_segments", "tcp.tx_segments", "tcp.predicted_acks",
       "tcp.predicted_data")
_SLOTS = {name: name.replace(".", "_") for name in HOT}  # "tcp.rx_segments" -> tcp_rx_segments


class HotCounts:
    """The per-frame counters of one Counters table, as plain integers."""

    __slots__ = tuple(_SLOTS.values())

    def __init__(self) -> None:
        for slot in self.__slots__:
            setattr(self, slot, 0)


class Counters(Counter):
    """A Counter whose missing keys read as 0, so `c[name] += 1` never raises."""

    def __init__(self, *args, **kwargs) -> None:
        self.hot = HotCounts()
        self._hot_declared: set[str] = set()
        super().__init__(*args, **kwargs)

    def __missing__(self, key: str) -> int:
        slot = _SLOTS.get(key)
        return 0 if slot is None else getattr(self.hot, slot)

    def declare(self, *names: str) -> None:
        for name in names:
            if name in _SLOTS:
                self._hot_declared.add(name)
            else:
                self.setdefault(name, 0)

    def snapshot(self) -> Counters:
        """A copy with the hot counters as ordinary entries (declared or not zero)."""
        out = Counters(self)
        hot = self.hot
        for name, slot in _SLOTS.items():
            value = getattr(hot, slot)
            if value or name in self._hot_declared:
                out[name] += value
        return out

    def grouped(self) -> dict[str, dict[str, int]]:
        """{'ipv4': {'rx_packets': 3, ...}, ...}, layers and names sorted."""
        snapshot = self.snapshot()
        groups: dict[str, dict[str, int]] = {}
        for name in sorted(snapshot):
            layer, _, rest = name.partition(".")
            groups.setdefault(layer, {})[rest or layer] = snapshot[name]
        return groups
