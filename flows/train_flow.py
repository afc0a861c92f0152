"""Prefect flow that runs the DVC pipeline stage by stage, with retries and logs per stage.

DVC owns the DAG and the caching; this flow only asks DVC for the stage order and runs
`dvc repro --single-item <stage>` for each. Overrides use DVC's grammar, `section.key=value`.
"""

from __future__ import annotations

import collections
import graphlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: dvc here, and `polyinr` for stage commands
DVC = str(BIN / "dvc")


def _env() -> dict[str, str]:
    """The environment for DVC: the venv's bin first so stage commands find `polyinr`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def stage_order(root: Path = ROOT) -> list[str]:
    """The pipeline's stage names in an order DVC can run them, read from `dvc dag --dot`."""
    dag = subprocess.run(
        [DVC, "dag", "--dot"], cwd=root, env=_env(), capture_output=True, text=True
    )
    if dag.returncode != 0:
        raise RuntimeError(f"dvc dag failed:\n{dag.stdout}{dag.stderr}")
    dot = dag.stdout
    graph: dict[str, set[str]] = {n: set() for n in re.findall(r'^"([^"]+)";$', dot, re.M)}
    for upstream, downstream in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M):
        graph.setdefault(downstream, set()).add(upstream)
    return list(graphlib.TopologicalSorter(graph).static_order())


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


@task(
    task_run_name="dvc-repro-{stage}",
    retries=2,
    retry_delay_seconds=[10, 60],
    cache_policy=NO_CACHE,  # DVC decides what is up to date
)
def repro(stage: str, force: bool = False) -> None:
    """Run one DVC stage, streaming its output into the Prefect log."""
    logger = get_run_logger()
    cmd = [DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("$ %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} exited with {proc.returncode}:\n" + "\n".join(tail))


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


@flow(name="train-poly-inr")
def train_poly_inr(
    overrides: list[str] | None = None, stages: list[str] | None = None, force: bool = False
) -> None:
    """Apply params overrides, then run the DVC pipeline's stages (all, or the named ones)."""
    apply_overrides(overrides or [])
    order = stage_order()
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline has {order}")
    for stage in order:
        if stages is None or stage in stages:
            repro(stage, force=force)
    metrics = ROOT / "metrics" / "eval.json"
    if metrics.is_file():
        create_markdown_artifact(_metrics_table(metrics), key="poly-inr-eval")


if __name__ == "__main__":
    train_poly_inr(overrides=sys.argv[1:])
