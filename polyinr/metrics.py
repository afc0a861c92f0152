"""FID, sFID, IS, precision/recall and rFID under the ADM or StyleGAN-XL protocol (SPEC.md 4).

Float64 statistics with TF32 off; reference statistics computed once, cached locally and in
storage.uri; generation and extraction split over torchrun ranks with the same result.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from polyinr.featurenets import (  # noqa: F401  (re-exported: the metrics' public surface)
    WEIGHTS_FILE,
    WEIGHTS_URL,
    MissingWeightsError,
    load_inception,
    load_vgg16,
    random_inception,
)
from polyinr.generator import to_uint8  # samples are scored exactly as they are exported
from polyinr.storage import snapshot_name

PROTOCOLS = ("stylegan-xl", "adm")
# Real images for precision/recall: ADM compares 10k reference images against all samples;
# StyleGAN-XL (stylegan2-ada's pr50k3_full) uses up to 200k training images.
PR_REFERENCE = {"adm": 10_000, "stylegan-xl": 200_000}
PR_K = 3
PARTS = ("fid", "pr", "rfid")  # fid: FID + sFID (+ IS on samples); pr: precision/recall
FID_CURVE = Path("metrics/fid.csv")
FID_LOG = "fid.json"  # the training FID rows, kept in storage so they survive a resume
CACHE_VERSION = 1  # bump when what a cached reference holds changes


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How samples are drawn and scored, and the cheap FID during training."""

    protocol: str
    num_samples: int
    batch: int
    psi: float
    seed: int
    inception_weights: str
    vgg16_weights: str
    allow_random_weights: bool
    random_seed: int
    reference_npz: str | None
    cache_dir: str
    every_kimg: float
    train_samples: int
    grid_classes: int
    grid_seeds: int
    grid_psi: float

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.num_samples < 2 or self.train_samples < 2:
            raise ValueError("num_samples and train_samples must be >= 2")
        if self.every_kimg < 0:
            raise ValueError(f"every_kimg must be >= 0 (0: off), got {self.every_kimg}")


@contextlib.contextmanager
def no_tf32():
    """Disable TF32 matmuls and convolutions inside the block, restoring the flags after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def extract(model: nn.Module, images_uint8: torch.Tensor) -> dict[str, np.ndarray]:
    """images (N, 3, H, W) uint8 -> the model's named features as float64 arrays (N, D)."""
    device = next(model.parameters()).device
    with no_tf32(), torch.no_grad():
        feats = model(images_uint8.to(device))
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in feats.items()}


# ---------------------------------------------------------------------------------------------
# Statistics and metrics


class FeatureStats:
    """Running float64 sum and sum of outer products of feature vectors."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> None:
        """Accumulate a batch of features (N, D)."""
        x = np.asarray(feats, dtype=np.float64)
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def all_reduce(self) -> FeatureStats:
        """Sum n, sum and outer over torchrun ranks (a no-op in a single process)."""
        if not _distributed():
            return self
        dim = int(_all_reduce(np.array([0 if self.sum is None else len(self.sum)]), "max")[0])
        if self.sum is None:
            self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))
        self.n = int(_all_reduce(np.array([self.n], np.float64))[0])
        self.sum = _all_reduce(self.sum)
        self.outer = _all_reduce(self.outer)
        return self

    def mean_cov(self, ddof: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) normalised by 1/(N - ddof)."""
        if self.n <= ddof:
            raise ValueError(f"need more than {ddof} samples, have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - ddof)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between two Gaussians, trace term from eigenvalues of sigma1 @ sigma2."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    # tr(sqrtm(S1 S2)) = sum of sqrt of the eigenvalues of S1 S2, which are real and >= 0 for
    # PSD inputs; round-off makes tiny imaginary or negative parts, hence real part clipped at 0.
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over consecutive splits of exp(E[KL(p(y|x) || p(y))])."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be in [1, {logits.shape[0]}], got {splits}")
    log_p = torch.log_softmax(logits, dim=1).numpy()
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x (N, D) to its k-th nearest other row, (N,)."""
    # k + 1 because every point is its own nearest neighbour at distance 0.
    radii = [
        torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)


def _coverage(manifold, radii, queries, chunk: int) -> float:
    """Fraction of queries inside at least one ball (manifold point, its k-NN radius)."""
    inside = [
        (torch.cdist(queries[i : i + chunk], manifold) <= radii[None]).any(dim=1)
        for i in range(0, len(queries), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = PR_K, device="cpu", chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifold radii."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} real and fake features")
    # Rows are processed `chunk` at a time so memory is O(chunk * N), not O(N^2).
    with no_tf32():
        precision = _coverage(real, _knn_radii(real, k, chunk), fake, chunk)
        recall = _coverage(fake, _knn_radii(fake, k, chunk), real, chunk)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Distributed helpers: sums are all-reduced, rows gathered in global index order


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(x: np.ndarray, op: str = "sum") -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, np.float64), device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _gather_rows(index: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows (n, dim) of every rank with their global indices (n,) -> all rows in index order."""
    if not _distributed():
        return rows[np.argsort(index, kind="stable")]
    device, world = _comm_device(), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(index)], device=device))
    most = max(int(c) for c in counts)
    # all_gather needs equal shapes: pad every rank's indices and rows to the largest count.
    mine_index = torch.zeros(most, dtype=torch.int64, device=device)
    mine_index[: len(index)] = torch.as_tensor(index, dtype=torch.int64)
    mine_rows = torch.zeros(most, dim, dtype=torch.float32, device=device)
    mine_rows[: len(index)] = torch.as_tensor(rows, dtype=torch.float32)
    all_index = [torch.empty_like(mine_index) for _ in range(world)]
    all_rows = [torch.empty_like(mine_rows) for _ in range(world)]
    dist.all_gather(all_index, mine_index)
    dist.all_gather(all_rows, mine_rows)
    index = torch.cat([t[: int(c)] for t, c in zip(all_index, counts, strict=True)])
    rows = torch.cat([t[: int(c)] for t, c in zip(all_rows, counts, strict=True)])
    return rows[torch.argsort(index, stable=True)].cpu().numpy()


