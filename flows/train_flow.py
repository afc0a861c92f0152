"""Prefect flow `train-poly-inr`: the DVC pipeline's stages as tasks, then publish the result.

Each flow run works in its own workspace (polyinr/commands/pipeline.py), a clean tree of the
deployment's commit with the run's overrides in its params.yaml. DVC owns the DAG and decides
what is up to date (those tasks end `Skipped`). The tasks are workspace, demo_data,
prepare@i, class_embeddings, train@i (one per progressive stage: `polyinr train
--until-stage i`, the last one the DVC stage) and evaluate, then publish. After each stage
params.yaml and dvc.lock are recorded beside the run's checkpoints, so a rerun redoes only
what is missing. Stage failures are retried by exit code (docs/errors.md); SIGTERM reaches
training, which checkpoints, and the run ends Crashed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from polyinr.commands import pipeline
from polyinr.commands import stage as stage_process
from polyinr.core import config, errors

ROOT = Path(__file__).resolve().parent.parent
DVC = pipeline.DVC  # the venv's: its bin also holds `polyinr` for the stage commands
ENV_OVERRIDES = "POLYINR_OVERRIDES"  # JSON list of section.key=value, before the run's own
ENV_DVC_REMOTE = "POLYINR_DVC_REMOTE"  # s3://bucket/prefix for `dvc pull/push`; else .dvc/config's
ENV_WORKSPACES = "POLYINR_WORKSPACES"  # where flow runs' workspaces go (default .workspaces/)
# The DVC stage's command ($POLYINR_TRAIN_LAUNCHER polyinr train), run per progressive stage.
TRAIN_CMD = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]


def env_overrides() -> list[str]:
    """Overrides from $POLYINR_OVERRIDES, a JSON list of `section.key=value` strings."""
    raw = os.environ.get(ENV_OVERRIDES, "").strip()
    if not raw:
        return []
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"${ENV_OVERRIDES} must be a JSON list of strings, got {raw!r}")
    return value


def _retry(task, task_run, state) -> bool:
    """Retry a failed stage unless polyinr said the inputs are wrong (exit 2: a retry can't fix
    it). 75 (transient) is retried; 143 (pre-empted) and a kill are rerun, which resumes from
    the last checkpoint; so is a crash, in case it was the machine's."""
    try:
        state.result()
    except stage_process.StageFailed as e:
        return e.returncode != errors.USAGE
    except Exception:
        return True
    return True


# Stages and publish: 2 retries, 10 s then 20 s apart (+-50 %); DVC and the checkpoint store
# decide what is already done, so nothing is cached by Prefect.
RETRY = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)


def _run_dir(ws: Path):
    """The workspace's run folder, where `polyinr train` (dvc.yaml: --run-dir) logs its events."""
    from polyinr.training.rundir import DEFAULT, RunDir

    return RunDir(ws / DEFAULT)


def _skipped(name: str, message: str) -> Completed:
    return Completed(name="Skipped", message=message, data={"stage": name, "ran": False})


def _up_to_date(stage: str, logger, ws: Path) -> bool:
    """DVC's own check: `dvc status <stage>` reports no change."""
    changes = json.loads(pipeline.dvc(ws, "status", "--json", stage) or "{}")
    if changes:
        logger.info("%s changed: %s", stage, json.dumps(changes)[:2000])
    return not changes


def _task_name(parameters: dict) -> str:
    """A stage task's name (Prefect passes its parameters): the stage's, with the resolution
    of a progressive stage."""
    name, resolution = parameters["name"], parameters.get("resolution")
    return f"{name} ({resolution}px)" if resolution else name


@task(task_run_name=_task_name, retry_condition_fn=_retry, **RETRY)
def run_stage(name: str, ws: Path, up_to_date: bool, force: bool, resolution: int | None = None):
    """One task of the pipeline in workspace `ws`: a DVC stage, or `train@i`, progressive stage
    i of the DVC stage `train`. `Skipped` when `dvc status` said the DVC stage is up to date.

    A DVC stage (and the last train@i, which finishes the schedule and exports the generator)
    runs `dvc repro --single-item`, then the new dvc.lock is recorded beside the checkpoints.
    An earlier train@i runs the DVC stage's own command with `--until-stage i`, which resumes
    from the latest checkpoint and exits at once (reported `Skipped`) when the checkpoints are
    past the stage. Output streams into the Prefect log. Returns what it did, with the
    checkpoints training resumed from and wrote.
    """
    logger = get_run_logger()
    stage, _, index = name.partition("@")
    if up_to_date:
        logger.info("%s is up to date (dvc status): %s skipped", stage, name)
        return _skipped(name, f"dvc: {stage} is up to date")
    until = int(index) if stage == "train" and int(index) < len(_schedule(ws)) - 1 else None
    if until is None:
        dvc_stage = "train" if stage == "train" else name
        cmd = [DVC, "repro", "--single-item", dvc_stage] + (["--force"] if force else [])
    else:
        cmd = f"{TRAIN_CMD} --until-stage {until}"
    offset = _run_dir(ws).offset()
    returncode, lines = stage_process.stream(cmd, logger, ws)
    if returncode != 0:
        raise stage_process.StageFailed(name, returncode, lines[-40:])
    if until is None:
        _record(ws)
    events = _run_dir(ws).read_events(offset)
    if any(e["event"] == "already_complete" for e in events):
        return _skipped(name, f"checkpoints are past stage {index}")
    return stage_process.checkpoints(name, events)


