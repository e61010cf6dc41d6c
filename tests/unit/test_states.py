"""The session's states (states.py), as printer.polar_cloud shows them."""
from __future__ import annotations

from klippy_extras.polar_cloud import states

STATES = [value for name, value in vars(states).items() if name.isupper()
          and isinstance(value, str)]


def test_states_are_distinct_lowercase_words():
    assert len(STATES) == len(set(STATES)) == 9
    assert all(s.isidentifier() and s == s.lower() for s in STATES)


def test_every_waiting_state_says_what_missing_its_deadline_means():
    assert set(states.WAITING) == {states.CONNECTING, states.REGISTERING,
                                   states.AUTHENTICATING}
    assert all(text.startswith("no ") for text in states.WAITING.values())
