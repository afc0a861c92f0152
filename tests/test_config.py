"""Tests for polyinr.core.config: loading, overrides, errors that name the key, the frozen
surface."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from polyinr.core import config, params
from polyinr.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
IMAGENET = ROOT / "configs" / "imagenet-256.yaml"
SECTIONS = ["data", "generator", "discriminator", "train", "eval", "storage", "tracking"]
# The config surface, frozen: adding, removing or renaming a key is a deliberate act that
# edits this list, params.yaml and configs/ together.
SURFACE = {
    "data": "source out_dir encoding jpeg_quality strict workers scan_cache demo_kind demo_classes "
    "demo_per_class demo_size demo_seed",
    "generator": "conditional num_classes z_dim w_dim embed_dim cond_dim mapping_lr_mult hidden "
    "levels clamp w_avg_beta mixing",
    "discriminator": "networks pretrained weights_dir input_size proj_channels head_channels "
    "embed_dim cmap_dim diffaugment blur_sigma blur_kimg",
    "train": "stages batch batch_gpu lr_g lr_d betas eps ema_kimg ema_rampup mirror seed "
    "snapshot_kimg sample_kimg sample_psi workers embed_init precision checkpoint_levels carry_d",
    "eval": "protocol num_samples batch psi seed inception_weights vgg16_weights "
    "allow_random_weights random_seed reference_npz cache_dir every_kimg train_samples "
    "grid_classes grid_seeds grid_psi",
    "storage": "uri endpoint_url keep retries multipart_mb staging_dir outage_minutes",
    "tracking": "uri experiment artifact_location run_name",
}
GENERATOR_KEYS = SURFACE["generator"].split()
PARAMS_FILES = [PARAMS, *sorted((ROOT / "configs").glob("*.yaml"))]


def raw_params() -> dict:
    return yaml.safe_load(PARAMS.read_text())


@pytest.mark.parametrize("path", [PARAMS, IMAGENET], ids=["params", "imagenet-256"])
def test_shipped_params_files_load(path):
    """params.yaml and the paper's configs/imagenet-256.yaml both validate into a Config."""
    cfg = config.load(path)
    assert isinstance(cfg, config.Config)
    assert [s.resolution for s in cfg.train.stages][-2:] in ([16, 32], [128, 256])


def test_imagenet_config_is_the_papers_generator():
    """configs/imagenet-256.yaml holds the paper's generator (C 1024, w 512, 10 levels, 1000)."""
    g = config.load(IMAGENET).generator
    assert (g.hidden, g.w_dim, g.z_dim, g.levels, g.num_classes) == (1024, 512, 64, 10, 1000)
    assert (g.embed_dim, g.cond_dim, g.conditional) == (320, 64, True)


@pytest.mark.parametrize("path", [PARAMS, IMAGENET], ids=["params", "imagenet-256"])
def test_to_dict_from_dict_round_trip(path):
    """from_dict(to_dict(cfg)) == cfg, and to_dict gives plain YAML-dumpable types."""
    cfg = config.load(path)
    raw = params.to_dict(cfg)
    assert config.from_dict(raw) == cfg
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw


def test_override_applies_with_its_type():
    """`train.batch=16` sets an int; float overrides parse; the rest is unchanged."""
    base = config.load(PARAMS)
    cfg = config.load(PARAMS, ["train.batch=16", "train.lr_g=3.0e-4", "storage.keep=5"])
    assert cfg.train.batch == 16 and isinstance(cfg.train.batch, int)
    assert cfg.train.lr_g == pytest.approx(3.0e-4) and isinstance(cfg.train.lr_g, float)
    assert cfg.storage.keep == 5
    assert cfg.generator == base.generator and cfg.train.seed == base.train.seed


def test_override_of_nested_list_builds_stages():
    """A flow-style YAML list override replaces train.stages with typed Stage entries."""
    cfg = config.load(
        PARAMS, ["train.stages=[{resolution: 16, kimg: 1}, {resolution: 32, kimg: 2}]"]
    )
    assert [(s.resolution, s.kimg) for s in cfg.train.stages] == [(16, 1.0), (32, 2.0)]
    assert isinstance(cfg.train.stages[1].kimg, float)


