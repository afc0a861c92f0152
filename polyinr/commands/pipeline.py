"""A flow run's own workspace (a clean copy of the deployment's commit) and the run's record
of the pipeline state (params.yaml + dvc.lock beside its checkpoints), from which a fresh
checkout recovers everything with `polyinr restore` (docs/orchestration.md)."""

from __future__ import annotations

import graphlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from polyinr.core import config
from polyinr.core.storage import write_atomic
from polyinr.training.checkpoints import CheckpointStore

DVC = str(Path(sys.executable).parent / "dvc")
# Untracked inputs and stores every workspace shares with the deployment's checkout: weights
# and class embeddings, local checkpoints and MLflow store, caches (reference statistics).
SHARED = ("weights", "checkpoints", "mlflow.db", "mlartifacts", ".cache")
# Copied without git: never pipeline outputs, local state or tool caches.
NOT_COPIED = {
    ".git",
    ".venv",
    ".workspaces",
    ".stack",
    ".prefect",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "data",
    "samples",
    "dvc_plots",
    *SHARED,
}
# The pipeline's state, kept beside the checkpoints: stored name -> path in the checkout.
# The metrics files are `cache: false` outputs (git's, not DVC's): `dvc pull` cannot bring them.
RECORD = {
    "params.yaml": "params.yaml",
    "dvc.lock": "dvc.lock",
    "metrics-eval.json": "metrics/eval.json",
    "run-train.csv": "run/train.csv",
    "run-fid.csv": "run/fid.csv",
}
ENV_CACHE = "POLYINR_DVC_CACHE"  # a DVC cache shared by all workspaces (default: root's)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def env() -> dict[str, str]:
    """The environment for DVC: the venv's bin first so stage commands find `polyinr`; progress
    bars refresh every few seconds, not every batch, in a log."""
    out = {**os.environ, "PATH": f"{Path(DVC).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out.setdefault("TQDM_MININTERVAL", "5")
    return out


def dvc(where: Path, *args: str) -> str:
    """Run a quick DVC command in `where`; its stdout, or RuntimeError with its output."""
    proc = subprocess.run([DVC, *args], cwd=where, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {where}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def stage_order(where: Path) -> list[str]:
    """The pipeline's stage names in an order DVC can run them, read from `dvc dag --dot`."""
    dot = dvc(where, "dag", "--dot")
    graph: dict[str, set[str]] = {n: set() for n in re.findall(r'^"([^"]+)";$', dot, re.M)}
    for upstream, downstream in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M):
        graph.setdefault(downstream, set()).add(upstream)
    return list(graphlib.TopologicalSorter(graph).static_order())


def write_overrides(overrides: list[str], params: str | Path) -> None:
    """Validate `section.key=value` overrides and write them into a params file, keeping
    comments: the same effect as `dvc exp run -S`, so the next `dvc repro` sees them."""
    from ruamel.yaml import YAML

    params = Path(params)
    expected = config.load(params, overrides)  # ConfigError naming the bad key and valid ones
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
        if config.load(tmp) != expected:
            raise ValueError(f"overrides {overrides} do not round-trip through {params}")


def metrics_table(path: Path) -> str:
    """A markdown table of a (possibly nested) metrics JSON file."""

    def rows(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from rows(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield f"| {prefix} | {node} |"

    lines = ["| metric | value |", "|---|---|", *rows("", json.loads(path.read_text()))]
    return f"## Evaluation ({path.name})\n\n" + "\n".join(lines)


def create_workspace(root: Path, dest: Path, params: str | None = None) -> str:
    """A clean tree of `root`'s commit at `dest`: a git worktree at HEAD, or without git a copy
    of the tree minus outputs. It shares root's DVC cache (hard links: no copies of the data),
    DVC remotes and untracked inputs (SHARED). params: a params file (relative to root) to
    use as params.yaml, e.g. configs/imagenet-256.yaml. Returns the commit, or "copy"."""
    root, dest = Path(root).resolve(), Path(dest)
    remove_workspace(root, dest)  # left by a killed try of the same flow run (flow-run retry)
    _git(root, "worktree", "prune")
    dest.parent.mkdir(parents=True, exist_ok=True)
    head = _git(root, "rev-parse", "HEAD")
    if (root / ".git").exists() and head.returncode == 0:
        commit = head.stdout.strip()
        added = _git(root, "worktree", "add", "--detach", str(dest), commit)
        if added.returncode != 0:
            raise RuntimeError(f"git worktree add {dest} failed: {added.stderr}")
    else:
        commit = "copy"
        shutil.copytree(root, dest, symlinks=True, ignore=_not_copied(root))
        dvc(dest, "config", "--local", "core.no_scm", "true")
    local = root / ".dvc" / "config.local"  # remotes and credentials configured by hand
    if local.is_file():
        shutil.copy2(local, dest / ".dvc" / "config.local")
    cache = os.environ.get(ENV_CACHE) or str(root / ".dvc" / "cache")
    dvc(dest, "cache", "dir", "--local", cache)
    dvc(dest, "config", "--local", "cache.type", "reflink,hardlink,copy")
    for name in SHARED:
        target = root / name
        if name == "mlflow.db":
            target.touch()  # SQLite creates it at the link's target; an empty file is a DB
        elif not target.exists():
            target.mkdir()
        (dest / name).unlink(missing_ok=True)
        (dest / name).symlink_to(target)
    if params:
        shutil.copy2(dest / params, dest / "params.yaml")
    return commit


def _not_copied(root: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder).resolve() == root:
            return {n for n in names if n in NOT_COPIED}
        if Path(folder).resolve() == root / "run":  # git's curves, not the run's outputs
            return {n for n in names if not n.endswith(".csv")}
        inside_dvc = Path(folder).name == ".dvc"
        return {n for n in names if n == "__pycache__" or (inside_dvc and n != "config")}

    return ignore


def link_source(root: Path, dest: Path, source: str) -> None:
    """Link data.source into the workspace when it is a relative path that exists only in
    root (an ImageNet folder or tar linked there), unless a pipeline stage writes it."""
    outs = {
        out if isinstance(out, str) else next(iter(out))
        for stage in yaml.safe_load((dest / "dvc.yaml").read_text())["stages"].values()
        for out in stage.get("do", stage).get("outs", [])
    }
    target, link = Path(root) / source, Path(dest) / source
    if Path(source).is_absolute() or source in outs or link.exists() or not target.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def remove_workspace(root: Path, dest: Path) -> None:
    """Delete a workspace (the links in it, never what they point to)."""
    if (Path(dest) / ".git").is_file():
        _git(root, "worktree", "remove", "--force", str(dest))
    if Path(dest).exists():
        shutil.rmtree(dest)


def save_record(store: CheckpointStore, where: Path) -> list[str]:
    """Copy params.yaml, dvc.lock and the metrics files of `where` beside the run's
    checkpoints; their URIs."""
    uris = []
    for name, relative in RECORD.items():
        path = Path(where) / relative
        if path.is_file():
            store.write(name, path.read_bytes())
            uris.append(f"{store.uri}/{name}")
    return uris


def restore(store: CheckpointStore, where: Path, pull: bool = True) -> list[str]:
    """Bring the run of `store` back into the checkout `where`: its recorded params.yaml,
    dvc.lock and metrics files, then (pull) `dvc pull` of its outputs; the names restored."""
    found = load_record(store, where)
    if "dvc.lock" not in found:
        raise FileNotFoundError(f"no dvc.lock recorded in {store.uri} (storage.uri, run name?)")
    if pull:
        subprocess.run([DVC, "pull"], cwd=where, check=True)
    return found


def load_record(store: CheckpointStore, where: Path, names=RECORD) -> list[str]:
    """Write the run's recorded files (of `names`) into `where`; the names found."""
    found = []
    for name in names:
        data = store.read(name)
        if data is not None:
            path = Path(where) / RECORD[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            found.append(name)
    return found
