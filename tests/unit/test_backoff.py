"""Reconnect backoff (backoff.py): doubling, capped, proportional jitter;
a fleet using it comes back from an outage without a stampede (R28)."""
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


def fleet_reconnects(n: int, outage: float, make_delay) -> list[float]:
    """Each client drops at t=0 and retries on its own schedule until the
    first attempt at or after `outage` succeeds; return those times."""
    times = []
    for i in range(n):
        next_delay = make_delay(i)
        t = next_delay()
        while t < outage:
            t += next_delay()
        times.append(t)
    return times


def max_per_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_fleet_comes_back_without_a_stampede():
    """1,000 printers lose the cloud at t=0, it returns at t=300 s."""
    n, outage = 1000, 300.
    times = fleet_reconnects(n, outage, lambda i: Backoff(
        rand=random.Random(i).random).next_delay)
    assert all(t >= outage for t in times)
    assert max_per_second(times) <= 0.03 * n
    # Spread over at least half of the jitter window at the cap (60-180 s)
    assert max(times) - min(times) >= 0.5 * 120.
    # For contrast: python-socketio's own reconnection (additive +/-0.5 s
    # jitter, delay capped at 5 s) would bring them back in a spike
    def socketio_default(i):
        rng, attempt = random.Random(i), [0]

        def delay():
            d = min(1. * 2 ** attempt[0], 5.)
            attempt[0] += 1
            return d + 0.5 * (2 * rng.random() - 1)
        return delay
    spike = fleet_reconnects(n, outage, socketio_default)
    assert max_per_second(spike) > 0.03 * n
