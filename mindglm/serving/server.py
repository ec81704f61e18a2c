"""Running the app under uvicorn, with a drain on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once and then waits for open
connections; a load balancer still sending traffic gets connection errors, and sse-starlette ends
every running stream. Here the first SIGTERM (or Ctrl-C) starts a drain instead: `/health` and new
requests answer 503 while the running replies finish, for up to `drain_timeout` seconds; what is
still running then is aborted, and the process exits with status 0. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn
from sse_starlette.sse import AppStatus

from mindglm.serving.app import ServerState, create_app

log = logging.getLogger("mindglm.serving")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before shutting down."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._drain_task = None
        # the streams end when their replies do, not when the signal arrives
        AppStatus.disable_automatic_graceful_drain()

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # a second signal: stop now
            self.force_exit = self.should_exit = True
            AppStatus.should_exit = True
            return
        self.state.draining = True
        log.warning("received %s: draining (no new requests; up to %.0fs for running ones)",
                    signal.Signals(sig).name, self.drain_timeout)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while not self.state.quiet() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.state.quiet():
            log.warning("drain timeout: aborting %d unfinished request(s)", self.state.active)
            self.state.loop.abort_all()
            # the aborted replies end with an error event; give them a moment to be sent
            for _ in range(40):
                if self.state.quiet():
                    break
                await asyncio.sleep(0.05)
        AppStatus.should_exit = True
        self.should_exit = True


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
          log_level: str = "info") -> int:
    """Start the engine thread and serve until drained; returns the exit status."""
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    server = DrainingServer(config, state, drain_timeout)
    state.loop.start()
    try:
        server.run()
    finally:
        state.loop.stop()
    return 0
