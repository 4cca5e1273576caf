"""An iterator run ahead on a background thread: what the store reader and the step prefetcher share."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """The items of `items`, made on a daemon thread up to `depth` ahead of the consumer.

    Whatever ends `items` there (its end, a data error) is raised by `next()` at the item that needed it, and
    again by every later call. Use as a context manager, or call `close()`: it stops the thread, an endless
    iterator's too."""

    def __init__(self, items: Iterator[T], depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._end: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(StopIteration())
        except BaseException as exc:  # re-raised in the consumer, at the item it stopped
            self._put(exc)

    def _put(self, item: object) -> bool:
        """Queue `item` unless `close()` comes first: a producer waiting on a full queue must not hang."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Background[T]:
        return self

    def __next__(self) -> T:
        if self._end is None:
            item = self._queue.get()
            if not isinstance(item, BaseException):
                return item
            self._end = item
        raise self._end

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

    def __enter__(self) -> Background[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
