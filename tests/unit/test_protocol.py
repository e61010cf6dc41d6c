"""The protocol's shared checks: clean text, credentials, the clock."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klippy_extras.polar_cloud import inbound
from klippy_extras.polar_cloud import protocol as p

FAKE_LINE = "// Klipper state: Ready"
BREAKS = ["\n", "\r", "\r\n", "\t", "\x00", "\x1b[2J", "\x7f", "\x85", "\x9b",
          "\u2028", "\u2029", "\u202e", "\ud800"]


@pytest.mark.parametrize("brk", BREAKS)
def test_cloud_text_is_one_clean_line(brk):
    text = p.cloud_text("refused" + brk + FAKE_LINE)
    assert text.startswith("refused") and text.endswith(FAKE_LINE)
    assert text.isprintable()


def test_cloud_text_is_bounded():
    assert p.cloud_text("x" * 10000) == "x" * 200
    assert p.cloud_text("x" * 100, limit=40) == "x" * 40
    assert p.cloud_text("  a \n\n b  ") == "a b"
    assert p.cloud_text(None) == "" and p.cloud_text(5) == ""


@given(st.text())
def test_cloud_text_never_breaks_a_line(value):
    text = p.cloud_text(value, limit=50)
    assert len(text) <= 50
    assert text.isprintable()


@pytest.mark.parametrize("brk", BREAKS)
def test_cloud_messages_are_one_line(brk):
    said = "Printer key mismatch" + brk + FAKE_LINE
    texts = [
        inbound.parse_hello_response({"status": "FAILED", "message": said})[1],
        inbound.parse_status_reply({"status": "FAILED", "message": said}, "x")[1],
        inbound.parse_register_response({"status": "FAILED", "reason": said}
                                  ).message,
        inbound.parse_register_response({"status": "FAILED", "reason": said}
                                  ).reason,
    ]
    for text in texts:
        assert "\n" not in text and "\r" not in text and text.isprintable()


def test_validate_credentials():
    assert p.validate_email("a@b.co") is None
    assert p.validate_email("a@b") and p.validate_email("") \
        and p.validate_email("a;b@c.d")
    assert p.validate_pin("1234") is None
    assert p.validate_pin("") and p.validate_pin("12 34") \
        and p.validate_pin("1;2")
    assert p.redact_email("someone@example.com") == "s***@example.com"


def test_clock_problem():
    assert p.clock_problem(978307200.) == (
        "the system clock is not set (2001-01-01); waiting for NTP")
    assert p.clock_problem(0.).startswith(
        "the system clock is not set (1970-01-01)")
    assert p.clock_problem(1795000000.) == ""
