"""The run folder's event log: appended whole lines, read from an offset, torn lines survived."""

import json
from pathlib import Path

import pytest
import yaml

from polyinr.training.rundir import DEFAULT, RunDir


def test_events_append_and_read_back_from_an_offset(tmp_path):
    """A reader that noted offset() before a command sees exactly the events it added."""
    run = RunDir(tmp_path / "run")
    assert run.read_events() == [] and run.offset() == 0
    run.emit("run_started", nimg=0)
    offset = run.offset()
    run.emit("checkpoint", nimg=8, uri="x/snapshot-000000000008.pt")
    run.emit("stage_done", stage=0, nimg=8)
    assert [e["event"] for e in run.read_events()] == ["run_started", "checkpoint", "stage_done"]
    assert [e["nimg"] for e in run.read_events(offset)] == [8, 8]
    assert all(isinstance(e["time"], float) for e in run.read_events())


def test_a_line_torn_by_a_killed_process_costs_only_itself(tmp_path):
    """Half a line (a process killed mid-write) is skipped, and the next event is whole."""
    run = RunDir(tmp_path)
    run.emit("run_started", nimg=0)
    with run.events.open("a") as f:
        f.write('{"event": "checkpoint", "nim')
    run.emit("preempted", nimg=16, uri="u")
    assert [e["event"] for e in run.read_events()] == ["run_started", "preempted"]
    assert all(json.loads(line) for line in run.events.read_text().splitlines()[-1:])


def test_unknown_events_and_non_finite_numbers_are_refused(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="unknown event 'saved'"):
        run.emit("saved")
    with pytest.raises(ValueError):
        run.emit("fid", value=float("nan"))
    assert not run.events.exists() or run.read_events() == []


def test_dvc_stages_use_the_default_run_folder():
    """dvc.yaml's train writes where the flow and the CLI's defaults look: RunDir(DEFAULT)."""
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    stages = stages["stages"]
    run = RunDir(DEFAULT)
    assert f"--run-dir {DEFAULT}" in stages["train"]["cmd"]
    assert stages["train"]["outs"] == [str(run.generator)]
    plots = [next(iter(p)) for p in stages["train"]["plots"]]
    assert plots == [str(run.train_curve), str(run.fid_curve)]
    assert str(run.generator) in stages["evaluate"]["deps"]
