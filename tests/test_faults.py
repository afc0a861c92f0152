"""Faults an operator meets, end to end: S3 answers that drop or cut off, a resume on a host
with another MLflow store, checkpoints that no longer load, SIGTERM during start-up.

The S3 server is real (moto over HTTP); scripts/fault_proxy.py sits in front of it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from test_train import tiny_overrides

from polyinr import data
from polyinr.commands import cli
from polyinr.core import config, storage
from polyinr.core.errors import Preempted
from polyinr.training import checkpoints, loop, run, tracking
from polyinr.training.run import train
from scripts.fault_proxy import Fault, FaultProxy

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 2-class demo dataset converted at 16 px, shared by the module."""
    root = tmp_path_factory.mktemp("faults")
    cfg = config.load(REPO / "params.yaml", tiny_overrides(root))
    data.make_demo_dataset(Path(cfg.data.source), 2, 8, 24, 0)
    data.prepare(cfg.data, [16], progress=False)
    return root


def overrides_in(prepared, where: Path, kimg: float, storage_uri: str, *extra) -> list[str]:
    """The tiny schedule with checkpoints at storage_uri and MLflow in `where`."""
    common = [
        o
        for o in tiny_overrides(prepared, kimg=kimg)
        if not o.startswith(("storage.", "tracking.uri", "tracking.artifact"))
    ]
    return [
        *common,
        f"storage.uri={storage_uri}",
        f"storage.staging_dir={where / 'staging'}",
        f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
        f"tracking.artifact_location={where / 'mlartifacts'}",
        "train.snapshot_kimg=0.008",
        "train.sample_kimg=1.0",
        *extra,
    ]


