"""The harness itself: the order tests start in."""

from __future__ import annotations

from conftest import start_rank


def test_long_tests_start_first_then_end_to_end_then_the_rest(request):
    """The order this process runs its selection in (an xdist worker gets its tests from this list too)."""
    ranks = [start_rank(item) for item in request.session.items]
    assert ranks == sorted(ranks), [(rank, item.nodeid) for rank, item in zip(ranks, request.session.items)
                                    if rank > min(ranks[ranks.index(rank):])][:3]