def test_int_given_for_float_is_widened():
    """An int where a float is expected (`train.lr_d=1`) becomes a float, not an error."""
    cfg = config.load(PARAMS, ["train.lr_d=1"])
    assert cfg.train.lr_d == 1.0 and isinstance(cfg.train.lr_d, float)


def test_unknown_section_names_it_and_lists_sections():
    """An unknown top-level section is an error naming it and every valid section."""
    raw = raw_params()
    raw["optimizer"] = {"lr": 1.0}
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert "optimizer" in str(e.value)
    assert all(s in str(e.value) for s in SECTIONS)


def test_unknown_section_in_override_is_an_error():
    """`optimizer.lr=1` names the unknown section and lists the valid ones."""
    with pytest.raises(ConfigError) as e:
        config.load(PARAMS, ["optimizer.lr=1"])
    assert "optimizer" in str(e.value)
    assert all(s in str(e.value) for s in SECTIONS)


def test_unknown_key_names_it_and_lists_valid_keys():
    """An unknown key in a section names `section.key` and lists that section's keys."""
    raw = raw_params()
    raw["generator"]["width"] = 64
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert "generator.width" in str(e.value)
    assert all(k in str(e.value) for k in GENERATOR_KEYS)


def test_unknown_key_in_override_names_it_and_lists_valid_keys():
    """`generator.width=64` is refused (not silently added), naming the valid keys."""
    with pytest.raises(ConfigError) as e:
        config.load(PARAMS, ["generator.width=64"])
    assert "generator.width" in str(e.value)
    assert all(k in str(e.value) for k in GENERATOR_KEYS)


def test_missing_key_names_it_and_lists_valid_keys():
    """A section without one of its keys names the missing key; there are no defaults."""
    raw = raw_params()
    del raw["generator"]["hidden"]
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert "generator.hidden" in str(e.value)
    assert all(k in str(e.value) for k in GENERATOR_KEYS)


def test_missing_section_names_it():
    """A params mapping without a section names the missing section."""
    raw = raw_params()
    del raw["tracking"]
    with pytest.raises(ConfigError, match="tracking"):
        config.from_dict(raw)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("generator.hidden=abc", "generator.hidden", "int"),
        ("train.lr_g=2e-4", "train.lr_g", "float"),
        ("train.mirror=1", "train.mirror", "true or false"),
        ("generator.hidden=true", "generator.hidden", "int"),
        ("train.betas=0.5", "train.betas", "list"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, key, expected):
    """A value of the wrong type is an error naming the key and the type it needs."""
    with pytest.raises(ConfigError) as e:
        config.load(PARAMS, [override])
    assert key in str(e.value)
    assert expected in str(e.value)


def test_float_written_2e_4_hints_at_the_yaml_pitfall():
    """PyYAML reads `2e-4` as a string: the error says to write 2.0e-4."""
    raw = raw_params()
    raw["train"]["lr_d"] = "2e-4"
    with pytest.raises(ConfigError, match="2.0e-4"):
        config.from_dict(raw)


def test_dataclass_validation_surfaces_as_config_error():
    """A value the component itself rejects (keep=0) is a ConfigError naming the section."""
    with pytest.raises(ConfigError, match="storage"):
        config.load(PARAMS, ["storage.keep=0"])


@pytest.mark.parametrize("bad", ["noequals", "train=16", "=16", "train..batch=1"])
def test_malformed_override_is_an_error(bad):
    """An override not of the form section.key=value is refused."""
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(PARAMS, [bad])


def test_missing_params_file_is_a_config_error(tmp_path):
    """A params path that does not exist says so."""
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")