def _accumulate(batches, nets, names, stats_keys, row_keys, keep, desc, progress):
    """One pass over this rank's (start index, uint8 images) batches through networks `names`.

    Returns ({key: FeatureStats} all-reduced for `stats_keys`, {key: rows (M, D)} for
    `row_keys`: the rows whose global index passes `keep`, from every rank in index order).
    """
    rank, _ = _rank_world()
    stats = {k: FeatureStats() for k in stats_keys}
    index, rows = [], {k: [] for k in row_keys}
    for start, images in tqdm(batches, desc=desc, disable=not progress or rank > 0):
        feats = nets.features(images, names)
        for key, s in stats.items():
            s.add(feats[key])
        selected = np.flatnonzero(keep(np.arange(start, start + len(images))))
        index.append(start + selected)
        for key in row_keys:
            rows[key].append(feats[key][selected].astype(np.float32))
    stats = {key: s.all_reduce() for key, s in stats.items()}
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    for key in row_keys:
        dim = rows[key][0].shape[1] if rows[key] else 0
        if _distributed():
            dim = int(_all_reduce(np.array([dim]), "max")[0])
        mine = np.concatenate(rows[key]) if rows[key] else np.zeros((0, dim), np.float32)
        rows[key] = _gather_rows(index, mine, dim)
    return stats, rows


# ---------------------------------------------------------------------------------------------
# Feature networks of a protocol


class Networks:
    """The feature networks an evaluation needs, loaded on first use."""

    def __init__(self, cfg: EvalConfig, device, modules: dict | None = None):
        self.cfg, self.device = cfg, device
        self._modules = dict(modules or {})  # tests inject small doubles here

    def get(self, name: str) -> nn.Module:
        """'inception', 'rinception' (random weights, rFID) or 'vgg16'; each has .label."""
        if name not in self._modules:
            c = self.cfg
            if name == "inception":
                net, _ = load_inception(
                    c.inception_weights, c.allow_random_weights, c.random_seed, self.device
                )
            elif name == "rinception":
                net = self.get("inception")  # a random-weight run already has rFID's network
                if net.weights_id != f"random-kaiming-seed{c.random_seed}":
                    net = random_inception(c.random_seed, self.device)
            elif name == "vgg16":
                net, _ = load_vgg16(
                    c.vgg16_weights, c.allow_random_weights, c.random_seed, self.device
                )
            else:
                raise KeyError(f"unknown feature network {name!r}")
            self._modules[name] = net
        return self._modules[name]

    def pr_network(self) -> tuple[str, str]:
        """(network, feature key) of precision/recall under the protocol."""
        return ("inception", "pool") if self.cfg.protocol == "adm" else ("vgg16", "vgg")

    def names(self, parts) -> list[str]:
        """The networks that `parts` need."""
        table = {"fid": "inception", "pr": self.pr_network()[0], "rfid": "rinception"}
        return list(dict.fromkeys(table[p] for p in parts))

    def features(self, images: torch.Tensor, names) -> dict[str, np.ndarray]:
        """uint8 images (N, 3, H, W) -> pool, logits, spatial / rpool (rFID) / vgg, float64."""
        feats, done = {}, {}
        for name in names:
            net = self.get(name)
            if id(net) not in done:  # shared networks (random-weight runs) run once
                done[id(net)] = extract(net, images)
            f = done[id(net)]
            feats |= {"rpool": f["pool"]} if name == "rinception" else f
        return feats


