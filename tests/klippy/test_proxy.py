"""Behind an HTTPS proxy: HTTPS_PROXY / HTTP_PROXY / NO_PROXY decide every
outbound connection in one place (netpolicy.proxy_for), and a real proxy
(Debian's squid, on loopback) carries the link, job downloads and
snapshot uploads to a cloud whose name only the proxy can resolve; the
local webcam stays direct.  Credentials in the proxy URL never show."""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import ssl
import sys
import threading
import types

import pytest

from klippy_extras.polar_cloud import download as downloads
from klippy_extras.polar_cloud import link, netpolicy
from tests.testbed.camera_server import CameraServer, noisy_jpeg
from tests.testbed.fileserver import FileServer
from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    EMAIL,
    EXTRA,
    PIN,
    health_problems,
    polar_cfg,
    polar_status,
    poll_until,
    register,
    start_provisioned,
    wait_polar,
)
from tests.testbed.polarsim import PolarSim
from tests.testbed.proxyserver import ProxyServer, find_squid
from tests.testbed.tlsproxy import TlsProxy, make_certs

# Names this machine cannot resolve (.test is reserved); squid maps them
# to 127.0.0.1
CLOUD = "cloud.polar.test"
BLOCKED = "blocked.polar.test"      # resolvable by squid, but refused
USER = "pcuser"
PASSWORD = "Pr0xy:S3cr@t"          # distinctive, with characters to quote
QUOTED_PASSWORD = "Pr0xy%3AS3cr%40t"
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")

needs_squid = pytest.mark.skipif(find_squid() is None, reason=(
    "squid is not installed (.ci/run installs it; by hand: apt-get install"
    " squid)"))


