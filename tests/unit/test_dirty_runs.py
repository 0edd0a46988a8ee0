"""Dirty-page bookkeeping: bitmaps and ring pages to byte runs, and run unions."""

import random

from hypothesis import given
from hypothesis import strategies as st

from kvmkit.memory.dirty_log import bitmap_runs, merge_runs, run_bytes
from kvmkit.memory.dirty_ring import page_runs

PAGE = 4096


def naive_runs(bitmap: bytes, base: int, npages: int) -> list[tuple[int, int]]:
    runs, start = [], -1
    for p in range(npages):
        if bitmap[p // 8] >> (p % 8) & 1:
            if start < 0:
                start = p
        elif start >= 0:
            runs.append((base + start * PAGE, (p - start) * PAGE))
            start = -1
    if start >= 0:
        runs.append((base + start * PAGE, (npages - start) * PAGE))
    return runs


@st.composite
def bitmaps(draw):
    words = draw(st.sampled_from([1, 2, 8, 9, 64, 65, 520, 1100]))
    kind = draw(st.sampled_from(["sparse", "dense", "blocks", "full", "empty"]))
    size = words * 8
    if kind == "full":
        data = bytearray(b"\xff" * size)
    elif kind == "empty":
        data = bytearray(size)
    elif kind == "blocks":  # long runs that cross the 64- and 512-byte block edges
        data = bytearray(size)
        for _ in range(draw(st.integers(1, 4))):
            a = draw(st.integers(0, size * 8 - 1))
            b = draw(st.integers(a, min(size * 8, a + 9000)))
            for p in range(a, b):
                data[p // 8] |= 1 << (p % 8)
    else:
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        if kind == "sparse":
            data = bytearray(
                1 << rng.randrange(8) if rng.random() < 0.01 else 0 for _ in range(size)
            )
        else:
            data = bytearray(rng.randrange(256) for _ in range(size))
    cut = draw(st.integers(0, 63))
    return bytes(data), max(1, words * 64 - cut)


@given(bitmaps())
def test_bitmap_runs_match_a_bit_by_bit_walk(case):
    bitmap, npages = case
    assert bitmap_runs(bytearray(bitmap), 0x10000, npages) == naive_runs(bitmap, 0x10000, npages)


def test_a_full_bitmap_is_one_run_clipped_to_the_slot():
    assert bitmap_runs(bytearray(b"\xff" * 8 * 10), 0, 600) == [(0, 600 * PAGE)]


runs_lists = st.lists(
    st.tuples(
        st.integers(0, 200).map(lambda p: p * PAGE), st.integers(1, 20).map(lambda n: n * PAGE)
    )
)


@given(runs_lists, runs_lists)
def test_merge_runs_covers_exactly_the_union(a, b):
    def pages(runs):
        return {p for off, n in runs for p in range(off // PAGE, (off + n) // PAGE)}

    merged = merge_runs(a, b)
    assert pages(merged) == pages(a) | pages(b)
    assert run_bytes(merged) == len(pages(a) | pages(b)) * PAGE
    for (o1, n1), (o2, _) in zip(merged, merged[1:], strict=False):
        assert o1 + n1 < o2  # sorted, and neighbours joined


@given(st.sets(st.integers(0, 5000)))
def test_ring_pages_become_sorted_joined_runs(pages):
    runs = page_runs(pages)
    assert {p for off, n in runs for p in range(off // PAGE, (off + n) // PAGE)} == pages
    assert all(o1 + n1 < o2 for (o1, n1), (o2, _) in zip(runs, runs[1:], strict=False))
