"""The harness itself: the order tests start in."""

from __future__ import annotations

from conftest import start_rank


def test_long_tests_start_first_then_end_to_end_then_the_rest(request):
    """The order this process runs its selection in (an xdist worker gets its tests from this list too)."""
    items = request.session.items
    late = [(a.nodeid, b.nodeid) for a, b in zip(items, items[1:]) if start_rank(a) > start_rank(b)]
    assert not late, late[:3]