def test_flatten_gives_section_dot_key():
    """flatten maps `section.key` to leaf values, lists (train.stages) kept whole."""
    cfg = config.load(PARAMS)
    flat = params.flatten(cfg)
    assert flat["train.batch"] == cfg.train.batch
    assert flat["generator.hidden"] == cfg.generator.hidden
    assert flat["train.stages"] == [
        {"resolution": s.resolution, "kimg": s.kimg} for s in cfg.train.stages
    ]
    assert len(cfg.train.stages) == 2  # the demo is progressive: 16 -> 32
    assert flat["storage.endpoint_url"] is None
    assert all(k.split(".")[0] in SECTIONS and k.count(".") == 1 for k in flat)


def test_config_sections_snapshot():
    """The section names of Config are frozen: changing them is a deliberate act."""
    assert [f for f in config.Config.__dataclass_fields__] == SECTIONS


def test_config_surface_snapshot():
    """The `section.key` names of the dataclasses are exactly the frozen SURFACE list."""
    fields = {
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(config.Config)
        for key in dataclasses.fields(typing.get_type_hints(config.Config)[section.name])
    }
    assert fields == {f"{s}.{k}" for s, keys in SURFACE.items() for k in keys.split()}


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_params_file_sets_exactly_the_surface(path):
    """params.yaml and every file in configs/ list every key of the surface, and no other
    (no key comes from a default, none is silently ignored)."""
    raw = yaml.safe_load(path.read_text())
    keys = {f"{s}.{k}" for s, section in raw.items() for k in section}
    assert keys == {f"{s}.{k}" for s, keys in SURFACE.items() for k in keys.split()}
    assert set(params.flatten(config.load(path))) == keys


def test_importing_config_loads_no_component_and_no_numerics():
    """`import polyinr.core.config` loads no polyinr component (only core's error model and
    params) and none of torch, timm, scipy or numpy: the config is the lowest layer (a flow
    or a CLI can read it for free)."""
    code = (
        "import sys, polyinr.core.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'timm', 'scipy', 'numpy') or m.startswith('polyinr.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    expected = ["polyinr.core", "polyinr.core.config", "polyinr.core.errors", "polyinr.core.params"]
    assert out.strip() == str(expected)


def test_every_named_choice_has_an_implementation():
    """Each name the config accepts (precision, feature network, DiffAugment op) maps to code
    in its component, and each implementation is accepted by the config."""
    from polyinr.model import augment, discriminator
    from polyinr.training import loop

    assert set(loop.DTYPES) == set(config.PRECISIONS)
    assert set(discriminator.NETWORKS) == set(config.FEATURE_NETWORKS)
    assert set(augment.POLICIES) == set(config.DIFFAUGMENT_OPS)


def test_parse_policy_rejects_unknown_ops():
    """parse_policy keeps known names in order and names an unknown op."""
    assert config.parse_policy(" color, cutout ,") == ("color", "cutout")
    assert config.parse_policy("") == ()
    with pytest.raises(ValueError, match="'flip'"):
        config.parse_policy("color,flip")
    with pytest.raises(ConfigError, match="discriminator: unknown DiffAugment op 'flip'"):
        config.load(PARAMS, ["discriminator.diffaugment=color,flip"])


def test_override_with_broken_yaml_is_a_config_error():
    """An unquoted flow mapping split by the shell names the override, not a traceback."""
    with pytest.raises(config.ConfigError, match=r"train\.stages=\[\{resolution:.*not valid YAML"):
        config.load(PARAMS, ["train.stages=[{resolution: 32,"])


def test_params_file_with_broken_yaml_is_a_config_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.batch=0", r"eval: batch must be >= 1"),
        ("train.seed=-1", r"train: seed must be >= 0"),
        ("eval.seed=-3", r"eval: seed and random_seed must be >= 0"),
    ],
)
def test_values_that_would_fail_later_are_refused_at_load_naming_the_key(override, message):
    """eval.batch=0 and negative seeds fail at config load, naming section and key."""
    with pytest.raises(ConfigError, match=message):
        config.load(PARAMS, [override])


