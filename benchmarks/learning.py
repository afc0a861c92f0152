"""Does training learn? The demo recipe on a fixed budget, judged by a network outside training.

`python -m benchmarks --only learning [--quick]` (or `python -m benchmarks.learning
[--quick] [--out DIR]`) makes the demo data, converts it, computes the class embeddings,
trains the demo schedule of params.yaml (one checkpoint per `SNAPSHOT_KIMG`) and judges
every checkpoint's EMA generator with a small classifier trained here on *other* real demo
images (never seen by the GAN):

- conditional accuracy: share of samples the judge puts in the class they were drawn for
  (chance = 1 / classes); floor = the judge's accuracy on held-out real images;
- diversity: per class, mean pairwise judge-feature distance of samples over that of real
  images, averaged over classes (1 = as diverse as the data; ~0 = collapse);
- Frechet distance between judge features of samples and of the GAN's training images;
  floor = the same distance for held-out real images.

Each number sits beside its real-vs-real floor. The curve (accuracy against kimg) goes to
the training run in MLflow and to <out>/curve.csv; the last generator's grid (one row per
class) to <out>/grid.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks import row
from polyinr import data
from polyinr.core import config
from polyinr.model.generator import Generator, seed_latents, to_uint8
from polyinr.model.sampling import grid as render_grid
from polyinr.training import checkpoints, embedding, tracking
from polyinr.training.run import train

OUT = Path(".cache/learning")
SNAPSHOT_KIMG = 1.0
SAMPLES_PER_CLASS = 64
JUDGE_SEEDS = (1001, 1002)  # demo_seed of the judge's train and held-out images


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


def real_images(classes: int, per_class: int, size: int, seed: int, root: Path):
    """Demo images (another seed than training's) as (N, 3, size, size) in [-1, 1], labels."""
    folder = root / f"judge-{seed}"
    data.make_demo_dataset(folder, classes, per_class, size, seed)
    images, labels = [], []
    for label in range(classes):
        for path in sorted((folder / "train" / f"n{label:08d}").iterdir()):
            images.append(np.array(Image.open(path).convert("RGB")))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(labels)


def train_judge(x, y, classes: int, epochs: int = 8, seed: int = 0) -> Judge:
    """Adam on real images with random flips and shifts; eval mode after."""
    torch.manual_seed(seed)
    judge = Judge(classes)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            xb = x[idx]
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


@dataclasses.dataclass
class Reference:
    """The judge and the real images it compares samples with."""

    judge: Judge
    classes: int
    resolution: int
    train_feats: torch.Tensor  # the GAN's own training images
    train_labels: torch.Tensor
    held_preds: torch.Tensor  # held-out real images (the floor)
    held_feats: torch.Tensor
    held_labels: torch.Tensor

    def floors(self) -> dict:
        """The real-vs-real values: held-out real images judged like samples."""
        return {
            "accuracy": float((self.held_preds == self.held_labels).float().mean()),
            "diversity": diversity(
                self.held_feats, self.held_labels, self.train_feats, self.train_labels
            ),
            "frechet": frechet(self.held_feats, self.train_feats),
        }

    @torch.no_grad()
    def score(self, g: Generator, seed: int = 0) -> dict:
        """Conditional accuracy, diversity and Frechet distance of g's samples (psi 1)."""
        labels = torch.arange(self.classes).repeat_interleave(SAMPLES_PER_CLASS)
        z = seed_latents(range(seed, seed + len(labels)), g.cfg.z_dim)
        images = torch.cat(
            [g(zb, cb) for zb, cb in zip(z.split(128), labels.split(128), strict=True)]
        )
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=self.resolution, mode="bilinear", antialias=True)
        images = to_uint8(images).float() / 127.5 - 1  # as exported: what a user sees
        preds, feats = judge_features(self.judge, images)
        return {
            "accuracy": float((preds == labels).float().mean()),
            "diversity": diversity(feats, labels, self.train_feats, self.train_labels),
            "frechet": frechet(feats, self.train_feats),
        }


def reference(cfg, resolution: int, root: Path) -> Reference:
    """Train the judge on fresh demo images; features of the GAN's data and held-out data."""
    d = cfg.data
    k = d.demo_classes
    x, y = real_images(k, 200, d.demo_size, JUDGE_SEEDS[0], root)
    held_x, held_y = real_images(k, 100, d.demo_size, JUDGE_SEEDS[1], root)
    gan_x, gan_y = real_images(k, d.demo_per_class, d.demo_size, d.demo_seed, root)

    def at(images):
        return F.interpolate(images, size=resolution, mode="bilinear", antialias=True)

    judge = train_judge(at(x), y, k)
    _, train_feats = judge_features(judge, at(gan_x))
    held_preds, held_feats = judge_features(judge, at(held_x))
    return Reference(judge, k, resolution, train_feats, gan_y, held_preds, held_feats, held_y)


