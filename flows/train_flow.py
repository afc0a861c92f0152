"""Prefect flow `train-poly-inr`: the DVC pipeline's stages as tasks, then publish the result.

Each flow run works in its own workspace, a clean tree of the deployment's commit under
$POLYINR_WORKSPACES (polyinr/commands/pipeline.py), so concurrent runs never share params.yaml,
dvc.lock or outputs; overrides go into the workspace's params.yaml only. DVC owns the DAG and
decides what is up to date: a stage whose `dvc status` is clean is reported as `Skipped`, any
other runs `dvc repro --single-item <stage>`. The tasks are demo_data, prepare@i (DVC's
per-resolution stages), train@i (one per progressive stage of the DVC stage `train`: its
command with --until-stage i, the last one the DVC stage itself) and evaluate, then publish.
After each stage the workspace's params.yaml and dvc.lock are recorded beside the run's
checkpoints; a later run of the same params starts from that record (and the DVC cache or
remote), and training resumes from its latest checkpoint, so rerunning redoes only what is
missing. SIGTERM reaches training, which checkpoints and exits; the flow run ends Crashed.
Overrides use DVC's grammar, `section.key=value`; `POLYINR_OVERRIDES` (a JSON list) adds
deployment-wide ones from the environment, e.g. production's `storage.uri`.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: dvc here, and `polyinr` for stage commands
DVC = str(BIN / "dvc")
ENV_OVERRIDES = "POLYINR_OVERRIDES"  # JSON list of section.key=value, before the run's own
ENV_DVC_REMOTE = "POLYINR_DVC_REMOTE"  # s3://bucket/prefix for `dvc pull/push`; else .dvc/config's
ENV_WORKSPACES = "POLYINR_WORKSPACES"  # where flow runs' workspaces go (default .workspaces/)
USAGE_ERROR = 2  # polyinr's exit status for a bad config or a missing file: retrying can't help
# The DVC stage's command ($POLYINR_TRAIN_LAUNCHER polyinr train), run per progressive stage.
TRAIN_CMD = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]


class StageFailed(RuntimeError):
    """A DVC stage that exited non-zero; the message ends with its last output lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode = stage, returncode
        super().__init__(f"stage {stage} exited with {returncode}:\n" + "\n".join(tail))


def _env() -> dict[str, str]:
    """The environment for DVC: the venv's bin first so stage commands find `polyinr`; progress
    bars refresh every few seconds, not every batch, in the Prefect log."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("TQDM_MININTERVAL", "5")
    return env


def _dvc(*args: str, root: Path = ROOT) -> str:
    """Run a quick DVC command; its stdout, or RuntimeError with its output."""
    proc = subprocess.run([DVC, *args], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def stage_order(root: Path) -> list[str]:
    """The pipeline's stage names in an order DVC can run them, read from `dvc dag --dot`."""
    dot = _dvc("dag", "--dot", root=root)
    graph: dict[str, set[str]] = {n: set() for n in re.findall(r'^"([^"]+)";$', dot, re.M)}
    for upstream, downstream in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M):
        graph.setdefault(downstream, set()).add(upstream)
    return list(graphlib.TopologicalSorter(graph).static_order())


def env_overrides() -> list[str]:
    """Overrides from $POLYINR_OVERRIDES, a JSON list of `section.key=value` strings."""
    raw = os.environ.get(ENV_OVERRIDES, "").strip()
    if not raw:
        return []
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"${ENV_OVERRIDES} must be a JSON list of strings, got {raw!r}")
    return value


