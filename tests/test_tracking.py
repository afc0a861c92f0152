"""MLflow helpers: a run's link says where to look. (Registering the generator is
polyinr.commands.registry's, tested in tests/test_registry.py.)"""

from polyinr.core.config import TrackingConfig
from polyinr.training import tracking


def test_run_url_names_the_store_and_the_run(tmp_path):
    cfg = TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="e",
        artifact_location=str(tmp_path / "artifacts"),
        run_name="r",
    )
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    link = tracking.run_url(cfg, run_id)
    assert cfg.uri in link and run_id in link  # a local store: where and which run


def test_a_kill_while_the_sqlite_store_is_created_leaves_no_broken_store(tmp_path):
    """SIGKILL while MLflow creates a SQLite store leaves no half-migrated store."""
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    cfg = TrackingConfig(f"sqlite:///{db}", "e", str(tmp_path / "artifacts"), "r")
    code = f"from polyinr.training import tracking; tracking.start_run(tracking.{cfg!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".mlflow.db.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not db.exists()
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    assert run_id in tracking.run_url(cfg, run_id) and db.is_file()
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))


def test_metric_names_group_by_their_first_word():
    """Curve columns go to MLflow as kind/name, so the UI sorts and charts losses, accuracies
    and FIDs in their own groups; names already grouped stay as they are."""
    names = ["loss_g", "loss_d", "acc_real_0", "blur_sigma", "fid10k", "eval/fid", "kimg"]
    keys = [tracking.metric_key(n) for n in names]
    assert keys == [
        "loss/g",
        "loss/d",
        "acc/real_0",
        "blur/sigma",
        "fid/fid10k",
        "eval/fid",
        "kimg",
    ]


def test_a_run_opens_as_model_training_with_its_dataset_and_key_columns(tmp_path):
    """A new experiment is tagged as model training (the UI opens it on its runs, not the GenAI
    overview) and holds the key-columns view; a run logs the FFCV file as its dataset input
    (name, manifest digest, source), grouped metric names, and no tracking.* params."""
    import json

    import mlflow

    cfg = TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", str(tmp_path / "a"), "r")
    manifest = {"resolution": 16, "written": 12, "classes": ["n1", "n2"], "encoding": "jpg"}
    manifest |= {"source": "data/demo", "source_fingerprint": "f"}
    params = {"train.lr_g": 0.002, "eval.train_samples": 256, "tracking.run_name": "r"}
    run_id = tracking.start_run(cfg, params=params).info.run_id
    tracking.log_dataset(tmp_path / "train_16.beton", manifest)
    tracking.log_metrics({"loss_g": 1.5}, step=8)
    tracking.end_run()

    client = mlflow.MlflowClient(cfg.uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    saved = json.loads(experiment.tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert saved["name"] and isinstance(saved["createdAt"], int)
    view = json.loads(saved["state"])
    assert "params.`train.lr_g`" in view["selectedColumns"]
    assert "metrics.`fid/fid256`" in view["selectedColumns"]
    assert run.data.params == {"train.lr_g": "0.002", "eval.train_samples": "256"}
    assert run.data.metrics == {"loss/g": 1.5}
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "demo-16px" and len(inp.dataset.digest) == 12
    assert json.loads(inp.dataset.source)["uri"] == str(tmp_path / "train_16.beton")
    assert {t.key: t.value for t in inp.tags}["images"] == "12"

    # Content only: the same manifest gives the same digest, another one another digest.
    changed = dict(manifest, written=11)
    run_id = tracking.start_run(cfg).info.run_id
    tracking.log_dataset(tmp_path / "train_16.beton", manifest)
    tracking.log_dataset(tmp_path / "train_16.beton", changed)
    tracking.end_run()
    digests = [i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs]
    assert len(set(digests)) == 2 and inp.dataset.digest in digests


def test_a_person_s_experiment_kind_is_kept(tmp_path):
    """An experiment whose kind a person changed in the UI keeps it when the next run starts."""
    import mlflow

    cfg = TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", str(tmp_path / "a"), "r")
    tracking.start_run(cfg)
    tracking.end_run()
    client = mlflow.MlflowClient(cfg.uri)
    experiment_id = client.get_experiment_by_name("e").experiment_id
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    tracking.start_run(cfg)
    tracking.end_run()
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "genai_development"


RACER = """
import sys, time
from pathlib import Path
from polyinr.training import tracking
from polyinr.core.config import TrackingConfig
cfg = TrackingConfig(sys.argv[1], "e", sys.argv[2], sys.argv[3])
print("ready", flush=True)
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
time.sleep(float(sys.argv[5]))
run = tracking.start_run(cfg, params={"who": sys.argv[3]})
tracking.end_run()
print(run.info.run_id, flush=True)
"""


def test_two_first_runs_on_a_fresh_sqlite_store_both_keep_their_run(tmp_path):
    """Two processes start their first run on one fresh SQLite store, 0.4 s apart: both
    finish, and the store holds both runs (one built the store, the other waited for it)."""
    import subprocess
    import sys

    import mlflow

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(tmp_path / "art"), name, str(go), delay],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, delay in (("first", "0"), ("second", "0.4"))
    ]
    for proc in procs:  # both have imported MLflow: the race is the store's creation alone
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    go.touch()
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        run_ids.append(out.split()[-1])
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_id: r.data.params["who"] for r in client.search_runs(["0", "1"])}
    assert runs == {run_ids[0]: "first", run_ids[1]: "second"}
