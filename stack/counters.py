"""Named counters, one flat table for the whole stack, grouped by layer when shown.

Names are `layer.what` (`ipv4.rx_bad_checksum`). Engines declare the names they own so
that `tapstack stats` shows zeros too: a zero is information.
"""

from __future__ import annotations

from collections import Counter


class Counters(Counter):
    """A Counter whose missing keys read as 0, so `c[name] += 1` never raises."""

    def declare(self, *names: str) -> None:
        for name in names:
            self.setdefault(name, 0)

    def grouped(self) -> dict[str, dict[str, int]]:
        """{'ipv4': {'rx_packets': 3, ...}, ...}, layers and names sorted."""
        groups: dict[str, dict[str, int]] = {}
        for name in sorted(self):
            layer, _, rest = name.partition(".")
            groups.setdefault(layer, {})[rest or layer] = self[name]
        return groups
