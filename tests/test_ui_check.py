"""The MLflow UI as users look at it (scripts/ui_check.py): the page checks fail on pages that
lack what they look for, and, slow, two tiny runs on a real server pass them in Chromium."""

import importlib.util
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ui_check.py"
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


def page(*text: str, images=()) -> "ui_check._Text":
    p = ui_check._Text()
    p.text, p.images = list(text), list(images)
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


@pytest.mark.slow
def test_the_mlflow_ui_shows_both_runs_their_curves_and_sample_grids(tmp_path):
    """`make ui-check`: two finished tiny runs (different train.lr_g) on an MLflow server on
    127.0.0.1, their runs table, compare page, loss charts and sample grid previews rendered
    by headless Chromium and checked against the REST API."""
    assert shutil.which("chromium"), "no chromium: scripts/install.sh installs it"
    assert ui_check.run_check(tmp_path / "ui", None) == []
