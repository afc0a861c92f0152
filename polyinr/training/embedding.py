"""Class embeddings taken from a pretrained classifier (docs/model.md section 2).

The reference initialises its 1000 x 320 class-embedding table from a pretrained
classifier and keeps it trainable. 320 is the width of tf_efficientnet_lite0's last
feature stage (the projected discriminator's deepest tap), so polyinr builds the table from
each class's mean pooled feature of that stage over the training set, then centres and
standardises every feature across classes. The reference's table has those statistics
(mean 0.01, per-feature std 1.02, mean off-diagonal cosine 0.08): classes start apart. Raw
class means share one large positive component (cosine 0.64-0.93 between classes on small
datasets), which leaves G's mapping and D's heads unable to tell classes apart at step 0.
How the reference derived its table is not published; this is our reading (README).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from polyinr import data
from polyinr.core.config import DataConfig
from polyinr.core.storage import write_atomic
from polyinr.model.discriminator import FeatureNetwork

NETWORK = "tf_efficientnet_lite0"
INPUT_SIZE = 224  # the classifier's native resolution


class EmbeddingError(ValueError):
    """A class-embedding file that is missing or does not fit the generator."""


@torch.no_grad()
def compute(
    data_cfg: DataConfig,
    resolution: int,
    num_classes: int,
    weights_dir: str,
    pretrained: bool = True,
    device=None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-class mean of the classifier's pooled last-stage features: (num_classes, 320).

    Reads every image of the FFCV file at `resolution`. Random features would give
    meaningless embeddings, so `pretrained=False` is only for tests and is never the default.
    """
    device = torch.device(device or "cpu")
    net = FeatureNetwork(NETWORK, pretrained, weights_dir).to(device)
    sums = torch.zeros(num_classes, 0, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    path = data.beton_path(data_cfg.out_dir, resolution)
    total = data.read_manifest(data_cfg.out_dir, resolution).get("written")
    bar = tqdm(total=total, unit="img", desc="class embeddings", disable=not progress)
    for images, labels in data.read_all(path, workers=data_cfg.workers):
        if labels.max() >= num_classes:
            raise EmbeddingError(
                f"{path} has label {int(labels.max())} but generator.num_classes={num_classes}"
            )
        x = images.to(device).float() / 127.5 - 1  # (B, 3, R, R) in [-1, 1]
        if x.shape[-1] != INPUT_SIZE:
            x = F.interpolate(x, size=INPUT_SIZE, mode="bilinear", align_corners=False)
        feats = net(x)[-1].mean(dim=(2, 3)).double().cpu()  # (B, 320)
        if sums.shape[1] == 0:
            sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels, feats)
        counts += torch.bincount(labels, minlength=num_classes).double()
        bar.update(len(labels))
    bar.close()
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise EmbeddingError(f"no training images for classes {empty[:10]} in {path}")
    return standardize(sums / counts.unsqueeze(1)).float()


def standardize(means: torch.Tensor) -> torch.Tensor:
    """Class means (K, D) -> each feature centred and scaled to unit std across classes.

    Removes what every class shares, so rows start apart (mean off-diagonal cosine
    -1 / (K - 1) for unrelated classes, near 0 for ImageNet's 1000); a feature that barely
    varies between classes is floored at a thousandth of the median spread rather than
    blown up from rounding noise. One class: the row scaled to unit second moment.
    """
    means = means.double()
    if len(means) < 2:
        return means * torch.rsqrt(means.square().mean(dim=1, keepdim=True) + 1e-12)
    centred = means - means.mean(dim=0, keepdim=True)
    std = centred.std(dim=0, keepdim=True)
    floor = 1e-3 * std.median().clamp_min(1e-12)
    return centred / std.clamp_min(floor)


PARALLEL = 0.9  # cosine above which two classes look alike to the feature network


def statistics(table: torch.Tensor, names: list[str] | None = None) -> dict:
    """What `polyinr class-embeddings` prints: mean/min/max off-diagonal cosine, the closest
    pair of classes (by name) and every pair above PARALLEL."""
    k = len(table)
    names = names or [str(i) for i in range(k)]
    unit = F.normalize(table.double(), dim=1)
    cos = unit @ unit.T  # (K, K)
    if k < 2:
        return {"classes": k, "mean_cosine": None, "closest": None, "parallel": []}
    i, j = torch.triu_indices(k, k, offset=1)
    off = cos[i, j]
    best = int(off.argmax())
    parallel = [
        (names[a], names[b], round(float(c), 3))
        for a, b, c in zip(i.tolist(), j.tolist(), off.tolist(), strict=True)
        if c > PARALLEL
    ]
    return {
        "classes": k,
        "mean_cosine": float(off.mean()),
        "min_cosine": float(off.min()),
        "max_cosine": float(off.max()),
        "closest": (names[int(i[best])], names[int(j[best])], float(off[best])),
        "parallel": parallel,
        "row_norm": float(table.double().norm(dim=1).mean()),
    }


def create(cfg, out: str | Path, device=None, progress=True, allow_random_weights=False):
    """The `class-embeddings` command: compute the table of cfg (a Config) from the prepared
    data at the last training resolution and save it to `out`; returns it and its
    statistics (classes named as in the data's manifest)."""
    if not cfg.generator.conditional:
        raise ValueError("class embeddings are for a conditional generator")
    if not cfg.discriminator.pretrained and not allow_random_weights:
        raise ValueError(
            f"class embeddings come from the pretrained {NETWORK}; set "
            f"discriminator.pretrained=true and put its weights in "
            f"{cfg.discriminator.weights_dir} (--allow-random-weights only for tests)"
        )
    resolution = max(s.resolution for s in cfg.train.stages)
    manifest = data.check_prepared(cfg.data.out_dir, resolution, cfg.generator.num_classes)
    table = compute(
        cfg.data,
        resolution,
        cfg.generator.num_classes,
        cfg.discriminator.weights_dir,
        pretrained=cfg.discriminator.pretrained,
        device=device,
        progress=progress,
    )
    meta = {
        "construction": "class means, centred and standardised per feature",
        "network": NETWORK,
        "pretrained": cfg.discriminator.pretrained,
        "resolution": resolution,
        "data": str(cfg.data.out_dir),
    }
    save(table, out, meta)
    return table, statistics(table, manifest["classes"])


def save(table: torch.Tensor, path, meta: dict) -> None:
    """Write the table and how it was made, atomically, loadable with weights_only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a file object: with a path, torch would write the temporary's name into the
    # bytes, and DVC would hash every save differently.
    with write_atomic(path) as tmp, tmp.open("wb") as f:
        torch.save({"embed": table.contiguous(), "meta": dict(meta)}, f)


def load(path, num_classes: int, embed_dim: int) -> torch.Tensor:
    """The (num_classes, embed_dim) table of `path`, checked against the generator."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(
            f"class embeddings not found at {path}: make them with `polyinr class-embeddings` "
            "(needs the pretrained feature network) or set train.embed_init=null"
        )
    table = torch.load(path, map_location="cpu", weights_only=True)["embed"]
    if tuple(table.shape) != (num_classes, embed_dim):
        raise EmbeddingError(
            f"{path} holds a {tuple(table.shape)} table; the generator needs "
            f"({num_classes}, {embed_dim}) (generator.num_classes, generator.embed_dim)"
        )
    return table
