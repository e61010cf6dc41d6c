"""Cloud print jobs (jobs.py) without klippy: the job manager's answers
to cloud prints (a fake session).  The download worker:
test_jobs_download.py; file names: test_jobnames.py; the sniffer and
the slicer's estimate: test_gcodefile.py."""
import json

import pytest

from klippy_extras.polar_cloud import jobnames, jobs, protocol
from tests.unit.fakes import FakePort

# The job manager's answer to a cloud print (a fake session, no network)

def fake_port(state_dir) -> FakePort:
    return FakePort(state_dir, serial="KL1")


class FakeDownload:
    made: list = []
    def __init__(self, url, dest_dir, filename, *args, **kw):
        self.url, self.dest_dir, self.filename = url, dest_dir, filename
        FakeDownload.made.append(self)
    def start(self):
        pass


@pytest.fixture
def manager(tmp_path, monkeypatch):
    FakeDownload.made = []
    monkeypatch.setattr(jobs, "Download", FakeDownload)
    return jobs.JobManager(fake_port(tmp_path))


def ready_snap(tmp_path):
    return {"klippy_state": "ready", "print_state": "standby",
            "static": {"sdcard_dir": str(tmp_path)}}


def answers(m):
    return [d for e, d in m.session.sent if e == "job"]


GCODE_URL = "https://cdn.example.com/jobs/a.gcode"
LONG_URL = GCODE_URL + "?X-Amz-Security-Token=" + "Fw" * 8200 \
    + "&X-Amz-Signature=" + "0f" * 32


@pytest.mark.parametrize("payload,job_id,url", [
    ({"jobId": "job 7/ä", "gcodeFile": GCODE_URL}, "job 7/ä", GCODE_URL),
    ({"jobId": "j-16k", "gcodeFile": LONG_URL}, "j-16k", LONG_URL),
    ({"jobId": 4711, "gcodeFile": " %s\n" % GCODE_URL}, "4711", GCODE_URL),
    ({"jobId": 12.0, "gcodeFile": GCODE_URL}, "12", GCODE_URL),
    # fileToPrint picks the G-code even with an STL and a config present
    ({"jobId": "j-pick", "fileToPrint": "gcodeFile", "gcodeFile": GCODE_URL,
      "stlFile": "https://cdn.example.com/a.stl",
      "configFile": "https://cdn.example.com/a.ini"}, "j-pick", GCODE_URL),
    # without fileToPrint the G-code wins too
    ({"jobId": "j-both", "stlFile": "https://cdn.example.com/a.stl",
      "gcodeFile": GCODE_URL}, "j-both", GCODE_URL),
    # lenient: unknown fields, a number as name, fileToPrint's case
    ({"jobId": "j-len", "gcodeFile": GCODE_URL, "jobName": 42,
      "fileToPrint": "GCODEFILE", "newField": {"x": [1]},
      "serialNumber": "KL1"}, "j-len", GCODE_URL),
])
def test_print_starts_a_download(manager, tmp_path, payload, job_id, url):
    assert len(LONG_URL) > 16 * 1024
    manager.handle_print(payload, ready_snap(tmp_path))
    assert answers(manager) == []
    [download] = FakeDownload.made
    assert download.url == url
    assert manager.job.job_id == job_id
    assert download.filename == manager.job.filename
    assert "/" not in download.filename
    assert download.filename.endswith(jobnames.job_file_token(job_id) + ".gcode")


class RecordingStop:
    """The session's stop_event, recording what the job file says while
    print_started waits on it."""
    def __init__(self, path):
        self.path, self.seen = path, []
    def wait(self, timeout):
        with open(self.path) as f:
            self.seen.append((timeout, json.load(f)["job"]["phase"]))
        return False
    def is_set(self):
        return False


def test_a_started_print_is_saved_and_reported_after_klippy_started_it(
        manager, tmp_path):
    """klippy's own start of the print comes first (its CPU burst); the
    job's save and status wait PRINT_START_SETTLE for it."""
    manager.handle_print(
        {"jobId": "j1", "gcodeFile": GCODE_URL, "serialNumber": "KL1"},
        ready_snap(tmp_path))
    manager.download_done("j1", "", 10)
    stop = manager.session.stop_event = RecordingStop(manager.job_path)
    requests = manager.session.status_requests
    manager.print_started("j1", True, "")
    assert stop.seen == [(jobs.PRINT_START_SETTLE, "starting")]
    assert manager.job.phase == "printing"
    with open(manager.job_path) as f:
        assert json.load(f)["job"]["phase"] == "printing"
    assert manager.session.status_requests == requests + 1


def test_a_loaded_file_not_yet_started_is_not_a_cancel(manager, tmp_path):
    """SDCARD_PRINT_FILE answers before virtual_sdcard's timer starts the
    print: a sample in between shows the file in standby.  A reset (no
    file) or another file is a cancel."""
    manager.handle_print(
        {"jobId": "j1", "gcodeFile": GCODE_URL, "serialNumber": "KL1"},
        ready_snap(tmp_path))
    manager.download_done("j1", "", 10)
    manager.print_started("j1", True, "")
    later = manager.job.start_mono + 1.
    loaded = {"klippy_state": "ready", "print_state": "standby",
              "filename": manager.job.filename, "mono": later}
    manager.watch(loaded)
    assert manager.job.phase == "printing"
    manager.watch(dict(loaded, print_state="printing"))
    assert manager.job.phase == "printing"
    manager.watch(dict(loaded, filename=""))
    assert manager.job.phase == "done" and manager.job.final_code == 0


