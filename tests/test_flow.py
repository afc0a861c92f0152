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

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
TINY = [  # the whole pipeline in a couple of minutes on 2 CPU cores
    "train.stages=[{resolution: 16, kimg: 0.064}]",
    "data.demo_per_class=8",
    "eval.num_samples=16",
]


@pytest.fixture
def train_flow(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # flows/ lives in the repository, not the package
    return importlib.import_module("flows.train_flow")


def _comments(text: str) -> list[str]:
    return [line.partition("#")[2] for line in text.splitlines() if "#" in line]


def test_apply_overrides_validates_and_keeps_comments(train_flow, tmp_path):
    """An unknown key fails with the config's message and leaves the file alone; valid
    overrides change only their own lines and read back as the validated config."""
    from polyinr.config import ConfigError, load

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(ConfigError, match="no_such_key"):
        train_flow.apply_overrides.fn(["train.no_such_key=1"], params=params)
    assert params.read_text() == before

    overrides = ["train.batch=16", "data.demo_per_class=8"]
    train_flow.apply_overrides.fn(overrides, params=params)
    after = params.read_text()
    assert load(params) == load(ROOT / "params.yaml", overrides)
    assert _comments(after) == _comments(before)
    assert len(after.splitlines()) == len(before.splitlines())
    changed = [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 2, changed
    assert list(tmp_path.iterdir()) == [params]  # no temporary file left behind


@pytest.mark.slow
def test_flow_runs_every_stage_as_a_task(tmp_path, repo_copy):
    """`python flows/train_flow.py OVERRIDES...` runs each DVC stage as a completed Prefect
    task, writes metrics/eval.json and publishes it as a markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    repo = repo_copy
    stages = subprocess.run(
        [DVC, "stage", "list", "--name-only"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.split()
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        cmd = [sys.executable, str(repo / "flows" / "train_flow.py"), *TINY]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            task_runs = client.read_task_runs()
            artifacts = client.read_artifacts()
    assert flow_run.name and flow_run.state.is_completed()
    repros = {t.name: t.state.is_completed() for t in task_runs if t.name.startswith("dvc-")}
    assert repros == {f"dvc-repro-{stage}": True for stage in stages}
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    (artifact,) = [a for a in artifacts if a.key == "poly-inr-eval"]
    assert all(name in artifact.data for name in metrics)
