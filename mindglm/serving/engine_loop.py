"""The engine's own thread: it warms the engine up, then steps it while there is work.

The HTTP event loop never calls the engine itself. `engine.step()` holds the engine's lock for
a whole step (a prefill chunk can take a while on CPU), so even a quick `add_request` or
`abort` from the event loop could wait behind it. Instead the event loop queues commands, and
this thread applies them between two steps; results come back as futures, tokens through the
per-request callback, which the thread calls right after each step.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

log = logging.getLogger("mindglm.serving")



@dataclass
class TokenEvent:
    """What one step did to one sequence, captured in the engine thread.

    `finished` and `finish_reason` are copied when the step ends: the event loop reads the event
    later, when the live Sequence may already be several steps further.
    """

    sequence: object
    new_ids: list
    finished: bool
    finish_reason: Optional[str]
    time: float = field(default_factory=time.monotonic)
    error: Optional[str] = None  # the step failed: the request is over


Callback = Callable[[TokenEvent], None]


class EngineLoop:
    """Owns the thread that runs `engine.warmup()` and then `engine.step()` in a loop."""

    def __init__(self, engine, warmup: bool = True):
        self.engine = engine
        self._warmup = warmup
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._callbacks: dict = {}
        self._stopping = False
        self.ready = threading.Event()  # set once warm-up is over (or failed: see `error`)
        self.error: Optional[str] = None
        self.stats: dict = {}
        self.compiles = 0
        self.warmup_compiles = 0
        self.warmup_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="mindglm-engine", daemon=True)

    # ------------------------------------------------------------------ called from the event loop
    def start(self) -> None:
        self._thread.start()

    def submit(self, callback: Callback, **request) -> concurrent.futures.Future:
        """Queue `engine.add_request(**request)` (`request_id` required); the future holds the
        Sequence (or its error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request, callback, future))
        self._wake.set()
        return future

    def abort(self, request_id: str) -> None:
        """Queue `engine.abort(request_id)`; its callback then reports the sequence finished."""
        self._commands.put(("abort", request_id, None, None))
        self._wake.set()

    def abort_all(self) -> None:
        """Queue an abort of every request in the engine (the drain timed out)."""
        self._commands.put(("abort_all", None, None, None))
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def idle(self) -> bool:
        """No request in the engine and none queued."""
        return not self._callbacks and self._commands.empty()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            if self._warmup:
                start = time.monotonic()
                self.warmup_compiles = self.engine.warmup()
                self.warmup_seconds = time.monotonic() - start
        except Exception:  # noqa: BLE001  (reported on /health; the process stays up to say why)
            self.error = "engine warm-up failed: " + traceback.format_exc(limit=3)
            log.error(self.error)
            self.ready.set()
            return
        self._refresh_stats()
        self.ready.set()
        while not self._stopping:
            self._apply_commands()
            if self.engine.has_unfinished():
                self._step()
            else:
                self._wake.wait(0.5)
                self._wake.clear()
            self._refresh_stats()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload, callback, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort_all":
                for request_id in list(self._callbacks):
                    self.engine.abort(request_id)
                continue
            if kind == "abort":
                if payload in self._callbacks:
                    self.engine.abort(payload)
                continue
            # registered first: the engine may report a sequence finished inside add_request
            self._callbacks[payload["request_id"]] = callback
            try:
                sequence = self.engine.add_request(listener=self._listener, **payload)
            except Exception as exc:  # noqa: BLE001  (PromptTooLong, QueueFull, bad settings: the caller maps it)
                self._callbacks.pop(payload["request_id"], None)
                future.set_exception(exc)
                continue
            future.set_result(sequence)

    def _listener(self, sequence, new_ids) -> None:
        callback = self._callbacks.get(sequence.request_id)
        if sequence.finished:
            self._callbacks.pop(sequence.request_id, None)
        if callback is not None:
            callback(TokenEvent(sequence, list(new_ids), sequence.finished, sequence.finish_reason))

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception:  # noqa: BLE001  (a broken step fails its requests, not the server)
            message = "engine step failed: " + traceback.format_exc(limit=3)
            log.error(message)
            callbacks, self._callbacks = self._callbacks, {}
            for request_id, callback in callbacks.items():
                try:
                    self.engine.abort(request_id)
                except Exception:  # noqa: BLE001
                    pass
                callback(TokenEvent(None, [], True, None, error=message))

    def _refresh_stats(self) -> None:
        # read here, between steps, so /metrics never waits on the engine's lock
        self.stats = dict(self.engine.stats())
        self.compiles = int(self.engine.compiles)