def _schedule(ws: Path):
    """The workspace's train.stages."""
    return config.load(ws / "params.yaml").train.stages


def _store(ws: Path):
    """The checkpoint store of the workspace's run: its identity is tracking.run_name."""
    from polyinr.training.checkpoints import CheckpointStore

    cfg = config.load(ws / "params.yaml")
    return CheckpointStore(cfg.storage, cfg.tracking.run_name)


def _record(ws: Path) -> list[str]:
    """params.yaml and dvc.lock of the workspace, beside the run's checkpoints."""
    return pipeline.save_record(_store(ws), ws)


def _use_remote(ws: Path) -> str | None:
    """$POLYINR_DVC_REMOTE (if set) as the workspace's default DVC remote; its URL."""
    url = os.environ.get(ENV_DVC_REMOTE)
    if url:
        pipeline.dvc(ws, "remote", "add", "--local", "--force", "--default", "env", url)
    return url


@task(cache_policy=NO_CACHE)
def workspace(ws: Path, params: str | None, overrides: list[str], pull: bool) -> dict:
    """The flow run's workspace: a clean tree of the deployment's commit, the overrides in its
    params.yaml, and the pipeline state of the last run with the same identity (its recorded
    dvc.lock, outputs from the shared DVC cache or, with `pull`, the DVC remote)."""
    logger = get_run_logger()
    commit = pipeline.create_workspace(ROOT, ws, params)
    logger.info("workspace %s at commit %s", ws, commit)
    pipeline.write_overrides(overrides, ws / "params.yaml")
    cfg = config.load(ws / "params.yaml")
    pipeline.link_source(ROOT, ws, cfg.data.source)
    url = _use_remote(ws)
    restored = pipeline.load_record(_store(ws), ws, ["dvc.lock"])
    name = cfg.tracking.run_name
    logger.info("run %s: %s", name, "dvc.lock of its last run" if restored else "new run")
    if pull:
        logger.info("$ dvc pull --allow-missing (remote %s)", url or "default")
        try:
            pipeline.dvc(ws, "pull", "--allow-missing")
        except RuntimeError as e:  # a remote that is not there yet: DVC reruns what is missing
            logger.warning("dvc pull failed; continuing:\n%s", str(e)[-2000:])
    else:
        pipeline.dvc(ws, "checkout", "--allow-missing")
    return {"workspace": str(ws), "commit": commit, "run_name": name, "restored": bool(restored)}


def _push(logger, ws: Path) -> None:
    """`dvc push`: FFCV files, the final generator and every other cached output, to the
    default remote, or to $POLYINR_DVC_REMOTE when set."""
    url = _use_remote(ws)
    logger.info("$ dvc push (remote %s)", url or "default")
    logger.info(pipeline.dvc(ws, "push").strip() or "dvc push: nothing to push")


@task(**RETRY)
def publish(trained: dict | None, register_as: str | None, push: bool, ws: Path) -> dict:
    """Register the final generator in MLflow with its metrics, `dvc push` the outputs, record
    the pipeline state beside the checkpoints, and leave Prefect artifacts: the metrics table,
    the MLflow run link, the checkpoint URIs, how to restore the run."""
    logger = get_run_logger()
    with contextlib.chdir(ws):  # params' relative paths (sqlite:///mlflow.db) mean the workspace
        return _publish(logger, trained, register_as, push, ws)


