"""Log lines the cloud cannot multiply (ratelog.py): one line per category
per period, repeats counted, a bounded table, a budget of lines."""
from __future__ import annotations

import logging
import types

import pytest

from klippy_extras.polar_cloud import ratelog
from klippy_extras.polar_cloud.ratelog import LineBudget, RateLimitedLog


@pytest.fixture
def clock(monkeypatch):
    now = [1000.]
    monkeypatch.setattr(ratelog, "time", types.SimpleNamespace(
        monotonic=lambda: now[0]))
    return now


def test_rate_limited_log_keeps_a_bounded_table(caplog):
    rlog = RateLimitedLog(period=600., max_keys=64)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for i in range(5000):
            rlog("key%d" % (i,), "message %d", i)
    assert len(rlog.last) <= 64
    assert rlog("key4999", "again") is False


def test_one_line_per_key_per_period_then_the_count(clock, caplog):
    rlog = RateLimitedLog(period=600.)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        assert rlog("flood", "dropped %d", 1) is True
        for i in range(5):
            clock[0] += 10.
            assert rlog("flood", "dropped %d", i) is False
        assert rlog("other", "something else") is True
        clock[0] += 600.
        assert rlog("flood", "dropped %d", 9, level=logging.WARNING)
    assert [r.getMessage() for r in caplog.records] == [
        "polar_cloud: dropped 1", "polar_cloud: something else",
        "polar_cloud: dropped 9 (5 similar suppressed)"]
    assert caplog.records[-1].levelno == logging.WARNING


def test_a_full_table_forgets_the_oldest_keys(clock, caplog):
    rlog = RateLimitedLog(period=600., max_keys=4)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for i in range(4):
            clock[0] += 1.
            rlog("key%d" % (i,), "message")
        rlog("key4", "message")
    assert sorted(rlog.last) == ["key2", "key3", "key4"]


@pytest.mark.parametrize("seconds,text", [
    (0, "0 s"), (119.9, "119 s"), (120, "2 min"), (7199, "119 min"),
    (7200, "2.0 h"), (36 * 3600, "36.0 h")])
def test_duration_text(seconds, text):
    assert ratelog.duration_text(seconds) == text


def test_line_budget(clock):
    budget = LineBudget(3, 60.)
    assert [budget.allow() for _ in range(4)] == [True, True, True, False]
    clock[0] += 59.
    assert not budget.allow()
    clock[0] += 1.                          # a window later: three more
    assert [budget.allow() for _ in range(4)] == [True, True, True, False]
