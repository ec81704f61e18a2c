"""One request's life in the engine: submitted, its tokens turned into deltas, finished or aborted.

Runs on the event loop. Tokens arrive from the engine thread through `call_soon_threadsafe` into
an asyncio queue, so nothing here waits on the model.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from mindglm.config import ConfigError
from mindglm.serving.protocol import APIError
from mindglm.serving.prompts import Prompt
from mindglm.serving.replies import Final, Reply


def _engine_errors():
    from mindglm.engine import PromptTooLong, QueueFull
    return PromptTooLong, QueueFull


@dataclass
class Event:
    """A step of a reply: new text, and the Final once it is over."""

    delta: str
    final: Optional[Final] = None


class Generation:
    """A request running in the engine (see `ServerState.generation`)."""

    def __init__(self, state, prompt: Prompt, config, reply: Reply, prefix: str, prompt_param: str):
        self.state, self.prompt, self.config, self.reply = state, prompt, config, reply
        self.request_id = f"{prefix}-{uuid.uuid4().hex}"
        self.prompt_param = prompt_param
        self.sequence = None
        self.generated = 0  # ids received so far (the live Sequence may be further on)
        self.done = False
        self._released = False
        self._events: asyncio.Queue = asyncio.Queue()
        self._last_token_time: Optional[float] = None
        state.active += 1

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)

    @property
    def completion_tokens(self) -> int:
        return self.generated

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def start(self) -> None:
        """Put the request into the engine; a prompt that does not fit is a 400, a full queue a 429."""
        loop = asyncio.get_running_loop()

        def callback(event):
            loop.call_soon_threadsafe(self._events.put_nowait, event)

        prompt_too_long, queue_full = _engine_errors()
        future = self.state.loop.submit(callback, prompt_ids=list(self.prompt.ids), generation=self.config,
                                        stop_ids=list(self.prompt.stop_ids),
                                        tool_call_ids=list(self.prompt.tool_call_ids), request_id=self.request_id)
        try:
            self.sequence = await asyncio.wrap_future(future)
        except prompt_too_long as exc:
            self.release()
            raise APIError(400, str(exc), self.prompt_param) from None
        except queue_full as exc:
            self.release()
            raise APIError(429, f"too many requests are waiting ({exc}); retry later") from None
        except (ConfigError, ValueError) as exc:
            self.release()
            raise APIError(400, str(exc)) from None
        except BaseException:
            self.release()
            raise
        self.state.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def events(self) -> AsyncIterator[Event]:
        """The reply as it grows; the last Event carries the Final."""
        try:
            while not self.done:
                step = await self._events.get()
                if step.error is not None:
                    self.done = True
                    raise APIError(500, step.error)
                self.generated += len(step.new_ids)
                self._observe(step)
                stopped_on_id = step.finished and step.finish_reason in ("stop", "tool_calls")
                delta = self.reply.push(step.new_ids, stopped_on_id)
                if self.reply.stopped:  # a stop string: the reply is over, the engine row is freed
                    self.state.loop.abort(self.request_id)
                    yield self._finish("stop", delta)
                elif step.finished:
                    if step.finish_reason == "abort":
                        self.done = True
                        self.state.metrics.finished("abort")
                        raise APIError(503, "the reply was aborted: the server is shutting down")
                    yield self._finish(step.finish_reason, delta)
                elif delta:
                    yield Event(delta)
        finally:
            self.release()

    def _finish(self, reason: str, delta: str) -> Event:
        self.done = True
        final = self.reply.finish(reason)
        final.delta = delta + final.delta
        self.state.metrics.finished(final.finish_reason)
        if self.sequence is not None and self.sequence.arrival_time is not None:
            self.state.metrics.e2e.observe(max(0.0, self._last_token_time - self.sequence.arrival_time)
                                           if self._last_token_time else 0.0)
        return Event(final.delta, final)

    def _observe(self, step) -> None:
        if not step.new_ids:
            return
        metrics, when, sequence = self.state.metrics, step.time, step.sequence
        metrics.generation_tokens.inc(len(step.new_ids))
        if self._last_token_time is None:
            first = sequence.first_token_time if sequence.first_token_time is not None else when
            metrics.ttft.observe(max(0.0, first - sequence.arrival_time))
            rest = len(step.new_ids) - 1
        else:
            rest = len(step.new_ids)
        if rest and self._last_token_time is not None:
            for _ in range(rest):
                metrics.tpot.observe((when - self._last_token_time) / rest)
        self._last_token_time = when

    def release(self) -> None:
        """Abort the sequence if it still runs (client gone, error) and stop counting it; idempotent."""
        if self._released:
            return
        self._released = True
        self.state.active -= 1
        if not self.done and self.sequence is not None:
            self.state.loop.abort(self.request_id)
            self.state.metrics.finished("abort")
        self.done = True

    async def run_to_end(self) -> Final:
        """Wait for the whole reply (non-streaming requests)."""
        async for event in self.events():
            if event.final is not None:
                return event.final
        raise APIError(500, "the reply ended without a result")
