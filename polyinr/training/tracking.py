"""MLflow runs: one run per training, continued on resume and by evaluation (mlflow lives here)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from polyinr.core.config import TrackingConfig
from polyinr.core.storage import write_atomic


def _connect(cfg: TrackingConfig):
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if cfg.uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(cfg.uri[len("sqlite:///") :]))
    mlflow.set_tracking_uri(cfg.uri)
    return mlflow


def _create_sqlite_store(path: Path) -> None:
    """Create a missing SQLite store under a temporary name, then rename it into place.

    MLflow builds a new store in a series of migrations; a process killed in the middle left
    a store that no later run could open ("duplicate column name"), found by a fault campaign.
    One process builds it, under an exclusive lock on `.<name>.lock` beside it: another first
    run waits, then finds the store. So a temporary file seen while holding the lock is a
    killed builder's, never a live one's, and only then is it removed.
    """
    if path.exists():
        return
    import fcntl

    import mlflow

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if path.exists():  # built by the process that held the lock before us
            return
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed here
            stale.unlink(missing_ok=True)
        with write_atomic(path) as tmp:
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # migrates


def _experiment_id(mlflow, cfg: TrackingConfig) -> str:
    """The id of experiment cfg.experiment, created if missing (by us or a concurrent run)."""
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A local artifact folder beside a local database; servers choose their own.
    local = not cfg.uri.startswith(("http://", "https://", "databricks"))
    location = Path(cfg.artifact_location).resolve().as_uri() if local else None
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)  # another run made it first
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(cfg: TrackingConfig, run_id: str | None = None, params: dict | None = None):
    """Start (or, given run_id, continue) a run; returns the active run to use as a context."""
    mlflow = _connect(cfg)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)  # None: this run creates it
    experiment_id = _experiment_id(mlflow, cfg)
    _label_experiment(mlflow.MlflowClient(), experiment_id, experiment, params or {})
    run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name)
    if params:
        # tracking.* says where the run is logged, which the run itself shows: as params they
        # only lead the compare page's list of differences.
        shown = {k: str(v)[:6000] for k, v in params.items() if not k.startswith("tracking.")}
        mlflow.log_params(shown)
    return run


# The experiment's kind (MLflow 3's ExperimentKind tag). MLflow 3.17.2's UI ignores it: a
# global "GenAI | Model training" switch (the URL's workflowType, else the browser's choice,
# GenAI by default) picks the page, so the links below say workflowType=machine_learning.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ML_WORKFLOW = "workflowType=machine_learning"
# A saved view of the runs table (the UI's "Views" menu, an experiment tag
# `mlflow.sharedViewState.<id>`), opened by view_url: the columns people compare runs by.
VIEW_KEY = "polyinr"
KEY_PARAMS = ("train.lr_g", "train.lr_d", "train.batch", "train.stages", "generator.hidden")
KEY_METRICS = ("loss/g", "loss/d", "eval/fid")


def _view_state(params: dict) -> str:
    """The saved view's envelope ({name, createdAt, state}) as the UI's "Save view" writes it."""
    from polyinr.evaluation.metrics import metric_name

    metrics = list(KEY_METRICS)
    if "eval.train_samples" in params:  # the FID during training, named by its sample count
        metrics.insert(2, metric_key(metric_name(int(params["eval.train_samples"]))))
    columns = ["attributes.`Dataset`"]
    columns += [f"metrics.`{k}`" for k in metrics] + [f"params.`{k}`" for k in KEY_PARAMS]
    state = {"orderByKey": "attributes.start_time", "orderByAsc": False}
    state |= {"selectedColumns": columns, "runListHidden": False}
    created = int(time.time() * 1000)
    return json.dumps({"name": "polyinr: key params and metrics", "createdAt": created,
                       "updatedAt": created, "state": json.dumps(state)})  # fmt: skip


def _label_experiment(client, experiment_id: str, experiment, params: dict) -> None:
    """Tag the experiment as model training and give it the key-columns view, unless a person
    (or an earlier run) already set those tags."""
    tags = experiment.tags if experiment is not None else {}
    wanted = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]}
    wanted[f"mlflow.sharedViewState.{VIEW_KEY}"] = _view_state(params)
    for key, value in wanted.items():
        if key not in tags:
            client.set_experiment_tag(experiment_id, key, value)


def metric_key(name: str) -> str:
    """The MLflow name of a curve column, grouped by its first word so that the UI sorts and
    charts it with its kind: loss_g -> loss/g, acc_real_0 -> acc/real_0, fid10k -> fid/fid10k."""
    if "/" in name:
        return name
    if name.startswith("fid"):
        return f"fid/{name}"
    return name.replace("_", "/", 1)


def log_dataset(path: str | Path, manifest: dict, context: str = "training") -> None:
    """The FFCV file of one resolution as the active run's dataset input: named after its
    source and resolution, its digest a hash of its manifest (content only), its source the
    file."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    resolution = manifest["resolution"]
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{Path(str(manifest['source'])).stem}-{resolution}px"
    source = LocalArtifactDatasetSource(str(Path(path).resolve()))
    tags = {
        "resolution": str(resolution),
        "images": str(manifest["written"]),
        "classes": str(len(manifest["classes"])),
        "encoding": str(manifest["encoding"]),
    }
    dataset = MetaDataset(source, name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags=tags)


