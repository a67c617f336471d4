"""Work on the next items while the caller works on the current one: one prefetcher for
training (the next batch's level-1 views) and prediction (the next files opened and their
views read). Reading does not depend on the weights, so the results are those of reading
in turn."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Iterable[T], workers: int = 1, ahead: int = 1,
               name: str = "zoomnet-read") -> Iterator[tuple[T, Future]]:
    """``(item, future of fn(item))`` in the order of ``items``, with ``fn`` already running in
    ``workers`` threads on up to ``ahead`` items after the one handed out. ``future.result()``
    gives the value or raises what ``fn`` raised; a finished item is let go at once. Leaving
    the loop early cancels what has not started and waits for what has.

    >>> [f.result() for _, f in prefetched(lambda x: x * x, range(5), ahead=2)]
    [0, 1, 4, 9, 16]
    """
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix=name) as pool:
        futures: list[Future | None] = [pool.submit(fn, it) for it in items[: ahead + 1]]
        try:
            for k, item in enumerate(items):
                if k and k + ahead < len(items):  # keep `ahead` items in flight past this one
                    futures.append(pool.submit(fn, items[k + ahead]))
                future, futures[k] = futures[k], None  # the caller holds it; the list lets go
                yield item, future
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()
