"""Mini-batches made ahead on a background thread: same items, same order, errors and early
stops handled (dist_tp.data.prefetch); a joint run is the same with and without it."""

from __future__ import annotations

import threading

import pytest

from dist_tp.data.prefetch import prefetched


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "dist-tp-prefetch"}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_come_in_order_through_prepare(depth):
    assert list(prefetched(iter(range(50)), depth, lambda x: x * x)) == [x * x for x in range(50)]
    assert list(prefetched(iter([]), depth)) == []
    assert not _threads()


def test_an_error_in_the_producer_is_raised_at_its_item():
    def items():
        yield from range(5)
        raise ValueError("bad row group 7")

    got = []
    with pytest.raises(ValueError, match="bad row group 7"):
        for x in prefetched(items(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4] and not _threads()


def test_closing_early_stops_the_producer_within_its_depth():
    made = []

    def items():
        for x in range(10_000):
            made.append(x)
            yield x

    gen = prefetched(items(), 3)
    assert [next(gen) for _ in range(4)] == [0, 1, 2, 3]
    gen.close()
    assert not _threads()
    assert len(made) <= 4 + 3 + 1  # consumed, queued, and the one waiting to be queued
