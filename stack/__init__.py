"""tapstack: a userspace TCP/IP stack on a Linux TAP device.

From a program (see stack/aio.py):

    import stack
    stack.run(main(), netns="demo", address="10.77.0.2/24")   # main's asyncio calls
                                                              # go through tapstack
    async with stack.open_stack(netns="demo") as s: ...       # on any running loop
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["EventLoopPolicy", "TapstackLoop", "UsageError", "new_event_loop", "open_stack",
           "run"]


def __getattr__(name: str) -> Any:
    """The program-facing names, imported on first use (the codecs need none of it)."""
    if name in ("open_stack", "run", "TapstackLoop", "new_event_loop", "EventLoopPolicy"):
        from stack import aio

        return getattr(aio, name)
    if name == "UsageError":
        from stack.launch import UsageError

        return UsageError
    raise AttributeError(f"module 'stack' has no attribute {name!r}")
