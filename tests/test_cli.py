"""The `polyinr` command: help on every subcommand, clear errors, the summary's counts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polyinr import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["demo-data", "prepare", "train", "evaluate", "generate", "summary"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    """`polyinr COMMAND --help` describes the command and the override grammar."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "section.key=value" in out and "--params" in out


def test_unknown_key_exits_2_naming_the_valid_keys(capsys, monkeypatch):
    """A typo in an override is one line on stderr that names the key and the valid ones."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["summary", "--skip-discriminator", "generator.hiden=3"]) == 2
    err = capsys.readouterr().err
    assert "generator.hiden" in err and "'hidden'" in err


def test_summary_reports_the_paper_generator(capsys, monkeypatch):
    """`polyinr summary --params configs/imagenet-256.yaml` gives 45,869,695 parameters."""
    monkeypatch.chdir(ROOT)
    assert (
        cli.main(["summary", "--skip-discriminator", "--params", "configs/imagenet-256.yaml"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["generator"]["total"] == 45_869_695
    assert out["generator"]["mapping"] == 669_248
    assert out["macs_per_image"]["256"] == pytest.approx(689e9, rel=0.01)


def test_python_dash_m_is_the_same_command():
    """`python -m polyinr --help` runs the CLI (what torchrun -m polyinr launches)."""
    proc = subprocess.run(
        [sys.executable, "-m", "polyinr", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "demo-data" in proc.stdout


def test_seed_ranges():
    """'0-3,7' means seeds 0, 1, 2, 3 and 7."""
    assert cli._seeds("0-3,7") == [0, 1, 2, 3, 7]
