"""``AsyncEngine``: the crate's continuous-batching engine for asyncio (as vLLM's ``AsyncLLMEngine``).

>>> engine = AsyncEngine(Model.from_pretrained("gpt2", dtype="q8"), parallel=8)
>>> result = await engine.generate("Hello, I'm a language model,", max_tokens=20, seed=1)
>>> async for piece in engine.stream("Once upon a time", max_tokens=50):
...     print(piece, end="")

One native thread owns the model's KV-cache slots and steps every request in flight together, with
the GIL released while it computes; each step's events reach the event loop through
``loop.call_soon_threadsafe``, so nothing here blocks the loop. A request's tokens equal
``Model.generate``'s with the same settings and seed, whatever runs beside it.

At most ``parallel + max_queue`` requests are in flight; one more raises ``EngineFull`` at once
(back-pressure: a server answers 429). Cancelling the task that awaits a request (or leaving a
stream early) frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator, NamedTuple, Optional

import numpy as np

from ._gpt2rs import EngineClosed, EngineFull, GenerationResult, Model, _AsyncEngine

__all__ = ["AsyncEngine", "AsyncStream", "EngineClosed", "EngineFull", "Token"]


class Token(NamedTuple):
    """One generated token as the engine produced it."""

    text: str
    """Text this token made final (may be empty: part of a character, or a possible stop string)."""
    id: int
    logprob: float
    """Log-softmax of the raw model logits at this token."""
    top: Optional[list]
    """``[(id, logprob)]``, best first, when ``logprobs=k`` was asked for."""
    finish_reason: Optional[str]
    """Set on the last token: ``"length"``, ``"eos"`` or ``"stop"``."""


class AsyncStream:
    """One request's tokens as they come: ``async for piece in stream`` gives non-empty text pieces
    (as ``Model.stream``); ``stream.tokens()`` gives every ``Token``. ``stream.result`` is the whole
    ``GenerationResult`` once it has ended. Leaving early (``break``, a cancelled task) or calling
    ``cancel()`` ends the request at the engine's next step."""

    def __init__(self, engine: "AsyncEngine", prompt: Any, settings: dict):
        self._ended = True  # until submitted (a refused submit leaves nothing to cancel)
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        # Called on the engine's thread with the GIL: hand the events to the loop, nothing more.
        callback = functools.partial(loop.call_soon_threadsafe, self._queue.put_nowait)
        self._handle = engine._native.submit(prompt, callback, **settings)
        self.seed: int = self._handle.seed
        self.result: Optional[GenerationResult] = None
        self._pending: list = []
        self._ended = False

    def cancel(self) -> None:
        """End the request at the next step (nothing more arrives)."""
        if not self._ended:
            self._ended = True
            self._handle.cancel()

    def __del__(self):
        # A stream dropped unread frees its slot.
        if not getattr(self, "_ended", True):
            self._handle.cancel()

    async def _next_event(self):
        while not self._pending:
            self._pending = list(reversed(await self._queue.get()))
        return self._pending.pop()

    async def tokens(self) -> AsyncIterator[Token]:
        """Every generated token, then the stream ends (``result`` is set)."""
        try:
            while not self._ended:
                ev = await self._next_event()
                kind = ev[0]
                if kind == "token":
                    yield Token(*ev[1:])
                elif kind == "done":
                    self.result = ev[1]
                    self._ended = True
                elif kind == "error":
                    self._ended = True
                    if ev[1].startswith("the engine shut down"):
                        raise EngineClosed(ev[1])
                    raise RuntimeError(ev[1])
        finally:
            # Left early (break, cancellation, an error in the consumer): free the slot.
            self.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        async for t in self.tokens():
            if t.text:
                yield t.text

    async def collect(self) -> GenerationResult:
        """Run to the end; the ``GenerationResult``."""
        async for _ in self.tokens():
            pass
        assert self.result is not None
        return self.result


class AsyncEngine:
    """Continuous batching over one model for asyncio: many requests in flight, stepped together.

    ``model``: a ``Model`` (its ``threads`` are the engine's). ``parallel``: sequences batched
    together (KV-cache slots of the whole context, allocated now). ``max_queue``: requests that may
    wait for a slot beyond those; more raise ``EngineFull``. ``prefill_chunk``: prompt tokens per
    step at most, so that running streams keep flowing while a long prompt is read.
    ``cache_tokens``: on the CPU, requests reuse the prompt prefixes that running and finished ones
    computed (the same bits as without), and finished ones keep up to this many tokens; ``None``
    turns the prefix cache off.
    """

    def __init__(self, model: Model, parallel: int = 8, max_queue: int = 256,
                 prefill_chunk: int = 256, cache_tokens: Optional[int] = 4096):
        self.model = model
        self._native = _AsyncEngine(model, parallel, max_queue, prefill_chunk, cache_tokens)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, *, dtype: str = "f32", device: str = "cpu",
                        threads: Optional[int] = None, revision: Optional[str] = None,
                        parallel: int = 8, max_queue: int = 256, prefill_chunk: int = 256,
                        cache_tokens: Optional[int] = 4096) -> "AsyncEngine":
        """``Model.from_pretrained`` and an engine over it."""
        model = Model.from_pretrained(name_or_dir, dtype=dtype, device=device, threads=threads,
                                      revision=revision)
        return cls(model, parallel=parallel, max_queue=max_queue, prefill_chunk=prefill_chunk,
                   cache_tokens=cache_tokens)

    def stream(self, prompt: Any, **settings) -> AsyncStream:
        """Start a generation (must be called inside a running event loop); settings as
        ``Model.generate`` without beam search, plus ``stop_token_ids``, ``min_tokens``,
        ``include_stop_str_in_output``, ``skip_special_tokens``, ``logit_bias`` and ``logprobs``.
        Bad settings raise here (``ValueError``/``TypeError``), before anything runs."""
        return AsyncStream(self, prompt, settings)

    async def generate(self, prompt: Any, **settings) -> GenerationResult:
        """The whole generation; equal to ``Model.generate(prompt, **settings)`` with a seed."""
        return await self.stream(prompt, **settings).collect()

    async def embed(self, texts: Any, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """``Model.embed`` run on the engine's thread between generation steps: ``(N, n_embd)`` for
        a list of texts, ``(n_embd,)`` for one."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(events):
            if not fut.done():
                fut.set_result(events)

        several = not isinstance(texts, str) and len(texts) > 0 and not isinstance(texts[0], int)
        handle = self._native.submit_embed(
            texts, functools.partial(loop.call_soon_threadsafe, done), pooling, normalize)
        try:
            events = await fut
        finally:
            handle.cancel()
        kind, value = events[0]
        if kind == "error":
            raise RuntimeError(value)
        arr = np.asarray(value, dtype=np.float32)
        return arr if several else arr[0]

    def stats(self) -> dict:
        """``running``, ``waiting``, ``in_flight`` (requests), ``parallel``, ``max_queue``,
        ``alive``."""
        return self._native.stats()

    def is_alive(self) -> bool:
        """Whether the engine's thread runs (a health check)."""
        return self._native.is_alive()

    async def shutdown(self, timeout: float = 30.0) -> bool:
        """Refuse new requests (``EngineClosed``), let those in flight finish for at most
        ``timeout`` seconds, then end the rest. Returns whether all finished."""
        return await asyncio.to_thread(self._native.shutdown, timeout)