@pytest.fixture
def env(monkeypatch):
    """A clean proxy environment; returns monkeypatch.setenv."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch.setenv


# ------------------------------------------------------ the one decision

@pytest.mark.parametrize("variables,url,expected", [
    ({"HTTPS_PROXY": "http://proxy.school.example:3128"},
     "https://printer4.polar3d.com", ("proxy.school.example", 3128)),
    ({"https_proxy": "proxy.school.example:8080"},          # no scheme
     "https://printer4.polar3d.com", ("proxy.school.example", 8080)),
    ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"},
     "https://printer4.polar3d.com", ("lower", 2)),         # lower first
    ({"HTTPS_PROXY": "http://proxy.school.example"},
     "https://s3.amazonaws.com/bucket", ("proxy.school.example", 80)),
    ({"HTTP_PROXY": "http://plain:3128"},
     "https://printer4.polar3d.com", None),                 # https only
    ({"HTTP_PROXY": "http://plain:3128"},
     "http://cam.example.org/snap", ("plain", 3128)),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "polar3d.com"},
     "https://printer4.polar3d.com", None),
    ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".polar3d.com,other.org"},
     "https://printer4.polar3d.com", None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"},
     "https://printer4.polar3d.com", None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "ar3d.com"},
     "https://printer4.polar3d.com", ("p", 1)),             # whole labels
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "203.0.113.0/24"},
     "https://203.0.113.7/x", None),
    # This host and the LAN never go through a proxy
    ({"HTTP_PROXY": "http://p:1"}, "http://127.0.0.1:8080/?action=snapshot",
     None),
    ({"HTTP_PROXY": "http://p:1"}, "http://localhost/webcam", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://[::1]:8080/", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://192.168.1.20/snap", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://10.0.0.7:8080/snap", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://100.64.1.1/snap", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://octopi.local/snap", None),
    ({}, "https://printer4.polar3d.com", None),
])
def test_proxy_for_follows_the_environment(env, variables, url, expected):
    for name, value in variables.items():
        env(name, value)
    proxy = netpolicy.proxy_for(url)
    assert (proxy and (proxy.host, proxy.port)) == (expected or None)


def test_the_credentials_never_show(env):
    env("HTTPS_PROXY", "http://%s:%s@proxy.school.example:3128"
        % (USER, QUOTED_PASSWORD))
    proxy = netpolicy.proxy_for("https://printer4.polar3d.com")
    assert proxy.basic_auth() == "%s:%s" % (USER, PASSWORD)
    assert proxy.shown == "http://proxy.school.example:3128"
    assert netpolicy.shown_proxy(proxy) == proxy.shown
    assert proxy.address == "proxy.school.example:3128"
    assert PASSWORD not in repr(proxy) and QUOTED_PASSWORD not in repr(proxy)
    # requests gets it back, quoted
    assert proxy.url == "http://%s:%s@proxy.school.example:3128" % (
        USER, QUOTED_PASSWORD)
    assert netpolicy.parse_proxy(proxy.url) == proxy


@pytest.mark.parametrize("value", [
    "socks5://%s:%s@proxy.school.example:1080" % (USER, QUOTED_PASSWORD),
    "https://%s:%s@proxy.school.example:3129" % (USER, QUOTED_PASSWORD),
    "http://%s:%s@proxy.school.example:99999" % (USER, QUOTED_PASSWORD),
])
def test_an_unusable_proxy_is_an_error_that_names_it(env, value):
    env("HTTPS_PROXY", value)
    with pytest.raises(netpolicy.ProxyError) as info:
        netpolicy.proxy_for("https://printer4.polar3d.com")
    text = str(info.value)
    assert text.startswith("HTTPS_PROXY: ") and "proxy.school.example" in text
    assert USER not in text and "S3cr" not in text


def test_websocket_client_gets_our_decision_only(env):
    """python-engineio passes websocket-client only its requests session's
    proxies, and websocket-client reads the environment by itself with
    NO_PROXY rules of its own.  The link gives it every option, so the
    environment is never read there."""
    from websocket._url import get_proxy_info

    def effective(proxy, host):
        opts = link.websocket_proxy_options(proxy)
        return get_proxy_info(host, True, opts.get("http_proxy_host"),
                              opts.get("http_proxy_port", 0),
                              opts.get("http_proxy_auth"),
                              opts.get("http_no_proxy"))
    env("HTTPS_PROXY", "http://%s:%s@proxy.school.example:3128"
        % (USER, QUOTED_PASSWORD))
    # websocket-client alone would go direct here ('.ar3d.com' matches
    # any name ending in "ar3d.com"); urllib's rule, ours, does not
    env("NO_PROXY", ".ar3d.com")
    proxy = netpolicy.proxy_for("https://printer4.polar3d.com")
    assert get_proxy_info("printer4.polar3d.com", True) == (None, 0, None)
    assert effective(proxy, "printer4.polar3d.com") == (
        "proxy.school.example", 3128, (USER, PASSWORD))
    # ...and where we go direct, HTTPS_PROXY is not used behind our back
    env("NO_PROXY", "")
    assert get_proxy_info("printer4.polar3d.com", True)[0] == \
        "proxy.school.example"
    assert effective(None, "printer4.polar3d.com") == (None, 0, None)


# ------------------------------------------- downloads through real squid

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"),
                      names=[CLOUD, BLOCKED])


@pytest.fixture(scope="module")
def files(certs):
    with FileServer(b"G28\nG1 X10 Y10\n", cert=certs["named"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def squid(files):
    with ProxyServer([CLOUD, BLOCKED], {CLOUD: [files.port]},
                     users={USER: PASSWORD}) as px:
        yield px


def download(url, dest, ca_file):
    results: list[tuple[str, int]] = []
    dl = downloads.Download(url, str(dest), "x_polar-j1.gcode", 1 << 20,
                            False, threading.Event(),
                            lambda err, size: results.append((err, size)),
                            ca_file=ca_file)
    dl.start()
    dl.join(60.)
    assert not dl.thread.is_alive()
    return results


def test_the_test_names_do_not_resolve_here():
    for name in (CLOUD, BLOCKED):
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(name, 443)


@needs_squid
def test_a_download_goes_through_the_proxy(env, tmp_path, certs, files,
                                           squid):
    env("HTTPS_PROXY", squid.url_with(USER, QUOTED_PASSWORD))
    before = len(files.requests)
    results = download(files.url(host=CLOUD), tmp_path, certs["ca"]["cert"])
    assert results == [("", len(files.body))]
    assert (tmp_path / "x_polar-j1.gcode").read_bytes() == files.body
    # Through the tunnel, TLS for the name
    assert files.requests[before:] == [{
        "path": "/x.gcode", "sni": CLOUD,
        "host": "%s:%d" % (CLOUD, files.port)}]
    target = "%s:%d" % (CLOUD, files.port)
    poll_until(lambda: ("CONNECT", target, 200) in squid.log(), 10,
               "the proxy's log")


@needs_squid
def test_a_camera_service_goes_through_the_proxy(monkeypatch, certs, files,
                                                 squid):
    # A camera on the internet (imagingchild.fetch_spec asked netpolicy),
    # its TLS checked with the CAs the helper host loaded
    from klippy_extras.polar_cloud import camerafetch, imaging
    trust = types.ModuleType(camerafetch.TRUST_MODULE)
    trust.context = ssl.create_default_context(cafile=certs["ca"]["cert"])
    monkeypatch.setitem(sys.modules, camerafetch.TRUST_MODULE, trust)
    spec = imaging.Fetch(files.url(host=CLOUD), 5., 5., 10., 1 << 20,
                         proxy=squid.url_with(USER, QUOTED_PASSWORD))
    before = len(files.requests)
    assert camerafetch.fetch(spec, lambda: None) == files.body
    assert files.requests[before:] == [{
        "path": "/x.gcode", "sni": CLOUD,
        "host": "%s:%d" % (CLOUD, files.port)}]
    poll_until(lambda: ("CONNECT", "%s:%d" % (CLOUD, files.port), 200)
               in squid.log(), 10, "the proxy's log")
    # Without the proxy's password: its refusal, in plain words
    spec = dataclasses.replace(spec, proxy=squid.url)
    with pytest.raises(camerafetch.FetchFailed, match=re.escape(
            "the proxy refused (407 Proxy Authentication Required)")):
        camerafetch.fetch(spec, lambda: None)


@needs_squid
@pytest.mark.parametrize("host,password,reason", [
    (BLOCKED, QUOTED_PASSWORD, "403 Forbidden"),
    (CLOUD, "wrong", "407 Proxy Authentication Required"),
    (CLOUD, None, "407 Proxy Authentication Required"),
])
def test_a_refusing_proxy_is_named(env, tmp_path, certs, files, squid, host,
                                   password, reason):
    env("HTTPS_PROXY", squid.url if password is None
        else squid.url_with(USER, password))
    before = len(files.requests)
    results = download(files.url(host=host), tmp_path, certs["ca"]["cert"])
    assert results == [("cannot reach %s through proxy %s: %s"
                        % (host, squid.url, reason), 0)]
    assert files.requests[before:] == []
    assert list(tmp_path.iterdir()) == []


@needs_squid
def test_a_proxy_that_is_not_there_is_named(env, tmp_path, certs, files):
    from tests.testbed.procs import free_port
    port = free_port()
    env("HTTPS_PROXY", "http://%s:%s@127.0.0.1:%d"
        % (USER, QUOTED_PASSWORD, port))
    results = download(files.url(host=CLOUD), tmp_path, certs["ca"]["cert"])
    assert results == [("cannot reach %s through proxy http://127.0.0.1:%d:"
                        " connection refused" % (CLOUD, port), 0)]


@needs_squid
@pytest.mark.parametrize("url", [
    "https://10.1.2.3/x.gcode", "https://169.254.169.254/latest",
    "https://127.0.0.1:1/x.gcode"])
def test_private_addresses_are_refused_through_a_proxy_too(env, tmp_path,
                                                           squid, url):
    env("HTTPS_PROXY", squid.url_with(USER))
    before = len(squid.log())
    results = download(url, tmp_path, "")
    assert results == [("refused download URL: the address is not public",
                        0)]
    assert squid.log()[before:] == []


# ----------------------------------------- a real klippy behind squid

@pytest.fixture(scope="module")
def psim():
    s = PolarSim().start()
    s.add_account(EMAIL, PIN)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cloud_tls(psim, certs):
    """The simulator behind TLS for the test names; its files and upload
    forms under CLOUD too, so only the proxy can reach any of it."""
    tls = TlsProxy(("127.0.0.1", psim.port), certs["named"]).start()
    psim.public_url = "https://%s:%d" % (CLOUD, tls.port)
    yield tls
    tls.stop()


@pytest.fixture(scope="module")
def cloud_squid(cloud_tls):
    if find_squid() is None:
        pytest.skip("squid is not installed (apt-get install squid)")
    with ProxyServer([CLOUD, BLOCKED], {CLOUD: [cloud_tls.port]},
                     users={USER: PASSWORD}) as px:
        yield px


@pytest.fixture(scope="module")
def camera():
    cam = CameraServer().start()
    yield cam
    cam.stop()


def proxy_env(px: ProxyServer) -> dict:
    # Upper case, as in a systemd EnvironmentFile; the camera's plain
    # http would go through HTTP_PROXY (and be refused) were it not direct
    proxy = px.url_with(USER, QUOTED_PASSWORD)
    return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy}


@pytest.fixture(scope="module")
def clean_environment():
    with pytest.MonkeyPatch.context() as mp:
        for name in PROXY_VARS:
            mp.delenv(name, raising=False)
            mp.delenv(name.upper(), raising=False)
        yield


@pytest.fixture(scope="module")
def k(make_klippy, clean_environment, psim, certs, cloud_tls, cloud_squid,
      camera):
    cfg = polar_cfg("https://%s:%d" % (CLOUD, cloud_tls.port),
                    ca_file=certs["ca"]["cert"], webcam_enabled="True",
                    snapshot_url=camera.snapshot_url, snapshot_interval="5")
    k = make_klippy("klipper", extra_cfg=cfg, env=proxy_env(cloud_squid),
                    extras={"polar_cloud": EXTRA})
    k.state_path = k.workdir / "polar_cloud"
    return k


def assert_no_secret(k, *texts):
    for text in texts + (k.log_text(),):
        assert PASSWORD not in text and QUOTED_PASSWORD not in text
        assert "%s:" % (USER,) not in text and "%s@" % (USER,) not in text


def test_registers_and_goes_online_through_the_proxy(k, psim, cloud_squid):
    k.serial = register(k, psim)
    st = polar_status(k)
    assert st["state"] == "online"
    assert st["proxy"] == "127.0.0.1:%d" % (cloud_squid.port,)
    out = k.subscribe_output()
    k.gcode("POLAR_STATUS")
    text = out.wait_for(r"through proxy: .*")
    out.close()
    assert text.endswith("through proxy: %s" % (cloud_squid.url,))
    assert_no_secret(k, text, repr(st))
    assert psim.violations == []


def test_a_cloud_job_downloads_and_starts_through_the_proxy(k, psim,
                                                            cloud_tls,
                                                            cloud_squid):
    content = demo_print(moves=40, hotend=0, bed=0, feedrate=6000).encode()
    url = psim.add_file("proxied.gcode", content)
    assert url.startswith("https://%s:%d/" % (CLOUD, cloud_tls.port))
    since = psim.now()
    psim.push_print(k.serial, "proxy-job-1", job_name="Proxied",
                    gcode_url=url)
    final = psim.wait_for("job", lambda d: d["jobId"] == "proxy-job-1",
                          since=since, serial=k.serial, timeout=90)
    assert final["state"] == "completed"
    assert psim.file_requests("proxied.gcode") == 1
    printed = [f for f in os.listdir(k.gcodes_dir) if "proxy-job-1" in f]
    assert len(printed) == 1
    with open(os.path.join(k.gcodes_dir, printed[0]), "rb") as f:
        assert f.read() == content
    target = "%s:%d" % (CLOUD, cloud_tls.port)
    poll_until(lambda: ("CONNECT", target, 200) in cloud_squid.log(), 10,
               "the proxy's log")
    assert psim.violations == []


def test_snapshots_upload_through_the_proxy_camera_stays_direct(
        k, psim, camera, cloud_squid):
    camera.picture = noisy_jpeg((640, 480))
    upload = psim.wait_upload(timeout=60)
    assert upload["content_type"] == "image/jpeg"
    assert upload["data"].startswith(b"\xff\xd8")
    assert camera.hits > 0
    # The camera's plain-http GETs never went to the proxy (it would have
    # refused them: only CONNECT to the cloud is allowed)
    assert [e for e in cloud_squid.log() if e[0] != "CONNECT"
            and not e[1].startswith("error:")] == []
    assert psim.violations == []


def test_a_job_from_a_refused_host_fails_naming_the_proxy(k, psim,
                                                          cloud_tls,
                                                          cloud_squid):
    url = "https://%s:%d/files/refused.gcode" % (BLOCKED, cloud_tls.port)
    out = k.subscribe_output()
    since = psim.now()
    psim.push_print(k.serial, "proxy-job-2", job_name="Refused",
                    gcode_url=url)
    line = out.wait_for(r"Polar Cloud: job proxy-job-2 failed: .*",
                        timeout=60)
    out.close()
    assert line.endswith("cannot reach %s through proxy %s: 403 Forbidden"
                         % (BLOCKED, cloud_squid.url)), line
    final = psim.wait_for("job", lambda d: d["jobId"] == "proxy-job-2",
                          since=since, serial=k.serial, timeout=60)
    assert final["state"] == "canceled"
    assert_no_secret(k, line)
    assert health_problems(k) == []


def test_a_refusing_proxy_is_named_in_the_status(make_klippy,
                                                 clean_environment, psim,
                                                 certs, cloud_tls,
                                                 cloud_squid):
    kb = start_provisioned(make_klippy, psim,
                           server_url="https://%s:%d" % (BLOCKED,
                                                         cloud_tls.port),
                           ca_file=certs["ca"]["cert"],
                           env=proxy_env(cloud_squid))
    st = wait_polar(kb, lambda s: s.get("state") == "backoff"
                    and s.get("last_error"))
    assert st["last_error"] == ("cannot reach %s through proxy %s: 403"
                                " Forbidden" % (BLOCKED, cloud_squid.url))
    assert st["proxy"] == "127.0.0.1:%d" % (cloud_squid.port,)
    assert psim.connects(kb.serial) == 0
    assert re.search(r"CONNECT", repr(cloud_squid.log()))
    assert_no_secret(kb, repr(st))
    assert health_problems(kb) == []
    kb.stop()