# ----------------------------------------------------------------------------- the run


def train_demo(root: Path, overrides: list[str], quick: bool):
    """Demo data -> FFCV -> class embeddings -> training; returns (cfg, train summary)."""
    root = root.resolve()
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # a fresh run, never a resume
    project = config.load(config.DEFAULT_PARAMS)
    db = Path(project.tracking.uri.removeprefix("sqlite:///")).resolve()
    base = [
        f"tracking.uri=sqlite:///{db}",
        f"tracking.artifact_location={Path(project.tracking.artifact_location).resolve()}",
        f"discriminator.weights_dir={Path(project.discriminator.weights_dir).resolve()}",
        "tracking.run_name=learning",
        f"data.source={root / 'demo'}",
        f"data.out_dir={root / 'ffcv'}",
        f"train.embed_init={root / 'class_embeddings.pt'}",
        f"train.snapshot_kimg={SNAPSHOT_KIMG}",
        "storage.keep=1000",  # every snapshot stays: the learning curve reads them all
        f"storage.uri={root / 'checkpoints'}",
        "tracking.experiment=polyinr-learning",
    ]
    cfg = config.load(config.DEFAULT_PARAMS, base + overrides)
    if quick:  # half the budget of every stage
        stages = [dataclasses.replace(s, kimg=s.kimg / 2) for s in cfg.train.stages]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=tuple(stages)))
    d = cfg.data
    print(f"learning: demo data and FFCV files under {root}", file=sys.stderr)
    data.make_demo_dataset(d.source, d.demo_classes, d.demo_per_class, d.demo_size, d.demo_seed)
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
    embedding.save(table, cfg.train.embed_init, {"network": embedding.NETWORK})
    summary = train(cfg, torch.device("cpu"), root / "run", progress=True)
    return cfg, summary


def curve(cfg, ref: Reference, run_id: str | None, out: Path) -> list[dict]:
    """Judge every checkpoint of the run; log the curve to MLflow and <out>/curve.csv."""
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
            f"learning: kimg {rows[-1]['kimg']:g} ({stage.resolution}px): accuracy "
            f"{scores['accuracy']:.3f} diversity {scores['diversity']:.3f} frechet "
            f"{scores['frechet']:.2f}",
            file=sys.stderr,
        )
    with (out / "curve.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if run_id:
        tracking.start_run(cfg.tracking, run_id=run_id)
        for r in rows:
            metrics = {f"judge_{k}": r[k] for k in ("accuracy", "diversity", "frechet")}
            tracking.log_metrics(metrics, step=round(r["kimg"] * 1000))
        tracking.end_run()
    return rows


def run(quick: bool, out: Path = OUT, overrides: list[str] = ()) -> list[dict]:
    """The benchmark rows: the last checkpoint's numbers beside their real-vs-real floors."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        cfg, summary = train_demo(out, list(overrides), quick)
        resolution = cfg.train.stages[-1].resolution
        ref = reference(cfg, resolution, out)
        rows = curve(cfg, ref, summary.get("mlflow_run_id"), out)
        g, _ = load_final(summary["generator"])
        k = cfg.data.demo_classes
        grid = render_grid(g, np.repeat(np.arange(k), 8), list(range(8)) * k, 1.0, rows=k)
        Image.fromarray(grid).save(out / "grid.png")
    last, floor = rows[-1], ref.floors()
    budget = sum(s.kimg for s in cfg.train.stages)
    case = f"{k} classes, {budget:g} kimg, {resolution}px"
    note = f"grid {out / 'grid.png'}; curve {out / 'curve.csv'}"
    return [
        row(
            "learning",
            f"conditional accuracy ({case})",
            last["accuracy"],
            floor["accuracy"],
            "share",
            f"chance {1 / k:.2f}; baseline: held-out real images; {note}",
        ),
        row(
            "learning",
            "diversity (samples / real, per class)",
            last["diversity"],
            floor["diversity"],
            "ratio",
            "baseline: held-out real images",
        ),
        row(
            "learning",
            "Frechet distance in judge features",
            last["frechet"],
            floor["frechet"],
            "FD",
            "baseline: held-out real images",
            lower_is_better=True,
        ),
    ]


def load_final(path):
    from polyinr.model.generator import load_generator

    return load_generator(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="half the demo's kimg per stage")
    parser.add_argument("--out", type=Path, default=OUT, help=f"work folder (default {OUT})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as everywhere")
    args = parser.parse_args(argv)
    from benchmarks.__main__ import table

    print(table(run(args.quick, args.out, args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
