"""The `polyinr` command: help on every subcommand, clear errors, the summary's counts."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tiny import TINY_GENERATOR

from polyinr.commands import cli, sample
from polyinr.core import config, errors
from polyinr.model import sampling
from polyinr.model.generator import Generator, save_generator

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "demo-data",
    "prepare",
    "train",
    "evaluate",
    "generate",
    "interpolate",
    "mix",
    "publish",
    "restore",
    "class-embeddings",
    "summary",
]


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
    assert sample._seeds("0-3,7") == [0, 1, 2, 3, 7]


TINY = dataclasses.replace(TINY_GENERATOR, levels=10)


@pytest.fixture
def tiny_generator(tmp_path, single_thread):
    """An exported tiny 10-level generator trained at 8 x 8 (random weights)."""
    torch.manual_seed(0)
    path = tmp_path / "generator.pt"
    save_generator(Generator(TINY, 8), path, {"resolution": 8, "cur_nimg": 0})
    return str(path)


def run(*argv):
    assert cli.main([*argv, "--device", "cpu", "--quiet"]) == 0


def test_generate_grid_pngs_and_npz_hold_the_same_samples(tiny_generator, tmp_path):
    """One (classes x seeds) request as a grid, PNG files and an ADM npz: same pixels."""
    common = ["generate", "--generator", tiny_generator, "--classes", "0", "2", "--seeds", "3-5"]
    run(*common, "--psi", "0.7", "--out", str(tmp_path / "s.npz"))
    run(*common, "--psi", "0.7", "--out", str(tmp_path / "pngs"))
    run(*common, "--psi", "0.7", "--out", str(tmp_path / "grid.png"))
    data = np.load(tmp_path / "s.npz")
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files][:2] == ["000000-class0-seed3.png", "000001-class0-seed4.png"]
    assert np.array_equal(np.stack([np.asarray(Image.open(f)) for f in files]), images)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid, sampling.tile(images, rows=2))


def test_generate_renders_any_resolution_and_compares_them(tiny_generator, tmp_path):
    """--resolution 4 16 shows each sample at both sizes, the small one enlarged."""
    out = tmp_path / "cmp.png"
    run("generate", "--generator", tiny_generator, "--seeds", "0", "--resolution", "4", "16",
        "--out", str(out))  # fmt: skip
    assert np.asarray(Image.open(out)).shape == (16, 32, 3)
    npz = tmp_path / "wide.npz"
    run("generate", "--generator", tiny_generator, "--seeds", "0", "--resolution", "6x20",
        "--view", "0", "-1", "1", "2", "--out", str(npz))  # fmt: skip
    assert np.load(npz)["arr_0"].shape == (1, 6, 20, 3)


def test_interpolate_writes_gif_mp4_and_strip(tiny_generator, tmp_path):
    """A looped walk through 3 keys: 3 x 4 frames in the GIF and the MP4, 5 in the strip."""
    outs = [tmp_path / "walk.gif", tmp_path / "walk.mp4", tmp_path / "strip.png"]
    run("interpolate", "--generator", tiny_generator, "--classes", "1", "--seeds", "0-2",
        "--steps", "4", "--loop", "--strip-frames", "5", "--fps", "10",
        "--out", *map(str, outs))  # fmt: skip
    gif = Image.open(outs[0])
    # Pillow merges frames that look the same after quantisation, adding their durations.
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    assert sum(durations) == 12 * 100 and gif.size == (8, 8)
    cv2 = pytest.importorskip("cv2")
    assert int(cv2.VideoCapture(str(outs[1])).get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert np.asarray(Image.open(outs[2])).shape == (8, 5 * 8 + 4 * 2, 3)


def test_mix_grid_has_targets_on_top_and_sources_on_the_left(tiny_generator, tmp_path):
    """Mixing all levels makes every row a copy of its source; the header row is the targets."""
    out = tmp_path / "mix.png"
    run("mix", "--generator", tiny_generator, "--levels", "0:10", "--source-seeds", "0-1",
        "--target-seeds", "2-4", "--out", str(out))  # fmt: skip
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 8 + 2 * 2, 4 * 8 + 3 * 2, 3)
    cell = lambda r, c: grid[r * 10 : r * 10 + 8, c * 10 : c * 10 + 8]  # noqa: E731
    for r in (1, 2):
        for c in (2, 3):
            assert np.array_equal(cell(r, c), cell(r, 0))
    assert not np.array_equal(cell(0, 1), cell(1, 0))


def test_sampling_commands_explain_bad_input(tiny_generator, capsys):
    """Unequal key lists, unknown level presets and odd file types exit 2 with a reason."""
    base = ["--generator", tiny_generator, "--device", "cpu", "--quiet"]
    assert cli.main(["interpolate", *base, "--classes", "0", "1", "--seeds", "0-2"]) == 2
    assert "2 classes and 3 seeds" in capsys.readouterr().err
    assert cli.main(["mix", *base, "--levels", "eyes"]) == 2
    assert "shape, style or START:STOP" in capsys.readouterr().err
    assert cli.main(["interpolate", *base, "--out", "walk.avi"]) == 2
    assert ".gif or .mp4" in capsys.readouterr().err


def test_demo_data_takes_trailing_overrides(tmp_path, monkeypatch):
    """`polyinr demo-data DIR section.key=value`: DIR is the folder, the rest overrides."""
    monkeypatch.chdir(ROOT)
    argv = ["demo-data", str(tmp_path / "demo"), "data.demo_classes=2", "data.demo_per_class=1"]
    assert cli.main([*argv, "data.demo_size=8", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "demo" / "train").iterdir()) == [
        "n00000000",
        "n00000001",
    ]


def test_overrides_after_a_many_valued_option_are_overrides(tiny_generator, tmp_path, capsys):
    """`interpolate --out w.gif w.png section.key=value`: --out keeps the files only, and the
    override is still checked (a typo exits 2 naming it)."""
    outs = [str(tmp_path / "w.gif"), str(tmp_path / "w.png")]
    base = ["interpolate", "--generator", tiny_generator, "--seeds", "0-1", "--steps", "2"]
    argv = [*base, "--params", str(ROOT / "params.yaml"), "--out", *outs]
    run(*argv, "tracking.run_name=walk")
    assert all(Path(p).is_file() for p in outs)
    assert cli.main([*argv, "tracking.run_nam=walk", "--device", "cpu", "--quiet"]) == 2
    assert "tracking.run_nam" in capsys.readouterr().err


def test_sampling_takes_the_class_count_from_the_generator_file(tmp_path, capsys):
    """Classes come from the file: class 7 of a 3-class generator, or any class but 0 of an
    unconditional one, is refused in one line naming both; random classes of an
    unconditional generator are all 0."""
    torch.manual_seed(0)
    conditional, unconditional = str(tmp_path / "c.pt"), str(tmp_path / "u.pt")
    save_generator(Generator(TINY, 8), conditional, {"resolution": 8, "cur_nimg": 0})
    plain = dataclasses.replace(TINY, conditional=False)
    save_generator(Generator(plain, 8), unconditional, {"resolution": 8, "cur_nimg": 0})
    base = ["--device", "cpu", "--quiet", "--seeds", "0", "--out", str(tmp_path / "x.png")]
    assert cli.main(["generate", "--generator", conditional, "--classes", "7", *base]) == 2
    err = capsys.readouterr().err
    assert "class 7 requested" in err and "has 3 classes" in err and len(err.splitlines()) == 1
    for command in ("generate", "interpolate", "mix"):
        flag = "--source-classes" if command == "mix" else "--classes"
        argv = [command, "--generator", unconditional, flag, "2", "--device", "cpu", "--quiet"]
        assert cli.main([*argv, "--out", str(tmp_path / f"{command}.png")]) == 2, command
        assert "unconditional" in capsys.readouterr().err
    run("generate", "--generator", unconditional, "--classes", "random", "--seeds", "0-3",
        "--out", str(tmp_path / "u.npz"))  # fmt: skip
    assert np.load(tmp_path / "u.npz")["arr_1"].tolist() == [0, 0, 0, 0]


def test_a_generator_file_of_another_version_is_refused_in_one_line(tmp_path, capsys):
    """A config key this code does not know (or weights that do not fit) exit 2 in one line."""
    torch.manual_seed(0)
    path = tmp_path / "g.pt"
    save_generator(Generator(TINY, 8), path, {"resolution": 8, "cur_nimg": 0})
    state = torch.load(path, weights_only=True)
    state["config"]["fourier_features"] = 16
    torch.save(state, path)
    argv = ["generate", "--generator", str(path), "--out", str(tmp_path / "x.png")]
    assert cli.main([*argv, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another polyinr version" in err and "fourier_features" in err
    assert len(err.splitlines()) == 1
    del state["config"]["fourier_features"]
    state["g_ema"]["synthesis.to_rgb.weight"] = torch.zeros(3, 5)
    torch.save(state, path)
    assert cli.main([*argv, "--device", "cpu", "--quiet"]) == 2
    assert "weights do not fit" in capsys.readouterr().err


def test_class_embeddings_of_data_with_another_class_count_are_refused(tmp_path, capsys):
    """`class-embeddings` compares generator.num_classes with the prepared data first."""
    from polyinr import data

    data.make_demo_dataset(tmp_path / "demo", 3, 1, 8, 0)
    common = [
        "--params", str(ROOT / "params.yaml"), f"data.source={tmp_path / 'demo'}",
        f"data.out_dir={tmp_path / 'ffcv'}", "data.workers=1",
        "train.stages=[{resolution: 8, kimg: 1}]",
    ]  # fmt: skip
    assert cli.main(["prepare", "--quiet", *common]) == 0
    argv = ["class-embeddings", "--allow-random-weights", "--device", "cpu", "--quiet", *common]
    assert cli.main([*argv, "generator.num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert "generator.num_classes=5 but" in err and "lists 3 classes" in err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_exits_75_in_one_line_and_records_the_code(tmp_path):
    """S3 that does not answer is transient: exit 75 (EX_TEMPFAIL), one stderr line, no
    traceback; $POLYINR_EXIT_FILE receives the same code."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "POLYINR_EXIT_FILE": str(tmp_path / "code"),
    }
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    overrides = ["storage.uri=s3://b/p", f"storage.endpoint_url={endpoint}", "storage.retries=1"]
    cmd = [sys.executable, "-m", "polyinr", "checkpoints", "list", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == errors.TRANSIENT == 75, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polyinr checkpoints: error: cannot reach")
    assert (tmp_path / "code").read_text().strip() == "75"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.ConfigError("train.bach: unknown key"), 2),
        (errors.DataError("no FFCV file"), 2),
        (errors.MissingWeightsError("no weights"), 2),
        (errors.StorageError("access denied"), 2),
        (errors.StorageUnavailable("503 after 5 attempts"), 75),
        (errors.Preempted("stopped by SIGTERM"), 143),
    ],
)
def test_each_error_exits_with_its_code_in_one_line(error, code, monkeypatch, capsys):
    """Every error class of polyinr.core.errors reaches the shell as its code and one line."""

    def fail(*args):
        raise error

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(config, "load", fail)
    assert cli.main(["summary"]) == code
    what = "" if code == errors.PREEMPTED else "error: "
    assert capsys.readouterr().err == f"polyinr summary: {what}{error}\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An error outside the model is a bug: it propagates (a traceback, exit 1)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(config, "load", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["summary"])
