"""How long the printer has been offline (outage.py): a handful of log
lines per outage, however many attempts it takes."""
from __future__ import annotations

import logging
import types

import pytest

from klippy_extras.polar_cloud import outage, ratelog
from klippy_extras.polar_cloud.outage import Outage
from klippy_extras.polar_cloud.ratelog import RateLimitedLog


@pytest.fixture
def clock(monkeypatch):
    now = [1000.]
    fake = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(outage, "time", fake)
    monkeypatch.setattr(ratelog, "time", fake)
    return now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_an_outage_is_a_line_per_reason_and_a_line_when_over(clock, caplog):
    out = Outage(RateLimitedLog())
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        out.retry("connection lost", 2.)
        for delay in (4., 8., 16.):
            clock[0] += delay
            out.retry("cannot connect to x: refused", delay)
        clock[0] += 30.
        out.over("KL000042")
    assert lines(caplog) == [
        "polar_cloud: connection lost; retry in 2 s",
        "polar_cloud: cannot connect to x: refused; retry in 4 s",
        "polar_cloud: online as KL000042 after 58 s offline (4 attempts)"]
    assert out.since == 0.


def test_a_long_outage_says_how_long_once_per_period(clock, caplog):
    out = Outage(RateLimitedLog(period=600.))
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(30):                 # 30 minutes, a try a minute
            out.retry("cannot connect to x: refused", 60.)
            clock[0] += 60.
    summaries = [line for line in lines(caplog) if "offline for" in line]
    assert lines(caplog)[0].endswith("refused; retry in 60 s")
    assert summaries == [
        "polar_cloud: cannot connect to x: refused; retry in 60 s (offline"
        " for 10 min, 11 attempts) (9 similar suppressed)",
        "polar_cloud: cannot connect to x: refused; retry in 60 s (offline"
        " for 20 min, 21 attempts) (9 similar suppressed)"]
    assert caplog.records[0].levelno == logging.WARNING


def test_online_without_an_outage_and_after_forget(clock, caplog):
    out = Outage(RateLimitedLog())
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        out.over("KL1")
        out.retry("no welcome from Polar Cloud", 2.)
        out.forget()                        # unregistered meanwhile
        clock[0] += 100.
        out.over("KL2")
    assert lines(caplog)[0] == "polar_cloud: online as KL1"
    assert lines(caplog)[-1] == "polar_cloud: online as KL2"
