"""Prefect flow `train-poly-inr`: the DVC pipeline's stages as tasks, then publish the result.

DVC owns the DAG and decides what is up to date: a stage whose `dvc status` is clean is
reported as `Skipped`, any other runs `dvc repro --single-item <stage>`. The tasks are
demo_data, prepare@i (DVC's per-resolution stages), train@i (one per progressive stage of
the DVC stage `train`: its command with --until-stage i, the last one the DVC stage itself)
and evaluate, then publish. Training resumes from its latest checkpoint by itself, so
rerunning a failed flow run redoes only what is missing. Overrides use DVC's grammar,
`section.key=value`; `POLYINR_OVERRIDES` (a JSON list) adds deployment-wide ones from the
environment, e.g. production's `storage.uri`.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import os
import re
import subprocess
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: dvc here, and `polyinr` for stage commands
DVC = str(BIN / "dvc")
ENV_OVERRIDES = "POLYINR_OVERRIDES"  # JSON list of section.key=value, before the run's own
ENV_DVC_REMOTE = "POLYINR_DVC_REMOTE"  # s3://bucket/prefix for `dvc push`; else .dvc/config's
USAGE_ERROR = 2  # polyinr's exit status for a bad config or a missing file: retrying can't help
# Lines of `polyinr train` that name checkpoints (see polyinr/train.py).
RESUMED = re.compile(r"resuming from (\S+/snapshot-(\d+)\.pt)")
SAVED = re.compile(r"-> (\S+/snapshot-\d+\.pt)\s*$")
ALREADY_COMPLETE = re.compile(r"^stage \d+ \(\d+px\) is already complete")
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


def stage_order(root: Path = ROOT) -> list[str]:
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
def apply_overrides(overrides: list[str], params: str | Path = ROOT / "params.yaml") -> None:
    """Validate `section.key=value` overrides and write them into params.yaml, keeping comments.

    The same effect as `dvc exp run -S`: the next `dvc repro` sees the changed params.
    """
    from ruamel.yaml import YAML

    from polyinr.config import load  # raises ConfigError naming the bad key and the valid ones

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
    tmp = params.with_name(f".{params.name}.tmp")
    yaml.dump(doc, tmp)
    try:
        if load(tmp) != expected:
            raise ValueError(f"overrides {overrides} do not round-trip through {params}")
        os.replace(tmp, params)
    finally:
        tmp.unlink(missing_ok=True)


def _transient(task, task_run, state) -> bool:
    """Retry a failed stage unless polyinr said the inputs are wrong (a retry can't fix it)."""
    try:
        state.result()
    except StageFailed as e:
        return e.returncode != USAGE_ERROR
    except Exception:
        return True
    return True


def _stream(cmd: str | list[str], logger) -> tuple[int, list[str]]:
    """Run a command (a shell line when a str) with its output in the Prefect log; returns
    the exit status and every non-empty output line."""
    logger.info("$ %s", cmd if isinstance(cmd, str) else " ".join(cmd))
    lines = []
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        shell=isinstance(cmd, str),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        for line in proc.stdout:
            if line := line.rstrip():
                lines.append(line)
                logger.info(line)
    return proc.returncode, lines


def _checkpoints(stage: str, lines: list[str]) -> dict:
    """What training said about checkpoints: the one it resumed from, the ones it wrote."""
    result = {"stage": stage, "ran": True, "resumed_from": None, "checkpoints": []}
    for line in lines:
        if match := RESUMED.search(line):
            result["resumed_from"] = match[1]
            result["resumed_nimg"] = int(match[2])
        elif match := SAVED.search(line):
            result["checkpoints"].append(match[1])
    return result


def _skipped(name: str, message: str) -> Completed:
    return Completed(name="Skipped", message=message, data={"stage": name, "ran": False})


def _up_to_date(stage: str, logger) -> bool:
    """DVC's own check: `dvc status <stage>` reports no change."""
    changes = json.loads(_dvc("status", "--json", stage) or "{}")
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
def run_stage(stage: str, force: bool = False):
    """One DVC stage: `Skipped` when `dvc status` says it is up to date, else `dvc repro
    --single-item`, its output streamed into the Prefect log. Returns what it did, with the
    checkpoints training resumed from and wrote."""
    logger = get_run_logger()
    if not force and _up_to_date(stage, logger):
        logger.info("%s is up to date (dvc status): skipped", stage)
        return _skipped(stage, f"dvc: {stage} is up to date")
    cmd = [DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    returncode, lines = _stream(cmd, logger)
    if returncode != 0:
        raise StageFailed(stage, returncode, lines[-40:])
    return _checkpoints(stage, lines)


@task(task_run_name="train@{index} ({resolution}px)", **STAGE_TASK)
def train_stage(index: int, resolution: int, final: bool, dvc_up_to_date: bool):
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
    returncode, lines = _stream(cmd, logger)
    if returncode != 0:
        raise StageFailed(name, returncode, lines[-40:])
    if any(ALREADY_COMPLETE.search(line) for line in lines):
        return _skipped(name, f"checkpoints are past stage {index} ({resolution}px)")
    return _checkpoints(name, lines)


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


def _push(logger) -> None:
    """`dvc push`: FFCV files, the final generator and every other cached output, to the
    default remote, or to $POLYINR_DVC_REMOTE (written to .dvc/config.local) when set."""
    url = os.environ.get(ENV_DVC_REMOTE)
    if url:
        _dvc("remote", "add", "--local", "--force", "--default", "env", url)
    logger.info("$ dvc push (remote %s)", url or "default")
    logger.info(_dvc("push").strip() or "dvc push: nothing to push")


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)
def publish(trained: dict | None, register_as: str | None, push: bool) -> dict:
    """Register the final generator in MLflow with its metrics, `dvc push` the outputs, and
    leave Prefect artifacts: the metrics table, the MLflow run link, the checkpoint URIs."""
    logger = get_run_logger()
    with contextlib.chdir(ROOT):  # params' relative paths (sqlite:///mlflow.db) mean the repo
        return _publish(logger, trained, register_as, push)


def _publish(logger, trained: dict | None, register_as: str | None, push: bool) -> dict:
    import torch

    from polyinr import registry, tracking
    from polyinr.config import load
    from polyinr.storage import CheckpointStore
    from polyinr.train import GENERATOR_PATH

    cfg = load(ROOT / "params.yaml")
    metrics_path = ROOT / "metrics" / "eval.json"
    metrics = json.loads(metrics_path.read_text())
    generator = ROOT / GENERATOR_PATH
    meta = torch.load(generator, map_location="cpu", weights_only=True, mmap=True)["meta"]
    run_id = meta["mlflow_run_id"]
    create_markdown_artifact(_metrics_table(metrics_path), key="poly-inr-eval")

    url = tracking.run_url(cfg.tracking, run_id)
    out = {"mlflow_run_id": run_id, "mlflow_run": url}
    if url.startswith("http"):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key="mlflow-run")
    else:
        create_markdown_artifact(f"MLflow run: {url}", key="mlflow-run")

    store_uri = CheckpointStore(cfg.storage, cfg.tracking.run_name).uri
    written = (trained or {}).get("checkpoints", [])
    resumed = (trained or {}).get("resumed_from")
    rows = [{"checkpoint": uri, "event": "written by this run"} for uri in written]
    if resumed:
        rows.insert(0, {"checkpoint": resumed, "event": "training resumed from it"})
    if not rows:
        rows = [{"checkpoint": store_uri, "event": "folder (training was up to date)"}]
    create_table_artifact(rows, key="checkpoints", description=f"Checkpoints in {store_uri}")
    out["checkpoints"] = [r["checkpoint"] for r in rows]

    if push:  # before registering: a retry after a failed push registers nothing twice
        _push(logger)
    if register_as:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        tags = {f"eval.{k}": str(v) for k, v in numbers.items()}
        tags.update({k: str(metrics[k]) for k in ("protocol", "label") if k in metrics})
        # A pyfunc model (polyinr.registry), loadable with mlflow.pyfunc.load_model.
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