@pytest.mark.slow
def test_resume_from_s3_on_a_new_host_continues_in_a_linked_mlflow_run(
    prepared, tmp_path, s3_bucket, s3_env, monkeypatch, capsys
):
    """Resuming on a host with its own MLflow store logs to a linked new run, retrying cut GETs."""
    proxy = FaultProxy(s3_env)
    uri = f"s3://{s3_bucket}/runs"
    a, b = tmp_path / "a", tmp_path / "b"
    for where in (a, b):
        where.mkdir()
    try:
        monkeypatch.chdir(a)
        extra = (f"storage.endpoint_url={proxy.url}", "storage.retries=3")
        cfg = config.load(REPO / "params.yaml", overrides_in(prepared, a, 0.016, uri, *extra))
        first = train(cfg, CPU, "run", progress=False)
        capsys.readouterr()

        monkeypatch.chdir(b)
        proxy.add(Fault("truncate", "GET", r"snapshot-0+16\.pt", times=2))
        cfg = config.load(REPO / "params.yaml", overrides_in(prepared, b, 0.032, uri, *extra))
        second = train(cfg, CPU, "run", progress=False)
    finally:
        proxy.close()
    assert [kind for *_, kind in proxy.served] == ["truncate", "truncate"]
    err = capsys.readouterr().err
    assert "resuming from" in err and "at kimg 0.016" in err
    [line] = [x for x in err.splitlines() if first["mlflow_run_id"] in x]
    assert "not in" in line and second["mlflow_run_id"] in line
    assert second["cur_nimg"] == 32 and second["mlflow_run_id"] != first["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{b / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(second["mlflow_run_id"])
    assert run.data.tags[tracking.PREVIOUS_RUN_TAG] == first["mlflow_run_id"]
    assert run.data.params["train.batch"] == "8"


@pytest.mark.slow
def test_no_loadable_checkpoint_stops_unless_restart_and_restart_keeps_its_commits(
    prepared, tmp_path, monkeypatch, capsys
):
    """No checkpoint loads: train stops (reruns too) until --restart; none listed as latest."""
    monkeypatch.chdir(tmp_path)
    overrides = overrides_in(prepared, tmp_path, 0.016, str(tmp_path / "ckpt"), "storage.keep=1")
    cfg = config.load(REPO / "params.yaml", overrides)
    train(cfg, CPU, "run", progress=False)
    overrides = [o.replace("kimg: 0.016", "kimg: 0.024") for o in overrides]  # a longer run
    cfg = config.load(REPO / "params.yaml", overrides)
    run = tmp_path / "ckpt" / "test"
    [name] = [p.name for p in run.glob("snapshot-*.pt")]
    (run / name).write_bytes((run / name).read_bytes()[:-100])
    capsys.readouterr()
    assert cli.main(["checkpoints", "list", "--params", str(REPO / "params.yaml"), *overrides]) == 0
    [record] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert not record["latest"] and "its record says" in record["corrupt"]

    steps = []
    original = loop.training_step
    monkeypatch.setattr(loop, "training_step", lambda *a, **k: steps.append(1) or original(*a))
    with pytest.raises(storage.StorageError, match="--restart") as error:
        train(cfg, CPU, "run", progress=False)
    assert name in str(error.value) and not steps
    assert (run / "corrupt" / name).is_file() and not (run / checkpoints.LATEST).exists()
    with pytest.raises(storage.StorageError, match="moved to corrupt/ by an earlier run"):
        train(cfg, CPU, "run", progress=False)  # a plain rerun does not start over either

    result = train(cfg, CPU, "run", progress=False, restart=True)
    assert result["cur_nimg"] == 24 and len(steps) == 3
    assert "starting from image 0 (--restart)" in capsys.readouterr().err
    latest = json.loads((run / checkpoints.LATEST).read_text())["name"]
    assert latest == checkpoints.snapshot_name(24) and (run / latest).is_file()


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (Linux: SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & 1 << (signal.SIGTERM - 1))


def test_sigterm_during_start_up_exits_143(tmp_path):
    """SIGTERM while `polyinr train` imports and loads its config exits 143, not -15."""
    cmd = [sys.executable, "-m", "polyinr", "train", "--params", str(REPO / "params.yaml")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not catches_sigterm(proc.pid):  # the command's handler is in: it is starting up
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # now inside the imports of torch and the models
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err


@pytest.mark.slow
def test_fault_campaign_script_runs_a_trial_and_reports_totals(tmp_path):
    """A seeded campaign trial loses no commit and ends bit-identical to an uninterrupted run."""
    out = tmp_path / "campaign.json"
    cmd = [sys.executable, str(REPO / "scripts" / "fault_campaign.py"), "--trials", "1"]
    cmd += ["--seed", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    totals = json.loads(out.read_text())["totals"]
    assert totals["trials"] == 1 and totals["runs"] >= 2
    assert totals["commits_lost"] == 0 and totals["bit_identical"] == 1


def test_sigterm_while_resuming_stops_before_building_models(prepared, tmp_path, monkeypatch):
    """SIGTERM during train's start-up (a slow resume) raises Preempted before any model."""
    import os

    monkeypatch.chdir(tmp_path)
    cfg = config.load(REPO / "params.yaml", overrides_in(prepared, tmp_path, 0.016, "ckpt"))

    def slow_resume(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return None, None  # a fresh run, found while the signal arrived

    monkeypatch.setattr(run, "_resume", slow_resume)
    built = []
    monkeypatch.setattr(run, "_stage_models", lambda *a: built.append(1))
    with pytest.raises(Preempted, match="during start-up"):
        train(cfg, CPU, "run", progress=False)
    assert not built


def test_a_full_disk_exits_75_in_one_line_and_the_rerun_resumes(prepared, tmp_path, monkeypatch):
    """`polyinr train` on a disk that fills up at the second commit: one stderr line naming the
    checkpoint's path and the bytes needed, exit 75 (transient); the first commit is intact
    and the rerun resumes from it."""
    from test_storage import fill_disk_for

    monkeypatch.chdir(tmp_path)
    overrides = overrides_in(prepared, tmp_path, 0.016, str(tmp_path / "ckpt"))
    argv = ["train", "--quiet", "--device", "cpu", "--params", str(REPO / "params.yaml")]
    with monkeypatch.context() as patch:
        fill_disk_for(patch, "snapshot-000000000016")
        done = _main(argv + overrides)
    assert done["code"] == 75, done["err"]
    [line] = [x for x in done["err"].splitlines() if "disk full" in x]
    assert "snapshot-000000000016.pt needs" in line and "bytes" in line
    assert line.startswith("polyinr train: error: ") and "Traceback" not in done["err"]
    latest = json.loads((tmp_path / "ckpt/test" / checkpoints.LATEST).read_text())
    assert latest["name"] == checkpoints.snapshot_name(8)
    again = _main(argv + overrides)
    assert again["code"] == 0 and "resuming from" in again["err"]
    assert json.loads(again["out"].splitlines()[-1])["cur_nimg"] == 16


def _main(argv: list[str]) -> dict:
    """cli.main(argv) in this process: its exit code and what it printed."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def test_a_second_trainer_of_one_run_exits_75_naming_the_holder(prepared, tmp_path, monkeypatch):
    """`polyinr train` of a run whose lease another live trainer holds exits 75 in one line
    naming the holder, before any step; once the lease is released it trains, and leaves no
    lease behind."""
    from polyinr.training.lease import LEASE, Lease

    monkeypatch.chdir(tmp_path)
    overrides = overrides_in(prepared, tmp_path, 0.008, str(tmp_path / "ckpt"))
    cfg = config.load(REPO / "params.yaml", overrides)
    holder = Lease(storage.Folder(cfg.storage, "test"))
    holder.acquire("test")
    steps = []
    original = loop.training_step
    monkeypatch.setattr(loop, "training_step", lambda *a, **k: steps.append(1) or original(*a))
    argv = ["train", "--quiet", "--device", "cpu", "--params", str(REPO / "params.yaml")]
    try:
        done = _main(argv + overrides)
    finally:
        holder.release()
    assert done["code"] == 75 and not steps, done["err"]
    [line] = done["err"].strip().splitlines()
    assert line.startswith("polyinr train: error: run test is being trained by ")
    assert f"pid {holder.pid} since " in line
    assert _main(argv + overrides)["code"] == 0 and steps
    assert not (tmp_path / "ckpt/test" / LEASE).exists()


def _outage_at(monkeypatch, proxy: FaultProxy, nimg: int, fault: Fault, seconds: float | None):
    """Start `fault` (on every matching request) when snapshot nimg's upload begins; clear it
    `seconds` later (None: never). Returns the outage's [start, end] times, filled in then."""
    times = []
    original = storage.Folder.upload

    def upload(self, name, local):
        if name == checkpoints.snapshot_name(nimg) and not times:
            times.append(time.monotonic())
            proxy.add(fault)
            if seconds is not None:
                threading.Timer(
                    seconds, lambda: proxy.clear() or times.append(time.monotonic())
                ).start()
        return original(self, name, local)

    monkeypatch.setattr(storage.Folder, "upload", upload)
    return times


@pytest.mark.slow
def test_an_s3_outage_during_an_upload_is_ridden_out_while_training_goes_on(
    prepared, tmp_path, s3_bucket, s3_env, monkeypatch
):
    """S3 answers 503 to everything for 4 s from the start of snapshot 32's upload: training
    steps on meanwhile, `latest.json` keeps naming the uploaded snapshot 16 until 32 lands,
    every commit lands, and the weights equal a fault-free run's."""
    monkeypatch.chdir(tmp_path)
    schedule = ("train.snapshot_kimg=0.016", "storage.retries=2")
    solo = overrides_in(prepared, tmp_path / "solo", 0.048, str(tmp_path / "solo"), *schedule)
    (tmp_path / "solo").mkdir()
    reference = train(config.load(REPO / "params.yaml", solo), CPU, "solo", progress=False)

    proxy = FaultProxy(s3_env)
    client = boto3.session.Session().client("s3", endpoint_url=s3_env)  # around the proxy
    extra = (*schedule, f"storage.endpoint_url={proxy.url}", "storage.outage_minutes=1.0")
    overrides = overrides_in(prepared, tmp_path, 0.048, f"s3://{s3_bucket}/runs", *extra)
    outage = _outage_at(monkeypatch, proxy, 32, Fault("503", times=-1), seconds=4.0)
    steps = []  # (whether S3 was down, the name latest.json held) at each step
    original = loop.training_step

    def step(*args, **kwargs):
        down = len(outage) == 1
        if outage:  # snapshot 16 is committed: latest.json exists
            body = client.get_object(Bucket=s3_bucket, Key="runs/test/latest.json")["Body"]
            steps.append((down, json.loads(body.read())["name"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)
    try:
        result = train(config.load(REPO / "params.yaml", overrides), CPU, "run", progress=False)
    finally:
        proxy.close()
    assert len(outage) == 2 and proxy.served, "the outage never started or ended"
    during = [latest for down, latest in steps if down]
    assert during and set(during) == {checkpoints.snapshot_name(16)}  # training went on
    assert result["weights_sha256"] == reference["weights_sha256"]
    body = client.get_object(Bucket=s3_bucket, Key="runs/test/latest.json")["Body"]
    assert json.loads(body.read())["name"] == checkpoints.snapshot_name(48)
    assert not list((tmp_path / "staging").rglob("*.pt"))  # every staged copy went up


@pytest.mark.slow
def test_an_outage_past_outage_minutes_exits_75_in_one_line_and_keeps_every_commit(
    prepared, tmp_path, s3_bucket, s3_env, monkeypatch
):
    """Checkpoint uploads failing for longer than storage.outage_minutes (0.05: 3 s) end
    `polyinr train` with exit 75 and one error line; snapshot 32 stays staged, `latest.json`
    names snapshot 16, and the rerun resumes from it and finishes."""
    monkeypatch.chdir(tmp_path)
    proxy = FaultProxy(s3_env)
    extra = (
        "train.snapshot_kimg=0.016",
        "storage.retries=2",
        f"storage.endpoint_url={proxy.url}",
        "storage.outage_minutes=0.05",
    )
    overrides = overrides_in(prepared, tmp_path, 0.048, f"s3://{s3_bucket}/runs", *extra)
    argv = ["train", "--quiet", "--device", "cpu", "--params", str(REPO / "params.yaml")]
    try:
        with monkeypatch.context() as patch:
            _outage_at(patch, proxy, 32, Fault("503", key=r"snapshot-", times=-1), None)
            done = _main(argv + overrides)
        staged = tmp_path / "staging" / "test" / checkpoints.snapshot_name(32)
        kept = staged.is_file()  # before the rerun uploads its own snapshot 32
        proxy.clear()
        again = _main(argv + overrides)
    finally:
        proxy.close()
    assert done["code"] == 75, done["err"]
    [line] = [x for x in done["err"].splitlines() if x.startswith("polyinr train: error: ")]
    assert (
        line.startswith("polyinr train: error: S3 has failed for ")
        and "Traceback" not in done["err"]
    )
    assert "storage.outage_minutes=0.05" in line and "the previous commit is intact" in line
    assert kept and str(staged) in line
    assert again["code"] == 0, again["err"]
    assert "resuming from" in again["err"] and "at kimg 0.016" in again["err"]
    assert json.loads(again["out"].splitlines()[-1])["cur_nimg"] == 48


@pytest.mark.slow
def test_sigterm_during_a_failing_upload_exits_143_soon_and_the_rerun_resumes(
    prepared, tmp_path, s3_bucket, s3_env, monkeypatch
):
    """SIGTERM while snapshot 32's upload is failing: the trainer waits at most PREEMPT_WAIT_S
    for it, leaves it, exits 143 without a new commit; `latest.json` still names snapshot 16,
    and the rerun resumes from it and finishes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "PREEMPT_WAIT_S", 1.0)
    proxy = FaultProxy(s3_env)
    extra = (
        "train.snapshot_kimg=0.016",
        "storage.retries=2",
        f"storage.endpoint_url={proxy.url}",
        "storage.outage_minutes=0.05",
    )
    overrides = overrides_in(prepared, tmp_path, 0.048, f"s3://{s3_bucket}/runs", *extra)
    argv = ["train", "--quiet", "--device", "cpu", "--params", str(REPO / "params.yaml")]
    signalled = []
    original = loop.training_step

    def step(*args, **kwargs):
        if outage and not signalled:  # the first step while snapshot 32's upload fails
            signalled.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    try:
        with monkeypatch.context() as patch:
            outage = _outage_at(patch, proxy, 32, Fault("503", key=r"snapshot-", times=-1), None)
            patch.setattr(loop, "training_step", step)
            done = _main(argv + overrides)
            took = time.monotonic() - signalled[0]
        for thread in threading.enumerate():  # the left upload gives up (outage_minutes)
            if thread.name == "checkpoint-upload":
                thread.join()
        proxy.clear()
        again = _main(argv + overrides)
    finally:
        proxy.close()
    assert done["code"] == 143 and took < 20, done["err"]
    assert "not saving kimg 0.04" in done["err"] and "not saved" in done["err"]
    assert again["code"] == 0 and "at kimg 0.016" in again["err"], again["err"]
    assert json.loads(again["out"].splitlines()[-1])["cur_nimg"] == 48