def test_odd_job_id_survives_a_restart_with_its_file(manager, tmp_path):
    job_id = "job 7/ä"
    manager.handle_print({"jobId": job_id, "jobName": "Cube",
                          "gcodeFile": GCODE_URL}, ready_snap(tmp_path))
    filename = manager.job.filename
    manager.job.phase = "printing"
    manager.save()
    again = jobs.JobManager(fake_port(tmp_path))
    again.load()
    # the file's job is known from the job state, not from its name
    assert again.job.job_id == job_id and again.job.filename == filename
    snap = {"klippy_state": "ready", "print_state": "printing",
            "filename": filename}
    assert again.view(snap).job_id == job_id
    # the repeat of an id already handled is ignored, after a restart too
    again.handle_print({"jobId": job_id, "gcodeFile": GCODE_URL},
                       ready_snap(tmp_path))
    assert answers(again) == [] and len(FakeDownload.made) == 1


@pytest.mark.parametrize("payload,job_id,reason,field", [
    ({"jobId": "s1", "stlFile": "https://x.example/a.stl",
      "configFile": "https://x.example/a.ini"}, "s1",
     "slicing on the printer is not supported (STL jobs)", "stlFile"),
    ({"jobId": "t1", "threemfFile": "https://x.example/a.3mf"}, "t1",
     "slicing on the printer is not supported (3MF jobs)", "threemfFile"),
    ({"jobId": "p1", "fileToPrint": "stlFile", "gcodeFile": GCODE_URL,
      "stlFile": "https://x.example/a.stl"}, "p1",
     "slicing on the printer is not supported (STL jobs)", "fileToPrint"),
    ({"jobId": "u1", "fileToPrint": "objFile", "gcodeFile": GCODE_URL},
     "u1", "fileToPrint names no known file", "fileToPrint"),
    ({"jobId": "n1"}, "n1", "the job has no G-code file", "gcodeFile"),
    ({"jobId": "n2", "gcodeFile": None}, "n2", "the job has no G-code file",
     "gcodeFile"),
    ({"jobId": "n3", "gcodeFile": {"url": GCODE_URL}}, "n3",
     "the G-code file is not a URL", "gcodeFile"),
    ({"jobId": "l1", "gcodeFile": GCODE_URL + "?" + "a" * 70000}, "l1",
     "the download URL is too long", "gcodeFile"),
    ({"jobId": "h1", "gcodeFile": "http://cdn.example.com/a.gcode"}, "h1",
     "plain http is not allowed", "gcodeFile"),
    ({"jobId": "job 7/ä\n", "gcodeFile": "file:///etc/passwd"},
     "job 7/ä\n", "refused download URL", "gcodeFile"),
    ({"jobId": "x" * 128, "gcodeFile": "https://10.0.0.1/a.gcode"},
     "x" * 128, "the address is not public", "gcodeFile"),
])
def test_unprintable_print_is_answered_once(manager, tmp_path, payload,
                                            job_id, reason, field):
    manager.handle_print(payload, ready_snap(tmp_path))
    manager.handle_print(payload, ready_snap(tmp_path))     # a repeat
    assert FakeDownload.made == []
    [answer] = answers(manager)
    assert answer == {"serialNumber": "KL1", "jobId": job_id,
                      "state": "canceled", "printSeconds": 0,
                      "filamentUsed": 0}
    [line] = manager.session.console_lines
    assert line.startswith("Polar Cloud: job %s refused: "
                           % (jobnames.shown_id(job_id),))
    assert reason in line and line.endswith("[%s]" % (field,))
    assert "\n" not in line


def test_busy_printer_answers_with_the_reason(manager, tmp_path):
    snap = dict(ready_snap(tmp_path), print_state="printing")
    manager.handle_print({"jobId": "b1", "gcodeFile": GCODE_URL}, snap)
    [answer] = answers(manager)
    assert answer["jobId"] == "b1" and answer["state"] == "canceled"
    assert manager.session.console_lines == [
        "Polar Cloud: job b1 refused: the printer is busy printing"]


@pytest.mark.parametrize("payload", [
    {"gcodeFile": GCODE_URL}, {"jobId": None, "gcodeFile": GCODE_URL},
    {"jobId": "", "gcodeFile": GCODE_URL}, {"jobId": "  "},
    {"jobId": True}, {"jobId": ["j1"]}, {"jobId": {"id": "j1"}},
    {"jobId": float("nan")}, {"jobId": "x" * 129},
    {"jobId": "j1", "serialNumber": "KL2", "gcodeFile": GCODE_URL},
    [], "print", None,
])
def test_print_without_an_id_to_answer_is_dropped(manager, tmp_path,
                                                  payload):
    with pytest.raises(protocol.ProtocolError):
        manager.handle_print(payload, ready_snap(tmp_path))
    assert answers(manager) == [] and FakeDownload.made == []
