"""A Config as params: the nested mapping, its `section.key` leaves (what MLflow and `dvc params
diff` show), and the run identity, the leaves that change the trained weights, hashed into
`{params}` of tracking.run_name."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import yaml

# A run's identity: the keys that change the trained weights. Every key of these sections
# except NOT_IDENTITY (where inputs live, how fast they load or compute, what is shown) and
# the last stage's kimg (how far to train: a longer schedule resumes the same run); the data
# file's bytes do not depend on data.workers (conversion writes in index order).
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
# With the FID during training on and a stage after the first, the FID picks the snapshot
# each stage hands to the next: what decides that FID, and at which snapshots it is measured,
# changes the weights too.
HANDOFF = ("eval.every_kimg", "eval.train_samples", "eval.seed", "eval.psi", "train.snapshot_kimg")
PARAMS_HASH = "{params}"  # in tracking.run_name: replaced by fingerprint(cfg)


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
    """`section.key -> value` of the params that decide the trained weights (see
    IDENTITY_SECTIONS and HANDOFF); train.stages without the last stage's kimg."""
    flat = flatten(cfg)
    out = {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] in IDENTITY_SECTIONS and k not in NOT_IDENTITY
    }
    if flat["eval.every_kimg"] > 0 and len(flat["train.stages"]) > 1:
        out |= {k: flat[k] for k in HANDOFF}
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
