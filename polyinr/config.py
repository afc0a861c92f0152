"""Compose the per-component config sections into one typed, frozen Config.

params.yaml is the only source of values; the dataclasses here and beside each component
are its schema. Overrides use DVC's grammar, `section.key=value`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

import yaml

from polyinr.data import DataConfig
from polyinr.discriminator import DiscriminatorConfig
from polyinr.generator import GeneratorConfig
from polyinr.metrics import EvalConfig
from polyinr.storage import StorageConfig
from polyinr.tracking import TrackingConfig
from polyinr.train import TrainConfig

DEFAULT_PARAMS = Path("params.yaml")
# A run's identity: every key of these sections changes what training produces, except
# NOT_IDENTITY (where inputs live, how fast they load, how often progress is saved) and the
# last stage's kimg (how far to train: a longer schedule resumes the same run).
IDENTITY_SECTIONS = ("data", "generator", "discriminator", "train")
NOT_IDENTITY = frozenset(
    {
        "data.out_dir",
        "data.workers",
        "data.scan_cache",
        "data.strict",
        "discriminator.weights_dir",
        "train.workers",
        "train.snapshot_kimg",
        "train.sample_kimg",
        "train.sample_psi",
        "train.checkpoint_levels",
    }
)
PARAMS_HASH = "{params}"  # in tracking.run_name: replaced by fingerprint(cfg)


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


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
    name = cfg.tracking.run_name.replace(PARAMS_HASH, fingerprint(cfg))
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


def to_dict(cfg) -> dict:
    """The nested plain-type mapping of a Config (or section, or such a mapping); lists stay
    lists."""
    plain = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return yaml.safe_load(yaml.safe_dump(_plain(plain)))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def flatten(cfg) -> dict[str, object]:
    """`section.key -> value` for every leaf, as MLflow params and `dvc params diff` show."""
    out: dict[str, object] = {}

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", to_dict(cfg))
    return out


def identity(cfg) -> dict[str, object]:
    """`section.key -> value` of the params that decide what training produces (see
    IDENTITY_SECTIONS); train.stages without the last stage's kimg."""
    flat = flatten(cfg)
    out = {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] in IDENTITY_SECTIONS and k not in NOT_IDENTITY
    }
    *done, last = out["train.stages"]
    out["train.stages"] = [*done, {"resolution": last["resolution"]}]
    return out


def fingerprint(cfg) -> str:
    """8 hex digits of a hash of identity(cfg): `{params}` in tracking.run_name, so that a
    change of any result-affecting param is a new run (checkpoint folder, MLflow run)."""
    text = json.dumps(identity(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def identity_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for each identity param that differs between two identity() maps."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
