"""Test bed only (PYTHONPATH=tests/testbed/dns_hang): a resolver that never
answers for names under .hang.test, like a DNS server that drops queries.
getaddrinfo() blocks for DNS_HANG_SECONDS (default 15), then fails the way
glibc does when every resolver timed out."""
import os
import socket
import time

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if isinstance(host, str) and host.endswith(".hang.test"):
        time.sleep(float(os.environ.get("DNS_HANG_SECONDS", "15")))
        raise socket.gaierror(socket.EAI_AGAIN,
                              "Temporary failure in name resolution")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