@task(cache_policy=NO_CACHE)
def apply_overrides(overrides: list[str], params: str | Path) -> None:
    """Validate `section.key=value` overrides and write them into a params file (a flow run's
    workspace's), keeping comments.

    The same effect as `dvc exp run -S`: the next `dvc repro` there sees the changed params.
    """
    from ruamel.yaml import YAML

    from polyinr.core.config import load  # raises ConfigError naming the bad key and the valid ones
    from polyinr.core.storage import write_atomic

    params = Path(params)
    expected = load(params, overrides)
    if not overrides:
        return
    yaml = YAML()  # round-trip: comments, flow style and float spelling survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    null = "tag:yaml.org,2002:null"  # ruamel would write None as an empty value
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar(null, "null"))
    doc = yaml.load(params)
    for override in overrides:
        key, _, value = override.partition("=")
        *sections, leaf = key.strip().split(".")
        node = doc
        for section in sections:
            node = node[section]
        old, new = node[leaf], yaml.load(value)
        if hasattr(old, "fa") and hasattr(new, "fa") and not old.fa.flow_style():
            new.fa.set_block_style()  # a block list stays a block list
        node[leaf] = new
    # Write beside the target, check it reads back as the validated config, then replace.
    with write_atomic(params) as tmp:
        yaml.dump(doc, tmp)
        if load(tmp) != expected:
            raise ValueError(f"overrides {overrides} do not round-trip through {params}")


def _transient(task, task_run, state) -> bool:
    """Retry a failed stage unless polyinr said the inputs are wrong (a retry can't fix it)."""
    try:
        state.result()
    except StageFailed as e:
        return e.returncode != USAGE_ERROR
    except Exception:
        return True
    return True


class _ForwardSigterm:
    """While a stage runs, SIGTERM (pre-emption, `stack.sh down`, a pod's end) goes to the
    stage's process group: training checkpoints and exits 143. Once its output has ended,
    `chain` hands the signal to Prefect's handler, which ends the flow run Crashed (or
    Cancelled when Prefect itself asked)."""

    def __init__(self, pgid: int):
        self.pgid, self.received, self.previous = pgid, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def chain(self) -> None:
        if callable(self.previous):
            self.previous(signal.SIGTERM, None)  # Prefect's: raises TerminationSignal
        raise SystemExit(128 + signal.SIGTERM)


def _stream(cmd: str | list[str], logger, cwd: Path) -> tuple[int, list[str]]:
    """Run a command (a shell line when a str) in `cwd`, its own process group, with its
    output in the Prefect log; returns the exit status and every non-empty output line."""
    logger.info("$ %s", cmd if isinstance(cmd, str) else " ".join(cmd))
    lines = []
    with (
        subprocess.Popen(
            cmd,
            cwd=cwd,
            env=_env(),
            shell=isinstance(cmd, str),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc,
        _ForwardSigterm(proc.pid) as sigterm,
    ):
        # Until every process holding the pipe (DVC, torchrun, training ranks) has exited.
        for line in proc.stdout:
            if line := line.rstrip():
                lines.append(line)
                logger.info(line)
    if sigterm.received:
        logger.warning("SIGTERM: %s stopped (exit %s)", cmd, proc.returncode)
        sigterm.chain()
    return proc.returncode, lines


def _run_dir(ws: Path):
    """The workspace's run folder, where `polyinr train` (dvc.yaml: --run-dir) logs its events."""
    from polyinr.training.rundir import DEFAULT, RunDir

    return RunDir(ws / DEFAULT)


def _checkpoints(stage: str, events: list[dict]) -> dict:
    """What training's event log says about checkpoints: the one it resumed from, the ones it
    wrote."""
    result = {"stage": stage, "ran": True, "resumed_from": None, "checkpoints": []}
    for event in events:
        if event["event"] == "run_started" and event["resumed_from"]:
            result["resumed_from"] = event["resumed_from"]
            result["resumed_nimg"] = event["nimg"]
        elif event["event"] == "checkpoint":
            result["checkpoints"].append(event["uri"])
    return result


def _skipped(name: str, message: str) -> Completed:
    return Completed(name="Skipped", message=message, data={"stage": name, "ran": False})


def _up_to_date(stage: str, logger, ws: Path) -> bool:
    """DVC's own check: `dvc status <stage>` reports no change."""
    changes = json.loads(_dvc("status", "--json", stage, root=ws) or "{}")
    if changes:
        logger.info("%s changed: %s", stage, json.dumps(changes)[:2000])
    return not changes


STAGE_TASK = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),  # 10 s, then 20 s
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,  # DVC (and the checkpoint store inside training) decide what is done
)


