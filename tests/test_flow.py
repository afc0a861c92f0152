"""The Prefect flow: overrides reach params.yaml like `dvc exp run -S`, and the flow runs the
DVC pipeline stage by stage against a real Prefect server."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polyinr.commands import pipeline, stage
from polyinr.commands.stage import StageFailed
from polyinr.core import errors

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
TINY = [  # the whole pipeline in a couple of minutes on 2 CPU cores
    "train.stages=[{resolution: 16, kimg: 0.064}]",
    "data.demo_per_class=8",
    "eval.num_samples=16",
    "eval.every_kimg=0.0",  # no FID during training: tests/test_pipeline.py covers it
]


@pytest.fixture
def train_flow(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # flows/ lives in the repository, not the package
    return importlib.import_module("flows.train_flow")


def _comments(text: str) -> list[str]:
    return [line.partition("#")[2] for line in text.splitlines() if "#" in line]


def test_overrides_are_validated_and_keep_comments(tmp_path):
    """An unknown key fails with the config's message and leaves the file alone; valid
    overrides change only their own lines and read back as the validated config."""
    from polyinr.core.config import ConfigError, load

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(ConfigError, match="no_such_key"):
        pipeline.write_overrides(["train.no_such_key=1"], params=params)
    assert params.read_text() == before

    overrides = ["train.batch=16", "data.demo_per_class=8"]
    pipeline.write_overrides(overrides, params=params)
    after = params.read_text()
    assert load(params) == load(ROOT / "params.yaml", overrides)
    assert _comments(after) == _comments(before)
    assert len(after.splitlines()) == len(before.splitlines())
    changed = [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 2, changed
    assert list(tmp_path.iterdir()) == [params]  # no temporary file left behind


def test_env_overrides_reads_a_json_list(train_flow, monkeypatch):
    """$POLYINR_OVERRIDES is a JSON list of overrides; anything else is refused by name."""
    monkeypatch.delenv(train_flow.ENV_OVERRIDES, raising=False)
    assert train_flow.env_overrides() == []
    monkeypatch.setenv(train_flow.ENV_OVERRIDES, '["storage.uri=s3://b/c", "train.batch=8"]')
    assert train_flow.env_overrides() == ["storage.uri=s3://b/c", "train.batch=8"]
    monkeypatch.setenv(train_flow.ENV_OVERRIDES, '"storage.uri=s3://b/c"')
    with pytest.raises(ValueError, match="POLYINR_OVERRIDES"):
        train_flow.env_overrides()


def test_stage_selection_takes_groups_and_single_stages(train_flow):
    """`stages`: `prepare` is every prepare@i, `train` every train@i; names select themselves."""
    names = ["demo_data", "prepare@0", "prepare@1", "train@0", "train@1", "evaluate"]
    pick = train_flow._selected
    assert [n for n in names if pick(n, ["prepare", "train@1"])] == [
        "prepare@0",
        "prepare@1",
        "train@1",
    ]
    assert [n for n in names if pick(n, None)] == names
    assert [n for n in names if pick(n, ["train"])] == ["train@0", "train@1"]


def test_stage_failures_retry_unless_the_inputs_are_wrong(train_flow):
    """Exit 2 (bad config, data or weights) is never retried; 75 (transient) is; 143 (pre-empted)
    and a kill are rerun, which resumes; so is a crash or any other error."""
    from prefect.states import Failed

    def retried(error):
        return train_flow._retry(None, None, Failed(data=error))

    assert retried(StageFailed("train", errors.USAGE, ["polyinr train: error"])) is False
    for code in (errors.TRANSIENT, errors.PREEMPTED, 1, -9):
        assert retried(StageFailed("train", code, [])) is True
    assert retried(OSError("connection reset")) is True
    assert train_flow._task_name({"name": "train@1", "resolution": 32}) == "train@1 (32px)"
    assert train_flow._task_name({"name": "evaluate", "resolution": None}) == "evaluate"


def test_dvc_run_stage_reports_polyinrs_own_exit_code(tmp_path):
    """`dvc repro` exits 255 whatever its stage's command returned; the stage runner reports the
    code polyinr wrote to $POLYINR_EXIT_FILE instead: 2 for a config typo."""
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  typo:\n    cmd: polyinr summary --skip-discriminator generator.hiden=3\n"
    )
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    pipeline.dvc(tmp_path, "init", "--no-scm")
    logged = []

    class Logger:
        def info(self, msg, *args):
            logged.append(msg % args if args else msg)

        warning = info

    code, lines = stage.stream([DVC, "repro", "typo"], Logger(), tmp_path)
    assert code == errors.USAGE, lines
    assert any("generator.hiden" in line for line in lines)
    (tmp_path / "dvc.yaml").write_text("stages:\n  crash:\n    cmd: python -c 'exit(3)'\n")
    assert stage.stream([DVC, "repro", "crash"], Logger(), tmp_path)[0] == 255  # DVC's own


@pytest.mark.slow
def test_flow_runs_every_stage_as_a_task(tmp_path, repo_copy):
    """`python flows/train_flow.py OVERRIDES...` runs each DVC stage as a completed Prefect
    task in a workspace of its own (the checkout's params.yaml untouched, the workspace gone
    at the end) and publishes metrics/eval.json as a markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    repo = repo_copy
    params_before = (repo / "params.yaml").read_text()
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        env.pop("POLYINR_OVERRIDES", None)
        cmd = [sys.executable, str(repo / "flows" / "train_flow.py"), *TINY]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            task_runs = client.read_task_runs()
            artifacts = client.read_artifacts()
    assert flow_run.name and flow_run.state.is_completed()
    assert (repo / "params.yaml").read_text() == params_before  # overrides: workspace only
    assert not any((repo / ".workspaces").iterdir())  # removed at the end
    # DVC's stages, with `train` run as one task per progressive stage (TINY has one).
    expected = ["workspace", "demo_data", "prepare@0", "train@0 (16px)", "evaluate", "publish"]
    states = {
        t.name.rsplit("-", 1)[0]
        if t.name.startswith(("workspace", "publish"))
        else t.name: t.state.name
        for t in task_runs
    }
    assert {name: states.get(name) for name in expected} == dict.fromkeys(expected, "Completed")
    assert "prepare@1" not in states
    (artifact,) = [a for a in artifacts if a.key == "poly-inr-eval"]
    assert all(name in artifact.data for name in ("fid", "sfid", "precision", "recall"))
    (link,) = [a for a in artifacts if a.key == "mlflow-run"]
    assert "sqlite:///mlflow.db" in link.data  # a local store: the run id, not a URL
    (restore,) = [a for a in artifacts if a.key == "restore"]
    assert "polyinr restore demo-" in restore.data
    # The run's record beside its checkpoints (storage.uri=checkpoints, shared by the link).
    (run_dir,) = (repo / "checkpoints").glob("demo-*")
    assert {"params.yaml", "dvc.lock", "latest.json"} <= {p.name for p in run_dir.iterdir()}
    assert "lr_g" in (run_dir / "params.yaml").read_text()


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_state(client, run_id, done, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if done(run.state):
            return run
        time.sleep(1)
    raise AssertionError(f"{what}: flow run still {run.state.name} after {timeout} s")


def _git(repo, *args) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_concurrent_runs_preemption_and_recovery_on_the_local_stack(repo_copy, tmp_path):
    """`scripts/stack.sh up` on a git checkout (S3 on disk, MLflow and Prefect servers, a
    worker). Two deployment runs issued at once with different train.lr_g each train their
    own run (MLflow run named by the params' hash, its own params), the checkout stays clean.
    A fresh clone restores run A from the remotes alone (`polyinr restore` + `dvc pull`).
    A third run, stopped by `stack.sh down` in its second progressive stage, checkpoints,
    ends Crashed with its MLflow run KILLED; after `stack.sh up` its rerun skips what DVC
    and the checkpoints finished and resumes from the pre-emption checkpoint."""
    import re
    import time

    import boto3
    import mlflow
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterTaskRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from polyinr.core.config import load
    from polyinr.training.rundir import RunDir

    repo = repo_copy
    subprocess.run([DVC, "config", "--unset", "core.no_scm"], cwd=repo, check=True)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "deployment")
    s3_port, mlflow_port, prefect_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.pop("PREFECT_API_URL", None)
    env.pop("POLYINR_OVERRIDES", None)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        POLYINR_S3_PORT=str(s3_port),
        POLYINR_MLFLOW_PORT=str(mlflow_port),
        POLYINR_PREFECT_PORT=str(prefect_port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    stack = ["bash", str(repo / "scripts" / "stack.sh")]
    tiny = ["data.demo_per_class=8", "eval.num_samples=16"]
    runs = {  # A and B: 2 steps of 32 images at 16 px; C: 4 at 16 px, then 8 at 32 px
        "a": [*tiny, "train.stages=[{resolution: 16, kimg: 0.064}]", "train.lr_g=2.0e-4"],
        "b": [*tiny, "train.stages=[{resolution: 16, kimg: 0.064}]", "train.lr_g=1.0e-3"],
        "c": [
            *tiny,
            "train.stages=[{resolution: 16, kimg: 0.128}, {resolution: 32, kimg: 0.256}]",
            "train.snapshot_kimg=0.064",
            "train.lr_g=5.0e-4",
        ],
    }
    names = {k: load(repo / "params.yaml", v).tracking.run_name for k, v in runs.items()}
    assert len(set(names.values())) == 3

    def up():
        proc = subprocess.run([*stack, "up"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        for line in (repo / ".stack" / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'")

    def down():
        proc = subprocess.run([*stack, "down"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def deployment_run(key):
        cmd = ["prefect", "deployment", "run", "train-poly-inr/local"]
        cmd += ["--param", f"overrides={json.dumps(runs[key])}"]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)[1]

    def s3_keys(prefix):
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="local",
            aws_secret_access_key="local",
            region_name="us-east-1",
        )
        listing = s3.list_objects_v2(Bucket="polyinr", Prefix=prefix)
        return [o["Key"] for o in listing.get("Contents", [])]

    def nimgs(key):
        found = s3_keys(f"checkpoints/{names[key]}/snapshot-")
        return [int(k[-15:-3]) for k in found if k.endswith(".pt")]

    try:
        up()
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                first = {key: deployment_run(key) for key in ("a", "b")}  # at once
                for key, run_id in first.items():
                    run = _wait_state(client, run_id, lambda s: s.is_final(), 1500, key)
                    assert run.state.is_completed(), (key, run.state.message)
                records = {k: s3_keys(f"checkpoints/{names[k]}/") for k in ("a", "b")}

                # Run C, stopped by `stack.sh down` once its event log (in the flow run's
                # workspace) says a 32 px checkpoint was committed.
                third = deployment_run("c")
                events = RunDir(repo / ".workspaces" / third / "run")
                deadline = time.monotonic() + 1500  # a last resort: 2 shared cores can be busy
                while not any(
                    e["event"] == "checkpoint" and e["resolution"] == 32
                    for e in events.read_events()
                ):
                    assert not client.read_flow_run(third).state.is_final()
                    assert time.monotonic() < deadline, "no 32 px checkpoint after 1500 s"
                    time.sleep(0.2)
                # On S3 the event follows the staging; the upload lands in the background.
                while max(nimgs("c"), default=0) <= 128:
                    assert time.monotonic() < deadline, "the 32 px checkpoint never reached S3"
                    time.sleep(0.2)
        stopped = down()
        stopped_at = max(
            int(p.name[-15:-3])
            for p in (repo / ".stack/s3/polyinr/checkpoints" / names["c"]).glob("*.pt")
        )
        up()
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        (killed,) = mlflow.search_runs(
            experiment_names=["polyinr-demo"],
            filter_string=f"attributes.run_name = '{names['c']}'",
            output_format="list",
        )
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                crashed = client.read_flow_run(third).state
                rerun = deployment_run("c")
                run = _wait_state(client, rerun, lambda s: s.is_final(), 1500, "rerun")
                assert run.state.is_completed(), run.state.message
                ids = FlowRunFilter(id=FlowRunFilterId(any_=[rerun]))
                tasks = {t.name: t for t in client.read_task_runs(flow_run_filter=ids)}
                train_id = LogFilterTaskRunId(any_=[tasks["train@1 (32px)"].id])
                logs = client.read_logs(LogFilter(task_run_id=train_id))

        # Recovery from the remotes alone: a fresh clone restores run A.
        fresh = tmp_path / "fresh"
        _git(tmp_path, "clone", "-q", str(repo), str(fresh))
        restore = ["polyinr", "restore", names["a"], "storage.uri=s3://polyinr/checkpoints"]
        proc = subprocess.run(restore, cwd=fresh, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = subprocess.run([DVC, "status"], cwd=fresh, env=env, capture_output=True, text=True)
    finally:
        down()

    # Concurrency: two MLflow runs, each named by its identity and holding its own params.
    mlflow.set_tracking_uri(f"sqlite:///{repo / '.stack' / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["polyinr-demo"], output_format="list")
    by_name = {r.info.run_name: r for r in found}
    assert set(by_name) == set(names.values())
    for key, lr in (("a", "0.0002"), ("b", "0.001"), ("c", "0.0005")):
        assert by_name[names[key]].data.params["train.lr_g"] == lr
    for key in ("a", "b"):  # each run's record of the pipeline, beside its checkpoints
        assert f"checkpoints/{names[key]}/dvc.lock" in records[key]
    assert _git(repo, "status", "--porcelain") == ""  # nothing written back into the checkout
    (version,) = [
        v
        for v in mlflow.MlflowClient().search_model_versions("name='polyinr-generator'")
        if v.run_id == by_name[names["a"]].info.run_id
    ]
    assert version.tags["protocol"] == "adm"  # the flow tags the version with eval.json

    # Pre-emption: checkpoint at SIGTERM, flow run Crashed, MLflow run KILLED, then resumed.
    assert "SIGTERM" in stopped and crashed.is_crashed(), (stopped, crashed)
    assert killed.info.status == "KILLED"
    train_logs = "\n".join(log.message for log in logs)
    resumed = int(re.search(r"resuming from \S+/snapshot-(\d+)\.pt", train_logs)[1])
    assert 128 < resumed == stopped_at < 384
    run_c = mlflow.MlflowClient().get_run(by_name[names["c"]].info.run_id)
    assert run_c.info.status == "FINISHED"  # KILLED at the stop, continued by the rerun
    states = {name: task.state.name for name, task in tasks.items()}
    for name in ("demo_data", "prepare@0", "prepare@1", "train@0 (16px)"):
        assert states[name] == "Skipped", (name, states)
    assert states["train@1 (32px)"] == states["evaluate"] == "Completed"

    # The fresh clone: run A's params, lock and outputs; nothing for DVC to redo.
    assert "lr_g: 2.0e-4" in (fresh / "params.yaml").read_text()
    assert (fresh / "run" / "generator.pt").is_file()
    assert "up to date" in status.stdout.lower(), status.stdout + status.stderr
    meta = torch.load(fresh / "run" / "generator.pt", weights_only=True)["meta"]
    assert meta["mlflow_run_id"] == by_name[names["a"]].info.run_id


def test_sigterm_during_a_stage_reaches_it_and_then_prefects_handler(train_flow, tmp_path):
    """SIGTERM to the flow process goes to the stage's process group (its child traps it,
    checkpoints and exits 143); only once the stage's output has ended (its last lines
    logged) does the flow's previous handler (Prefect's: the run ends Crashed) get it."""
    import signal
    import threading

    class Terminated(BaseException):
        pass

    logged = []

    def prefects(signum, frame):
        logged.append("prefect's handler")
        raise Terminated

    class Logger:
        def info(self, msg, *args):
            logged.append(msg % args if args else msg)

        warning = info

    child = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(0.5); print('checkpoint written', flush=True); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n"
    )
    previous = signal.signal(signal.SIGTERM, prefects)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(Terminated):
            stage.stream([sys.executable, "-c", child], Logger(), tmp_path)
        assert signal.getsignal(signal.SIGTERM) is prefects  # restored after the stage
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert logged[1:3] == ["training", "checkpoint written"]
    assert logged[3].startswith("SIGTERM:") and logged[3].endswith("(exit 143)")
    assert logged[4] == "prefect's handler"
