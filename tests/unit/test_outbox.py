"""The outbox of final job reports (outbox.py): kept on disk until sent,
kept in memory until settled, sent again after a lost link, never under
another serial."""
import json

from klippy_extras.polar_cloud import messages
from klippy_extras.polar_cloud import outbox as outbox_mod
from tests.unit.fakes import FakePort


def make(tmp_path, **kw):
    port = FakePort(tmp_path, serial="KL1", **kw)
    return port, outbox_mod.Outbox(port)


def on_disk(tmp_path):
    path = tmp_path / outbox_mod.OUTBOX_FILE
    return json.loads(path.read_text()) if path.exists() else []


def sent_ids(port):
    return [d["jobId"] for e, d in port.sent if e == "job"]


def test_offline_reports_wait_on_disk_and_go_out_once_online(tmp_path):
    port, box = make(tmp_path)
    port.online = False
    box.queue("j1", "completed", 60., 10.)
    assert sent_ids(port) == [] and len(box) == 1
    assert [m["jobId"] for m in on_disk(tmp_path)] == ["j1"]
    again = outbox_mod.Outbox(port)         # a restart
    again.load()
    port.online = True
    again.flush()
    assert sent_ids(port) == ["j1"] and len(again) == 0
    assert on_disk(tmp_path) == []
    assert [m["jobId"] for _t, m in again.unsettled] == ["j1"]


def test_a_report_lost_with_the_link_goes_out_again(tmp_path):
    port, box = make(tmp_path)
    box.queue("j1", "canceled", 0., 0.)
    box.link_lost()
    assert [m["jobId"] for m in on_disk(tmp_path)] == ["j1"]
    box.flush()
    assert sent_ids(port) == ["j1", "j1"]


def test_an_acknowledged_report_is_settled(tmp_path):
    port, box = make(tmp_path)
    box.queue("j1", "completed", 1., 1.)
    _event, msg = port.sent[-1]
    box._ack(msg)()             # the cloud's ack, on the read thread
    [(fn, args)] = port.posted
    fn(*args)
    box.link_lost()
    assert box.unsettled == [] and len(box) == 0


def test_reports_of_another_serial_are_dropped(tmp_path):
    (tmp_path / outbox_mod.OUTBOX_FILE).write_text(json.dumps([
        messages.build_job("KL9", "theirs", "completed", 1., 1.),
        messages.build_job("KL1", "mine", "completed", 1., 1.),
        {"jobId": "junk", "state": "printing"}]))
    port, box = make(tmp_path)
    box.load()
    box.flush()
    assert sent_ids(port) == ["mine"]


def test_unregistered_reports_nothing_and_forget_drops_all(tmp_path):
    port, box = make(tmp_path)
    port.online = False
    box.queue("j1", "completed", 1., 1.)
    assert box.forget() == 1 and on_disk(tmp_path) == []
    port._serial = None
    box.queue("j2", "canceled", 0., 0.)
    assert len(box) == 0
