"""The run folder's event log: appended whole lines, read from an offset, torn lines survived."""

import json
from pathlib import Path

import numpy as np
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


def curve_rows(fid: bool) -> list[dict]:
    """Two stages of curve rows as training writes them; FIDs in some rows when `fid`."""
    rows = []
    for i, kimg in enumerate((2.0, 4.0, 6.0, 8.0)):
        row = {"kimg": kimg, "stage": int(kimg > 4), "resolution": 16, "loss_g": 3.0 - i / 2}
        row |= {"loss_d": 1.0 + i / 10, "acc_real": 0.9, "acc_fake": 0.8 - i / 10}
        if fid and i % 2:
            row["fid8"] = 50.0 - i
        rows.append(row)
    return rows


def test_curves_png_has_a_panel_per_quantity_and_the_fid_one_only_when_measured(tmp_path):
    """curves.png: losses and D's accuracy, plus a FID panel when rows carry one (the figure
    grows by one panel); a real picture, not a blank canvas."""
    from PIL import Image

    run = RunDir(tmp_path / "run")
    run.write_curves_png(curve_rows(fid=False))
    with Image.open(run.curves_png) as image:
        two = image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # lines and text drawn
    run.write_curves_png(curve_rows(fid=True))
    with Image.open(run.curves_png) as image:
        three = image.size
    assert two[0] == three[0] == 600 and (two[1], three[1]) == (440, 660)
    assert not list(run.path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_the_sample_grid_png_holds_the_image_exactly(tmp_path):
    """grid.png is the uint8 grid as rendered (PNG is lossless), replaced on each write."""
    from PIL import Image

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    for _ in range(2):
        grid = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
        run.write_grid(grid)
    with Image.open(run.grid_png) as image:
        np.testing.assert_array_equal(np.asarray(image), grid)
