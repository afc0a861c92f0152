"""`polyinr runs`: checkpoint folders in storage.uri joined with the tracking store's runs by
name, one line each, and a clear word when a source cannot be read."""

import json
from pathlib import Path

import pytest
import torch

from polyinr.commands import cli, runs
from polyinr.core import config
from polyinr.training import tracking
from polyinr.training.checkpoints import CheckpointStore

REPO = Path(__file__).resolve().parents[1]


def overrides(tmp_path, db="mlflow.db"):
    return [f"storage.uri={tmp_path / 'checkpoints'}", f"tracking.uri=sqlite:///{tmp_path / db}"]


def stored_run(cfg, name, nimgs, fids=(), stage=0):
    """A run folder with a tiny checkpoint at each of `nimgs`; FIDs marked as the stage's."""
    store = CheckpointStore(cfg.storage, name)
    for nimg in nimgs:
        info = {"stage": stage, "resolution": 16, "kimg": nimg / 1000}
        store.save({"w": torch.zeros(2), "cur_nimg": nimg}, nimg, info)
    for nimg, fid in fids:
        store.mark_best(f"snapshot-{nimg:012d}.pt", fid, stage)


def test_storage_runs_are_listed_without_a_tracking_store_which_is_not_created(tmp_path, capsys):
    """Two run folders (and folders holding no checkpoint, such as reference statistics):
    one aligned line each with kimg, the stage's best FID and where the checkpoints are;
    status `untracked`; a missing SQLite store stays missing."""
    cfg = config.load(REPO / "params.yaml", overrides(tmp_path))
    stored_run(cfg, "demo-aaaa", [4000, 8000], fids=[(4000, 40.0), (8000, 35.5)])
    stored_run(cfg, "demo-bbbb", [2000])
    (tmp_path / "checkpoints/reference-stats").mkdir()
    (tmp_path / "checkpoints/reference-stats/x.npz").write_bytes(b"x")
    assert cli.main(["runs", *overrides(tmp_path)]) == 0
    header, a, b = capsys.readouterr().out.splitlines()
    assert header.split() == "RUN STATUS STARTED KIMG BEST FID EVAL FID CHECKPOINTS".split()
    assert a.split()[:4] == ["demo-aaaa", "untracked", "-", "8.000"]
    assert "35.50 (stage 0, kimg 8)" in a
    assert f"{tmp_path}/checkpoints/demo-aaaa (2, stage 0, latest snapshot-000000008000.pt)" in a
    assert b.split()[:4] == ["demo-bbbb", "untracked", "-", "2.000"] and " - " in b
    assert a.index(str(tmp_path)) == b.index(str(tmp_path)) == header.index("CHECKPOINTS")
    assert not (tmp_path / "mlflow.db").exists()


def test_tracked_runs_join_their_checkpoints_by_name(tmp_path, capsys, monkeypatch):
    """A tracked run with checkpoints shows MLflow's status and the storage's progress; a
    tracked run without checkpoints shows MLflow's kimg (the last loss step) and best FID."""
    monkeypatch.chdir(tmp_path)  # the experiment's artifact folder
    cfg = config.load(REPO / "params.yaml", overrides(tmp_path))
    stored_run(cfg, "demo-aaaa", [8000], fids=[(8000, 12.25)], stage=1)
    for name, status in (("demo-aaaa", "FINISHED"), ("demo-cccc", "FAILED")):
        named = [*overrides(tmp_path), f"tracking.run_name={name}"]
        tracking.start_run(config.load(REPO / "params.yaml", named).tracking)
        for nimg, fid in ((4000, 50.0), (6000, 45.0)):
            tracking.log_metrics({"loss_g": 1.0, "fid8": fid}, step=nimg)
        tracking.log_metrics({"eval/fid": 44.0})
        tracking.end_run(status)
    assert (
        cli.main(["runs", "--json", "--params", str(REPO / "params.yaml"), *overrides(tmp_path)])
        == 0
    )
    newest, older = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (newest["name"], newest["tracking"]["status"], newest["storage"]) == (
        "demo-cccc", "FAILED", None
    )  # fmt: skip
    assert newest["tracking"]["kimg"] == 6.0 and newest["tracking"]["eval_fid"] == 44.0
    assert newest["tracking"]["best_fid"] == {"metric": "fid/fid8", "value": 45.0, "kimg": 6.0}
    assert older["name"] == "demo-aaaa" and older["storage"]["best"]["fid"] == 12.25
    cells = runs.table_row(older)
    assert (cells["status"], cells["kimg"], cells["eval fid"]) == ("finished", "8.000", "44.00")
    assert cells["best fid"] == "12.25 (stage 1, kimg 8)"  # the checkpoints' record wins
    assert runs.table_row(newest)["best fid"] == "45.00 (fid/fid8, kimg 6)"


def test_an_unreadable_source_is_one_warning_and_both_unreadable_exit_1(tmp_path, capsys):
    """A storage.uri without a bucket and a tracking store that is not a database: one
    warning line each on stderr, and exit status 1; no traceback."""
    (tmp_path / "mlflow.db").write_text("not a database\n")
    argv = ["runs", "storage.uri=s3://", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert err[0].startswith("warning: storage.uri s3://: storage.uri='s3://' names no bucket")
    assert err[1].startswith(f"warning: tracking.uri sqlite:///{tmp_path / 'mlflow.db'}: ")
    assert err[2].startswith("no runs in s3:// nor in sqlite:///")


def test_no_runs_anywhere_says_where_it_looked(tmp_path, capsys):
    """An empty storage folder and no tracking store: exit 0, one line naming both places."""
    assert cli.main(["runs", *overrides(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip() == (
        f"no runs in {tmp_path / 'checkpoints'} nor in sqlite:///{tmp_path / 'mlflow.db'} "
        "(experiment polyinr-demo)"
    )
