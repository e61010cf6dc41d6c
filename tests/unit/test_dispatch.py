"""Which code handles which cloud event (dispatch.py): only registered
handlers are ever called, online-only events wait for the hello, and a
bad event is dropped with one log line per kind."""
from __future__ import annotations

import logging

import pytest

from klippy_extras.polar_cloud import dispatch, protocol
from klippy_extras.polar_cloud.ratelog import RateLimitedLog


@pytest.fixture
def calls():
    return []


@pytest.fixture
def d(calls):
    d = dispatch.Dispatcher(RateLimitedLog())
    d.on("print", calls.append)
    d.on("welcome", calls.append, online=False)
    return d


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_registered_handler_gets_the_data(d, calls):
    d.dispatch("print", {"jobId": "1"}, True)
    d.dispatch("welcome", {"challenge": "c"}, False)
    assert calls == [{"jobId": "1"}, {"challenge": "c"}]


def test_online_events_wait_for_the_hello(d, calls, caplog):
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        d.dispatch("print", {"jobId": "1"}, False)
        d.dispatch("print", {"jobId": "2"}, False)
    assert calls == []
    assert messages(caplog) == [
        "polar_cloud: ignoring 'print' before the printer is authenticated"]


def test_unknown_and_unsupported_events_are_never_called(d, calls, caplog):
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for name in ("__init__", "evil", "keyPair", "getQueueResponse"):
            d.dispatch(name, {}, True)
    assert calls == []
    assert messages(caplog) == [
        "polar_cloud: ignoring unknown event from the cloud: '__init__'",
        "polar_cloud: ignoring 'keyPair' from the cloud (not supported)",
        "polar_cloud: ignoring 'getQueueResponse' from the cloud (not"
        " supported)"]
    assert caplog.records[0].levelno == logging.WARNING


def test_a_malformed_event_is_one_line_without_a_traceback(d, caplog):
    def strict(data):
        raise protocol.ProtocolError("print: jobId is not a string")
    d.on("print", strict)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(3):
            d.dispatch("print", [], True)
    [record] = caplog.records
    assert record.getMessage() == ("polar_cloud: dropped malformed 'print':"
                                   " print: jobId is not a string")
    assert record.exc_info is None


def test_a_failing_handler_is_one_traceback_and_the_event_dropped(d, caplog):
    def broken(data):
        raise RuntimeError("bug")
    d.on("print", broken)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(3):
            d.dispatch("print", {}, True)
    [record] = caplog.records
    assert "could not handle 'print'" in record.getMessage()
    assert record.exc_info is not None


def test_a_forgotten_event_is_unknown_again(d, calls):
    d.forget("print")
    d.dispatch("print", {}, True)
    assert calls == [] and "print" not in d.handlers


def test_verbose_logs_every_event(calls, caplog):
    d = dispatch.Dispatcher(RateLimitedLog(), verbose=True)
    d.on("pause", calls.append)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        d.dispatch("pause", {}, True)
        d.dispatch("pause", {}, True)
    assert messages(caplog) == ["polar_cloud: received pause"] * 2