# ---------------------------------------------------------------------------------------------
# Reference statistics: an ADM npz, or the training data, cached


def data_fingerprint(out_dir, resolution: int) -> str:
    """Identity of a prepared FFCV file: its manifest (without timings) and size."""
    from polyinr import data

    manifest = data.read_manifest(out_dir, resolution)
    stable = manifest.get("fingerprint") or {
        k: v for k, v in manifest.items() if k not in ("seconds", "images_per_second")
    }
    size = data.beton_path(out_dir, resolution).stat().st_size
    return hashlib.sha256(json.dumps([stable, size], sort_keys=True).encode()).hexdigest()[:16]


def _key(fingerprint: str, resolution: int, protocol: str, part: str, weights_id: str) -> str:
    fields = [CACHE_VERSION, fingerprint, resolution, protocol, part, weights_id]
    return f"{part}-{hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]}"


class ReferenceCache:
    """Reference arrays as npz files in a local folder and in storage.uri/reference-stats/."""

    def __init__(self, cache_dir, storage_cfg=None):
        from polyinr.storage import CheckpointStore

        self.dir = Path(cache_dir)
        self.store = CheckpointStore(storage_cfg, "reference-stats") if storage_cfg else None

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.dir / f"{key}.npz"
        raw = path.read_bytes() if path.is_file() else None
        if raw is None and self.store is not None:
            raw = self.store.read(f"{key}.npz")
            if raw is not None:
                self._write_local(path, raw)
        if raw is None:
            return None
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._write_local(self.dir / f"{key}.npz", buffer.getvalue())
        if self.store is not None:
            self.store.write(f"{key}.npz", buffer.getvalue())

    @staticmethod
    def _write_local(path: Path, raw: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)


def _real_batches(source, batch: int):
    """(fingerprint, number of images, iterator of (uint8 NCHW, labels)) of a reference source."""
    from polyinr import data

    if isinstance(source, np.ndarray):  # arr_0 of an ADM batch, NHWC uint8
        images = torch.from_numpy(source).permute(0, 3, 1, 2)  # (N, 3, H, W)
        return iter((images[i : i + batch], None) for i in range(0, len(images), batch))
    out_dir, resolution = source
    return data.read_all(data.beton_path(out_dir, resolution), batch_size=batch)


