"""The MLflow and Prefect UIs as users look at them (scripts/ui_check.py): the page checks fail
on pages that lack what they look for, and, slow, two tiny runs on a real MLflow server and a
deployment run on a real Prefect server with a worker pass them in Chromium."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ui_check.py"
sys.path.insert(0, str(SCRIPT.parent))  # its modules browser and ui_servers, as when run
spec = importlib.util.spec_from_file_location("ui_check", SCRIPT)
ui_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ui_check)

RUNS = [
    {"name": "lr_g-0.0002", "params": {"train.lr_g": "0.0002"}, "loss_steps": [16, 32],
     "metrics": {"loss/g": 1.7978727817535400, "loss/d": 6.61275577545166}},
    {"name": "lr_g-0.002", "params": {"train.lr_g": "0.002"}, "loss_steps": [16, 32],
     "metrics": {"loss/g": 1.6352437734603882, "loss/d": 6.726238489151001}},
]  # fmt: skip
WANT = {"experiment_id": "1", "runs": RUNS}


TASKS = ["workspace-c0d", "demo_data", "prepare@0", "class_embeddings", "train@0 (16px)"]
TASKS += ["evaluate", "publish-db1"]
LINK = "http://127.0.0.1:5000/#/experiments/1/runs/d460e6db8210?workflowType=machine_learning"
FLOW_RUN = {
    "state": "COMPLETED",
    "tasks": dict.fromkeys(TASKS, "Completed"),
    "logs": ["Worker 'ProcessWorker 1' submitting flow run '2'", "\tgit add dvc.lock"]
    + [f"line {i}\nits second line" for i in range(18)],
    "mlflow_link": LINK,
    "mlflow_status": "FINISHED",
}


def page(*text: str, images=(), links=()) -> "ui_check.PageText":
    p = ui_check.PageText()
    p.text, p.images, p.links = list(text), list(images), list(links)
    return p


def test_the_runs_table_check_passes_the_runs_and_fails_the_genai_overview():
    """The runs table passes with both runs, their losses and dataset; the GenAI overview
    MLflow 3 opens by default, or a table without metric columns, fails."""
    table = ["Training runs", "Run Name", "Dataset", "loss/d", "loss/g"]
    for run in RUNS:
        table += [run["name"], "demo-16px (54d160dd4c94)", "training"]
        table += [repr(run["metrics"]["loss/d"]), repr(run["metrics"]["loss/g"])]
    assert ui_check.check_runs_table(page(*table), WANT) == []
    overview = page("Overview", "Traces", "0", "No data available for the selected time range")
    assert len(ui_check.check_runs_table(overview, WANT)) >= 5
    bare = [t for t in table if not t.startswith(("loss", "demo", "1.", "6."))]
    failures = ui_check.check_runs_table(page(*bare), WANT)
    assert any("no loss/g column" in f for f in failures)
    assert any("dataset" in f for f in failures)


def test_the_compare_check_needs_each_run_s_lr_g_in_the_parameter_row():
    """The compare page passes with the lr_g row holding both runs' values in order; a row
    with one value missing fails."""
    text = ["Parallel Coordinates Plot", "lr_g-0.0002", "lr_g-0.002", "Parameters"]
    text += ["train.lr_g", "0.0002", "0.002", "Metrics", "loss/g", "1.798", "1.635"]
    assert ui_check.check_compare(page(*text), WANT) == []
    text[text.index("0.002")] = "-"
    assert ui_check.check_compare(page(*text), WANT) == ["compare: no parameter row train.lr_g "
                                                         "| 0.0002 | 0.002"]  # fmt: skip


def test_curves_and_artifact_checks_fail_without_charts_or_a_preview():
    """A loss chart against steps and an image preview pass; a page without them fails."""
    run = RUNS[0]
    charts = page("loss", "(2)", "g", "Step", f"{run['name']} (loss/g)")
    assert ui_check.check_curves(charts, run) == []
    assert ui_check.check_curves(page("acc", "Step"), run) != []
    assert ui_check.check_curves(charts, dict(run, loss_steps=[64])) != []
    png = "images/samples+step+32+timestamp+1+u.png"
    assert ui_check.check_artifact(page(images=[(png, "blob:http://x/1")]), png) == []
    assert ui_check.check_artifact(page("Select a file to preview"), png) != []


def test_the_stages_check_needs_every_stage_listed_as_completed():
    """The Task Runs tab passes with each stage's row and state; a missing row fails, and so
    does the Logs tab, which names the task runs beside their log lines."""
    rows = [t for name in TASKS for t in (name, "+0", "Completed", "2s")]
    assert ui_check.check_stages(page("7 Task runs", *rows), FLOW_RUN) == []
    failures = ui_check.check_stages(page(*rows[4:]), FLOW_RUN)
    assert failures == ["task runs: workspace-c0d not listed as Completed"]
    logs = [t for name in TASKS for t in (name, "prefect.task_runs", "Info", "Completed()")]
    assert len(ui_check.check_stages(page(*logs), FLOW_RUN)) == len(TASKS)
    failed = dict(FLOW_RUN, state="FAILED", tasks={**FLOW_RUN["tasks"], "evaluate": "Failed"})
    failures = ui_check.check_stages(page(*rows), failed)
    assert failures[:2] == ["flow run: FAILED", "task runs: evaluate is Failed"]


def test_the_logs_check_needs_the_first_20_lines():
    """The Logs tab passes showing the first 20 log lines (first lines, stripped); a page
    that lacks one, or a run that logged fewer, fails."""
    shown = [m.split("\n")[0].strip() for m in FLOW_RUN["logs"]]
    assert ui_check.check_logs(page("Logs", *shown, "11:22:55 PM"), FLOW_RUN) == []
    assert ui_check.check_logs(page(*shown[1:]), FLOW_RUN) == [
        "logs: \"Worker 'ProcessWorker 1' submitting flow run '2'\" not shown"
    ]
    few = dict(FLOW_RUN, logs=FLOW_RUN["logs"][:5])
    assert ui_check.check_logs(page(*shown), few) == ["logs: 5 log lines only"]


def test_the_mlflow_link_check_needs_the_link_to_a_finished_run():
    """The Artifacts tab passes with the link to the MLflow run's page; a card without it
    (no description), a killed run or a run without a link artifact fails."""
    assert ui_check.check_mlflow_link(page("mlflow-run", links=[LINK]), FLOW_RUN) == []
    bare = page("mlflow-run", "No description")
    assert ui_check.check_mlflow_link(bare, FLOW_RUN) == [f"artifacts: no link to {LINK}"]
    killed = dict(FLOW_RUN, mlflow_status="KILLED")
    assert ui_check.check_mlflow_link(page(links=[LINK]), killed) != []
    assert ui_check.check_mlflow_link(bare, dict(FLOW_RUN, mlflow_link=None)) != []


@pytest.mark.slow
def test_the_uis_show_the_runs_their_curves_grids_and_the_flow_run_s_stages(tmp_path):
    """`make ui-check`: two finished tiny runs (different train.lr_g) on an MLflow server on
    127.0.0.1, their runs table, compare page, loss charts and sample grid previews; then a
    Prefect server and worker, a deployment run of train-poly-inr and its flow-run page's
    stages, logs and MLflow link; rendered by headless Chromium and checked against the REST
    APIs."""
    assert shutil.which("chromium"), "no chromium: scripts/install.sh installs it"
    assert ui_check.run_check(tmp_path / "ui", None) == []
