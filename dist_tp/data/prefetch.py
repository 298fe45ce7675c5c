"""Mini-batches made ahead on a background thread, so the device never waits on numpy.

``prefetched(items, depth)`` runs the iterator ``items`` on a thread of its own, at most
``depth`` items ahead of the consumer, and yields them in the same order: a seeded epoch stays
the same epoch. The numpy work (windows, shuffles, gathers) and the pinning of host memory for
the copy to a GPU release the GIL, so they overlap the training step. An error in the producer
is raised in the consumer at the item where it happened; closing the generator early (a capped
or stopped epoch) stops the producer and waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()
PUT_WAIT = 0.1  # seconds between the producer's checks of the stop flag while the queue is full


class _Failed:
    """The producer's exception, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(
    items: Iterator[T], depth: int, prepare: Callable[[T], U] | None = None
) -> Iterator[U]:
    """``items`` (each through ``prepare``, on the producer's thread), made up to ``depth``
    ahead; ``depth`` 0: in the caller's thread, nothing ahead."""
    if depth <= 0:
        yield from (items if prepare is None else map(prepare, items))
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=PUT_WAIT)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item if prepare is None else prepare(item)):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            put(_Failed(error))
            return
        put(_END)

    worker = threading.Thread(target=produce, name="dist-tp-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            value = ready.get()
            if value is _END:
                return
            if isinstance(value, _Failed):
                raise value.error
            yield value
    finally:
        stop.set()
        worker.join()
