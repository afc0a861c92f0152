"""Tests for the benchmark runner (python -m benchmarks): discovery, rows, the table."""

import sys

import numpy as np
import pytest

import benchmarks
from benchmarks import __main__ as runner


@pytest.fixture
def extra_modules(tmp_path, monkeypatch):
    """Benchmark modules written to a folder the package also searches."""
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])

    def write(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)

    yield write
    for path in tmp_path.glob("*.py"):
        sys.modules.pop(f"benchmarks.{path.stem}", None)


def test_row_ratio_is_higher_is_better():
    """row() divides ours by the baseline for throughputs and the other way for costs."""
    assert benchmarks.row("b", "c", 30.0, 10.0, "img/s")["ratio"] == 3.0
    assert benchmarks.row("b", "c", 30.0, 10.0, "MiB", lower_is_better=True)["ratio"] == 1 / 3


def test_a_new_module_joins_the_table(extra_modules, capsys):
    """A module with run(quick) is discovered, run with --quick, and its rows printed."""
    extra_modules(
        "zz_fake",
        "from benchmarks import row\n"
        "def run(quick):\n"
        "    return [row('fake', f'quick={quick}', 4.0, 2.0, 'img/s', note='n')]\n",
    )
    extra_modules("zz_helper", "X = 1\n")  # no run(): not a benchmark
    modules, broken = runner.discover()
    assert "zz_fake" in modules and "zz_helper" not in modules and not broken
    assert list(modules)[:2] == ["generator", "train_step"]
    assert runner.main(["--quick", "--only", "zz_fake"]) == 0
    out = capsys.readouterr().out
    assert "| fake | quick=True | 4 | 2 | img/s | 2 | n |" in out


def test_a_broken_module_fails_the_run_but_not_the_table(extra_modules, capsys):
    """A module that raises becomes a FAILED row and a non-zero exit; others still print."""
    extra_modules(
        "zz_ok",
        "from benchmarks import row\ndef run(quick):\n    return [row('ok', 'c', 1.0, 1.0, 'x')]\n",
    )
    extra_modules("zz_bad", "def run(quick):\n    raise RuntimeError('boom')\n")
    extra_modules("zz_noimport", "import module_that_does_not_exist\n")
    assert runner.main(["--only", "zz_ok", "--only", "zz_bad", "--only", "zz_noimport"]) == 1
    out = capsys.readouterr().out
    assert "| ok | c |" in out
    assert "| zz_bad | FAILED" in out and "| zz_noimport | FAILED to import" in out


def test_rows_without_the_required_keys_are_refused(extra_modules):
    """A row lacking ours/baseline/ratio is an error that names the module."""
    extra_modules("zz_partial", "def run(quick):\n    return [{'benchmark': 'p', 'case': 'c'}]\n")
    with pytest.raises(ValueError, match="zz_partial"):
        runner.main(["--only", "zz_partial"])


def test_unknown_module_names_the_available_ones(capsys):
    """--only with a wrong name exits with the list of modules."""
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])
    assert "generator" in capsys.readouterr().err


def test_loader_benchmark_builds_a_valid_data_config(tmp_path):
    """The loader benchmark's hand-built DataConfig keeps up with the config's fields."""
    from benchmarks import loader

    cfg = loader._config(tmp_path / "src", tmp_path / "out", workers=1)
    assert cfg.scan_cache is None and cfg.source == str(tmp_path / "src")


def test_evaluate_benchmark_joins_the_table_and_sets_up_a_valid_stage(tmp_path):
    """benchmarks.evaluate is discovered, and its set-up (params, data, generator, samples)
    keeps up with the config and the evaluate stage."""
    from benchmarks import evaluate

    assert "evaluate" in runner.discover()[0]
    cfg, g, weights = evaluate._setup(tmp_path, n=8, resolution=16, batch=4)
    assert all(path.is_file() for path in weights.values())
    assert cfg.eval.num_samples == 8 and not cfg.eval.allow_random_weights
    assert tuple(evaluate._samples(cfg, g, "cpu").shape) == (8, 3, 16, 16)


