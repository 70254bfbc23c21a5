"""Several users at once: questions asked concurrently are gathered and answered as one batch.

The models run one batch at a time (their forward passes are serialised anyway), and a small model answers a batch
of a few questions for little more than the cost of one. So concurrent callers do not queue one behind another:

    batcher = Batcher(run_many, run_one, max_batch=4, window_s=0.03)
    result = batcher.submit(key, item)     # blocks; from any number of threads at once

A call waits up to `window_s` after the oldest waiting call for others to join it; calls that arrive while a batch
runs wait for the next one. Only calls with the same `key` (e.g. corpus, settings, baseline) share a batch, at most
`max_batch` of them; other keys run as their own batches, oldest first.

A call alone in its batch runs `run_one(key, item)` inside the caller's own context (its context variables, so a
`unirag.streaming` listener still gets the docid path and the tokens as they come). A batch runs
`run_many(key, items)` on the batcher's thread, with no listener: its callers get their results at once when the
batch is done (batched questions stream less finely). `run_many` returns one result a call, or an exception
instance for a call that failed alone; if it raises, every call of the batch is run again alone, so an error
reaches only the caller whose question caused it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("unirag.batching")

MAX_BATCH = 4  # questions a batch holds: the app's four simultaneous users
WINDOW_S = 0.03  # how long the oldest waiting question waits for others (a lone question pays this once)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Call(Generic[K, T]):
    key: K
    item: T
    context: contextvars.Context
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher(Generic[K, T, R]):
    """Gathers concurrent `submit` calls with the same key into batches, one batch at a time (see the module)."""

    def __init__(self, run_many: Callable[[K, list[T]], Sequence[R | BaseException]],
                 run_one: Callable[[K, T], R], max_batch: int = MAX_BATCH, window_s: float = WINDOW_S,
                 name: str = "unirag-batcher") -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be at least 1 and window_s at least 0.")
        self.run_many, self.run_one = run_many, run_one
        self.max_batch, self.window_s, self.name = max_batch, window_s, name
        self._pending: list[_Call[K, T]] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, key: K, item: T) -> R:
        """The result of `item`, answered alone or in a batch with other calls of the same key; raises what
        answering it raised."""
        call: _Call[K, T] = _Call(key, item, contextvars.copy_context())
        with self._ready:
            self._pending.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._ready.notify_all()
        return call.future.result()

    @property
    def waiting(self) -> int:
        """Calls waiting for a batch (not counting the one running)."""
        with self._ready:
            return len(self._pending)

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - the server thread must outlive any batch
                log.exception("the batcher failed")
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(exc)

    def _next_batch(self) -> list[_Call[K, T]]:
        """The oldest waiting call and up to max_batch - 1 others with its key, once the batch is full or the oldest
        call has waited `window_s`."""
        with self._ready:
            while not self._pending:
                self._ready.wait()
            first = self._pending[0]
            while True:
                batch = [c for c in self._pending if c.key == first.key][: self.max_batch]
                left = first.arrived + self.window_s - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0:
                    break
                self._ready.wait(left)
            for call in batch:
                self._pending.remove(call)
            return batch

    def _run(self, batch: list[_Call[K, T]]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        try:
            results = list(self.run_many(batch[0].key, [c.item for c in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_many returned {len(results)} results for {len(batch)} calls")
        except Exception:  # noqa: BLE001 - which call failed is unknown: each runs alone, its error goes to it
            log.warning("a batch of %d failed; answering its calls one at a time", len(batch), exc_info=True)
            for call in batch:
                self._run_alone(call)
            return
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    def _run_alone(self, call: _Call[K, T]) -> None:
        try:
            call.future.set_result(call.context.run(self.run_one, call.key, call.item))
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller, raised in its thread
            call.future.set_exception(exc)


def concurrent_requests(max_batch: int = MAX_BATCH) -> int:
    """Requests the web server should let in at once: a full batch running and the next one gathering."""
    return 2 * max(1, max_batch)


__all__ = ["MAX_BATCH", "WINDOW_S", "Batcher", "concurrent_requests"]
