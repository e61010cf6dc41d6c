"""Reconnect backoff: doubling, capped, proportional jitter."""
import random

from klippy_extras.polar_cloud.backoff import Backoff


def test_doubles_to_cap_without_jitter():
    b = Backoff(base=2., cap=120., rand=lambda: .5)
    delays = [b.next_delay() for _ in range(9)]
    assert delays == [2., 4., 8., 16., 32., 64., 120., 120., 120.]
    b.reset()
    assert b.next_delay() == 2.


def test_jitter_is_proportional():
    lows = Backoff(rand=lambda: 0.)
    highs = Backoff(rand=lambda: 1. - 1e-12)
    for _ in range(10):
        low, high = lows.next_delay(), highs.next_delay()
        nominal = low / .5
        assert abs(high - 1.5 * nominal) < 1e-6


def test_fleet_spreads_out():
    """1,000 clients at the cap spread over the whole jitter window."""
    rng = random.Random(7)
    delays = []
    for _ in range(1000):
        b = Backoff(rand=rng.random)
        b.attempts = 10
        delays.append(b.next_delay())
    assert min(delays) >= 60. and max(delays) <= 180.
    per_second = {}
    for d in delays:
        per_second[int(d)] = per_second.get(int(d), 0) + 1
    assert max(per_second.values()) <= 30          # <= 3 % in any second
    assert max(delays) - min(delays) >= 60.        # >= 50 % of the window
