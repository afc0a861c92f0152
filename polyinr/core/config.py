"""The typed, frozen schema of params.yaml, one section per component, and its loader.

The lowest layer: components import their section from here; this imports no component
(only the standard library and yaml). Overrides use DVC's grammar, `section.key=value`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from polyinr.core import params
from polyinr.core.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# The valid values of the string-valued choices; the components map each name to its code.
ENCODINGS = ("jpg", "raw")  # data.encoding
DEMO_KINDS = ("shapes", "glyphs", "colours")  # data.demo_kind (polyinr/data/demo.py)
# generator.mixing, the C x C layers (docs/model.md): plain, the reference's nn.Linear (He
# init here), lrelu without gain; equalized, StyleGAN's runtime-scaled N(0, 1), gain sqrt(2).
MIXING = ("plain", "equalized")
FEATURE_NETWORKS = ("tf_efficientnet_lite0", "deit_base_distilled_patch16_224")  # timm names
DIFFAUGMENT_OPS = ("color", "translation", "cutout")  # discriminator.diffaugment
PRECISIONS = ("fp32", "bf16")  # train.precision: plain fp32, or bf16 autocast of G and D
PROTOCOLS = ("stylegan-xl", "adm")  # eval.protocol


def parse_policy(policy: str) -> tuple[str, ...]:
    """'color,translation,cutout' -> names, checked against the known augmentations."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in DIFFAUGMENT_OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op {unknown[0]!r}; valid: {sorted(DIFFAUGMENT_OPS)}")
    return names


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the source images are, how they are stored as FFCV files, and the demo dataset."""

    source: str  # <source>/train/<wnid>/*.JPEG, or the path of ILSVRC2012_img_train.tar
    out_dir: str  # folder of train_<R>.beton + train_<R>.json, one pair per resolution
    encoding: str  # how FFCV stores images: jpg or raw (ENCODINGS)
    jpeg_quality: int  # JPEG quality of the jpg encoding, 1-100
    strict: bool  # true: an unreadable source image is an error; false: skipped and listed
    workers: int  # conversion processes; 0 = every available core
    scan_cache: str | None  # folder for a tar source's listing (scanned once); null: none
    demo_kind: str  # `polyinr demo-data`: shapes, glyphs or colours (DEMO_KINDS)
    demo_classes: int  # `polyinr demo-data`: number of classes
    demo_per_class: int  # `polyinr demo-data`: images per class
    demo_size: int  # `polyinr demo-data`: image side, px
    demo_seed: int  # `polyinr demo-data`: seed of the drawn images

    def __post_init__(self):
        for name, valid in (("encoding", ENCODINGS), ("demo_kind", DEMO_KINDS)):
            if (value := getattr(self, name)) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: every available core), got {self.workers}")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Shape of the generator; the paper's is hidden=1024, w_dim=512, levels=10."""

    conditional: bool  # class-conditional: the mapping network also sees a class embedding
    num_classes: int  # classes of the data (as many as the prepared manifests list)
    z_dim: int  # size of the latent z
    w_dim: int  # size of the mapped latent w that drives every level (paper: 512)
    embed_dim: int  # width of the class embedding table (train.embed_init's, 320)
    cond_dim: int  # the class embedding is projected to this width before mapping
    mapping_lr_mult: float  # learning-rate multiplier of the mapping network (reference: 0.1)
    hidden: int  # C, the width of every level (paper: 1024; 512 for FFHQ)
    levels: int  # number of polynomial levels (paper: 10)
    clamp: float  # each level's activations are clamped to [-clamp, clamp]
    w_avg_beta: float  # decay of the running mean of w (the truncation centre), in [0, 1)
    mixing: str  # C x C layers: plain (the reference's nn.Linear) or equalized (StyleGAN's)

    @property
    def class_count(self) -> int:
        """The classes G is conditioned on: num_classes when conditional, else 0."""
        return self.num_classes if self.conditional else 0

    def __post_init__(self):
        for name in ("num_classes", "z_dim", "w_dim", "embed_dim", "cond_dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if not 0.0 <= self.w_avg_beta < 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1), got {self.w_avg_beta}")
        if self.mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {self.mixing!r}")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Which frozen networks D looks through, its widths, augmentation and blur."""

    networks: tuple[str, ...]  # timm names, from FEATURE_NETWORKS
    pretrained: bool  # ImageNet weights (false: random frozen features, labelled everywhere)
    weights_dir: str  # <weights_dir>/<network>.safetensors|.pth|.bin wins over packaged ones
    input_size: int  # EfficientNet input below this size is resized up to it (reference: 224)
    proj_channels: int  # width of the first channel mixing: x1, x2, x4, x8 (reference: 64)
    head_channels: int  # head width at nominal size 64, doubling per halving (reference: 64)
    embed_dim: int  # the heads' class-embedding width (reference: 320, as the generator's)
    cmap_dim: int  # width of the projection onto the class (reference: 64)
    diffaugment: str  # DiffAugment ops, comma-separated from DIFFAUGMENT_OPS, drawn per network
    blur_sigma: float  # blur of D's inputs at the start of each stage, px (reference: 2)
    blur_kimg: float  # ... fading linearly to 0 over this many kimg (reference: 300)

    def __post_init__(self):
        if not self.networks:
            raise ValueError("networks must name at least one feature network")
        unknown = [n for n in self.networks if n not in FEATURE_NETWORKS]
        if unknown:
            raise ValueError(f"unknown network {unknown[0]!r}; valid: {sorted(FEATURE_NETWORKS)}")
        for name in ("proj_channels", "head_channels", "embed_dim", "cmap_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size < 16:
            # Below 32 px the deepest taps are 1 px; below 16 the networks' maps vanish.
            raise ValueError(f"input_size must be >= 16, got {self.input_size}")
        parse_policy(self.diffaugment)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the progressive schedule: train at `resolution` for `kimg` images."""

    resolution: int  # image side, px (one FFCV file per resolution)
    kimg: float  # thousands of real images shown to D in this stage

    def __post_init__(self):
        if self.resolution < 4 or self.kimg <= 0:
            raise ValueError(f"stage needs resolution >= 4 and kimg > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The recipe: stages, global batch, Adam, EMA, seeds and how often to snapshot."""

    stages: tuple[Stage, ...]  # progressive, each from the previous stage's best or last EMA
    batch: int  # global batch, images per step over all ranks
    batch_gpu: int  # per-rank batch (gradient accumulation below batch); 0 = batch / world
    lr_g: float  # Adam learning rate of G
    lr_d: float  # Adam learning rate of D
    betas: tuple[float, ...]  # Adam's (beta1, beta2)
    eps: float  # Adam's epsilon
    ema_kimg: float  # half-life of G's EMA, kimg; -1 = batch * 10/32, as the reference
    ema_rampup: float  # half-life at most this fraction of the stage's images so far; 0 = off
    mirror: bool  # random horizontal flips of the real images
    seed: int  # seed of weights, latents and data order, >= 0
    snapshot_kimg: float  # a checkpoint every this many kimg
    sample_kimg: float  # a sample grid every this many kimg
    sample_psi: float  # truncation of those samples (1 = none)
    workers: int  # data-loading processes per rank
    embed_init: str | None  # class-embedding table that initialises G and D; null: random
    precision: str  # fp32 (the reference) or bf16 autocast of the G/D forward passes
    checkpoint_levels: bool  # recompute G's levels in backward: less memory, ~1/3 more compute
    carry_d: bool  # later stages start D from the stage before's (the reference: a fresh D)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages must list at least one {resolution, kimg}")
        resolutions = [s.resolution for s in self.stages]
        if len(set(resolutions)) != len(resolutions):
            # One FFCV file, one DVC `prepare@<index>` stage per resolution.
            raise ValueError(f"stages must have distinct resolutions, got {resolutions}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}: {self.precision!r}")
        if self.batch < 1 or self.batch_gpu < 0:
            raise ValueError("batch must be >= 1 and batch_gpu >= 0")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are unsigned), got {self.seed}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How samples are drawn and scored, and the cheap FID during training."""

    protocol: str  # stylegan-xl (the Poly-INR tables) or adm (the diffusion papers' suite)
    num_samples: int  # generated images scored by `polyinr evaluate`, >= 2
    batch: int  # images per forward pass of G and the feature networks
    psi: float  # truncation of the scored samples (1 = none)
    seed: int  # seed of the scored samples' latents and classes, >= 0
    inception_weights: str  # the FID Inception's weights file
    vgg16_weights: str  # torchvision VGG16 weights: precision/recall under stylegan-xl
    allow_random_weights: bool  # missing weights: randomly initialised nets, labelled (demo)
    random_seed: int  # seed of those random networks (rFID), >= 0
    reference_npz: str | None  # an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0); null
    cache_dir: str  # local folder of reference statistics (also kept in storage.uri)
    every_kimg: float  # FID during training at snapshots, every this many kimg; 0 = off
    train_samples: int  # samples of that FID (logged as fid<N>), >= 2
    grid_classes: int  # the evaluate stage's sample grid: classes (rows of seeds)
    grid_seeds: int  # ... seeds per class
    grid_psi: float  # ... truncation

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.num_samples < 2 or self.train_samples < 2:
            raise ValueError("num_samples and train_samples must be >= 2")
        if self.every_kimg < 0:
            raise ValueError(f"every_kimg must be >= 0 (0: off), got {self.every_kimg}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if min(self.seed, self.random_seed) < 0:
            raise ValueError(
                f"seed and random_seed must be >= 0, got {self.seed}, {self.random_seed}"
            )


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where checkpoints go (a folder or s3://bucket/prefix), how many are kept, S3 transfer."""

    uri: str  # a local folder or s3://bucket/prefix
    endpoint_url: str | None  # S3-compatible endpoint; null: AWS_ENDPOINT_URL or AWS itself
    keep: int  # newest checkpoints kept (plus the best-FID one), >= 1
    retries: int  # S3: attempts per request (throttling, 5xx, dropped connections), >= 1
    multipart_mb: int  # S3: checkpoints above this many MiB upload in parts of it, >= 5
    staging_dir: str  # S3: local copy of a checkpoint before upload; kept if the upload fails
    outage_minutes: float  # S3: how long a background upload may keep failing, then exit 75

    def __post_init__(self):
        for key, low in (("keep", 1), ("retries", 1), ("multipart_mb", 5), ("outage_minutes", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where runs are logged: a tracking URI (SQLite file or server), experiment, run name."""

    uri: str  # MLflow tracking URI: sqlite:///<file> or http(s)://<server>
    experiment: str  # MLflow experiment name
    artifact_location: str  # local artifact folder of a new experiment (servers choose their own)
    run_name: str  # MLflow run and checkpoint folder name; {params}: fingerprint(cfg)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of the pipeline, one section per component."""

    data: DataConfig
    generator: GeneratorConfig
    discriminator: DiscriminatorConfig
    train: TrainConfig
    eval: EvalConfig
    storage: StorageConfig
    tracking: TrackingConfig


def _check(value, tp, where: str):
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        hint = " (write floats like 2.0e-4: YAML reads 2e-4 as a string)" if tp is float else ""
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}{hint}")
    return value


def _build(cls, raw, where: str):
    """Build dataclass `cls` from mapping `raw`, checking names and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    missing = [k for k in valid if k not in raw]
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; valid keys of {where}: {valid}")
    if missing:
        raise ConfigError(f"missing key {where}.{missing[0]}; {where} needs: {valid}")
    values = {k: _check(raw[k], hints[k], f"{where}.{k}") for k in valid}
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _apply_override(raw: dict, override: str) -> None:
    """Set `section.key=value` (value parsed as YAML) in the nested mapping `raw`."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            where = ".".join(parts[: i + 1])
            valid = sorted(k for k, v in node.items() if isinstance(v, dict))
            raise ConfigError(f"override {override!r}: unknown section {where}; valid: {valid}")
        node = node[part]
    if parts[-1] not in node:
        section = ".".join(parts[:-1])
        raise ConfigError(
            f"override {override!r}: unknown key {key}; valid keys of {section}: {sorted(node)}"
        )
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({e.problem}); quote the "
            "whole argument in the shell, e.g. 'train.stages=[{resolution: 32, kimg: 1}]'"
        ) from None


def from_dict(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """Validate a nested mapping (as in params.yaml) plus overrides into a Config."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through plain types
    for override in overrides:
        _apply_override(raw, override)
    if not isinstance(raw, dict):
        raise ConfigError("params must be a mapping of sections")
    valid = [f.name for f in dataclasses.fields(Config)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]}; valid sections: {valid}")
    missing = [k for k in valid if k not in raw]
    if missing:
        raise ConfigError(f"missing section {missing[0]}; params need: {valid}")
    hints = typing.get_type_hints(Config)
    cfg = Config(**{k: _build(hints[k], raw[k], k) for k in valid})
    name = cfg.tracking.run_name.replace(params.PARAMS_HASH, params.fingerprint(cfg))
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name=name))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently, so an edit to the first copy would change nothing)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load(path: str | Path = DEFAULT_PARAMS, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a complete params file and apply `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the repository root?)")
    with path.open() as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        return from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def nimg(kimg: float) -> int:
    """Images in `kimg` thousand, to the nearest image (0.029 * 1000 is 28.999...): the one
    kimg-to-image rule of schedules, snapshot and sample ticks and the FID's interval."""
    return round(kimg * 1000)
