"""Live progress of one answer: the docid search level by level, then each side's answer token by token.

The code that does the work (`joint.search.search_docids`, `joint.reader.answer_with_docs`, `rag.Reader`) calls
`emit`; it costs nothing unless a caller listens. A listener opens a `Stream`, and each side runs inside
`stream.side(name)` (a context variable, so two sides on two threads keep their events apart):

    stream = Stream()
    with stream.side("joint"):
        system.answer(question, settings)      # emits ("level", ...) and ("token", ...) events
    for event in stream.drain(): ...
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

_CLOSED = object()


@dataclass(frozen=True)
class Event:
    side: str  # "joint" or "rag" (the page's two sides)
    kind: str  # "level": the docid search decided one more level; "token": the answer so far
    data: Any  # "level": {"level", "paths"} (each path: the search's per-level dicts); "token": the text so far


class Stream:
    """A thread-safe queue of `Event`s from the sides that run inside `side(...)`."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    @contextmanager
    def side(self, name: str) -> Iterator[None]:
        token = _current.set((self, name))
        try:
            yield
        finally:
            _current.reset(token)

    def bind(self, name: str, run: Callable[[], Any]) -> Callable[[], Any]:
        """`run` wrapped to emit into this stream as side `name` on whatever thread calls it."""
        def bound() -> Any:
            with self.side(name):
                return run()
        return bound

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def close(self) -> None:
        """No more events: `events` ends after the ones already queued."""
        self._queue.put(_CLOSED)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come, until `close`; `timeout` seconds without one ends the iteration early."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            if item is _CLOSED:
                return
            yield item

    def drain(self) -> list[Event]:
        """The events queued so far (without waiting)."""
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not _CLOSED:
                items.append(item)


_current: ContextVar[tuple[Stream, str] | None] = ContextVar("unirag_stream", default=None)


def listening() -> bool:
    """Whether anyone listens here (callers skip building an event's data otherwise)."""
    return _current.get() is not None


def current() -> Stream | None:
    here = _current.get()
    return here[0] if here is not None else None


def emit(kind: str, data: Any) -> None:
    here = _current.get()
    if here is not None:
        stream, side = here
        stream.put(Event(side, kind, data))


__all__ = ["Event", "Stream", "current", "emit", "listening"]