PREVIOUS_RUN_TAG = "polyinr.previous_run_id"


def continue_run(cfg: TrackingConfig, run_id: str, params: dict | None = None):
    """Continue run `run_id`; if this tracking store never saw it (a checkpoint resumed on
    another host), start a new run tagged with the old id and say so in one line."""
    mlflow = _connect(cfg)
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = start_run(cfg, params=params)
        mlflow.set_tag(PREVIOUS_RUN_TAG, run_id)
        print(
            f"MLflow run {run_id} of the checkpoint is not in {cfg.uri}: logging to new run "
            f"{run.info.run_id} (tag {PREVIOUS_RUN_TAG}={run_id})",
            file=sys.stderr,
        )
        return run
    return mlflow.start_run(run_id=run_id)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Numbers of the active run at `step` (cur_nimg, images seen, for training curves), under
    their grouped names (metric_key)."""
    import mlflow

    mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def log_event(record: dict) -> None:
    """What MLflow keeps of a training event (polyinr/training/rundir.py): a checkpoint's curve
    row and
    a FID as metrics at step = images seen, a stage's starting point as a tag."""
    event = record["event"]
    if event == "checkpoint":
        log_metrics(record["metrics"], step=record["nimg"])
    elif event == "fid":
        log_metrics({record["metric"]: record["value"]}, step=record["nimg"])
    elif event == "stage_started" and record["stage"] > 0:
        set_tags({f"stage{record['stage']}.start": record["start"]})


def log_image(image: np.ndarray, key: str, step: int) -> None:
    """A uint8 (H, W, 3) image, step-indexed so the MLflow UI can page through it."""
    import mlflow

    mlflow.log_image(image, key=key, step=step)


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    """A file (a sample grid, a metrics file) or a folder of files of the active run."""
    import mlflow

    if Path(path).is_dir():
        mlflow.log_artifacts(
            str(path), artifact_path="/".join(filter(None, [folder, Path(path).name]))
        )
    else:
        mlflow.log_artifact(str(path), artifact_path=folder)


def set_tags(tags: dict[str, str]) -> None:
    """Labels of the active run, e.g. whether weights were random."""
    import mlflow

    mlflow.set_tags(tags)


def end_run(status: str = "FINISHED") -> None:
    """Close the active run, if any, as FINISHED, FAILED or KILLED (it can be continued later)."""
    import mlflow

    mlflow.end_run(status=status)


def list_runs(cfg: TrackingConfig) -> list[dict]:
    """The runs of cfg.experiment, newest first: run_id, run_name, status, start (epoch s),
    kimg (the last loss's step), best_fid {metric, value, kimg} over the training FIDs, and
    eval_fid. A SQLite store that does not exist yet has no runs (it is not created)."""
    if cfg.uri.startswith("sqlite:///") and not Path(cfg.uri[len("sqlite:///") :]).exists():
        return []
    mlflow = _connect(cfg)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return []
    out = []
    for run in client.search_runs([experiment.experiment_id], order_by=["start_time DESC"]):
        metrics = run.data.metrics
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start": run.info.start_time / 1000,
            "kimg": None,
            "eval_fid": metrics.get("eval/fid"),
        }
        # Curves are logged at step = images seen: the last step of a loss is the progress.
        loss = next((k for k in sorted(metrics) if "loss" in k and "eval" not in k), None)
        if loss:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, loss)]
            row["kimg"] = max(steps) / 1000
        # Training FIDs (fid64, fid10k, ...; also under a group such as fid/) at step = images
        # seen; the lowest is the best. The evaluate stage's eval/fid is reported apart.
        keys = [k for k in metrics if k.rsplit("/", 1)[-1].startswith("fid") and "eval" not in k]
        history = [
            (m.value, key, m.step)
            for key in keys
            for m in client.get_metric_history(run.info.run_id, key)
        ]
        if history:
            value, key, step = min(history)
            row["best_fid"] = {"metric": key, "value": value, "kimg": step / 1000}
        out.append(row)
    return out


def run_url(cfg: TrackingConfig, run_id: str) -> str:
    """Where a person looks at the run: the UI page on a server, else the store and run id."""
    import mlflow

    _connect(cfg)
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    if cfg.uri.startswith(("http://", "https://")):
        return f"{cfg.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_WORKFLOW}"
    return f"{cfg.uri} experiment {experiment_id} run {run_id} (`mlflow ui --backend-store-uri`)"


def view_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table on an MLflow server, with the key params and metrics as
    columns (the view _label_experiment stored)."""
    base = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{base}?{ML_WORKFLOW}&viewStateShareKey={VIEW_KEY}"