@task(task_run_name="{stage}", **STAGE_TASK)
def run_stage(stage: str, ws: Path, force: bool = False):
    """One DVC stage in workspace `ws`: `Skipped` when `dvc status` says it is up to date, else
    `dvc repro --single-item`, its output streamed into the Prefect log, then the new
    dvc.lock recorded. Returns what it did, with the checkpoints training resumed from and
    wrote."""
    logger = get_run_logger()
    if not force and _up_to_date(stage, logger, ws):
        logger.info("%s is up to date (dvc status): skipped", stage)
        return _skipped(stage, f"dvc: {stage} is up to date")
    cmd = [DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    offset = _run_dir(ws).offset()
    returncode, lines = _stream(cmd, logger, ws)
    if returncode != 0:
        raise StageFailed(stage, returncode, lines[-40:])
    _record(ws)
    return _checkpoints(stage, _run_dir(ws).read_events(offset))


@task(task_run_name="train@{index} ({resolution}px)", **STAGE_TASK)
def train_stage(index: int, resolution: int, final: bool, dvc_up_to_date: bool, ws: Path):
    """Progressive stage `index` of the DVC stage `train`.

    Skipped when DVC says `train` is up to date. Otherwise a stage before the last runs the
    DVC stage's own command with `--until-stage index`, which resumes from the latest
    checkpoint and exits at once (reported `Skipped`) when the checkpoints are already past
    the stage; the last stage runs `dvc repro --single-item train`, which finishes the
    schedule, exports the generator and records the result in dvc.lock.
    """
    logger = get_run_logger()
    name = f"train@{index}"
    if dvc_up_to_date:
        logger.info("train is up to date (dvc status): %s skipped", name)
        return _skipped(name, "dvc: train is up to date")
    if final:
        cmd = [DVC, "repro", "--single-item", "train"]
    else:
        cmd = f"{TRAIN_CMD} --until-stage {index}"
    offset = _run_dir(ws).offset()
    returncode, lines = _stream(cmd, logger, ws)
    if returncode != 0:
        raise StageFailed(name, returncode, lines[-40:])
    if final:
        _record(ws)
    events = _run_dir(ws).read_events(offset)
    if any(e["event"] == "already_complete" for e in events):
        return _skipped(name, f"checkpoints are past stage {index} ({resolution}px)")
    return _checkpoints(name, events)


def _metrics_table(path: Path) -> str:
    """A markdown table of a (possibly nested) metrics JSON file."""

    def rows(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from rows(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield f"| {prefix} | {node} |"

    lines = ["| metric | value |", "|---|---|", *rows("", json.loads(path.read_text()))]
    return f"## Evaluation ({path.name})\n\n" + "\n".join(lines)


def _store(ws: Path):
    """The checkpoint store of the workspace's run: its identity is tracking.run_name."""
    from polyinr.core.config import load
    from polyinr.training.checkpoints import CheckpointStore

    cfg = load(ws / "params.yaml")
    return CheckpointStore(cfg.storage, cfg.tracking.run_name)


def _record(ws: Path) -> list[str]:
    """params.yaml and dvc.lock of the workspace, beside the run's checkpoints."""
    from polyinr.commands import pipeline

    return pipeline.save_record(_store(ws), ws)


def _use_remote(ws: Path) -> str | None:
    """$POLYINR_DVC_REMOTE (if set) as the workspace's default DVC remote; its URL."""
    url = os.environ.get(ENV_DVC_REMOTE)
    if url:
        _dvc("remote", "add", "--local", "--force", "--default", "env", url, root=ws)
    return url


@task(cache_policy=NO_CACHE)
def workspace(ws: Path, params: str | None, overrides: list[str], pull: bool) -> dict:
    """The flow run's workspace: a clean tree of the deployment's commit, the overrides in its
    params.yaml, and the pipeline state of the last run with the same identity (its recorded
    dvc.lock, outputs from the shared DVC cache or, with `pull`, the DVC remote)."""
    from polyinr.commands import pipeline
    from polyinr.core.config import load

    logger = get_run_logger()
    commit = pipeline.create_workspace(ROOT, ws, params)
    logger.info("workspace %s at commit %s", ws, commit)
    apply_overrides.fn(overrides, ws / "params.yaml")
    cfg = load(ws / "params.yaml")
    pipeline.link_source(ROOT, ws, cfg.data.source)
    url = _use_remote(ws)
    restored = pipeline.load_record(_store(ws), ws, ["dvc.lock"])
    name = cfg.tracking.run_name
    logger.info("run %s: %s", name, "dvc.lock of its last run" if restored else "new run")
    if pull:
        logger.info("$ dvc pull --allow-missing (remote %s)", url or "default")
        proc = subprocess.run(
            [DVC, "pull", "--allow-missing"], cwd=ws, env=_env(), capture_output=True, text=True
        )
        if proc.returncode != 0:  # a remote that is not there yet: DVC reruns what is missing
            logger.warning("dvc pull failed; continuing:\n%s", (proc.stdout + proc.stderr)[-2000:])
    else:
        _dvc("checkout", "--allow-missing", root=ws)
    return {"workspace": str(ws), "commit": commit, "run_name": name, "restored": bool(restored)}


def _push(logger, ws: Path) -> None:
    """`dvc push`: FFCV files, the final generator and every other cached output, to the
    default remote, or to $POLYINR_DVC_REMOTE when set."""
    url = _use_remote(ws)
    logger.info("$ dvc push (remote %s)", url or "default")
    logger.info(_dvc("push", root=ws).strip() or "dvc push: nothing to push")


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)
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
    from polyinr.core.config import load
    from polyinr.training import tracking

    cfg = load(ws / "params.yaml")
    metrics_path = ws / "metrics" / "eval.json"
    metrics = json.loads(metrics_path.read_text())
    generator = _run_dir(ws).generator
    meta = torch.load(generator, map_location="cpu", weights_only=True, mmap=True)["meta"]
    run_id = meta["mlflow_run_id"]
    create_markdown_artifact(_metrics_table(metrics_path), key="poly-inr-eval")

    url = tracking.run_url(cfg.tracking, run_id)
    out = {"mlflow_run_id": run_id, "mlflow_run": url, "run_name": cfg.tracking.run_name}
    if url.startswith("http"):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key="mlflow-run")
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
    train@i (one per progressive stage of the DVC stage `train`), evaluate; then publish.
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
    from polyinr.commands import pipeline
    from polyinr.core.config import load

    ws = _workspace_path()
    try:
        workspace(ws, params, env_overrides() + list(overrides or []), push)
        return _run_stages(
            ws, load(ws / "params.yaml").train.stages, stages, force, push, register_as
        )
    finally:
        pipeline.remove_workspace(ROOT, ws)


def _run_stages(ws: Path, schedule, stages, force: bool, push: bool, register_as) -> dict | None:
    order = stage_order(ws)
    trains = [f"train@{i}" for i in range(len(schedule))]
    known = {*order, *trains, *(name.partition("@")[0] for name in order)}
    unknown = sorted(set(stages or []) - known)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline has {order}, with {trains}")
    results = {}
    for stage in order:
        if stage != "train":
            if _selected(stage, stages):
                results[stage] = run_stage(stage, ws, force=force, return_state=True).result()
            continue
        up_to_date = not force and _up_to_date("train", get_run_logger(), ws)
        for index, step in enumerate(schedule):
            if _selected(trains[index], stages):
                final = index == len(schedule) - 1
                state = train_stage(
                    index, step.resolution, final, up_to_date, ws, return_state=True
                )
                results[trains[index]] = state.result()
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
