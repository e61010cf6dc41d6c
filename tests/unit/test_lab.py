"""The build plate gate and continuous printing without klippy (lab.py):
what lab.json holds across sessions, and when a next job is asked for."""
from __future__ import annotations

import json
import types

import pytest

from klippy_extras.polar_cloud.lab import LabWorkflow


class FakeSession:
    def __init__(self, state_path: str, **options) -> None:
        self.options = types.SimpleNamespace(
            state_path=state_path,
            require_plate_clear=options.get("gate", True),
            continuous_printing=options.get("continuous", True))
        self.abandoned = False
        self.jobs = types.SimpleNamespace(outbox=[])
        self.sent: list[tuple[str, dict]] = []
        self.lines: list[str] = []
        self.online = True

    def publish(self) -> None:
        pass

    def status_now(self) -> None:
        pass

    def console(self, text: str, **kw) -> None:
        self.lines.append(text)

    def serial(self) -> str:
        return "KL000001"

    def emit(self, event: str, data: dict) -> bool:
        if self.online:
            self.sent.append((event, data))
        return self.online


def lab(tmp_path, **options) -> tuple[LabWorkflow, FakeSession]:
    session = FakeSession(str(tmp_path / "state"), **options)
    workflow = LabWorkflow(session)
    workflow.load()
    return workflow, session


def ended(workflow: LabWorkflow, count: int) -> None:
    workflow.watch({"print_ends": count, "print_state": "complete"})


def test_the_gate_is_kept_across_sessions(tmp_path):
    first, _ = lab(tmp_path)
    assert first.plate_clear is True          # nothing printed yet
    ended(first, 1)
    assert first.plate_clear is False and first.refusal()
    second, _ = lab(tmp_path)
    assert second.plate_clear is False
    second.plate_cleared("G-code")
    third, _ = lab(tmp_path)
    assert third.plate_clear is True and third.refusal() == ""


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
def test_an_unreadable_file_counts_as_not_cleared(tmp_path, content):
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "lab.json").write_bytes(content)
    workflow, _ = lab(tmp_path)
    assert workflow.plate_clear is False


def test_a_restart_during_a_print_closes_the_gate(tmp_path):
    workflow, _ = lab(tmp_path)
    workflow.stopping({"klippy_state": "ready", "print_state": "printing",
                       "print_ends": 0})
    assert lab(tmp_path)[0].plate_clear is False


def test_next_job_only_after_completion_and_the_gate(tmp_path):
    workflow, session = lab(tmp_path)
    workflow.job_finished("canceled")
    ended(workflow, 1)
    workflow.plate_cleared("G-code")
    workflow.online_work()
    assert session.sent == []                  # never after a cancel
    workflow.job_finished("completed")
    ended(workflow, 2)
    workflow.online_work()
    assert session.sent == []                  # the plate first
    session.online = False
    workflow.plate_cleared("Polar Cloud")
    workflow.online_work()
    assert session.sent == [] and workflow.next_print
    # Owed across a restart, sent once online
    again, session = lab(tmp_path)
    assert again.next_print is True
    session.jobs.outbox = [{"jobId": "j1"}]
    again.online_work()
    assert session.sent == []                  # the job report goes first
    session.jobs.outbox = []
    again.online_work()
    again.online_work()
    assert session.sent == [("sendNextPrint", {"serialNumber": "KL000001"})]
    assert json.loads((tmp_path / "state" / "lab.json").read_text()) == {
        "plate_clear": True, "next_print": False}


def test_a_local_print_first_drops_the_request(tmp_path):
    workflow, session = lab(tmp_path, gate=False)
    session.online = False
    workflow.job_finished("completed")
    workflow.watch({"print_ends": 0, "print_state": "printing"})
    session.online = True
    workflow.online_work()
    assert session.sent == [] and not workflow.next_print


def test_without_the_options_nothing_is_gated_or_written(tmp_path):
    workflow, session = lab(tmp_path, gate=False, continuous=False)
    ended(workflow, 1)
    workflow.job_finished("completed")
    workflow.online_work()
    assert workflow.plate_clear and workflow.refusal() == ""
    assert session.sent == [] and workflow.command_list() == []
    assert not (tmp_path / "state").exists()
