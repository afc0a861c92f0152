"""The whole evaluate stage vs torch-fidelity's calculate_metrics on the same images, img/s.

Ours: `metrics.evaluate_generator` from an empty cache, i.e. the reference pass over a
prepared FFCV file, rendering the samples and every metric of the adm protocol (FID, sFID,
IS, precision/recall). Baseline: the same real and generated images given to torch-fidelity
as tensors: `calculate_metrics(fid, isc, prc)` with the Inception file, so that both score the
same metrics with the same network (seeded random weights saved as a file: speed only).
`python -m benchmarks.evaluate [--full]` prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks import device, row, sync
from polyinr import data
from polyinr.core import config
from polyinr.evaluation import featurenets, metrics
from polyinr.model.generator import Generator

ROOT = Path(__file__).resolve().parents[1]


class _Images(torch.utils.data.Dataset):
    """uint8 (3, R, R) images, the input torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _setup(tmp: Path, n: int, resolution: int, batch: int):
    """Prepared demo data (n images), the evaluate config, weights files and a generator.

    The Inception file holds seeded random weights.
    """
    weights = {"inception": tmp / "inception" / featurenets.WEIGHTS_FILE}
    weights["inception"].parent.mkdir()
    torch.save(featurenets._random_state_dict(seed=1), weights["inception"])
    overrides = [
        f"data.source={tmp / 'demo'}",
        f"data.out_dir={tmp / 'ffcv'}",
        "data.demo_classes=4",
        f"data.demo_per_class={n // 4}",
        f"data.demo_size={resolution}",
        "data.workers=1",
        "generator.num_classes=4",
        "eval.protocol=adm",
        f"eval.num_samples={n}",
        f"eval.batch={batch}",
        f"eval.inception_weights={weights['inception']}",
        "eval.allow_random_weights=false",
        f"storage.uri={tmp / 'storage'}",
    ]
    cfg = config.load(ROOT / "params.yaml", overrides)
    data.make_demo_dataset(Path(cfg.data.source), 4, n // 4, resolution, 0)
    data.prepare(cfg.data, [resolution], progress=False)
    torch.manual_seed(0)
    g = Generator(cfg.generator, resolution).eval().requires_grad_(False)
    return cfg, g, weights


def _ours(cfg, g, resolution: int, dev) -> tuple[dict, dict]:
    """The evaluate stage from an empty reference cache (local folder and storage alike)."""
    import dataclasses

    tmp = Path(tempfile.mkdtemp(prefix="cache-", dir=Path(cfg.storage.uri).parent))
    run_cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, cache_dir=str(tmp / "cache")),
        storage=dataclasses.replace(cfg.storage, uri=str(tmp / "storage")),
    )
    return metrics.evaluate_generator(run_cfg, g.to(dev), resolution, dev, False)


def _theirs(fakes, reals, weights: dict, batch: int, cuda: bool) -> dict:
    """torch-fidelity over the same images: FID, IS, P/R."""
    import torch_fidelity

    warnings.filterwarnings("ignore", "This DataLoader will create")  # its default workers
    common = dict(
        input1=_Images(fakes), input2=_Images(reals), cache=False, cuda=cuda, batch_size=batch,
        feature_extractor="inception-v3-compat", verbose=False,
    )  # fmt: skip
    return torch_fidelity.calculate_metrics(
        **common, fid=True, isc=True, prc=True,
        feature_extractor_weights_path=str(weights["inception"]),
    )  # fmt: skip


def _samples(cfg, g, dev) -> torch.Tensor:
    """The samples evaluate() draws: the same latents and classes, uint8 (N, 3, R, R)."""
    e = cfg.eval
    rng = torch.Generator().manual_seed(e.seed)
    z = torch.randn(e.num_samples, g.cfg.z_dim, generator=rng)
    c = torch.randint(0, g.cfg.num_classes, (e.num_samples,), generator=rng)
    with torch.no_grad():
        return metrics.to_uint8(g.to(dev)(z.to(dev), c.to(dev), psi=e.psi)).cpu()


def _timed(fn, dev):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - start


def run(quick: bool) -> list[dict]:
    """Rows {benchmark, case, ours, baseline, unit, ratio, note}; images/s, higher is better."""
    dev = device()
    cuda = dev.type == "cuda"
    n, resolution = (16, 32) if quick else ((2000, 64) if cuda else (48, 32))
    batch = 100 if cuda else 16
    with tempfile.TemporaryDirectory(prefix="polyinr-bench-") as tmp:
        cfg, g, weights = _setup(Path(tmp), n, resolution, batch)
        reals = torch.cat(
            [x for x, _ in data.read_all(data.beton_path(cfg.data.out_dir, resolution))]
        )
        fakes = _samples(cfg, g, dev)
        import torch_fidelity  # noqa: F401  (imported before the clock starts, for both)

        # One call each, after the set-up paid the one-off costs of both (FFCV's numba
        # compilation, importing torch-fidelity): these calls take minutes on 2 CPU cores.
        start = time.perf_counter()
        (ours_result, profile), ours_s = _timed(lambda: _ours(cfg, g, resolution, dev), dev)
        their_result, theirs_s = _timed(lambda: _theirs(fakes, reals, weights, batch, cuda), dev)
        wall = time.perf_counter() - start
    images = len(reals) + len(fakes)
    ours, theirs = images / ours_s, images / theirs_s
    agree = abs(ours_result["fid"] - their_result["frechet_inception_distance"])
    agree /= max(abs(their_result["frechet_inception_distance"]), 1e-12)
    profile = ", ".join(f"{k} {v:.1f} s" for k, v in profile.items())
    case = f"{len(fakes)} samples + {len(reals)} reals, {resolution}px, batch {batch}"
    note = (
        f"whole evaluate stage (empty reference cache) vs torch-fidelity calculate_metrics "
        f"(FID+IS+P/R; the same weights file); FID relative difference "
        f"{agree:.1e}; ours: {profile}; both calls {wall:.0f} s"
    )
    return [row("evaluate stage", case, ours, theirs, "img/s", note)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more images")
    for line in run(quick=not parser.parse_args().full):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