def test_feature_network_limits_run_the_networks_own_convolutions():
    """The conv and matmul limits of the metrics benchmark replay every convolution of one
    forward pass with its shapes, and count 2 x multiply-adds as its FLOPs."""
    import torch
    import torch.nn as nn

    from benchmarks import metrics

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 5, 1)

        def forward(self, images):
            return {"f": self.b(self.a(images.float())).mean((2, 3))}

    calls = metrics._conv_calls(Tiny(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert [(tuple(s), tuple(o)) for _, s, o in calls] == [
        ((2, 3, 8, 8), (2, 4, 4, 4)),
        ((2, 4, 4, 4), (2, 5, 4, 4)),
    ]
    assert metrics._flops(calls) == 2 * (27 * 4 * 32 + 4 * 5 * 32)
    metrics._conv_limit(calls, torch.device("cpu"), torch.float32)()
    metrics._matmul_limit(calls, torch.device("cpu"), torch.float32)()


def test_colour_distance_sees_a_collapse_onto_one_hue():
    """The learning benchmark's colour distance is 0 for the same images, near 1 for images
    of disjoint colours, and larger for a set collapsed onto one hue than for fresh images
    of the same distribution."""
    import torch

    from benchmarks import learning
    from polyinr.data import demo

    def images(seed, n=24):
        cells = [
            demo.demo_image("shapes", 0, np.random.default_rng([seed, i]), 16, 4) for i in range(n)
        ]
        x = torch.from_numpy(np.stack([np.asarray(c) for c in cells])).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1, torch.zeros(n, dtype=torch.long)

    (a, la), (b, lb) = images(0), images(1)
    h = learning.colour_histograms(a, la, 1)
    assert learning.colour_distance(h, h) == 0
    fresh = learning.colour_distance(learning.colour_histograms(b, lb, 1), h)
    green = torch.zeros_like(a)
    green[:, 1] = 0.8
    collapsed = learning.colour_distance(learning.colour_histograms(green, la, 1), h)
    assert fresh < 0.5 < collapsed <= 1


def test_learning_rows_report_mean_worst_seed_and_floors():
    """Each dataset gives accuracy, diversity, colour, FID and judge-Frechet rows: the mean
    over seeds, the worst seed in the note, each beside its real-vs-real floor."""
    from benchmarks import learning

    finals = {
        s: {"accuracy": a, "diversity": 0.8, "colour": 0.3, "frechet": 5.0, "fid": f}
        for s, a, f in ((0, 0.9, 20.0), (1, 0.7, 40.0))
    }
    floors = {"accuracy": 1.0, "diversity": 1.0, "colour": 0.2, "frechet": 0.5, "fid": 10.0}
    rows = learning.rows_of(
        "glyphs", {"finals": finals, "floors": floors, "budget": 9, "seconds": 60}, learning.OUT
    )
    assert [r["case"].split(" (")[0] for r in rows] == [
        "accuracy",
        "diversity",
        "colour distance",
        "FID, pretrained Inception",
        "Frechet distance, judge features",
    ]
    assert rows[0]["ours"] == pytest.approx(0.8) and "worst seed 0.700" in rows[0]["note"]
    assert rows[3]["ours"] == pytest.approx(30.0) and rows[3]["baseline"] == 10.0
    assert "worst seed 40.0" in rows[3]["note"] and "chance 0.10" in rows[0]["note"]


def test_train_step_limit_replays_the_products_flop_counter_counts():
    """The train-step benchmark's recorder finds every product FlopCounterMode counts (linear,
    transposed convolutions, forward and backward) with the same FLOPs, a grouped convolution
    as a product per group, and its matmul limit runs them."""
    import torch
    import torch.nn as nn
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import train_step

    def record(net, x):
        with FlopCounterMode(display=False) as counter, train_step.Products() as products:
            net(x).square().sum().backward()
        flops = sum(2 * g * m * k * n for g, m, k, n in products.shapes)
        return products.shapes, flops, counter.get_flop_counts()["Global"]

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ConvTranspose2d(8, 4, 2, 2),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 5),
    )
    shapes, flops, counts = record(net, torch.randn(2, 3, 8, 8, requires_grad=True))
    assert len(shapes) == 9 and flops == sum(counts.values()) > 0
    train_step._matmul_limit(shapes, torch.device("cpu"))()
    # FlopCounterMode counts a grouped convolution's weight gradient as an ungrouped one's.
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    shapes, _, counts = record(grouped, torch.randn(2, 8, 8, 8))
    assert shapes == [(4, 128, 18, 2), (4, 18, 128, 2)]  # 4 x [128, 18] x [18, 2], its grad
    assert 2 * 4 * 128 * 18 * 2 == counts[torch.ops.aten.convolution]
