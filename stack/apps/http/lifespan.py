"""The ASGI lifespan protocol: the application's startup before the server says ready,
its shutdown when the stack is stopping (before its connections are reset), and the
state it keeps for requests."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("tapstack.http")

SHUTDOWN_TIMEOUT = 10.0


class LifespanFailed(Exception):
    """The application reported lifespan.startup.failed (or raised during startup)."""


class Lifespan:
    """Runs `app` with a lifespan scope; `state` is what startup stored, copied into
    every request's scope. An app that raises at once does not speak lifespan: that is
    allowed, and noted at debug level."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.supported = True
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._started = False

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._send)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not self._started:
                self._events.put_nowait({"type": "raised", "exc": exc})
                return
            log.exception("the ASGI application failed in its lifespan")
        self._events.put_nowait({"type": "returned"})

    async def _send(self, message: dict[str, Any]) -> None:
        self._started = True
        self._events.put_nowait(message)

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main())
        self._inbox.put_nowait({"type": "lifespan.startup"})
        event = await self._events.get()
        kind = event["type"]
        if kind == "lifespan.startup.complete":
            return
        if kind == "lifespan.startup.failed":
            raise LifespanFailed(event.get("message") or "no reason given")
        if kind == "raised":
            self.supported = False
            log.debug("the ASGI application does not use lifespan (%r)", event["exc"])
            return
        if kind == "returned":
            self.supported = False
            return
        raise LifespanFailed(f"unexpected {kind} during startup")

    async def shutdown(self) -> None:
        if not self.supported or self._task is None or self._task.done():
            return
        self._inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            event = await asyncio.wait_for(self._events.get(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("the ASGI application did not finish its shutdown in %g s",
                        SHUTDOWN_TIMEOUT)
            self._task.cancel()
            return
        if event["type"] == "lifespan.shutdown.failed":
            log.warning("the ASGI application's shutdown failed: %s",
                        event.get("message") or "no reason given")
