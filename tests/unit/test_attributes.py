"""AttributeMap against a page-by-page model: whatever sequence of conversions, the
ranges agree with the model, stay sorted, disjoint and merged."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.memory.attributes import AttributeMap

PAGE = 4096
PAGES = 64

ops = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(0, PAGES - 1),
        st.integers(1, 16),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_a_page_model(operations):
    amap = AttributeMap()
    model = [False] * (PAGES + 16)
    for private, first, count in operations:
        if private:
            amap.set_private(first * PAGE, count * PAGE)
        else:
            amap.set_shared(first * PAGE, count * PAGE)
        for p in range(first, first + count):
            model[p] = private
    for p, want in enumerate(model):
        assert amap.is_private(p * PAGE) == want
        assert amap.is_private(p * PAGE + PAGE - 1) == want
    ranges = amap.ranges()
    for (s1, e1), (s2, _) in zip(ranges, ranges[1:], strict=False):
        assert s1 < e1 < s2  # sorted, disjoint, and never merely adjacent (merged)
    assert amap.private_bytes == sum(model) * PAGE


def test_split_and_merge():
    amap = AttributeMap()
    amap.set_private(0, 8 * PAGE)
    amap.set_shared(2 * PAGE, 2 * PAGE)
    assert amap.ranges() == [(0, 2 * PAGE), (4 * PAGE, 8 * PAGE)]
    amap.set_private(2 * PAGE, 2 * PAGE)
    assert amap.ranges() == [(0, 8 * PAGE)]


@pytest.mark.parametrize("gpa, size", [(1, PAGE), (0, PAGE + 1), (0, 0), (-PAGE, PAGE)])
def test_unaligned_or_empty_ranges_refused(gpa, size):
    with pytest.raises(ValueError, match="page aligned"):
        AttributeMap().set_private(gpa, size)
