"""Prefect flow `train-poly-inr`: the DVC pipeline's stages as tasks, then publish the result.

DVC owns the DAG and decides what is up to date: a stage whose `dvc status` is clean is
reported as `Skipped`, any other runs `dvc repro --single-item <stage>`. Training resumes
from its latest checkpoint by itself, so rerunning a failed flow run redoes only what is
missing. Overrides use DVC's grammar, `section.key=value`; `POLYINR_OVERRIDES` (a JSON list)
adds deployment-wide ones from the environment, e.g. production's `storage.uri`.
"""

from __future__ import annotations

import collections
import contextlib
import graphlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


@task(
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),  # 10 s, then 20 s
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,  # DVC decides what is up to date
)
def run_stage(stage: str, force: bool = False):
    """One DVC stage: `Skipped` when `dvc status` says it is up to date, else `dvc repro
    --single-item`, its output streamed into the Prefect log. Returns what it did, with the
    checkpoints training resumed from and wrote."""
    logger = get_run_logger()
    if not force:
        changes = json.loads(_dvc("status", "--json", stage) or "{}")
        if not changes:
            logger.info("%s is up to date (dvc status): skipped", stage)
            return Completed(
                name="Skipped",
                message=f"dvc: {stage} is up to date",
                data={"stage": stage, "ran": False},
            )
        logger.info("%s changed: %s", stage, json.dumps(changes)[:2000])
    cmd = [DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("$ %s", " ".join(cmd))
    result = {"stage": stage, "ran": True, "resumed_from": None, "checkpoints": []}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            logger.info(line)
            if match := RESUMED.search(line):
                result["resumed_from"] = match[1]
                result["resumed_nimg"] = int(match[2])
            elif match := SAVED.search(line):
                result["checkpoints"].append(match[1])
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, list(tail))
    return result


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


@flow(name="train-poly-inr")
def train_poly_inr(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    push: bool = False,
    register_as: str | None = "polyinr-generator",
) -> dict | None:
    """Apply params overrides, run the DVC stages (all, or the named ones), then publish.

    overrides: `section.key=value` strings, after those of $POLYINR_OVERRIDES.
    stages: run only these DVC stages (no publish unless `evaluate` is among them).
    force: rerun the stages even when DVC says they are up to date.
    push: `dvc push` the outputs (FFCV files, final generator) to the DVC remote.
    register_as: the MLflow registered model to add the final generator to; null: don't.
    """
    apply_overrides(env_overrides() + list(overrides or []))
    order = stage_order()
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline has {order}")
    results = {}
    for stage in order:
        if stages is None or stage in stages:
            results[stage] = run_stage(stage, force=force, return_state=True).result()
    if stages is not None and "evaluate" not in stages:
        return None
    return publish(results.get("train"), register_as, push)


if __name__ == "__main__":
    train_poly_inr(overrides=sys.argv[1:])