def test_duplicate_key_in_a_params_file_names_it(tmp_path):
    """A key given twice in one mapping is an error naming it and both lines, not last-wins."""
    text = PARAMS.read_text().replace("  seed: 0\n", "  seed: 0\n  seed: 5\n", 1)
    assert text != PARAMS.read_text()
    (tmp_path / "params.yaml").write_text(text)
    line = text.splitlines().index("  seed: 5") + 1
    with pytest.raises(ConfigError, match=rf"duplicate key 'seed' \(lines {line - 1} and {line}\)"):
        config.load(tmp_path / "params.yaml")


def test_run_name_hashes_the_params_that_change_the_result():
    """`{params}` in tracking.run_name is a hash of the result-affecting params: a new lr or
    resolution is a new run; where things are stored or logged, how fast data loads and
    lengthening the last stage (how far to train) keep the run; names say what differs."""
    base = config.load(PARAMS)
    name = base.tracking.run_name
    assert name.startswith("demo-") and len(name) == len("demo-") + 8
    new_runs = [
        "train.lr_g=2.0e-4",
        "generator.hidden=64",
        "discriminator.diffaugment=color",
        "data.demo_per_class=8",
        "train.stages=[{resolution: 16, kimg: 5.0}, {resolution: 32, kimg: 3.0}]",
    ]
    for override in new_runs:
        assert config.load(PARAMS, [override]).tracking.run_name != name, override
    same_run = [
        "train.workers=4",
        "train.snapshot_kimg=1.0",
        "storage.uri=s3://bucket/checkpoints",
        "tracking.uri=http://127.0.0.1:5000",
        "eval.num_samples=16",
        "data.out_dir=elsewhere",
        "train.stages=[{resolution: 16, kimg: 4.0}, {resolution: 32, kimg: 5.0}]",
    ]
    for override in same_run:
        assert config.load(PARAMS, [override]).tracking.run_name == name, override
    assert config.load(PARAMS, ["tracking.run_name=fixed"]).tracking.run_name == "fixed"
    changed = config.load(PARAMS, ["train.lr_g=2.0e-4", "generator.levels=4"])
    diff = params.identity_diff(params.identity(base), params.identity(changed))
    assert diff == ["generator.levels: 10 -> 4", "train.lr_g: 0.00025 -> 0.0002"]


def test_the_run_identity_is_exactly_the_keys_that_change_the_weights():
    """Every params key is on one side: in the identity (the run-name hash, the resume check)
    or out of it. The FID during training's keys are in when it picks the stage hand-off."""
    out = {
        "data.out_dir",
        "data.workers",  # the FFCV file's bytes do not depend on it (tests/test_data.py)
        "data.scan_cache",
        "data.strict",
        "discriminator.weights_dir",
        "train.workers",
        "train.sample_kimg",
        "train.sample_psi",
        "train.checkpoint_levels",
    }
    handoff = {"eval.every_kimg", "eval.train_samples", "eval.seed", "eval.psi"}
    handoff |= {"train.snapshot_kimg"}
    sections = ("data.", "generator.", "discriminator.", "train.")
    every = set(params.flatten(config.load(PARAMS)))
    weights = {k for k in every if k.startswith(sections)} - out - handoff
    assert config.load(PARAMS).eval.every_kimg == 0  # the demo: FID during training off
    assert set(params.identity(config.load(PARAMS))) == weights
    fid_on = config.load(PARAMS, ["eval.every_kimg=1.0"])
    assert set(params.identity(fid_on)) == weights | handoff
    one_stage = config.load(
        PARAMS, ["eval.every_kimg=1.0", "train.stages=[{resolution: 16, kimg: 1.0}]"]
    )
    assert set(params.identity(one_stage)) == weights  # no hand-off: the FID is only logged
    for override in ("eval.train_samples=128", "train.snapshot_kimg=0.5", "eval.every_kimg=2.0"):
        changed = config.load(PARAMS, ["eval.every_kimg=1.0", override])
        assert params.fingerprint(changed) != params.fingerprint(fid_on), override
    assert params.fingerprint(config.load(PARAMS, ["data.workers=1"])) == params.fingerprint(
        config.load(PARAMS, ["data.workers=2"])
    )
