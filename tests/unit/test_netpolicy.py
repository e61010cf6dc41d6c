"""The URL and address policy of netpolicy.py: which URLs the cloud may
send for downloads and uploads, and signed URLs kept out of the logs."""
import logging
import socket

import pytest

from klippy_extras.polar_cloud import netpolicy


@pytest.mark.parametrize("url,loopback_ok,ok", [
    ("https://s3.amazonaws.com/bucket/x.gcode", False, True),
    ("http://s3.amazonaws.com/x.gcode", False, False),
    ("file:///etc/passwd", False, False),
    ("ftp://example.com/x", False, False),
    ("https://127.0.0.1:7125/printer", False, False),
    ("https://169.254.169.254/latest", False, False),
    ("https://192.168.1.1/admin", False, False),
    ("https://10.0.0.2/x", False, False),
    ("https://[::1]/x", False, False),
    ("https://100.64.0.1/x", False, False),          # carrier-grade NAT
    ("https://100.100.100.100/x", False, False),     # (Tailscale's too)
    ("https://100.127.255.254/x", False, False),
    ("https://[::ffff:10.0.0.1]/x", False, False),
    ("https://example.com:99999/x", False, False),
    ("https://user:pw@example.com/x", False, False),
    ("http://127.0.0.1:8000/files/x.gcode", True, True),
    ("http://192.168.1.1/x.gcode", True, False),
])
def test_check_url(url, loopback_ok, ok):
    assert (netpolicy.check_url(url, loopback_ok) == "") is ok


@pytest.mark.parametrize("addr,public", [
    ("8.8.8.8", True),
    ("100.63.255.255", True),
    ("100.64.0.0", False),
    ("100.100.100.100", False),
    ("100.127.255.255", False),
    ("100.128.0.0", True),
    ("10.1.2.3", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("127.0.0.1", False),
    ("169.254.169.254", False),
    ("2001:4860:4860::8888", True),
    ("2001:4860::6440:1", True),       # IPv6, whatever its low 32 bits
    ("fd00::1", False),
    ("fe80::1%eth0", False),
])
def test_address_is_public(addr, public):
    assert netpolicy._address_is_public(addr) is public


def test_refused_address_refuses_a_name_with_any_private_address():
    public = (socket.AF_INET, ("8.8.8.8", 443))
    private = (socket.AF_INET, ("10.0.0.1", 443))
    loopback = (socket.AF_INET, ("127.0.0.1", 443))
    assert netpolicy.refused_address([public], False) == ""
    assert netpolicy.refused_address([public, private], False) != ""
    assert netpolicy.refused_address([], False) != ""
    assert netpolicy.refused_address([loopback], False) != ""
    assert netpolicy.refused_address([loopback], True) == ""


def test_signed_url_queries_stay_out_of_urllib3_log_lines(caplog):
    netpolicy.hide_url_queries()
    netpolicy.hide_url_queries()        # installed once
    logger = logging.getLogger("urllib3.connectionpool")
    assert sum(isinstance(f, netpolicy.HideUrlQueries)
               for f in logger.filters) == 1
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logger.debug('"GET %s HTTP/1.1" 200', "/x.gcode?X-Amz-Signature=s3cr3t")
    assert "s3cr3t" not in caplog.text
    assert "/x.gcode?..." in caplog.text