@flow(name="train-poly-inr")
def train_poly_inr(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    push: bool = False,
    register_as: str | None = "polyinr-generator",
) -> dict | None:
    """Apply params overrides, run the DVC stages (all, or the named ones), then publish.

    The tasks, in `dvc dag` order: demo_data, prepare@i (one per resolution), train@i (one
    per progressive stage of the DVC stage `train`), evaluate; then publish.
    overrides: `section.key=value` strings, after those of $POLYINR_OVERRIDES.
    stages: run only these (DVC stage names, `prepare` or `train` for all of theirs, or
    `train@i`); no publish unless `evaluate` is among them.
    force: rerun the stages even when DVC says they are up to date.
    push: `dvc push` the outputs (FFCV files, final generator) to the DVC remote.
    register_as: the MLflow registered model to add the final generator to; null: don't.
    """
    from polyinr.config import load

    apply_overrides(env_overrides() + list(overrides or []))
    order = stage_order()
    schedule = load(ROOT / "params.yaml").train.stages
    trains = [f"train@{i}" for i in range(len(schedule))]
    known = {*order, *trains, *(name.partition("@")[0] for name in order)}
    unknown = sorted(set(stages or []) - known)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline has {order}, with {trains}")
    results = {}
    for stage in order:
        if stage != "train":
            if _selected(stage, stages):
                results[stage] = run_stage(stage, force=force, return_state=True).result()
            continue
        up_to_date = not force and _up_to_date("train", get_run_logger())
        for index, step in enumerate(schedule):
            if _selected(trains[index], stages):
                final = index == len(schedule) - 1
                state = train_stage(index, step.resolution, final, up_to_date, return_state=True)
                results[trains[index]] = state.result()
    if stages is not None and "evaluate" not in stages:
        return None
    return publish(_training(results), register_as, push)


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