def load_reference(
    cfg: EvalConfig, parts, resolution: int, nets: Networks, data_dir, storage_cfg, progress=True
) -> dict[str, np.ndarray]:
    """Reference arrays for `parts`: mu, sigma, mu_s, sigma_s, n (fid); pr (N, D); mu_r, sigma_r.

    An ADM reference batch (eval.reference_npz) gives mu, sigma, mu_s, sigma_s as is and its
    arr_0 images for the rest; otherwise the training FFCV file at `resolution` is read once
    for every missing part and the result cached (eval.cache_dir and storage.uri).
    """
    ddof = 1 if cfg.protocol == "adm" else 0  # ADM: np.cov's 1/(N-1); StyleGAN-XL: 1/N
    reference, npz = {}, None
    if cfg.reference_npz:
        path = Path(cfg.reference_npz)
        if not path.is_file():
            raise FileNotFoundError(f"eval.reference_npz: no ADM reference batch at {path}")
        npz = np.load(path, allow_pickle=False)
        missing = {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} is not an ADM reference batch: no {sorted(missing)}")
        reference |= {k: npz[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")}
        reference["n"] = np.array(len(npz["arr_0"]))
        parts = [p for p in parts if p != "fid"]
        fingerprint, num_images = f"npz-{_file_digest(path)}", len(npz["arr_0"])
    else:
        fingerprint = data_fingerprint(data_dir, resolution)
        from polyinr import data

        num_images = data.read_manifest(data_dir, resolution)["written"]
    cache = ReferenceCache(cfg.cache_dir, storage_cfg)
    pr_name, pr_key = nets.pr_network()
    weights = {"fid": "inception", "pr": pr_name, "rfid": "rinception"}
    todo = {}
    for part in parts:
        key = _key(fingerprint, resolution, cfg.protocol, part, nets.get(weights[part]).weights_id)
        found = cache.get(key)
        missing = np.array([found is None], np.float64)
        # Every rank must take part in the same passes, even if only one lacks the cache file.
        if (_all_reduce(missing, "max") if _distributed() else missing)[0]:
            todo[part] = key
        else:
            reference |= found
    if not todo:
        return reference

    # One pass over the real images for every missing part; P/R keeps an evenly spaced subset.
    stride = math.ceil(num_images / PR_REFERENCE[cfg.protocol])
    stats_keys = (["pool", "spatial"] if "fid" in todo else []) + (
        ["rpool"] if "rfid" in todo else []
    )
    rank, world = _rank_world()
    source = npz["arr_0"] if npz is not None else (data_dir, resolution)

    def mine():
        start = 0
        for b, (images, _) in enumerate(_real_batches(source, cfg.batch)):
            if b % world == rank:
                yield start, images
            start += len(images)

    keep = (lambda i: i % stride == 0) if "pr" in todo else (lambda i: np.zeros(len(i), bool))
    row_keys = [pr_key] if "pr" in todo else []
    names = nets.names(todo)
    out, rows = _accumulate(mine(), nets, names, stats_keys, row_keys, keep, "reference", progress)
    computed = {}
    if "fid" in todo:
        mu, sigma = out["pool"].mean_cov(ddof)
        mu_s, sigma_s = out["spatial"].mean_cov(ddof)
        computed["fid"] = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, n=out["pool"].n)
    if "pr" in todo:
        computed["pr"] = {"pr": rows[pr_key]}
    if "rfid" in todo:
        mu_r, sigma_r = out["rpool"].mean_cov(ddof)
        computed["rfid"] = {"mu_r": mu_r, "sigma_r": sigma_r}
    for part, arrays in computed.items():
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if rank == 0:
            cache.put(todo[part], arrays)
        reference |= arrays
    return reference


def _file_digest(path) -> str:
    from polyinr.featurenets import file_sha256

    return file_sha256(path)[:16]


# ---------------------------------------------------------------------------------------------
# Evaluation of a generator


def metric_name(num_samples: int) -> str:
    """FID named by its sample count: fid50k, fid10k, fid256 (never compare different counts)."""
    return f"fid{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid{num_samples}"


def evaluate(
    generator: nn.Module,
    reference: dict,
    cfg: EvalConfig,
    num_classes: int,
    nets: Networks,
    device,
    parts=PARTS,
    num_samples: int | None = None,
    progress: bool = True,
) -> dict:
    """Score `num_samples` (default cfg.num_samples) samples of `generator` against `reference`.

    Latents and classes are drawn up front from cfg.seed, so a sample depends neither on the
    batch size nor on the number of ranks; each rank renders every world-th batch.
    """
    n = num_samples or cfg.num_samples
    ddof = 1 if cfg.protocol == "adm" else 0
    rng = torch.Generator().manual_seed(cfg.seed)
    z_all = torch.randn(n, generator.cfg.z_dim, generator=rng)
    c_all = torch.randint(0, max(num_classes, 1), (n,), generator=rng)
    rank, world = _rank_world()

    def mine():
        for start in range(rank * cfg.batch, n, world * cfg.batch):
            z = z_all[start : start + cfg.batch].to(device)
            c = c_all[start : start + cfg.batch].to(device)
            with torch.no_grad():
                yield start, to_uint8(generator(z, c, psi=cfg.psi))

    pr_key = nets.pr_network()[1]
    stats_keys = (["pool", "spatial"] if "fid" in parts else []) + (
        ["rpool"] if "rfid" in parts else []
    )
    row_keys = (["logits"] if "fid" in parts else []) + ([pr_key] if "pr" in parts else [])
    names = nets.names(parts)
    out, rows = _accumulate(
        mine(),
        nets,
        names,
        stats_keys,
        row_keys,
        lambda i: np.ones(len(i), bool),
        "samples",
        progress,
    )

    inception = nets.get("inception")
    result = {"protocol": cfg.protocol, "num_samples": n, "seed": cfg.seed, "psi": cfg.psi}
    if "fid" in parts:
        result["fid"] = frechet_distance(
            *out["pool"].mean_cov(ddof), reference["mu"], reference["sigma"]
        )
        result["sfid"] = frechet_distance(
            *out["spatial"].mean_cov(ddof), reference["mu_s"], reference["sigma_s"]
        )
        # 10 consecutive splits as published; tiny runs keep >= 2 samples per split.
        result["is_mean"], result["is_std"] = inception_score(rows["logits"], min(10, n // 2))
        result["num_reference"] = int(reference["n"])
    if "pr" in parts:
        real = reference["pr"]
        result["precision"], result["recall"] = precision_recall(real, rows[pr_key], PR_K, device)
        result["num_pr_reference"] = len(real)
        result["pr_features"] = "inception-pool" if pr_key == "pool" else "vgg16-fc7"
        result["pr_weights"] = nets.get(nets.pr_network()[0]).label
    if "rfid" in parts:
        result["rfid"] = frechet_distance(
            *out["rpool"].mean_cov(ddof), reference["mu_r"], reference["sigma_r"]
        )
        result["rfid_seed"] = cfg.random_seed
    random = inception.weights_id.startswith("random")
    result["inception_weights"] = f"random (seed {cfg.random_seed})" if random else "real"
    result["reference"] = cfg.reference_npz or "training data"
    caveats = [inception.label]
    if "pr" in parts and result["pr_weights"].startswith("RANDOM") and not random:
        caveats.append(f"precision/recall on {result['pr_weights']}")
    comparable = not any(c.startswith("RANDOM") for c in caveats)
    result["label"] = f"{metric_name(n)} ({cfg.protocol}, {', '.join(caveats)}" + (
        ")" if comparable else ": not comparable to published numbers)"
    )
    return result


def evaluate_generator(cfg, generator, resolution: int, device, progress=True) -> dict:
    """The full evaluation of the `evaluate` stage: every part, cfg.eval.num_samples samples."""
    nets = Networks(cfg.eval, device)
    reference = load_reference(
        cfg.eval, PARTS, resolution, nets, cfg.data.out_dir, cfg.storage, progress
    )
    num_classes = cfg.generator.num_classes if cfg.generator.conditional else 0
    return evaluate(generator, reference, cfg.eval, num_classes, nets, device, progress=progress)


class TrainingFID:
    """The cheap FID of training: eval.train_samples samples every eval.every_kimg.

    Logged to MLflow against kimg and to metrics/fid.csv (a DVC plot); the best snapshot of
    each stage is marked in storage so pruning keeps it. Call `tick` on every rank.
    """

    def __init__(self, cfg, store, device, nets: Networks | None = None):
        self.cfg, self.store, self.device = cfg, store, device
        self.every = int(cfg.eval.every_kimg * 1000)
        self.name = metric_name(cfg.eval.train_samples)
        raw = store.read(FID_LOG) if self.every > 0 else None
        self.rows = json.loads(raw) if raw else []
        self.nets = nets  # loaded at the first evaluation
        self.references = {}

    def tick(self, g_ema, cur_nimg: int, stage: int, resolution: int, done: bool):
        """FID of g_ema if an every_kimg boundary was crossed (or the stage ended), else None."""
        if self.every <= 0:
            return None
        # Rows past cur_nimg come from a run that crashed after them: this run redoes them.
        self.rows = [r for r in self.rows if r["kimg"] * 1000 < cur_nimg]
        last = max((round(r["kimg"] * 1000) for r in self.rows), default=0)
        if not done and cur_nimg // self.every <= last // self.every:
            return None
        from polyinr import tracking

        if self.nets is None:
            self.nets = Networks(self.cfg.eval, self.device)
        if resolution not in self.references:
            self.references[resolution] = load_reference(
                self.cfg.eval,
                ["fid"],
                resolution,
                self.nets,
                self.cfg.data.out_dir,
                self.cfg.storage,
                progress=False,
            )
        num_classes = self.cfg.generator.num_classes if self.cfg.generator.conditional else 0
        result = evaluate(
            g_ema,
            self.references[resolution],
            self.cfg.eval,
            num_classes,
            self.nets,
            self.device,
            parts=["fid"],
            num_samples=self.cfg.eval.train_samples,
            progress=False,
        )
        fid = result["fid"]
        kimg = cur_nimg / 1000
        self.rows.append({"kimg": kimg, "stage": stage, "resolution": resolution, self.name: fid})
        if _rank_world()[0] == 0:
            tracking.log_metrics({self.name: fid}, step=int(kimg))
            self.store.write(FID_LOG, json.dumps(self.rows).encode())
            self.store.mark_best(snapshot_name(cur_nimg), fid)
            self.write_curve()
        return fid

    def write_curve(self) -> None:
        """metrics/fid.csv: kimg, stage, resolution and the FID column named by sample count."""
        FID_CURVE.parent.mkdir(parents=True, exist_ok=True)
        with FID_CURVE.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["kimg", "stage", "resolution", self.name])
            writer.writeheader()
            writer.writerows(r for r in self.rows if self.name in r)