def _publish(logger, trained: dict | None, register_as: str | None, push: bool, ws: Path):
    import torch

    from polyinr.commands import registry
    from polyinr.training import tracking

    cfg = config.load(ws / "params.yaml")
    metrics_path = ws / "metrics" / "eval.json"
    metrics = json.loads(metrics_path.read_text())
    generator = _run_dir(ws).generator
    meta = torch.load(generator, map_location="cpu", weights_only=True, mmap=True)["meta"]
    run_id = meta["mlflow_run_id"]
    create_markdown_artifact(pipeline.metrics_table(metrics_path), key="poly-inr-eval")

    url = tracking.run_url(cfg.tracking, run_id)
    out = {"mlflow_run_id": run_id, "mlflow_run": url, "run_name": cfg.tracking.run_name}
    if url.startswith("http"):
        # The description is what the flow-run page's Artifacts tab shows: the link itself.
        link = f"MLflow run {run_id}"
        described = f"The training's MLflow run: [{url}]({url})"
        create_link_artifact(url, link_text=link, key="mlflow-run", description=described)
    else:
        create_markdown_artifact(f"MLflow run: {url}", key="mlflow-run")

    store = _store(ws)
    written = (trained or {}).get("checkpoints", [])
    resumed = (trained or {}).get("resumed_from")
    rows = [{"checkpoint": uri, "event": "written by this run"} for uri in written]
    if resumed:
        rows.insert(0, {"checkpoint": resumed, "event": "training resumed from it"})
    if not rows:
        rows = [{"checkpoint": store.uri, "event": "folder (training was up to date)"}]
    create_table_artifact(rows, key="checkpoints", description=f"Checkpoints in {store.uri}")
    out["checkpoints"] = [r["checkpoint"] for r in rows]

    if push:  # before registering: a retry after a failed push registers nothing twice
        _push(logger, ws)
    out["record"] = _record(ws)
    restore = f"polyinr restore {cfg.tracking.run_name} storage.uri={cfg.storage.uri}"
    create_markdown_artifact(
        f"Pipeline state of run `{cfg.tracking.run_name}`: {', '.join(out['record'])}.\n\n"
        f"In a fresh checkout (with the DVC remote's credentials): `{restore}`",
        key="restore",
    )
    if register_as:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        tags = {f"eval.{k}": str(v) for k, v in numbers.items()}
        tags.update({k: str(metrics[k]) for k in ("protocol", "label") if k in metrics})
        # A pyfunc model (polyinr.commands.registry), loadable with mlflow.pyfunc.load_model.
        uri = registry.publish(
            generator, meta["resolution"], cfg.tracking, register_as, run_id, tags
        )
        version = uri.rsplit("/", 1)[1]
        logger.info("%s version %s is run %s", register_as, version, run_id)
        out["model_version"] = f"{register_as}/{version}"
    return out


def _selected(name: str, stages: list[str] | None) -> bool:
    """Whether a task runs: all do without a selection; `prepare` selects every `prepare@i`."""
    return stages is None or name in stages or name.partition("@")[0] in stages


def _workspace_path() -> Path:
    from prefect.runtime import flow_run

    base = os.environ.get(ENV_WORKSPACES) or ROOT / ".workspaces"
    return Path(base).resolve() / str(flow_run.get_id())


@flow(name="train-poly-inr")
def train_poly_inr(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    push: bool = False,
    register_as: str | None = "polyinr-generator",
    params: str | None = None,
) -> dict | None:
    """In a workspace of its own, apply params overrides, run the DVC stages (all, or the
    named ones), then publish.

    The tasks, in `dvc dag` order: workspace, demo_data, prepare@i (one per resolution),
    class_embeddings, train@i (one per progressive stage of the DVC stage `train`), evaluate;
    then publish.
    overrides: `section.key=value` strings, after those of $POLYINR_OVERRIDES.
    stages: run only these (DVC stage names, `prepare` or `train` for all of theirs, or
    `train@i`); no publish unless `evaluate` is among them.
    force: rerun the stages even when DVC says they are up to date.
    push: `dvc pull` what earlier runs pushed, at the start; `dvc push` the outputs (FFCV
    files, final generator) to the DVC remote at the end.
    register_as: the MLflow registered model to add the final generator to; null: don't.
    params: a params file of the repository to start from (default params.yaml), e.g.
    configs/imagenet-256.yaml.
    """

    ws = _workspace_path()
    try:
        workspace(ws, params, env_overrides() + list(overrides or []), push)
        return _run_stages(ws, stages, force, push, register_as)
    finally:
        pipeline.remove_workspace(ROOT, ws)


def _run_stages(ws: Path, stages, force: bool, push: bool, register_as) -> dict | None:
    order = pipeline.stage_order(ws)
    trains = [f"train@{i}" for i in range(len(_schedule(ws)))]  # progressive stages
    known = {*order, *trains, *(name.partition("@")[0] for name in order)}
    unknown = sorted(set(stages or []) - known)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline has {order}, with {trains}")
    results, resolutions = {}, [s.resolution for s in _schedule(ws)]
    for stage in order:
        names = trains if stage == "train" else [stage]
        up_to_date = None  # asked of DVC once per DVC stage, only when one of its tasks runs
        for name in filter(lambda n: _selected(n, stages), names):
            if up_to_date is None:
                up_to_date = not force and _up_to_date(stage, get_run_logger(), ws)
            px = resolutions[trains.index(name)] if stage == "train" else None
            state = run_stage(name, ws, up_to_date, force, px, return_state=True)
            results[name] = state.result()
    if stages is not None and "evaluate" not in stages:
        return None
    return publish(_training(results), register_as, push, ws)


def _training(results: dict) -> dict:
    """The train@i results merged: where training resumed from first, every checkpoint written."""
    out = {"resumed_from": None, "checkpoints": []}
    for name, result in results.items():
        if name.startswith("train@") and result.get("ran"):
            out["resumed_from"] = out["resumed_from"] or result.get("resumed_from")
            out["checkpoints"] += result.get("checkpoints", [])
    return out


if __name__ == "__main__":
    train_poly_inr(overrides=sys.argv[1:])
